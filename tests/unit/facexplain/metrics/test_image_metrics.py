"""PSNR and SSIM against independent reference computations (scipy's Gaussian filter, closed forms)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from facexplain.metrics.image import luma, psnr, ssim
from facexplain.metrics.reconstruction import rank1_excluding_self, reconstruction_report
from facexplain.metrics.verification import DLIB_L2_RULE


def _ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al. with scipy: Gaussian sigma 1.5 truncated at 3.5 sigma (11 taps), valid region only."""
    f = lambda x: gaussian_filter(x, 1.5, truncate=3.5)  # noqa: E731
    mx, my = f(a), f(b)
    sxx, syy, sxy = f(a * a) - mx * mx, f(b * b) - my * my, f(a * b) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return float(s[5:-5, 5:-5].mean())


def test_psnr_closed_form() -> None:
    a = torch.zeros(1, 3, 8, 8)
    b = torch.full((1, 3, 8, 8), 0.1)
    assert float(psnr(a, b)[0]) == pytest.approx(20.0, abs=1e-4)  # mse 0.01 -> 20 dB


def test_ssim_matches_scipy_reference() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 40, 48, generator=g)
    b = (a + 0.15 * torch.randn(2, 3, 40, 48, generator=g)).clamp(0, 1)
    got = ssim(a, b)
    for i in range(2):
        ref = _ssim_reference(luma(a[i : i + 1])[0, 0].double().numpy(), luma(b[i : i + 1])[0, 0].double().numpy())
        assert float(got[i]) == pytest.approx(ref, abs=1e-6)


def test_ssim_identity_and_range() -> None:
    a = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(ssim(a, a), torch.ones(3), atol=1e-6)
    s = ssim(a, 1 - a)
    assert bool((s < 0).all()) and bool((s >= -1).all())
    with pytest.raises(ValueError, match="smaller than"):
        ssim(a[:, :, :8, :8], a[:, :, :8, :8])
    with pytest.raises(ValueError, match="one shape"):
        psnr(a, a[:, :, :16])


def test_rank1_leaves_the_source_face_out() -> None:
    gallery = torch.eye(4)  # four faces, orthogonal templates
    ids = ["a", "a", "b", "c"]
    # probe 0 equals its own source exactly but must be matched to face 1 (same person) to count
    probes = torch.tensor([[1.0, 0.9, 0, 0], [0.9, 1.0, 0, 0], [0, 0, 1.0, 0.95], [0, 0, 0.2, 1.0]])
    r1 = rank1_excluding_self(probes, gallery, ids)
    assert r1[:2].tolist() == [1.0, 1.0]
    assert math.isnan(float(r1[2])) and math.isnan(float(r1[3]))  # b and c have no other face


def test_reconstruction_report_perfect_reconstruction() -> None:
    g = torch.Generator().manual_seed(2)
    imgs = torch.rand(4, 3, 16, 16, generator=g)
    t = torch.randn(4, 128, generator=g) * 0.13
    rep, per = reconstruction_report(imgs, imgs, t, t.clone(), ["x", "x", "y", "y"], DLIB_L2_RULE)
    assert rep.identity_cosine == pytest.approx(1.0)
    assert rep.accepted == 1.0 and rep.ssim == pytest.approx(1.0, abs=1e-6)
    assert rep.psnr > 90 and per["psnr"].shape == (4,)
