"""Targeted facial-region blending: paste one face's region (eyes, nose, lower face) into another face.

Spatially isolated (SSI) direction discovery (Plesh et al.) needs template changes caused by *one*
facial region only. It gets them by blending the region of a *region donor* into a *face donor*:
both are aligned chips in the same canonical frame (dlib's template, see
:mod:`facexplain.faces.align`), so a region sits at nearly the same pixels in both and a soft mask
swaps it without any further warping. Over N faces every ordered pair (face donor, region donor)
with different faces gives one blend: N(N-1) blends per region, far too many to hold at once for
N = 160 (25,440 chips of 150x150x3 floats = 6.9 GB), so blends are generated batch by batch from
index pairs (:func:`iter_blend_batches`, :func:`iter_blends`).

Masks are convex hulls of landmark groups (a region may be several groups: the two eyes are two
hulls, so the nose bridge between them is *not* part of "eyes"), dilated by a few pixels so the
skin around a feature travels with it, then feathered with a Gaussian so the seam leaves no hard
edge for the FR model to react to. Coordinates are chip pixel-index coordinates (pixel ``i``
covers [i - 0.5, i + 0.5]), as :attr:`facexplain.data.faceset.FaceSet.landmarks` holds them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F

from facexplain.faces.regions import convex_hull

# A region: one or more groups of 68-point landmark indices; the mask is the union of each group's hull.
PointGroups = tuple[tuple[int, ...], ...]

_RIGHT_BROW = tuple(range(17, 22))  # the subject's right: left side of the image
_LEFT_BROW = tuple(range(22, 27))
_RIGHT_EYE = tuple(range(36, 42))
_LEFT_EYE = tuple(range(42, 48))
_NOSE = tuple(range(27, 36))
_MOUTH = tuple(range(48, 68))
_CHIN = tuple(range(5, 12))  # jaw points around the chin

REGIONS: Mapping[str, PointGroups] = {
    # each eye with its brow as one hull, so the mask does not cover the nose bridge between the eyes
    "eyes": (_RIGHT_BROW + _RIGHT_EYE, _LEFT_BROW + _LEFT_EYE),
    "nose": (_NOSE,),
    "lower_face": (_MOUTH + _CHIN,),
}

MaskMode = Literal["union", "region_donor", "face_donor"]

# Default dilation and feathering, in pixels of a 150-px chip (scale them with the chip size).
DEFAULT_DILATE = 4.0
DEFAULT_FEATHER = 3.0


def region_points(region: str | Sequence[Sequence[int]] | Sequence[int]) -> PointGroups:
    """A region name from :data:`REGIONS`, one group of landmark indices, or several -> point groups.

    Every index must be in 0..67. Raising here, not deep inside mask building, gives a caller (a
    service validating a request) a clear message.
    """
    if isinstance(region, str):
        if region not in REGIONS:
            raise ValueError(f"unknown region {region!r}; known: {sorted(REGIONS)} (or pass landmark indices)")
        return REGIONS[region]
    items: list[Any] = list(region)
    if not items:
        raise ValueError("a region needs at least one landmark index")
    flat = all(hasattr(p, "__index__") for p in items)  # ints, numpy ints, 0-d int tensors
    groups = [tuple(int(p) for p in items)] if flat else [tuple(int(p) for p in g) for g in items]
    for g in groups:
        if not g:
            raise ValueError("a landmark group of a region is empty")
        bad = [p for p in g if not 0 <= p < 68]
        if bad:
            raise ValueError(f"landmark indices must be in 0..67, got {bad}")
    return tuple(groups)


def segment_distance(pix: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """(S, S, 2) pixels, (K, 2) points (K = 1 or 2) -> (S, S) euclidean distance to the point/segment."""
    a = pts[0]
    b = pts[-1]
    ab = b - a
    denom = float(ab @ ab)
    if denom == 0.0:
        return (pix - a).norm(dim=-1)
    s = (((pix - a) * ab).sum(-1) / denom).clamp(0.0, 1.0)
    return (pix - (a + s.unsqueeze(-1) * ab)).norm(dim=-1)


def hull_outside_distance(pix: torch.Tensor, group_pts: torch.Tensor) -> torch.Tensor:
    """(S, S, 2) pixels, (K, 2) points -> (S, S) outward distance from their convex hull (<= 0 inside).

    As in :func:`facexplain.faces.regions.face_region_mask`: the largest signed distance to a hull
    edge line, exact inside and along edges, a little short of euclidean near corners (which only
    rounds the dilated outline). Fewer than three non-collinear points give a point or a segment.
    """
    hull = convex_hull([(float(x), float(y)) for x, y in group_pts.tolist()])
    if len(hull) < 3:
        return segment_distance(pix, torch.tensor(hull, dtype=pix.dtype, device=pix.device))
    v = torch.tensor(hull, dtype=pix.dtype, device=pix.device)  # CCW for x right / y up
    e = torch.roll(v, -1, dims=0) - v
    normal = torch.stack([e[:, 1], -e[:, 0]], dim=-1)  # outward for that orientation
    normal = normal / normal.norm(dim=-1, keepdim=True).clamp_min(1e-9)
    return ((pix.unsqueeze(-2) - v) * normal).sum(-1).amax(-1)


def gaussian_feather(masks: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, 1, H, W) masks -> the same blurred by a separable Gaussian of ``sigma`` pixels (0 = unchanged).

    Zero padding: outside the chip counts as "not region", so a mask touching the border fades there.
    """
    if sigma < 0:
        raise ValueError(f"feather sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return masks
    radius = max(1, math.ceil(3.0 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=masks.dtype, device=masks.device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    out = F.conv2d(masks, k.view(1, 1, 1, -1), padding=(0, radius))
    return F.conv2d(out, k.view(1, 1, -1, 1), padding=(radius, 0))


def region_mask(
    landmarks: torch.Tensor,
    points: str | Sequence[Sequence[int]] | Sequence[int],
    size: int,
    dilate: float = DEFAULT_DILATE,
    feather: float = DEFAULT_FEATHER,
) -> torch.Tensor:
    """(N, 68, 2) or (68, 2) chip-pixel landmarks -> (N, 1, size, size) float32 masks in [0, 1].

    ``points`` is a region name (:data:`REGIONS`), a list of landmark indices, or a list of such
    groups. Each group's convex hull, grown by ``dilate`` pixels, is 1 (the union over groups), then
    the binary mask is blurred by a Gaussian of ``feather`` pixels standard deviation: values fall
    smoothly from 1 well inside to 0 a few sigma outside. The mask carries no gradient and lives on
    the landmarks' device.
    """
    groups = region_points(points)
    if landmarks.dim() == 2:
        landmarks = landmarks.unsqueeze(0)
    if landmarks.dim() != 3 or landmarks.shape[1:] != (68, 2):
        raise ValueError(f"expected (N, 68, 2) landmarks, got {tuple(landmarks.shape)}")
    if size < 1:
        raise ValueError(f"mask size must be positive, got {size}")
    if dilate < 0:
        raise ValueError(f"dilate must be >= 0 pixels, got {dilate}")
    device = landmarks.device
    coords = torch.arange(size, dtype=torch.float32, device=device)
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")
    pix = torch.stack([gx, gy], dim=-1)
    pts = landmarks.detach().to("cpu", torch.float64)
    masks = torch.zeros(pts.shape[0], 1, size, size, dtype=torch.float32, device=device)
    for b in range(pts.shape[0]):
        for g in groups:
            gp = pts[b, list(g)]
            # only pixels near the hull can be inside the dilated hull: evaluate its bounding box alone
            lo = (gp.min(dim=0).values - dilate - 1).floor().clamp(0, size).long().tolist()
            hi = (gp.max(dim=0).values + dilate + 2).ceil().clamp(0, size).long().tolist()
            if lo[0] >= hi[0] or lo[1] >= hi[1]:
                continue
            box = (slice(lo[1], hi[1]), slice(lo[0], hi[0]))
            inside = (hull_outside_distance(pix[box], gp) <= dilate).to(torch.float32)
            masks[b, 0][box] = torch.maximum(masks[b, 0][box], inside)
    return gaussian_feather(masks, feather).clamp_(0.0, 1.0)


def blend(face_donor: torch.Tensor, region_donor: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(1 - mask) * face_donor + mask * region_donor`` as float32 (chips stay in [0, 255]).

    Shapes broadcast: (B, 3, S, S) chips with (B, 1, S, S) masks. uint8 chips (as a FaceSet stores
    them) are converted, so a mask of ones returns the region donor and a mask of zeros the face
    donor exactly.
    """
    face = face_donor.to(torch.float32)
    region = region_donor.to(torch.float32)
    m = mask.to(torch.float32)
    return (1.0 - m) * face + m * region


def pair_masks(
    masks: torch.Tensor, face_idx: torch.Tensor, region_idx: torch.Tensor, mode: MaskMode = "union"
) -> torch.Tensor:
    """Per-face masks (N, 1, S, S) -> the (B, 1, S, S) masks for pairs (face donor, region donor).

    ``union`` (default) covers both faces' regions, so the face donor's own feature is replaced even
    where its eyes sit a pixel higher than the region donor's, and none of the donor's feature is
    cut off; ``region_donor`` / ``face_donor`` use one face's landmarks only.
    """
    if mode == "union":
        return torch.maximum(masks[face_idx], masks[region_idx])
    if mode == "region_donor":
        return masks[region_idx]
    if mode == "face_donor":
        return masks[face_idx]
    raise ValueError(f"unknown mask mode {mode!r}")


def blend_region(
    face_chips: torch.Tensor,
    face_landmarks: torch.Tensor,
    region_chips: torch.Tensor,
    region_landmarks: torch.Tensor,
    region: str | Sequence[Sequence[int]] | Sequence[int],
) -> torch.Tensor:
    """Pairwise blends: face ``k`` of ``face_chips`` with the region of face ``k`` of ``region_chips``.

    The union mask of both faces' regions (default dilation and feathering), as in the discovery
    blends; float32 (B, 3, S, S) in [0, 255]. For one-off pairs; discovery itself streams all N(N-1)
    pairs with :func:`iter_blends`, which builds each face's mask once.
    """
    n = face_chips.shape[0]
    masks = region_mask(torch.cat([face_landmarks, region_landmarks]), region, face_chips.shape[-1])
    both = pair_masks(masks, torch.arange(n, device=masks.device), torch.arange(n, 2 * n, device=masks.device))
    return blend(face_chips, region_chips, both)


def n_ordered_pairs(n: int) -> int:
    """N(N-1): the number of ordered (face donor, region donor) pairs of different faces."""
    return n * (n - 1)


def pair_at(k: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat pair numbers ``k`` in [0, N(N-1)) -> (face donor, region donor) indices, never equal.

    Pair ``k`` has face donor ``k // (N-1)``; the region donor runs over the other N-1 faces in
    order. A flat numbering lets a batch (or a resumed job) start at any pair without a table.
    """
    i = torch.div(k, n - 1, rounding_mode="floor")
    r = k - i * (n - 1)
    j = r + (r >= i).to(r.dtype)
    return i, j


def sample_pairs(n: int, max_pairs: int, seed: int) -> torch.Tensor | None:
    """A uniform sample of ``max_pairs`` flat pair numbers (see :func:`pair_at`), sorted; ``None`` = all pairs.

    N(N-1) grows quadratically, so a caller bounding the work per region samples pairs rather than
    faces: every face still acts as face donor and as region donor. The sample is drawn without
    replacement from a generator seeded with ``seed`` (same seed, same pairs on every machine) and
    sorted, so pairs stay grouped by face donor. ``None`` when ``max_pairs`` covers all N(N-1) pairs.
    """
    if n < 2:
        raise ValueError(f"blending needs at least 2 faces, got {n}")
    if max_pairs < 1:
        raise ValueError(f"max_pairs must be positive, got {max_pairs}")
    total = n_ordered_pairs(n)
    if max_pairs >= total:
        return None
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(total, generator=gen)[:max_pairs].sort().values


def iter_blend_batches(
    n: int, batch_size: int, start: int = 0, pairs: torch.Tensor | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (face_idx, region_idx) int64 tensors over all N(N-1) ordered pairs, ``batch_size`` at a time.

    Pairs come grouped by face donor (face donor 0 with every other region donor, then 1, ...);
    ``start`` skips that many pairs (resumption). Only indices are produced: memory stays
    O(batch_size) whatever N is. ``pairs`` (flat pair numbers, e.g. from :func:`sample_pairs`)
    restricts the walk to those pairs, in the given order; ``start`` then counts within them.
    """
    if n < 2:
        raise ValueError(f"blending needs at least 2 faces, got {n}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if pairs is not None:
        flat = torch.as_tensor(pairs, dtype=torch.int64).reshape(-1)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= n_ordered_pairs(n)):
            raise ValueError(f"pair numbers must be in 0..{n_ordered_pairs(n) - 1}")
        if not 0 <= start <= flat.numel():
            raise ValueError(f"start must be in 0..{flat.numel()}, got {start}")
        for s in range(start, flat.numel(), batch_size):
            yield pair_at(flat[s : s + batch_size], n)
        return
    total = n_ordered_pairs(n)
    if not 0 <= start <= total:
        raise ValueError(f"start must be in 0..{total}, got {start}")
    for s in range(start, total, batch_size):
        yield pair_at(torch.arange(s, min(s + batch_size, total), dtype=torch.int64), n)


def iter_blends(
    chips: torch.Tensor,
    landmarks: torch.Tensor,
    region: str | Sequence[Sequence[int]] | Sequence[int],
    batch_size: int,
    *,
    dilate: float = DEFAULT_DILATE,
    feather: float = DEFAULT_FEATHER,
    mask_mode: MaskMode = "union",
    start: int = 0,
    pairs: torch.Tensor | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (face_idx, region_idx, blends) over all N(N-1) ordered pairs of ``chips`` (or ``pairs``).

    ``chips`` are (N, 3, S, S) aligned chips (uint8 or float in [0, 255]) with their (N, 68, 2)
    chip-pixel ``landmarks``; ``blends`` are float32 (B, 3, S, S) in [0, 255] on the chips' device.
    Masks are built once per face (N masks, not N(N-1)). ``pairs`` restricts the blends to those
    flat pair numbers (:func:`sample_pairs`).
    """
    if chips.dim() != 4 or chips.shape[2] != chips.shape[3]:
        raise ValueError(f"expected (N, C, S, S) chips, got {tuple(chips.shape)}")
    if landmarks.shape[0] != chips.shape[0]:
        raise ValueError(f"{chips.shape[0]} chips but {landmarks.shape[0]} landmark sets")
    masks = region_mask(landmarks.to(chips.device), region, chips.shape[-1], dilate, feather)
    for face_idx, region_idx in iter_blend_batches(chips.shape[0], batch_size, start, pairs):
        fi, ri = face_idx.to(chips.device), region_idx.to(chips.device)
        yield face_idx, region_idx, blend(chips[fi], chips[ri], pair_masks(masks, fi, ri, mask_mode))
