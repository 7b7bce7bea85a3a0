"""Accessory probes (issue 6): linear probes on frozen face-api features, checked on held-out CelebA people.

Features are extracted once per module (clean chips, plus 64-px blurred copies: training copies at a
random blur, held-out copies at the fixed evaluation blur) and shared by every test here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from facexplain.attributes import accessory as acc
from facexplain.attributes.catalog import FaceBatch, UnknownAttributeError
from facexplain.attributes.pose import image_landmarks
from facexplain.attributes.probe import identity_split
from facexplain.models.landmarks import FaceLandmark68Net

LABELS = list(acc.DEFAULT_LABELS)
TEST_FRACTION = 0.3
SPLIT_SEED = 1  # the pixel probes' split seed (facexplain.attributes.probe.ProbeConfig.split_seed)
BAR = 0.85


@pytest.fixture(scope="module")
def fitted(celeba_attr_faceset) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    torch.set_num_threads(1)
    fs = celeba_attr_faceset
    y = fs.labels[:, [fs.label_names.index(n) for n in LABELS]].numpy().astype(np.float64)
    ids = np.array(fs.identities)
    train, test = identity_split(fs.identities, TEST_FRACTION, SPLIT_SEED)
    assert not set(ids[train]) & set(ids[test])
    ext = acc.FeatureExtractor()
    lms = image_landmarks(FaceLandmark68Net.from_faceapi(), fs.chips)  # as the catalogue finds them
    clean = ext(fs.chips, lms)
    sigma = acc.random_sigmas(len(fs), seed=0)
    sigma[torch.as_tensor(test)] = acc.EVAL_SIGMA
    d_img, d_lm = acc.degrade_faces(fs.chips, lms, sigma)
    degraded = ext(d_img, d_lm)
    probes = acc.fit_probe_set(
        np.concatenate([clean[train], degraded[train]]),
        np.concatenate([y[train], y[train]]),
        np.concatenate([ids[train], ids[train]]).tolist(),
        LABELS,
        ext.blocks,
    )
    return {
        "fs": fs,
        "ext": ext,
        "probes": probes,
        "clean": clean,
        "lms": lms,
        "degraded": degraded,
        "d_img": d_img,
        "d_lm": d_lm,
        "y": y,
        "train": train,
        "test": test,
    }


def test_heldout_balanced_accuracy(fitted: dict[str, Any]) -> None:
    p, test, y = fitted["probes"], fitted["test"], fitted["y"]
    clean = acc.evaluate_probes(p, fitted["clean"][test], y[test])
    degraded = acc.evaluate_probes(p, fitted["degraded"][test], y[test])
    print(f"\n{len(test)} held-out faces; balanced accuracy clean / 64-px blurred (sigma {acc.EVAL_SIGMA}), AUC clean:")
    for label in LABELS:
        c, d = clean[label], degraded[label]
        print(f"  {label:20s} {c['balanced_accuracy']:.3f} / {d['balanced_accuracy']:.3f}  AUC {c['auc']:.3f}")
    for label in ("Eyeglasses", "Smiling"):
        assert clean[label]["balanced_accuracy"] >= BAR, (label, clean[label])
        # Decoded-looking faces are reported, and must stay clearly informative.
        assert degraded[label]["balanced_accuracy"] >= 0.7, (label, degraded[label])


def test_report_and_regularisation(fitted: dict[str, Any]) -> None:
    rep = fitted["probes"].report
    assert set(rep["labels"]) == set(LABELS)
    for label in LABELS:
        assert rep["labels"][label]["C"] in acc.DEFAULT_C_GRID
        assert rep["labels"][label]["positives"] >= acc.MIN_CLASS_COUNT
    assert 0 < rep["val_identities"] < rep["identities"]


def test_save_load_round_trip(fitted: dict[str, Any], tmp_path: Path) -> None:
    p = fitted["probes"]
    p.save(tmp_path / "probes")
    q = acc.LinearProbeSet.load(tmp_path / "probes")
    feats = fitted["clean"][:20]
    np.testing.assert_array_equal(p.probabilities(feats), q.probabilities(feats))
    assert q.labels == p.labels and q.blocks == p.blocks and q.report["labels"] == p.report["labels"]
    (tmp_path / "probes" / acc.PROBES_JSON).write_text('{"format": 99}')
    with pytest.raises(ValueError, match="format"):
        acc.LinearProbeSet.load(tmp_path / "probes")


def test_bundle_round_trip(fitted: dict[str, Any], tmp_path: Path) -> None:
    from facexplain.artifacts import probes as probe_bundles
    from facexplain.artifacts.bundle import BundleError, read_metadata
    from facexplain.artifacts.probes import KIND_ATTRIBUTE_PROBES

    p = fitted["probes"]
    meta = probe_bundles.save_probe_bundle(tmp_path / "b", p)
    assert meta["kind"] == KIND_ATTRIBUTE_PROBES and read_metadata(tmp_path / "b")["labels"] == LABELS
    est = probe_bundles.default_estimator(tmp_path / "b")
    fs = fitted["fs"]
    faces = FaceBatch(fs.chips[:6].float() / 255.0, fitted["lms"][:6])
    got = est.estimate(faces, ["eyeglasses", "smiling"])
    want = p.probabilities(fitted["clean"][:6])
    np.testing.assert_allclose(got["eyeglasses"][:, 0], want[:, LABELS.index("Eyeglasses")], atol=1e-5)
    # A changed weight file is caught by its checksum.
    arr = tmp_path / "b" / "probes" / acc.PROBES_ARRAYS
    arr.write_bytes(arr.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(BundleError, match="corrupt"):
        probe_bundles.load_probe_bundle(tmp_path / "b")


def test_estimator_specs_and_shapes(fitted: dict[str, Any]) -> None:
    est = acc.AccessoryEstimator(fitted["probes"], fitted["ext"])
    names = [s.name for s in est.specs]
    assert names == [n.lower() for n in LABELS]
    assert all(s.group == "accessory" and s.unit == "probability" and s.components == ("p",) for s in est.specs)
    assert not any(s.discrete for s in est.specs)
    # Decoded-size faces (64 px) read the same way as chips.
    faces = FaceBatch(fitted["d_img"][:5], fitted["d_lm"][:5])
    out = est.estimate(faces, ["eyeglasses", "wearing_hat", "smiling"])
    assert set(out) == {"eyeglasses", "wearing_hat", "smiling"}
    for v in out.values():
        assert v.shape == (5, 1) and v.dtype == np.float64 and ((v >= 0) & (v <= 1)).all()
    assert est.estimate(faces, []) == {}


def test_bad_input(fitted: dict[str, Any]) -> None:
    est = acc.AccessoryEstimator(fitted["probes"], fitted["ext"])
    faces = FaceBatch(fitted["d_img"][:2], fitted["d_lm"][:2])
    with pytest.raises(UnknownAttributeError, match="known: eyeglasses"):
        est.estimate(faces, ["eyeglasses", "sunglasses"])
    with pytest.raises(ValueError, match="landmarks"):
        fitted["ext"](fitted["d_img"][:2], fitted["d_lm"][:1])
    with pytest.raises(ValueError, match="images"):
        fitted["ext"](fitted["d_img"][:2, :, :, :10], fitted["d_lm"][:2])
    with pytest.raises(ValueError, match="feature block"):
        acc.FeatureExtractor(["expression:ears"])
    x = fitted["clean"][:40].astype(np.float64)
    ids = [str(i // 2) for i in range(40)]
    few = np.zeros((40, 1))
    few[:3] = 1.0  # three positives: too few to learn from
    with pytest.raises(ValueError, match="at least 5"):
        acc.fit_probe_set(x, few, ids, ["Eyeglasses"], acc.DEFAULT_BLOCKS)
    with pytest.raises(ValueError, match="labels"):
        acc.fit_probe_set(x, np.zeros((39, 1)), ids, ["Eyeglasses"], acc.DEFAULT_BLOCKS)
    with pytest.raises(ValueError, match="0/1"):
        acc.fit_probe_set(x, np.full((40, 1), 2.0), ids, ["Eyeglasses"], acc.DEFAULT_BLOCKS)
    with pytest.raises(ValueError, match="features"):
        fitted["probes"].probabilities(x[:, :10])


def test_training_config_defaults_match_library() -> None:
    from training.probes.config import DEFAULT_BLOCKS, DEFAULT_C_GRID, DEFAULT_LABELS, TrainProbesConfig

    assert tuple(DEFAULT_LABELS.split(",")) == acc.DEFAULT_LABELS
    assert tuple(DEFAULT_BLOCKS.split(",")) == acc.DEFAULT_BLOCKS
    assert tuple(float(c) for c in DEFAULT_C_GRID.split(",")) == acc.DEFAULT_C_GRID
    with pytest.raises(ValueError, match="c_grid"):
        TrainProbesConfig(c_grid="0,1")
