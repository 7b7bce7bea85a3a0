"""Regenerate tests/data/faceplugin_ort.npz: faceplugin's MobileFaceNet run by onnxruntime itself, the
reference the torch replay (facexplain.models.onnx_graph) is held to (tests/unit/facexplain/models/test_faceplugin.py).

Chips: the third model's own 112x112 five-point chips (``third_fr_pipeline``) of the first image of the first
``--faces`` CelebA identities (sorted), rounded to uint8 so both sides see identical inputs, normalised as the
package does (``(x - 127) / 128``, RGB). onnxruntime 1.31.1 (CPU) is the runtime the package itself runs
(as onnxruntime-web); it is never a dependency of facexplain, so install it beside the project for this only::

    .venv/bin/pip install onnxruntime==1.31.1
    PYTHONPATH=. .venv/bin/python scripts/make_faceplugin_fixture.py
    .venv/bin/pip uninstall -y onnxruntime

All ``--faces`` are compared (the max abs difference is printed and recorded); the first ``--keep`` are
stored, to keep the fixture small.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from facexplain.artifacts.embedder import third_fr_pipeline
from facexplain.models.faceplugin import SOURCE, model_path, normalise, onnx_net
from facexplain.paths import REPO_ROOT
from scripts.make_faceres_fixture import first_face_chips, save_fixture

FIXTURE = REPO_ROOT / "tests" / "data" / "faceplugin_ort.npz"


def main() -> None:
    import onnxruntime as ort

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--celeba", type=Path, default=REPO_ROOT.parent / "shared" / "data" / "celeba_subset")
    ap.add_argument("--faces", type=int, default=24)
    ap.add_argument("--keep", type=int, default=8)
    args = ap.parse_args()
    x = first_face_chips(third_fr_pipeline(), args.celeba, args.faces)
    fed = normalise(x).numpy().astype(np.float32)
    session = ort.InferenceSession(str(model_path()), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    ref = np.concatenate([session.run(None, {name: fed[i : i + 1]})[0] for i in range(len(fed))])
    with torch.no_grad():
        ours = onnx_net()(torch.from_numpy(fed)).numpy()
    diff = float(np.abs(ref - ours).max())
    print(f"{len(x)} faces: max abs difference torch vs onnxruntime {diff:.3g} (outputs up to {np.abs(ref).max():.3g})")
    meta = {
        "faces_compared": len(x),
        "max_abs_diff_all": diff,
        "runtime": f"onnxruntime {ort.__version__}, CPUExecutionProvider, one chip per run",
        "model": SOURCE,
        "fed": "RGB, (x - 127) / 128",
    }
    save_fixture(FIXTURE, x[: args.keep], ref[: args.keep], meta)


if __name__ == "__main__":
    main()
