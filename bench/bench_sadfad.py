"""SAD/FAD benchmark: the paper's five variants trained alike, compared on held-out identities.

For each variant (base, base-aug, sad, fad, sad+fad) one run of ``train_sadfad`` with the same
preset, seed, split and number of optimiser steps (steps, not minutes: a fair comparison should not
depend on what else the machine was doing), then on the test identities:

* verification AUC and TAR at FAR 1% / 0.1%, clean and with the synthetic occluder;
* the mean peak-location spread of the filters (std of each filter's positive-peak location over
  faces, warped to the frontal template; smaller = more consistent, "more interpretable");
* the mean clean/occluded feature difference per filter (Fig. 6).

Expected from the paper: sad+fad has the smallest spread and the best occluded verification. What
comes out is written as measured to ``bench/results/sadfad-<device>.json``.

    python bench/bench_sadfad.py [--preset cpu] [--steps 300] [--threads 1] [--variants base,sad+fad]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, write
from training.sadfad.config import PRESETS, VARIANT_NAMES, TrainSADFADConfig

REPORTED = (
    "test_clean_auc",
    "test_clean_tar_far1",
    "test_clean_tar_far0.1",
    "test_occluded_auc",
    "test_occluded_tar_far1",
    "test_occluded_tar_far0.1",
    "test_peak_pos_std_mean",
    "test_peak_neg_std_mean",
    "test_peak_pos_location_spread",
    "test_feature_diff_mean",
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu", help="training preset (training/sadfad/config.py)")
    ap.add_argument("--steps", type=int, default=300, help="optimiser steps per variant (same for all)")
    ap.add_argument("--variants", default="", help="comma-separated subset (default: all five)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--faceset",
        default="",
        help="a cached face set .npz of the preset's data (e.g. the one decoder training built); default: build",
    )
    ap.add_argument("--registry", default=os.environ.get("FACEXPLAIN_REGISTRY_URI", ""), help="MLflow URI (optional)")
    ap.add_argument("--out", default="var/bench/sadfad", help="per-variant run folders")
    args = ap.parse_args()

    import torch  # heavy: --help and a bad flag answer before torch loads

    from training.sadfad.run import load_faces, train_sadfad  # torch, likewise

    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [v for v in args.variants.split(",") if v] or list(VARIANT_NAMES)
    base = TrainSADFADConfig().replace(**PRESETS[args.preset])
    base = base.replace(max_steps=args.steps, max_minutes=0.0, epochs=10_000, seed=args.seed, threads=args.threads)
    if args.faceset:
        base = base.replace(faceset=args.faceset)
    faces = load_faces(base, Path("var/cache/facesets"), progress=True)
    rows: list[dict[str, Any]] = []
    for variant in variants:
        cfg = base.replace(variant=variant)
        t0 = time.perf_counter()
        summary = train_sadfad(
            cfg,
            out_dir=Path(args.out) / variant.replace("+", "-"),
            tracking_uri=args.registry or None,
            faces=faces,
            register=False,
        )
        m = summary.metrics
        row: dict[str, Any] = {
            "variant": variant,
            "steps": summary.steps,
            "epochs": summary.epochs_run,
            "best_epoch": summary.best_epoch,
            "train_images_per_s": round(summary.train_images_per_s, 2),
            "wall_s": round(time.perf_counter() - t0, 1),
            "mlflow_run_id": summary.run_id,
        }
        row.update({k: (round(m[k], 4) if math.isfinite(m[k]) else None) for k in REPORTED if k in m})
        rows.append(row)
        print({k: row.get(k) for k in ("variant", "test_clean_auc", "test_occluded_auc", "test_peak_pos_std_mean")})
    payload = {
        "benchmark": "sadfad variants, same preset / seed / split / steps",
        "machine": machine(),
        "preset": args.preset,
        "config": base.to_params(),
        "faces": summary.faces,
        "rows": rows,
    }
    device = "gpu" if torch.cuda.is_available() else "cpu"
    print(write(f"sadfad-{device}", payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
