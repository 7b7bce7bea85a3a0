"""Accessory probes as a registered model (issue 6): trained by training/probes/run.py on a small CelebA
subset, tracked and registered in a real MLflow server, then loaded back from the registry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from facexplain.artifacts.probes import DEFAULT_PROBES_MODEL
from registry import CHAMPION, REQUIRED_TAGS, Registry

pytestmark = pytest.mark.integration


def test_cli_parses_train_probes() -> None:
    from cli.main import build_parser

    args = build_parser(with_training=True).parse_args(
        ["train", "probes", "--data", "d", "--labels", "Eyeglasses,Smiling", "--max-images", "300", "--out", "o"]
    )
    assert (args.pipeline, args.labels, args.max_images, args.data, args.out) == (
        "probes",
        "Eyeglasses,Smiling",
        300,
        "d",
        "o",
    )


def test_train_register_and_load(celeba_attr_faceset, mlflow, registry: Registry, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from facexplain.artifacts.probes import KIND_ATTRIBUTE_PROBES, load_probe_bundle
    from facexplain.attributes.catalog import FaceBatch
    from training.probes.config import TrainProbesConfig
    from training.probes.run import train_probes

    torch.set_num_threads(1)
    faces = celeba_attr_faceset.subset(range(0, len(celeba_attr_faceset), 2))  # ~280 faces
    cfg = TrainProbesConfig(labels="Eyeglasses,Smiling", device="cpu", c_grid="0.001,0.01")
    summary = train_probes(cfg, out_dir=tmp_path / "run", tracking_uri=mlflow.uri, progress=False, faces=faces)
    assert summary.run_id and summary.registered["name"] == DEFAULT_PROBES_MODEL
    assert summary.registered["alias"] == CHAMPION  # the model's first version serves
    for key in ("test_eyeglasses_balanced_accuracy", "test_degraded_smiling_balanced_accuracy", "C_smiling"):
        assert np.isfinite(summary.metrics[key]), key

    info = registry.resolve(DEFAULT_PROBES_MODEL, CHAMPION)
    assert info.version == summary.registered["version"]
    assert info.tags["kind"] == KIND_ATTRIBUTE_PROBES and info.tags["labels"] == "Eyeglasses,Smiling"
    assert all(info.tags.get(t) for t in REQUIRED_TAGS[KIND_ATTRIBUTE_PROBES])
    run = registry.client.get_run(summary.run_id)
    assert run.data.params["labels"] == "Eyeglasses,Smiling"
    assert "test_eyeglasses_balanced_accuracy" in run.data.metrics

    downloaded = registry.download(info, tmp_path / "cache")
    est = load_probe_bundle(downloaded)
    local = load_probe_bundle(tmp_path / "run" / "bundle")
    batch = FaceBatch(faces.chips[:4].float() / 255.0, faces.landmarks[:4])
    got = est.estimate(batch, ["eyeglasses", "smiling"])
    want = local.estimate(batch, ["eyeglasses", "smiling"])
    for name in ("eyeglasses", "smiling"):
        assert got[name].shape == (4, 1)
        np.testing.assert_array_equal(got[name], want[name])
    assert [s.estimator for s in est.specs] == [DEFAULT_PROBES_MODEL] * 2
