"""``facexplain train decoder``: flags for every setting of ``TrainDecoderConfig``, presets underneath."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from facexplain.paths import var_dir
from training.common import (
    add_config_arguments,
    config_from_args,
    print_registration,
    print_summary_json,
    stop_on_sigterm,
)
from training.decoder.config import PERCEPTUAL_NETWORKS, PRESETS, TrainDecoderConfig
from training.distributed import env_rank


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="named overrides (explicit flags win)")
    p.add_argument(
        "--registry",
        default=os.environ.get("FACEXPLAIN_REGISTRY_URI", ""),
        help="MLflow tracking/registry URI (FACEXPLAIN_REGISTRY_URI)",
    )
    p.add_argument("--out", default="", help="checkpoints, bundle and summary (default var/train/decoder-<preset>)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt and its MLflow run")
    p.add_argument("--no-register", action="store_true", help="train and evaluate only")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    helps = {
        "fr_model": "FR model to invert: NAME@ALIAS or NAME@VERSION",
        "data": "DIR or DIR,LABELS.csv (DIR with images/ and labels.csv is read as CelebA)",
        "perceptual": "white_box (a layer of the FR model inverted), dlib_resnet (that layer of the default model's "
        "net, for any FR model), hse_faceres / faceplugin (black box: an inner map of the independent HSE FaceRes / "
        "faceplugin MobileFaceNet) or none",
        "alias": "alias for the new version: auto (champion if none, else challenger), champion, challenger or ''",
        "max_minutes": "stop after the epoch that crosses this budget (0 = none)",
        "ema": "moving average of the weights, e.g. 0.998; validated, kept and registered (0 = off)",
        "hflip": "true: add every training face mirrored, re-embedded by the FR model (doubles the data)",
        "region_blends": "true: add every training face with one region of another training face blended in, "
        "re-embedded (teaches local rendering of region changes)",
        "region_pairs": "weight of the pair-difference term: the decoded change from a face to its region blend "
        "should equal the real one (needs --region-blends true; 0 = off)",
        "chips_from": "a face set .npz of DATA from another FR model with the same front end: re-embed its chips "
        "(auto: the newest cached one)",
    }
    add_config_arguments(p, TrainDecoderConfig, helps, choices={"perceptual": PERCEPTUAL_NETWORKS})


def run_from_args(args: argparse.Namespace) -> int:
    from training.decoder.run import train_decoder  # torch: the CLI builds its parser from this module

    stop_on_sigterm()

    if not args.registry:
        print(
            "error: no registry: pass --registry URI or set FACEXPLAIN_REGISTRY_URI (try `make mlflow`)",
            file=sys.stderr,
        )
        return 2
    cfg = config_from_args(args, TrainDecoderConfig, PRESETS)
    out = Path(args.out) if args.out else var_dir() / "train" / f"decoder-{args.preset}"
    summary = train_decoder(
        cfg,
        registry_uri=args.registry,
        out_dir=out,
        resume=args.resume,
        register=not args.no_register,
        progress=not args.quiet,
    )
    if env_rank() != 0:  # under torchrun: rank 0 reports the run; the others trained their shards
        return 0
    m = summary.metrics
    print(
        f"trained {summary.epochs_run} epochs ({summary.stopped}), best epoch {summary.best_epoch}, "
        f"{summary.train_images_per_s:.0f} img/s on {summary.device}"
    )
    if "test_psnr" in m:
        print(
            f"unseen identities ({summary.faces['test']} faces): PSNR {m['test_psnr']:.2f} dB "
            f"(mean face {m['baseline_mean_face_psnr']:.2f}), SSIM {m['test_ssim']:.3f}, "
            f"identity cosine {m['test_identity_cosine']:.3f}, accepted {m['test_accepted']:.1%}, "
            f"rank-1 {m['test_rank1']:.1%}; quality gates {'passed' if summary.gates_passed else 'NOT passed'}"
        )
        if "test_accepted_second" in m:  # the independent FR model's verdict (reported, not a gate)
            print(
                f"  second FR model: identity cosine {m.get('test_identity_cosine_second', float('nan')):.3f}, "
                f"accepted {m['test_accepted_second']:.1%}"
            )
        failed = [k for k, ok in summary.gates.items() if not ok]
        if failed:
            print("  gates missed: " + ", ".join(failed))
    print_registration(summary.registered)
    print(f"MLflow run {summary.run_id}; summary in {out / 'summary.json'}")
    print_summary_json(summary)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="facexplain train decoder", description="Train a Deep Face Decoder.")
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
