"""The third FR model (faceplugin's 512-d MobileFaceNet, an ONNX graph from npm): the torch replay against
onnxruntime's own outputs, its pin, and its embedder bundle (registered as an auditor's ONNX program).

tests/data/faceplugin_ort.npz holds 8 real CelebA chips (uint8, the model's own 112x112 five-point
alignment) and the templates onnxruntime 1.31.1 (CPU) computed for them; regenerate it with
``scripts/make_faceplugin_fixture.py`` (its docstring says how). On the 24 faces that script compares, the
largest difference was recorded in the fixture (``max_abs_diff_all``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from facexplain.artifacts.bundle import read_metadata
from facexplain.artifacts.embedder import THIRD_FR_MODEL, load_bundle, save_embedder_bundle, third_fr_pipeline
from facexplain.data.faces import load_image
from facexplain.models.faceplugin import MODEL_FILE, MODEL_SHA256, TEMPLATE_DIM, model_path, normalise, onnx_net
from facexplain.paths import REPO_ROOT

FIXTURE = REPO_ROOT / "tests" / "data" / "faceplugin_ort.npz"


@pytest.fixture(scope="module")
def fixture() -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as data:
        return {k: data[k] for k in data.files}


def _fed(chips: np.ndarray) -> torch.Tensor:
    return normalise(torch.from_numpy(chips))


def test_replay_matches_onnxruntime(fixture: dict[str, np.ndarray]) -> None:
    ref = fixture["features"]
    with torch.no_grad():
        ours = onnx_net()(_fed(fixture["chips"])).numpy()
    diff = float(np.abs(ours - ref).max())
    meta = json.loads(str(fixture["meta"]))
    print(
        f"\nmax abs diff torch vs onnxruntime on {len(ref)} chips: {diff:.3g} "
        f"({meta['faces_compared']}-face script: {meta['max_abs_diff_all']:.3g})"
    )
    assert ours.shape == (len(ref), TEMPLATE_DIM)
    assert diff < 1e-4 * max(1.0, float(np.abs(ref).max()))
    assert float(np.abs(ref[0] - ref[1]).max()) > 100 * diff  # distinct faces, distinct templates


def test_a_different_model_file_is_refused(tmp_path: Path) -> None:
    shutil.copy2(model_path(), tmp_path / MODEL_FILE)
    with (tmp_path / MODEL_FILE).open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match="not the pinned"):
        model_path(tmp_path)
    with pytest.raises(FileNotFoundError, match="fetch_faceplugin"):
        model_path(tmp_path / "missing")


def test_bundle_carries_the_published_file_and_serves_its_templates(
    tmp_path: Path, fixture: dict[str, np.ndarray], celeba_dir: Path
) -> None:
    pipe = third_fr_pipeline()
    meta = save_embedder_bundle(tmp_path / "b", pipe, name=THIRD_FR_MODEL)
    spec = meta["components"]["recognition"]
    assert (spec["format"], spec["file"]) == ("onnx", "weights/recognition.onnx")
    assert "faceplugin-face-recognition-js@0.0.1" in meta["source"]
    assert hashlib.sha256((tmp_path / "b" / spec["file"]).read_bytes()).hexdigest() == MODEL_SHA256
    assert read_metadata(tmp_path / "b")["alignment"]["scheme"] == "arcface_5pt"
    loaded = load_bundle(tmp_path / "b")
    with torch.no_grad():
        chips = torch.from_numpy(fixture["chips"]).float()
        torch.testing.assert_close(loaded.embed_chips(chips), torch.from_numpy(fixture["features"]), atol=1e-4, rtol=0)
    image = load_image(sorted((celeba_dir / "images").glob("*.jpg"))[0])
    a, b = pipe.analyze([image])[0], loaded.analyze([image])[0]
    assert a is not None and b is not None
    torch.testing.assert_close(a.template, b.template)
