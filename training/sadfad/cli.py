"""``facexplain train sadfad``: flags for every setting of ``TrainSADFADConfig``, presets underneath."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from facexplain.paths import var_dir
from training import common
from training.common import add_config_arguments, print_summary_json, stop_on_sigterm
from training.distributed import require_single_process
from training.sadfad.config import PRESETS, VARIANT_NAMES, TrainSADFADConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="named overrides (explicit flags win)")
    p.add_argument(
        "--registry",
        default=os.environ.get("FACEXPLAIN_REGISTRY_URI", ""),
        help="MLflow tracking URI (FACEXPLAIN_REGISTRY_URI); empty: train without tracking",
    )
    p.add_argument(
        "--out", default="", help="checkpoints, model and summary (default var/train/sadfad-<preset>-<variant>)"
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt and its MLflow run")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--no-register", action="store_true", help="train and evaluate only (no bundle, no version)")
    helps = {
        "data": "DIR or DIR,LABELS.csv (DIR with images/ and labels.csv is read as CelebA)",
        "faceset": "a cached face set .npz to train on instead of DATA",
        "variant": f"one of {', '.join(VARIANT_NAMES)}",
        "fad_keep": "t, the representation elements FAD keeps per batch (0: 260/320 of n_filters)",
        "max_steps": "stop after this many optimiser steps in total (0 = whole epochs)",
        "max_minutes": "stop after the epoch that crosses this budget (0 = none)",
    }
    add_config_arguments(p, TrainSADFADConfig, helps, {"variant": VARIANT_NAMES, "optimizer": ("adam", "sgd")})


def config_from_args(args: argparse.Namespace) -> TrainSADFADConfig:
    return common.config_from_args(args, TrainSADFADConfig, PRESETS)


def run_from_args(args: argparse.Namespace) -> int:
    from training.sadfad.run import train_sadfad  # torch: the CLI builds its parser from this module

    require_single_process("sadfad")  # no DDP here yet: N ranks would register N copies
    stop_on_sigterm()
    cfg = config_from_args(args)
    out = Path(args.out) if args.out else var_dir() / "train" / f"sadfad-{args.preset}-{cfg.variant}"
    if not args.registry:
        print("note: no --registry / FACEXPLAIN_REGISTRY_URI: training without MLflow tracking")
    summary = train_sadfad(
        cfg,
        out_dir=out,
        tracking_uri=args.registry or None,
        resume=args.resume,
        progress=not args.quiet,
        register=not args.no_register,
    )
    m = summary.metrics
    print(
        f"{summary.variant}: {summary.epochs_run} epochs, {summary.steps} steps ({summary.stopped}), "
        f"best epoch {summary.best_epoch}, {summary.train_images_per_s:.0f} img/s on {summary.device}"
    )
    for side in ("val", "test"):
        if f"{side}_clean_auc" in m:
            print(
                f"  {side} ({summary.faces[side]} faces, unseen identities): AUC clean {m[f'{side}_clean_auc']:.3f} "
                f"occluded {m.get(f'{side}_occluded_auc', float('nan')):.3f}; TAR@FAR1% clean "
                f"{m.get(f'{side}_clean_tar_far1', float('nan')):.3f} occluded "
                f"{m.get(f'{side}_occluded_tar_far1', float('nan')):.3f}; peak std (pos) "
                f"{m.get(f'{side}_peak_pos_std_mean', float('nan')):.2f} px"
            )
    print(f"model in {summary.model_file}; summary in {out / 'summary.json'}")
    if summary.run_id:
        print(f"MLflow run {summary.run_id} (experiment facexplain-sadfad)")
    print_summary_json(summary)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="facexplain train sadfad", description="Train an interpretable FR net with the SAD/FAD losses."
    )
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
