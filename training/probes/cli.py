"""``facexplain train probes``: flags for every setting of ``TrainProbesConfig``, presets underneath."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from facexplain.paths import var_dir
from training.common import (
    add_config_arguments,
    config_from_args,
    print_registration,
    print_summary_json,
    stop_on_sigterm,
)
from training.distributed import require_single_process
from training.probes.config import PRESETS, TrainProbesConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default="celeba", help="named overrides (explicit flags win)")
    p.add_argument(
        "--registry",
        default=os.environ.get("FACEXPLAIN_REGISTRY_URI", ""),
        help="MLflow tracking/registry URI (FACEXPLAIN_REGISTRY_URI); empty: fit and write the bundle only",
    )
    p.add_argument("--out", default="", help="bundle and summary (default var/train/probes)")
    p.add_argument("--no-register", action="store_true", help="track the run but register no version")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    helps = {
        "data": "DIR or DIR,LABELS.csv (DIR with images/ and labels.csv is read as CelebA)",
        "labels": "CelebA labels to probe, comma-separated",
        "max_images": "use a label-stratified sample of this many images (0 = all)",
        "features": "feature blocks <net>:<crop>, comma-separated (nets: expression, landmarks, age_gender; "
        "crops: face, eyes)",
        "c_grid": "inverse L2 strengths tried per label, comma-separated",
        "alias": "alias for the new version: auto (champion if none, else challenger), champion, challenger or ''",
    }
    add_config_arguments(p, TrainProbesConfig, helps)


def run_from_args(args: argparse.Namespace) -> int:
    from training.probes.run import train_probes  # torch: the CLI builds its parser from this module

    require_single_process("probes")  # no DDP here yet: N ranks would register N copies
    stop_on_sigterm()
    cfg = config_from_args(args, TrainProbesConfig, PRESETS)
    if not args.registry:
        print("note: no --registry / FACEXPLAIN_REGISTRY_URI: fitting without MLflow tracking or registration")
    out = Path(args.out) if args.out else var_dir() / "train" / "probes"
    summary = train_probes(
        cfg,
        out_dir=out,
        tracking_uri=args.registry or None,
        register=not args.no_register,
        progress=not args.quiet,
    )
    m = summary.metrics
    print(
        f"{summary.faces['train']} training / {summary.faces['test']} held-out faces "
        f"({summary.faces['identities_test']} unseen identities), features {summary.seconds['features']:.0f} s "
        f"on {summary.device}"
    )
    for label in summary.labels:
        a = label.lower()
        c = m[f"C_{a}"]
        print(
            f"  {a:22s} balanced accuracy {m[f'test_{a}_balanced_accuracy']:.3f} clean, "
            f"{m[f'test_degraded_{a}_balanced_accuracy']:.3f} degraded; AUC {m[f'test_{a}_auc']:.3f} (C {c:g})"
        )
    if summary.gates:
        print("gates (>= 0.85 clean): " + ", ".join(f"{k} {'ok' if v else 'MISSED'}" for k, v in summary.gates.items()))
    print_registration(summary.registered)
    print(f"bundle in {out / 'bundle'}; summary in {out / 'summary.json'}")
    print_summary_json(summary)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="facexplain train probes", description="Fit accessory/appearance probes.")
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
