"""Pictures people would rather look at than read: image grids and strips as uint8 arrays / PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def image_grid(images01: torch.Tensor, ncol: int, pad: int = 2, background: float = 1.0) -> np.ndarray:
    """(N, 3, H, W) images in [0, 1] -> (rows*H + pads, ncol*W + pads, 3) uint8, row-major, padded."""
    if images01.dim() != 4 or images01.shape[1] != 3:
        raise ValueError(f"expected (N, 3, H, W) images, got {tuple(images01.shape)}")
    n, _, h, w = images01.shape
    ncol = max(1, min(ncol, n))
    nrow = max(1, -(-n // ncol))
    canvas = torch.full((3, nrow * (h + pad) + pad, ncol * (w + pad) + pad), background)
    for i in range(n):
        r, c = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        canvas[:, y : y + h, x : x + w] = images01[i].detach().float().cpu().clamp(0, 1)
    return (canvas * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def save_png(array_or_images: np.ndarray | torch.Tensor, path: Path | str) -> Path:
    """Write a (H, W, 3) uint8 array, or one (3, H, W) image in [0, 1], as PNG."""
    if isinstance(array_or_images, torch.Tensor):
        arr = (array_or_images.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    else:
        arr = array_or_images
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(out)
    return out


def pairs_grid(originals01: torch.Tensor, recons01: torch.Tensor, ncol: int = 8) -> np.ndarray:
    """Originals above their reconstructions, ``ncol`` pairs per row block."""
    n = min(originals01.shape[0], recons01.shape[0])
    blocks = []
    for s in range(0, n, ncol):
        o, r = originals01[s : s + ncol], recons01[s : s + ncol]
        if o.shape[0] < ncol:  # pad the last block with blanks so rows line up
            blank = torch.ones(ncol - o.shape[0], *o.shape[1:])
            o, r = torch.cat([o, blank]), torch.cat([r, blank])
        blocks += [o, r]
    return image_grid(torch.cat(blocks), ncol)
