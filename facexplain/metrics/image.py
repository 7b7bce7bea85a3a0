"""Image-quality measures of a reconstruction against its reference: PSNR and SSIM.

Both take (B, 3, H, W) RGB in [0, 1] and return one value per image, so callers can report means,
spreads and per-image CSVs from the same numbers. SSIM follows Wang et al. (2004) as most papers
report it: luminance (ITU-R BT.601 luma) only, an 11x11 Gaussian window with sigma 1.5, K1 = 0.01,
K2 = 0.03, dynamic range 1, averaged over the valid (un-padded) window positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_LUMA = (0.299, 0.587, 0.114)
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.dim() != 4 or a.shape[1] != 3:
        raise ValueError(f"expected two (B, 3, H, W) images of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def psnr(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, over RGB, peak 1."""
    _check(a, b)
    mse = (a.float() - b.float()).square().flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(eps))


def luma(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB -> (B, 1, H, W) BT.601 luma, same range."""
    w = torch.tensor(_LUMA, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * w).sum(1, keepdim=True)


def _gaussian_window(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).view(1, 1, size, size)


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Mean structural similarity per image on luma (see module docstring for the exact recipe)."""
    _check(a, b)
    if min(a.shape[-2:]) < window:
        raise ValueError(f"images of {tuple(a.shape[-2:])} are smaller than the {window}-px SSIM window")
    x, y = luma(a.double()), luma(b.double())
    w = _gaussian_window(window, sigma, x.device)
    mu_x, mu_y = F.conv2d(x, w), F.conv2d(y, w)
    sxx = F.conv2d(x * x, w) - mu_x**2
    syy = F.conv2d(y * y, w) - mu_y**2
    sxy = F.conv2d(x * y, w) - mu_x * mu_y
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    num = (2 * mu_x * mu_y + c1) * (2 * sxy + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2)
    return (num / den).flatten(1).mean(1).float()
