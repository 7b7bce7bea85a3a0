"""DFD losses: pixel, gradient-domain and perceptual terms, global and on the face region."""

from __future__ import annotations

import math

import pytest
import torch

from facexplain.faces.align import ALIGNMENT_POINTS, chip_template
from facexplain.faces.regions import REGION_POINTS, face_region_mask, landmarks_to_chip
from facexplain.losses import (
    DFDLossWeights,
    PerceptualFeatures,
    dfd_loss,
    gradient_loss,
    pair_difference_loss,
    pixel_loss,
)
from facexplain.models.decoder import DecoderConfig, DeepFaceDecoder
from facexplain.models.recognition import FaceRecognitionNet

SIZE = 64
ALL_TERMS = {
    "pixel_global",
    "pixel_local",
    "gradient_global",
    "gradient_local",
    "perceptual_global",
    "perceptual_local",
}


@pytest.fixture(scope="module")
def fr_net() -> FaceRecognitionNet:
    return FaceRecognitionNet.from_faceapi()


@pytest.fixture(scope="module")
def perceptual(fr_net: FaceRecognitionNet) -> PerceptualFeatures:
    return PerceptualFeatures.white_box(fr_net)


def _square_landmarks(lo: float, hi: float, n: int = 1) -> torch.Tensor:
    """68 landmarks whose region points (17..67) fill a grid on [lo, hi]^2 (corners included); jaw at the centre."""
    pts = torch.full((68, 2), (lo + hi) / 2)
    axis = torch.linspace(lo, hi, 8)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2)
    pts[list(REGION_POINTS)] = grid[: len(REGION_POINTS)]
    corners = torch.tensor([[lo, lo], [hi, lo], [lo, hi], [hi, hi]], dtype=torch.float32)
    pts[list(REGION_POINTS[-4:])] = corners  # the grid is cut short: keep the square's corners in the set
    return pts.expand(n, 68, 2).clone()


def _images(n: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, SIZE, SIZE, generator=g)


def test_all_terms_are_zero_for_identical_images(perceptual: PerceptualFeatures) -> None:
    x = _images()
    mask = face_region_mask(_square_landmarks(20, 44, 2), SIZE)
    total, parts = dfd_loss(x, x.clone(), mask, perceptual)
    assert set(parts) == ALL_TERMS | {"total"}
    assert total.item() == 0.0
    assert all(v.item() == 0.0 for v in parts.values())


def test_pixel_loss_is_hand_computed_mse() -> None:
    recon = torch.zeros(2, 3, 4, 4)
    target = torch.zeros(2, 3, 4, 4)
    target[0, 0, 1, 1] = 2.0
    target[1, 2, 3, 0] = 1.0
    assert pixel_loss(recon, target).item() == pytest.approx((4.0 + 1.0) / (2 * 3 * 16))
    mask = torch.zeros(2, 1, 4, 4)
    mask[:, :, :2, :2] = 1.0  # contains the first error, not the second
    assert pixel_loss(recon, target, mask).item() == pytest.approx(4.0 / (2 * 3 * 4))


def test_gradient_loss_ignores_constant_offset_and_sees_edges() -> None:
    x = _images()
    mask = face_region_mask(_square_landmarks(20, 44, 2), SIZE)
    assert gradient_loss(x + 0.25, x).item() == pytest.approx(0.0, abs=1e-12)
    assert gradient_loss(x + 0.25, x, mask).item() == pytest.approx(0.0, abs=1e-12)
    # One vertical edge: x-differences (0, 1) vs (0, 0) on each of 2 rows -> mean 0.5; y-differences all 0.
    step = torch.tensor([[[[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]]])
    assert gradient_loss(step, torch.zeros_like(step)).item() == pytest.approx(0.5)


def test_region_mask_is_zero_outside_and_positive_inside() -> None:
    landmarks = _square_landmarks(20, 44, 3)
    mask = face_region_mask(landmarks, SIZE, margin=0.0, feather=0.05)
    assert mask.shape == (3, 1, SIZE, SIZE)
    assert mask.min() >= 0.0 and mask.max() <= 1.0
    ramp = 0.05 * SIZE
    ys, xs = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    inside = (xs >= 20) & (xs <= 44) & (ys >= 20) & (ys <= 44)
    far = (xs < 20 - ramp) | (xs > 44 + ramp) | (ys < 20 - ramp) | (ys > 44 + ramp)
    assert (mask[:, 0][:, inside] == 1.0).all()
    assert (mask[:, 0][:, far] == 0.0).all()
    # Shifting the landmarks moves the region with them.
    shifted = face_region_mask(landmarks + 8, SIZE)
    assert shifted[0, 0, 50, 50] > 0 and mask[0, 0, 50, 50] == 0


def test_landmarks_to_chip_inverts_alignment() -> None:
    """Image landmarks made by a known similarity of the canonical face map back onto it."""
    template = chip_template(SIZE).float()
    angle, scale, shift = 0.3, 2.5, torch.tensor([120.0, 80.0])
    rot = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]) * scale
    image_pts = torch.zeros(1, 68, 2)
    image_pts[0, list(ALIGNMENT_POINTS)] = template @ rot.T + shift
    chip = landmarks_to_chip(image_pts, SIZE)
    # dlib's rectangle convention shrinks the chip by (S*s - 1)/(S - 1) about its centre: < 1 px here.
    assert (chip[0, list(ALIGNMENT_POINTS)] - template).abs().max() < 1.0


def test_white_box_features_are_fr_intermediate_activations(fr_net: FaceRecognitionNet) -> None:
    perceptual = PerceptualFeatures.white_box(fr_net, layer="conv64_3")
    captured: list[torch.Tensor] = []
    hook = fr_net.residuals["conv64_3"].register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        chips = torch.rand(2, 3, 150, 150)
        with torch.no_grad():
            fr_net(chips * 255.0)
            features = perceptual(chips)
    finally:
        hook.remove()
    assert features.shape == (2, 64, 17, 17)
    torch.testing.assert_close(features, captured[0])
    # Decoder-sized images are resized to the net's 150 px internally; weights are shared, not copied.
    assert perceptual(torch.rand(2, 3, SIZE, SIZE)).shape == (2, 64, 17, 17)
    assert perceptual.extractor.conv32_down is fr_net.conv32_down
    assert not any(p.requires_grad for p in perceptual.parameters())


def test_black_box_features_and_gradient_to_images() -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.BatchNorm2d(4))
    perceptual = PerceptualFeatures.black_box(net, input_size=32).train()
    assert not net.training  # stays in eval: the loss does not move with batch statistics
    x = _images().requires_grad_(True)
    total, parts = dfd_loss(x, _images(seed=1), None, perceptual)
    assert set(parts) == {"pixel_global", "gradient_global", "perceptual_global", "total"}
    total.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_zero_weights_skip_terms_and_weights_scale_total() -> None:
    x, y = _images(), _images(seed=1)
    mask = face_region_mask(_square_landmarks(20, 44, 2), SIZE)
    only_pixel = DFDLossWeights(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        dfd_loss(x, y, mask, None, only_pixel)
    weights = DFDLossWeights(pixel_global=2.0, pixel_local=0.5, gradient_global=0.0, gradient_local=1.0)
    total, parts = dfd_loss(x, y, mask, None, weights)
    assert "gradient_global" not in parts
    expected = 2.0 * parts["pixel_global"] + 0.5 * parts["pixel_local"] + parts["gradient_local"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)


def test_adam_steps_decrease_total_loss(perceptual: PerceptualFeatures) -> None:
    torch.manual_seed(0)
    decoder = DeepFaceDecoder(DecoderConfig(base_channels=8, max_channels=32, dropout=0.0))
    templates = torch.randn(4, 128) * 0.13
    g = torch.Generator().manual_seed(3)
    # Smooth targets (a face-like blob on a gradient), what chips look like more than noise does.
    targets = torch.nn.functional.interpolate(torch.rand(4, 3, 8, 8, generator=g), size=SIZE, mode="bilinear")
    mask = face_region_mask(_square_landmarks(18, 46, 4), SIZE)
    optimiser = torch.optim.Adam(decoder.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        optimiser.zero_grad()
        total, _ = dfd_loss(decoder(templates), targets, mask, perceptual)
        total.backward()
        optimiser.step()
        losses.append(total.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_pair_difference_loss_reads_the_change_not_the_images() -> None:
    g = torch.Generator().manual_seed(0)
    face, blend = torch.rand(2, 3, 8, 8, generator=g), torch.rand(2, 3, 8, 8, generator=g)
    offset = 0.3 * torch.ones(2, 3, 8, 8)
    # both reconstructions off by the same error: the change is right, the term is 0
    assert pair_difference_loss(face + offset, blend + offset, face, blend).item() == pytest.approx(0.0, abs=1e-12)
    # a change rendered everywhere instead of where it is: hand-computed mean squared error
    got = pair_difference_loss(face, face + 0.1, face, blend)
    assert got.item() == pytest.approx(float(((0.1 - (blend - face)) ** 2).mean()), rel=1e-6)
    with pytest.raises(ValueError, match="pair shapes"):
        pair_difference_loss(face, blend[:1], face, blend)
