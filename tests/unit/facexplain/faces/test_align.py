"""Our differentiable alignment reproduces ``dlib.get_face_chip(size=150, padding=0.25)``."""

from __future__ import annotations

import math
from pathlib import Path

import dlib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from facexplain.faces.align import align_faces, align_faces_from_images, chip_transforms, similarity_transform
from tests.unit.faces_ref import RefFace, dlib_chip_descriptor, dlib_descriptors, faces_for, to_tensor

N_DESCRIPTOR_FACES = 10
# Measured: the float chip sits 0.46 (ORL) / 0.49 (CelebA) grey levels above dlib's on average,
# because dlib truncates to uint8; floor() of it matches dlib to < 0.01 on average.
MAX_MEAN_ABS_FLOAT = 0.6
MAX_MEAN_ABS_FLOORED = 0.02


def _landmarks(faces: tuple[RefFace, ...]) -> torch.Tensor:
    return torch.from_numpy(np.stack([f.landmarks for f in faces])).float()


def _our_chips(faces: tuple[RefFace, ...]) -> torch.Tensor:
    images = [to_tensor(f.image) for f in faces]
    return align_faces_from_images(images, torch.arange(len(faces)), _landmarks(faces))


def _dlib_chips(faces: tuple[RefFace, ...]) -> torch.Tensor:
    return torch.from_numpy(np.stack([f.chip for f in faces])).permute(0, 3, 1, 2).float()


def test_similarity_transform_recovers_rotation_scale_translation() -> None:
    src = torch.tensor([[0.0, 0.0], [3.0, 1.0], [1.0, 4.0], [-2.0, 2.5]])
    angle, scale = 0.3, 1.7
    rot = scale * torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    dst = src @ rot.T + torch.tensor([5.0, -2.0])
    fit = similarity_transform(src.expand(2, -1, -1), dst)
    torch.testing.assert_close(fit[:, :, :2], rot.expand(2, -1, -1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fit[:, :, 2], torch.tensor([[5.0, -2.0]] * 2), rtol=1e-5, atol=1e-5)


def test_similarity_transform_never_reflects() -> None:
    src = torch.tensor([[0.0, 0.0], [3.0, 1.0], [1.0, 4.0], [-2.0, 2.5]])
    mirrored = src * torch.tensor([-1.0, 1.0])
    fit = similarity_transform(src, mirrored)
    assert torch.linalg.det(fit[0, :, :2]) >= 0


@pytest.mark.parametrize("dataset", ["orl", "celeba"])
def test_chip_geometry_matches_dlib_chip_details(data_dir: Path, dataset: str) -> None:
    faces = faces_for(dataset, data_dir)
    transforms = chip_transforms(_landmarks(faces)).double()
    for face, tf in zip(faces, transforms, strict=True):
        details = dlib.get_face_chip_details(face.shape, 150, 0.25)
        rect, angle = details.rect, details.angle
        cx, cy = (rect.left() + rect.right()) / 2, (rect.top() + rect.bottom()) / 2
        cos, sin = math.cos(angle), math.sin(angle)
        for (u, v), (rx, ry) in zip(
            ((0, 0), (149, 0), (0, 149)),
            ((rect.left(), rect.top()), (rect.right(), rect.top()), (rect.left(), rect.bottom())),
            strict=True,
        ):
            expected = (cx + cos * (rx - cx) - sin * (ry - cy), cy + sin * (rx - cx) + cos * (ry - cy))
            ours = tf[:, :2] @ torch.tensor([float(u), float(v)], dtype=torch.float64) + tf[:, 2]
            assert ours.tolist() == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize("dataset", ["orl", "celeba"])
def test_chips_match_dlib_pixels(data_dir: Path, dataset: str) -> None:
    faces = faces_for(dataset, data_dir)
    ours, theirs = _our_chips(faces), _dlib_chips(faces)
    float_diff = (ours - theirs).abs().mean().item()
    floored = (ours.floor() - theirs).abs()
    print(
        f"\n{dataset}: |chip - dlib chip| mean {float_diff:.3f} grey levels (float), "
        f"{floored.mean().item():.4f} (floored, max {floored.max().item():.0f}) over {len(faces)} faces"
    )
    assert float_diff < MAX_MEAN_ABS_FLOAT
    assert floored.mean() < MAX_MEAN_ABS_FLOORED
    assert floored.max() <= 1


@pytest.mark.parametrize("dataset", ["orl", "celeba"])
def test_our_chips_give_dlib_the_same_descriptor(data_dir: Path, dataset: str) -> None:
    faces = faces_for(dataset, data_dir)[:N_DESCRIPTOR_FACES]
    chips = _our_chips(faces).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    ours = torch.from_numpy(dlib_descriptors([np.ascontiguousarray(c) for c in chips]))
    theirs = torch.from_numpy(np.stack([dlib_chip_descriptor(dataset, data_dir, i) for i in range(len(faces))]))
    cosine = F.cosine_similarity(ours, theirs, dim=1)
    print(
        f"\n{dataset}: dlib descriptor of our chip vs of dlib's chip: "
        f"cosine mean {cosine.mean():.6f} min {cosine.min():.6f}"
    )
    assert cosine.mean() >= 0.999


def test_list_alignment_equals_per_image_and_is_differentiable(data_dir: Path) -> None:
    faces = faces_for("orl", data_dir)[:2] + faces_for("celeba", data_dir)[:2]
    images = [to_tensor(f.image).requires_grad_(True) for f in faces]
    landmarks = _landmarks(faces)
    # Faces 0 and 2 come twice: one image can hold several faces.
    index = torch.tensor([0, 1, 2, 3, 2, 0])
    chips = align_faces_from_images(images, index, landmarks[index])
    for row, i in enumerate(index.tolist()):
        alone = align_faces(images[i].detach()[None], landmarks[i][None])
        torch.testing.assert_close(chips[row : row + 1].detach(), alone, rtol=0, atol=5e-3)  # float32 grid rounding
    chips.sum().backward()
    for img in images:
        assert img.grad is not None and torch.isfinite(img.grad).all() and img.grad.abs().sum() > 0
