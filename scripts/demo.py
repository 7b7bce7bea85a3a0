"""The main job on a fresh machine (``make demo``): registry, service, embed the sample faces, report.

Starts an MLflow server on loopback (sqlite + local artifacts under ``var/demo/mlflow``), registers the
default face model as a version (champion on first run; re-runs reuse it), starts the embedding
service serving ``champion`` from the registry, embeds ``data/sample`` with the ``facexplain embed``
CLI, prints per-identity verification under the model's stored rule, and stops everything on exit
(Ctrl-C included).
"""

from __future__ import annotations

import subprocess
import sys
import time
from itertools import combinations
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from services.client.launcher import start_mlflow, start_service  # noqa: E402
from services.kit.registry import DEFAULT_FR_MODEL  # noqa: E402


def main() -> int:
    out_dir = REPO / "var" / "demo"
    out_dir.mkdir(parents=True, exist_ok=True)
    sample = REPO / "data" / "sample"
    t0 = time.monotonic()
    print("starting the MLflow registry (10-20 s) ...", flush=True)
    mlflow = start_mlflow(out_dir / "mlflow")
    svc = None
    try:
        print(f"MLflow UI: {mlflow.uri}")
        subprocess.run(
            [sys.executable, "-m", "services.client.cli", "registry", "register-defaults", "--uri", mlflow.uri],
            cwd=REPO,
            check=True,
        )
        print("starting the embedding service (serving champion from the registry) ...", flush=True)
        svc = start_service(
            "embedding",
            out_dir,
            env={"FACEXPLAIN_REGISTRY_URI": mlflow.uri, "FACEXPLAIN_MODEL_NAME": DEFAULT_FR_MODEL},
        )
        print(f"embedding service on {svc.address}, metrics on :{svc.metrics_port}, log {svc.log_path}")
        npz = out_dir / "templates.npz"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "services.client.cli",
                "embed",
                str(sample),
                "--target",
                svc.address,
                "--out",
                str(npz),
            ],
            cwd=REPO,
            check=True,
        )
        data = np.load(npz)
        paths = data["paths"].tolist()
        t = data["templates"]
        ident = [p.rsplit("/", 1)[0] for p in paths]
        same, diff = [], []
        for i, j in combinations(range(len(paths)), 2):
            (same if ident[i] == ident[j] else diff).append(float(np.linalg.norm(t[i] - t[j])))
        acc_same = np.mean(np.asarray(same) < 0.6)
        rej_diff = np.mean(np.asarray(diff) >= 0.6)
        print(f"\nmodel {data['model']} version {data['version']}: {len(paths)} templates of {len(set(ident))} people")
        print(f"same person  : {len(same):4d} pairs, mean L2 {np.mean(same):.3f}, accepted {acc_same:.1%} (L2 < 0.6)")
        print(f"different    : {len(diff):4d} pairs, mean L2 {np.mean(diff):.3f}, rejected {rej_diff:.1%}")
        if len(data["failed"]):
            print("no face found in:", ", ".join(f for f, _ in data["failed"]))
        print(f"\ntemplates written to {npz}  ({time.monotonic() - t0:.0f} s)")
    finally:
        if svc is not None:
            print(f"embedding service stopped (exit {svc.stop()})")
        mlflow.stop()
        print("MLflow stopped")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        print("\ninterrupted: everything the demo started has been stopped", file=sys.stderr)
        raise SystemExit(130) from None
