"""Local texture: LBP histograms on a 7 x 7 grid of patches over the aligned face (issue 6, Ren et al.).

A decoder can keep a face's geometry and colour yet smooth away wrinkles, stubble or skin texture;
local binary patterns (Ojala, Pietikäinen & Mäenpää, "Multiresolution gray-scale and rotation
invariant texture classification with local binary patterns", TPAMI 2002) measure exactly that
micro-structure, and histograms per patch (Ahonen, Hadid & Pietikäinen, "Face description with
local binary patterns", TPAMI 2006, whose 7 x 7 grid this follows) keep *where* on the face it is.
Alignment puts every face at nearly the same place in the frame, so the grid simply divides the
whole image into 7 x 7 equal patches; each patch is one attribute (``lbp_r{row}_c{col}``), so
importance and significance can be mapped per patch.

Choices:

* **Operator**: 8 neighbours at radius 1, taken as the 3 x 3 square around each pixel (the original
  LBP; no interpolation of a circle's diagonal points, so a code depends on pixel values only).
  A neighbour counts 1 when it is >= the centre.
* **Codes**: uniform rotation-invariant ("riu2"): a circular pattern with at most two 0/1
  transitions gets the number of its 1 bits (0..8), every other pattern code 9: 10 bins. Rotation
  invariance makes a code insensitive to small misalignments of an edge's direction, and the nine
  uniform codes cover most of a face's patterns (edges, spots, corners, flat areas). Code 8 (all
  neighbours >= the centre) is what a flat area gives: :data:`FLAT_CODE`.
* **Grey levels**: luminance ``0.299 R + 0.587 G + 0.114 B``, rounded to 256 levels before
  comparing. Chips are 8-bit while decoded faces are floats; without the rounding a float image's
  flat regions would turn float noise of 1e-7 into arbitrary codes, and the two would not compare.
* **Borders**: only pixels with all eight neighbours inside the image get a code (no padding, whose
  repeated values would invent flat codes); a pixel's patch is set by its own position, so border
  patches have one row or column fewer codes than inner ones.
* **Histograms** are normalised to sum to 1 (fractions of the patch's codes), so 64-px decoded faces
  and 150-px chips give comparable values.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from facexplain.attributes.catalog import AttributeSpec, FaceBatch, UnknownAttributeError
from facexplain.attributes.crops import to_255

GRID = 7
N_CODES = 10
FLAT_CODE = 8
NON_UNIFORM_CODE = 9
COMPONENTS: tuple[str, ...] = (*(f"u{k}" for k in range(9)), "non_uniform")
# Neighbour offsets (dy, dx) in circular order around the centre.
_NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1))
_LUMA = (0.299, 0.587, 0.114)


def patch_name(row: int, col: int) -> str:
    return f"lbp_r{row}_c{col}"


PATCH_NAMES: tuple[str, ...] = tuple(patch_name(r, c) for r in range(GRID) for c in range(GRID))
_PATCH_CELL = {patch_name(r, c): (r, c) for r in range(GRID) for c in range(GRID)}


def grey_levels(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, S, S) RGB ([0, 1] or [0, 255]) -> (N, S, S) float32 luminance rounded to 0..255."""
    x = to_255(images.detach().cpu())
    w = torch.tensor(_LUMA, dtype=torch.float32).view(1, 3, 1, 1)
    return (x * w).sum(1).round()


def lbp_codes(grey: torch.Tensor) -> torch.Tensor:
    """(N, H, W) grey images -> (N, H - 2, W - 2) int64 riu2 codes (0..9) of the interior pixels."""
    if grey.dim() != 3 or grey.shape[1] < 3 or grey.shape[2] < 3:
        raise ValueError(f"expected (N, H, W) grey images of at least 3 x 3, got {tuple(grey.shape)}")
    h, w = grey.shape[1], grey.shape[2]
    centre = grey[:, 1 : h - 1, 1 : w - 1]
    bits = torch.stack(
        [grey[:, 1 + dy : h - 1 + dy, 1 + dx : w - 1 + dx] >= centre for dy, dx in _NEIGHBOURS], dim=1
    )  # (N, 8, H-2, W-2)
    ones = bits.sum(1)
    transitions = (bits != torch.roll(bits, 1, dims=1)).sum(1)
    return torch.where(transitions <= 2, ones, torch.full_like(ones, NON_UNIFORM_CODE))


def lbp_grid_histograms(images: torch.Tensor, grid: int = GRID, batch_size: int = 64) -> np.ndarray:
    """(N, 3, S, S) faces ([0, 1] or [0, 255]) -> (N, grid, grid, 10) float64 riu2 histograms, each summing to 1.

    The full array behind the ``lbp_r*_c*`` attributes, for per-patch significance maps.
    """
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
        raise ValueError(f"expected (N, 3, S, S) images, got {tuple(images.shape)}")
    size = int(images.shape[-1])
    if grid < 1 or size < grid + 2:
        raise ValueError(f"a {grid} x {grid} grid needs images of at least {grid + 2} px, got {size}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    # patch of each interior pixel (pixel index 1..S-2), by its own position in the image
    cell = (torch.arange(1, size - 1) * grid) // size
    patch = (cell.view(-1, 1) * grid + cell.view(1, -1)).reshape(-1)  # (P,)
    n = images.shape[0]
    counts = torch.zeros(n, grid * grid, N_CODES, dtype=torch.float64)
    for s in range(0, n, batch_size):
        codes = lbp_codes(grey_levels(images[s : s + batch_size])).reshape(-1, patch.numel())  # (B, P)
        b = codes.shape[0]
        flat = (torch.arange(b).view(-1, 1) * grid * grid + patch.view(1, -1)) * N_CODES + codes
        counts[s : s + b] = (
            torch.bincount(flat.reshape(-1), minlength=b * grid * grid * N_CODES)
            .view(b, grid * grid, N_CODES)
            .to(torch.float64)
        )
    hist = counts / counts.sum(-1, keepdim=True)
    return hist.view(n, grid, grid, N_CODES).numpy()


class TextureEstimator:
    """One attribute per grid patch (group "texture"): its 10-bin riu2 LBP histogram, in fractions."""

    def __init__(self) -> None:
        self._specs = tuple(
            AttributeSpec(
                name=patch_name(r, c),
                group="texture",
                unit="fraction",
                components=COMPONENTS,
                description=f"LBP (8 neighbours, radius 1, riu2) histogram of grid patch row {r}, column {c} "
                f"of a {GRID} x {GRID} grid over the aligned face",
            )
            for r in range(GRID)
            for c in range(GRID)
        )

    @property
    def specs(self) -> tuple[AttributeSpec, ...]:
        return self._specs

    def estimate(self, faces: FaceBatch, names: Sequence[str]) -> dict[str, np.ndarray]:
        wanted = list(names) or list(PATCH_NAMES)
        unknown = [n for n in wanted if n not in _PATCH_CELL]
        if unknown:
            raise UnknownAttributeError(f"unknown texture attribute(s) {unknown}; known: lbp_r0_c0 .. lbp_r6_c6")
        hist = lbp_grid_histograms(faces.images)
        return {n: hist[:, _PATCH_CELL[n][0], _PATCH_CELL[n][1]].copy() for n in wanted}
