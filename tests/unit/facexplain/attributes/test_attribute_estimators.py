"""Independent attribute estimators (issue 6): face-api expressions, head pose from landmarks, pixel probes.

They are what the direction benchmarks measure decoded faces with, so each is held against something
it did not learn from: CelebA's Smiling labels for the expression net, mirror symmetry and known
synthetic poses for the pose estimate, a held-out identity split for the probes.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from facexplain.attributes.crops import (
    CHIP_FACE_BOX,
    crop_faces,
    fixed_boxes,
    landmark_boxes,
    scale_points,
    to_255,
)
from facexplain.attributes.expression import (
    EXPRESSIONS,
    FaceExpressionNet,
    expression_probabilities,
    happy_log_odds,
    happy_probability,
)
from facexplain.attributes.pose import (
    GENERIC_FACE_3D,
    POSE_POINTS,
    head_pose,
    image_landmarks,
    image_pose,
    mirror_landmarks,
)
from facexplain.attributes.probe import (
    ProbeConfig,
    binary_metrics,
    load_probe,
    probe_logits,
    probe_probabilities,
    save_probe,
    train_probe,
)
from facexplain.data.faceset import read_labels
from facexplain.metrics.verification import roc_auc
from facexplain.models.landmarks import FaceLandmark68Net


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def expression_net() -> FaceExpressionNet:
    return FaceExpressionNet.from_faceapi()


@pytest.fixture(scope="module")
def landmark_net() -> FaceLandmark68Net:
    return FaceLandmark68Net.from_faceapi()


@pytest.fixture(scope="module")
def sample_smiling(sample_faceset: Any, celeba_dir: Path) -> tuple[list[int], np.ndarray]:
    """Indices of the sample's CelebA faces and their Smiling labels (from the subset's labels.csv)."""
    _, attrs, _ = read_labels(celeba_dir / "labels.csv")
    idx = [i for i, p in enumerate(sample_faceset.paths) if p.startswith("celeba/")]
    labels = np.array([attrs[Path(sample_faceset.paths[i]).name]["Smiling"] for i in idx])
    return idx, labels


# -- crops -----------------------------------------------------------------------------------------------


def test_to_255_reads_both_ranges_and_survives_resize_overshoot() -> None:
    x = torch.rand(2, 3, 8, 8)
    assert torch.allclose(to_255(x), x * 255)
    assert torch.equal(to_255((x * 255).round().to(torch.uint8)), (x * 255).round())
    # an antialiased resize of a [0, 1] image overshoots 1 a little: still a [0, 1] image
    assert torch.allclose(to_255(x * 1.0001), (x * 1.0001 * 255).clamp(0, 255))
    big = x * 200 + 50
    assert torch.equal(to_255(big), big)
    with pytest.raises(ValueError, match="RGB"):
        to_255(torch.rand(2, 1, 8, 8))


def test_landmark_boxes_grow_by_twenty_percent_and_crops_agree() -> None:
    pts = torch.tensor([[[10.0, 20.0], [60.0, 100.0]] + [[30.0, 50.0]] * 66])
    assert landmark_boxes(pts).tolist() == [[5.0, 12.0, 65.0, 108.0]]
    images = torch.rand(3, 3, 64, 64) * 255
    same = fixed_boxes(3, 64, CHIP_FACE_BOX)
    batched = crop_faces(images, same)  # one crop for the whole batch
    one_by_one = torch.cat([crop_faces(images[i : i + 1], same[i : i + 1] + 0) for i in range(3)])
    assert batched.shape == (3, 3, 112, 112)
    assert torch.allclose(batched, one_by_one)
    with pytest.raises(ValueError, match="outside"):
        crop_faces(images[:1], torch.tensor([[70.0, 70.0, 90.0, 90.0]]))
    assert scale_points(torch.tensor([-0.5, 149.5]), 150, 64).tolist() == pytest.approx([-0.5, 63.5])


# -- expression ------------------------------------------------------------------------------------------


def test_expression_outputs_are_distributions(sample_faceset: Any, expression_net: FaceExpressionNet) -> None:
    chips = sample_faceset.chips
    with_lm = expression_probabilities(expression_net, chips, sample_faceset.landmarks, batch_size=16)
    fixed = expression_probabilities(expression_net, chips)
    for p in (with_lm, fixed):
        assert p.shape == (len(chips), len(EXPRESSIONS))
        assert bool((p >= 0).all()) and torch.allclose(p.sum(1), torch.ones(len(chips)), atol=1e-5)
    # [0, 1] floats and [0, 255] uint8 are the same image
    again = expression_probabilities(expression_net, chips.float() / 255.0)
    assert torch.allclose(again, fixed, atol=1e-4)
    assert EXPRESSIONS[1] == "happy"


def test_happy_separates_smiling_celeba_faces(
    sample_faceset: Any, sample_smiling: tuple[list[int], np.ndarray], expression_net: FaceExpressionNet
) -> None:
    """AUC of P(happy) vs CelebA's Smiling label on the 30 sample CelebA faces, at 150 px and at 64 px.

    (On 400 faces of the full CelebA subset the AUC is 0.96 at both sizes; see bench_directions estimators.)
    """
    idx, smiling = sample_smiling
    assert 0 < smiling.sum() < len(smiling)
    chips = sample_faceset.chips[idx]
    lm = sample_faceset.landmarks[idx]
    auc = roc_auc(happy_probability(expression_net, chips, lm).numpy(), smiling)
    small = F.interpolate(chips.float() / 255, size=64, mode="bilinear", antialias=True, align_corners=False)
    auc64 = roc_auc(happy_probability(expression_net, small).numpy(), smiling)
    assert auc >= 0.85, auc
    assert auc64 >= 0.85, auc64


def test_happy_log_odds_is_the_probability_unsaturated(
    sample_faceset: Any, sample_smiling: tuple[list[int], np.ndarray], expression_net: FaceExpressionNet
) -> None:
    """The log-odds orders faces exactly as P(happy) does, equals log(p / (1 - p)) where float32 can tell,
    and stays finite and ordered where the probability has rounded to 0 or 1."""
    idx, smiling = sample_smiling
    chips = sample_faceset.chips[idx]
    p = happy_probability(expression_net, chips).double()
    lo = happy_log_odds(expression_net, chips)
    assert lo.dtype == torch.float64 and torch.isfinite(lo).all()
    mid = (p > 1e-4) & (p < 1 - 1e-4)
    assert mid.sum() >= 5
    assert torch.allclose(lo[mid], torch.log(p[mid] / (1 - p[mid])), atol=2e-3)
    assert roc_auc(lo.numpy(), smiling) == roc_auc(p.numpy(), smiling)
    # A surer net (the same one with its last layer x 40): its float32 probabilities round to exactly
    # 0 or 1 for several faces, its log-odds still tell every face apart.
    sharp = copy.deepcopy(expression_net)
    with torch.no_grad():
        sharp.fc.weight.mul_(40)
        sharp.fc.bias.mul_(40)
    p_sharp = happy_probability(sharp, chips)
    lo_sharp = happy_log_odds(sharp, chips)
    assert int(((p_sharp == 0) | (p_sharp == 1)).sum()) >= 2
    assert torch.isfinite(lo_sharp).all() and len(set(lo_sharp.tolist())) == len(lo_sharp)
    unsaturated = (p_sharp > 0) & (p_sharp < 1)
    assert torch.equal(p_sharp[unsaturated] > 0.5, lo_sharp[unsaturated] > 0)


# -- pose ------------------------------------------------------------------------------------------------


def _project(yaw_deg: float, pitch_deg: float = 0.0, size: int = 150) -> torch.Tensor:
    """68 landmarks (NaN except the six pose points) of the generic model seen at a known pose."""
    a, b = math.radians(-yaw_deg), math.radians(pitch_deg)  # yaw's sign is flipped (pose module docstring)
    ry = np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    cam = (ry @ rx @ GENERIC_FACE_3D.T).T + np.array([0.0, 0.0, 1500.0])
    f, c = float(size), (size - 1) / 2
    uv = cam[:, :2] / cam[:, 2:] * f + c
    pts = torch.full((68, 2), 50.0, dtype=torch.float64)  # points the fit does not use
    pts[list(POSE_POINTS)] = torch.from_numpy(uv)
    return pts


def test_head_pose_recovers_known_poses_and_their_sign() -> None:
    for yaw, pitch in ((0.0, 0.0), (20.0, 0.0), (-35.0, 5.0), (10.0, -10.0)):
        got = head_pose(_project(yaw, pitch), 150)
        assert got.tolist() == pytest.approx([yaw, pitch, 0.0], abs=0.05)
    # positive yaw: the nose tip (30) lies right of the outer eye corners' midpoint in the image
    p = _project(20.0)
    assert float(p[30, 0]) > float((p[36, 0] + p[45, 0]) / 2)
    assert torch.isnan(head_pose(torch.full((68, 2), float("nan")), 150)).all()


def test_mirrored_landmarks_negate_yaw_and_roll_exactly(sample_faceset: Any) -> None:
    lm = sample_faceset.landmarks.double()
    mirrored = mirror_landmarks(lm, 150)
    assert torch.equal(mirror_landmarks(mirrored, 150), lm)
    a, b = head_pose(lm, 150), head_pose(mirrored, 150)
    assert torch.allclose(a[:, 0], -b[:, 0], atol=0.05)
    assert torch.allclose(a[:, 1], b[:, 1], atol=0.05)
    assert torch.allclose(a[:, 2], -b[:, 2], atol=0.05)


def test_yaw_of_mirrored_chips_flips_sign(sample_faceset: Any, landmark_net: FaceLandmark68Net) -> None:
    """The landmark net is run on each chip and on its mirror image: turned faces change sign."""
    chips = sample_faceset.chips
    yaw = image_pose(landmark_net, chips)[:, 0]
    yaw_m = image_pose(landmark_net, chips.flip(-1))[:, 0]
    turned = yaw.abs() >= 5
    assert int(turned.sum()) >= 8
    assert bool((torch.sign(yaw[turned]) == -torch.sign(yaw_m[turned])).all())
    # The net is not exactly mirror-symmetric, least so on glasses: |yaw + mirrored yaw| has median 2.0
    # degrees over the 36 sample faces, its largest values on the faces with glasses (7.2 on
    # celeba/id7241/183760.jpg, 5.1 on celeba/id7202/006155.jpg).
    gap = (yaw + yaw_m).abs()
    assert float(gap.median()) < 3.0 and float(gap.max()) < 8.0


def test_frontal_sample_faces_are_near_zero_yaw(sample_faceset: Any, landmark_net: FaceLandmark68Net) -> None:
    """ORL's first image of each person is a frontal face; the 30 sample faces average out near 0."""
    yaw = image_pose(landmark_net, sample_faceset.chips)[:, 0]
    frontal = [i for i, p in enumerate(sample_faceset.paths) if p.startswith("orl/") and p.endswith("/1.pgm")]
    assert len(frontal) == 2
    assert float(yaw[frontal].abs().max()) < 8.0
    assert abs(float(yaw.mean())) < 5.0


def test_chip_landmarks_reproduce_the_pipelines(sample_faceset: Any, landmark_net: FaceLandmark68Net) -> None:
    """The net on the whole chip finds the points the pipeline found on the photo's detector box."""
    ref = sample_faceset.landmarks
    got = image_landmarks(landmark_net, sample_faceset.chips, batch_size=7)
    iod = (ref[:, 36] - ref[:, 45]).norm(dim=-1)
    err = ((got - ref).norm(dim=-1).mean(1) / iod).mean()
    assert float(err) < 0.08
    # the same faces at the decoder's 64 px: the points scale with the image
    small = F.interpolate(sample_faceset.chips.float() / 255, size=64, mode="bilinear", antialias=True)
    got64 = image_landmarks(landmark_net, small)
    err64 = ((got64 - scale_points(ref, 150, 64)).norm(dim=-1).mean(1) / (iod * 64 / 150)).mean()
    assert float(err64) < 0.10


# -- probes ----------------------------------------------------------------------------------------------


def _glasses_data(sample_faceset: Any) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Every sample chip twice, once with a dark bar across the eyes (label 1): a visible pixel attribute."""
    chips = sample_faceset.chips.clone()
    lm = sample_faceset.landmarks
    barred = chips.clone()
    for i in range(len(chips)):
        y = int(lm[i, 36:48, 1].mean().round())
        x0, x1 = int(lm[i, 36, 0]) - 4, int(lm[i, 45, 0]) + 4
        barred[i, :, y - 7 : y + 7, max(x0, 0) : x1] = 0
    images = torch.cat([chips, barred])
    labels = torch.cat([torch.zeros(len(chips)), torch.ones(len(chips))])
    ids = list(sample_faceset.identities) * 2
    return images, labels, ids


@pytest.mark.parametrize("arch", ["linear", "cnn"])
def test_probe_learns_a_pixel_attribute_on_held_out_identities(
    sample_faceset: Any, arch: Literal["cnn", "linear"], tmp_path: Path
) -> None:
    images, labels, ids = _glasses_data(sample_faceset)
    cfg = ProbeConfig(attribute="bar", arch=arch, size=32, epochs=8, batch_size=16, lr=5e-3, test_fraction=0.3, seed=3)
    probe, report = train_probe(images, labels, ids, cfg)
    assert report.identities_test > 0 and report.n_train + report.n_test == len(images)
    # the linear probe is the weak baseline (grey pixels, 48 training images): 0.85-1.0 over split seeds
    assert report.auc >= (0.9 if arch == "cnn" else 0.8), report
    # save / load: same outputs; the file is small and loads without pickle
    path = save_probe(probe, tmp_path / "probe.pt", report)
    assert path.stat().st_size < 400_000
    loaded, rep = load_probe(path)
    assert rep == report and loaded.config == cfg
    assert torch.allclose(probe_probabilities(loaded, images), probe_probabilities(probe, images), atol=1e-6)
    assert torch.allclose(torch.sigmoid(probe_logits(probe, images)), probe_probabilities(probe, images))
    # seeded: the same recipe trains the same probe
    again, _ = train_probe(images, labels, ids, cfg)
    assert torch.allclose(probe_probabilities(again, images[:8]), probe_probabilities(probe, images[:8]), atol=1e-5)


def test_probe_rejects_bad_input(sample_faceset: Any) -> None:
    images, labels, ids = _glasses_data(sample_faceset)
    cfg = ProbeConfig(attribute="bar", arch="linear", size=32, epochs=1)
    with pytest.raises(ValueError, match="0/1"):
        train_probe(images, labels * 2, ids, cfg)
    with pytest.raises(ValueError, match="one class"):
        train_probe(images, torch.zeros(len(images)), ids, cfg)
    with pytest.raises(ValueError, match="labels"):
        train_probe(images, labels[:-1], ids, cfg)
    with pytest.raises(ValueError, match="architecture"):
        ProbeConfig(attribute="x", arch="svm")  # type: ignore[arg-type]
    m = binary_metrics(torch.tensor([0.1, 0.9, 0.8, 0.2]), torch.tensor([0, 1, 0, 0]))
    assert m["auc"] == pytest.approx(1.0) and m["accuracy"] == pytest.approx(0.75)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1) / 2)
