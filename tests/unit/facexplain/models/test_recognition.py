"""The torch port of dlib's ResNet descriptor agrees with dlib on real, dlib-aligned faces."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from facexplain.faces.align import align_faces
from facexplain.models.recognition import FaceRecognitionNet
from tests.unit.faces_ref import dlib_chip_descriptor, faces_for, to_tensor

# dlib's own net costs ~0.15 s per chip, so descriptor agreement uses a prefix of each subset.
N_DESCRIPTOR_FACES = 20
MIN_MEAN_COSINE = 0.999


@pytest.fixture(scope="module")
def net() -> FaceRecognitionNet:
    return FaceRecognitionNet.from_faceapi()


def _chips(dataset: str, data_dir: Path, count: int) -> torch.Tensor:
    return torch.stack([to_tensor(f.chip) for f in faces_for(dataset, data_dir)[:count]])


@pytest.mark.parametrize("dataset", ["orl", "celeba"])
def test_templates_match_dlib_descriptors(net: FaceRecognitionNet, data_dir: Path, dataset: str) -> None:
    chips = _chips(dataset, data_dir, N_DESCRIPTOR_FACES)
    assert len(chips) == N_DESCRIPTOR_FACES
    reference = torch.from_numpy(
        np.stack([dlib_chip_descriptor(dataset, data_dir, i) for i in range(len(chips))])
    ).float()
    start = time.perf_counter()
    with torch.no_grad():
        templates = net(chips)
    elapsed = time.perf_counter() - start
    cosine = F.cosine_similarity(templates, reference, dim=1)
    distance = (templates - reference).norm(dim=1)
    print(
        f"\n{dataset}: cosine to dlib mean {cosine.mean():.6f} min {cosine.min():.6f}, "
        f"euclidean mean {distance.mean():.4f} over {len(chips)} faces; "
        f"torch batch of {len(chips)} in {elapsed:.2f} s"
    )
    assert templates.shape == (len(chips), 128)
    assert cosine.mean() >= MIN_MEAN_COSINE
    # dlib's same-person threshold is 0.6; port error must be far below it.
    assert distance.max() < 0.1


def test_batched_equals_single(net: FaceRecognitionNet, data_dir: Path) -> None:
    chips = _chips("orl", data_dir, 3)
    with torch.no_grad():
        batched = net(chips)
        single = torch.cat([net(c[None]) for c in chips])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)


def test_gradient_reaches_original_pixels(net: FaceRecognitionNet, data_dir: Path) -> None:
    probe, other = faces_for("orl", data_dir)[:2]
    image = to_tensor(probe.image).unsqueeze(0).requires_grad_(True)
    landmarks = torch.from_numpy(probe.landmarks).float().unsqueeze(0)
    template = net(align_faces(image, landmarks))
    with torch.no_grad():
        reference = net(to_tensor(other.chip).unsqueeze(0))
    F.cosine_similarity(template, reference).sum().backward()
    grad = image.grad
    assert grad is not None
    assert torch.isfinite(grad).all()
    assert grad.abs().sum() > 0
    # The chip covers the face only: pixels far outside it get no gradient.
    rows = grad.abs().sum(dim=(0, 1, 3))
    assert (rows > 0).sum() < image.shape[-2]
