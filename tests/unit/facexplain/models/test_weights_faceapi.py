"""Every face-api weight manifest shipped with 1.7.15 loads completely and decodes to finite values."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from facexplain.models.weights import load_faceapi_weights
from facexplain.paths import faceapi_model_dir

_BYTES = {"float32": 4, "int32": 4, "uint8": 1, "uint16": 2, "float16": 2}
EXPECTED_MODELS = {
    "age_gender_model",
    "face_expression_model",
    "face_landmark_68_model",
    "face_landmark_68_tiny_model",
    "face_recognition_model",
    "ssd_mobilenetv1_model",
    "tiny_face_detector_model",
}


def _manifests() -> list[Path]:
    return sorted(faceapi_model_dir().glob("*-weights_manifest.json"))


def _model_name(manifest: Path) -> str:
    return manifest.name.removesuffix("-weights_manifest.json")


def test_all_models_present() -> None:
    assert {_model_name(m) for m in _manifests()} >= EXPECTED_MODELS


@pytest.mark.parametrize("manifest", _manifests(), ids=_model_name)
def test_manifest_loads_exactly(manifest: Path) -> None:
    groups = json.loads(manifest.read_text())
    specs = [spec for group in groups for spec in group["weights"]]
    shard_bytes = sum((manifest.parent / p).stat().st_size for group in groups for p in group["paths"])
    # Independent of the loader: the manifest's own byte count must cover the shards exactly.
    declared = sum(
        math.prod(spec["shape"]) * _BYTES[spec.get("quantization", {}).get("dtype", spec["dtype"])] for spec in specs
    )
    assert declared == shard_bytes

    weights = load_faceapi_weights(_model_name(manifest))
    assert list(weights) == [spec["name"] for spec in specs]
    for spec in specs:
        tensor = weights[spec["name"]]
        assert tensor.dtype == torch.float32
        assert list(tensor.shape) == spec["shape"], spec["name"]
        assert torch.isfinite(tensor).all(), spec["name"]
