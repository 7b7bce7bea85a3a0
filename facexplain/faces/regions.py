"""Face-region masks from 68-point landmarks, in aligned-chip coordinates.

The Deep Face Decoder applies each loss twice: over the whole chip and over the local face
region (eyes with brows, nose, mouth). Identity lives mostly in that region, while hair and
background dominate a global pixel loss; weighting the region separately keeps the decoder from
spending its capacity on the periphery.
"""

from __future__ import annotations

import torch

from facexplain.faces.align import chip_transforms

# Landmarks 17..67: brows (17-26), nose (27-35), eyes (36-47), mouth (48-67); the jaw (0-16) is out.
REGION_POINTS = tuple(range(17, 68))


def landmarks_to_chip(landmarks68: torch.Tensor, size: int = 150, padding: float = 0.25) -> torch.Tensor:
    """(N, 68, 2) image-pixel landmarks -> (N, 68, 2) pixel coordinates in the ``size`` x ``size`` chip.

    Inverts ``chip_transforms`` (chip -> image) for the same ``size`` and ``padding``, i.e. for a chip
    produced by ``align_faces(..., size, padding)``. For a chip produced at 150 px and resized to S,
    use ``(p + 0.5) * S / 150 - 0.5`` on the 150-px result instead (pixel-centre convention).
    """
    m = chip_transforms(landmarks68, size, padding).to(torch.float64)
    a, t = m[:, :, :2], m[:, :, 2]
    pts = landmarks68.detach().to(torch.float64) - t.unsqueeze(1)
    out = torch.linalg.solve(a, pts.transpose(1, 2)).transpose(1, 2)
    dtype = landmarks68.dtype if landmarks68.is_floating_point() else torch.float32
    return out.to(dtype)


def convex_hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Andrew's monotone chain; counter-clockwise in a y-up frame, without repeated end point."""
    pts = sorted(set(points))
    if len(pts) <= 2:
        return pts

    def cross(o: tuple[float, float], a: tuple[float, float], b: tuple[float, float]) -> float:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list[tuple[float, float]] = []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    upper: list[tuple[float, float]] = []
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return lower[:-1] + upper[:-1]


def face_region_mask(
    landmarks_chip: torch.Tensor, size: int, margin: float = 0.0, feather: float = 0.05
) -> torch.Tensor:
    """(B, 68, 2) landmarks in the output image's pixel coordinates -> (B, 1, size, size) mask in [0, 1].

    The region is the convex hull of landmarks 17..67 (brows, eyes, nose, mouth): 1 inside it and
    within ``margin * size`` pixels of it, falling linearly to exactly 0 over a further
    ``feather * size`` pixels. Feathering avoids a hard edge that would make the local losses jump
    as a landmark moves by a pixel; exact zeros far outside keep hair and background out. The
    distance used is the largest outward distance to a hull edge line (exact inside the hull and
    along edges, slightly less than euclidean near corners, which only rounds the feathered band).
    The mask carries no gradient.
    """
    if landmarks_chip.dim() != 3 or landmarks_chip.shape[1:] != (68, 2):
        raise ValueError(f"expected (B, 68, 2) landmarks, got {tuple(landmarks_chip.shape)}")
    device = landmarks_chip.device
    coords = torch.arange(size, dtype=torch.float32, device=device)
    grid_y, grid_x = torch.meshgrid(coords, coords, indexing="ij")
    pix = torch.stack([grid_x, grid_y], dim=-1)  # (S, S, 2)
    pts = landmarks_chip.detach()[:, list(REGION_POINTS)].to("cpu", torch.float64)
    masks = []
    for b in range(pts.shape[0]):
        hull = convex_hull([(float(x), float(y)) for x, y in pts[b].tolist()])
        if len(hull) < 3:
            masks.append(torch.zeros(size, size, device=device))
            continue
        v = torch.tensor(hull, dtype=torch.float32, device=device)  # (K, 2), CCW for x right / y up
        e = torch.roll(v, -1, dims=0) - v
        # Outward normal of a CCW polygon (in the x/y frame the hull was computed in) is (e_y, -e_x).
        normal = torch.stack([e[:, 1], -e[:, 0]], dim=-1)
        normal = normal / normal.norm(dim=-1, keepdim=True).clamp_min(1e-9)
        outward = ((pix.unsqueeze(-2) - v) * normal).sum(-1).amax(-1)  # (S, S): <= 0 inside
        ramp = max(feather * size, 1e-6)
        masks.append(((margin * size + ramp - outward) / ramp).clamp(0.0, 1.0))
    return torch.stack(masks).unsqueeze(1)
