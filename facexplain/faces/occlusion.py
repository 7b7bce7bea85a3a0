"""Synthetic occlusion of the same physical face region across differently posed faces (Yin et al.).

FAD (``facexplain.losses.sadfad``) compares a face with the same face under an occlusion, and picks
the feature elements to keep *per batch*; that only makes sense if every face of the batch loses
the same part of the face (both eyes, the nose, the left cheek, ...), not the same pixels. So the
occluder is a rectangle drawn once per batch in a **frontal template frame** and warped onto each
face through a **mesh of triangles** over the 68 landmarks:

* the template is a set of frontal landmark positions (the mean landmarks of a face set in the
  network's input frame, or dlib's mean face used for alignment, ``dlib_frontal_template``) plus
  8 boundary points on a square around the frame, so the mesh covers every pixel;
* the triangles are the Delaunay triangulation of the template points (scipy), used unchanged on
  every face: a face's mesh is the same triangles over its own landmarks and the same boundary
  points, i.e. a piecewise-affine map between the template and the face;
* a face pixel is occluded when its barycentric coordinates in its triangle, applied to the same
  triangle of the template, land inside the rectangle (inverse warping: the mask has no holes,
  and a rectangle that spans several triangles bends with the face).

Everything is pure torch, batched, and deterministic given the seed that draws the rectangle.
Faces whose landmarks leave the boundary square fold their triangles; pixels in no triangle are
left unoccluded (the boundary sits a quarter frame outside the image, far from any real face).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from facexplain.faces.align import _FIRST_TEMPLATE_POINT, _MEAN_FACE_X, _MEAN_FACE_Y

_EPS = 1e-6


@dataclass(frozen=True)
class OcclusionRect:
    """An axis-aligned rectangle [x0, x1] x [y0, y1] in template pixel coordinates, and its seed."""

    x0: float
    y0: float
    x1: float
    y1: float
    seed: int | None = None

    def contains(self, pts: torch.Tensor) -> torch.Tensor:
        """(..., 2) points -> (...) bool: inside or on the border."""
        x, y = pts[..., 0], pts[..., 1]
        return (x >= self.x0) & (x <= self.x1) & (y >= self.y0) & (y <= self.y1)


@dataclass(frozen=True)
class FaceMesh:
    """A triangle mesh over frontal landmarks plus frame boundary points (see module docstring).

    ``points`` (P, 2) are the template positions: first the landmarks ``landmark_index`` (indices
    into the 68 iBUG points), then the boundary points; ``triangles`` (T, 3) index ``points``.
    ``size`` is the side of the square frame (pixels) the template and the faces live in.
    """

    points: torch.Tensor
    landmark_index: tuple[int, ...]
    boundary: torch.Tensor
    triangles: torch.Tensor
    size: int

    @classmethod
    def from_template(
        cls,
        template: torch.Tensor,
        size: int,
        landmark_index: Sequence[int] | None = None,
        boundary_margin: float = 0.25,
    ) -> FaceMesh:
        """Mesh over ``template`` (K, 2) landmark positions (indices ``landmark_index``, default 0..K-1).

        Boundary points: corners and edge midpoints of the square ``[-m, size - 1 + m]``, m =
        ``boundary_margin * size``; the faces share them, so the frame border maps to itself.
        """
        from scipy.spatial import Delaunay  # heavy: only building a mesh needs it, not applying one

        tmpl = torch.as_tensor(template, dtype=torch.float32)
        if tmpl.dim() != 2 or tmpl.shape[1] != 2:
            raise ValueError(f"expected (K, 2) template landmarks, got {tuple(tmpl.shape)}")
        index = tuple(range(tmpl.shape[0])) if landmark_index is None else tuple(int(i) for i in landmark_index)
        if len(index) != tmpl.shape[0]:
            raise ValueError("landmark_index must name one landmark per template point")
        m = boundary_margin * size
        lo, hi, mid = -m, size - 1 + m, (size - 1) / 2
        boundary = torch.tensor(
            [[lo, lo], [mid, lo], [hi, lo], [hi, mid], [hi, hi], [mid, hi], [lo, hi], [lo, mid]], dtype=torch.float32
        )
        points = torch.cat([tmpl, boundary])
        tri = Delaunay(points.double().numpy()).simplices
        triangles = torch.from_numpy(np.ascontiguousarray(tri, dtype=np.int64))
        return cls(points, index, boundary, triangles, size)

    def face_points(self, landmarks68: torch.Tensor) -> torch.Tensor:
        """(B, 68, 2) face landmarks (same frame as the template) -> (B, P, 2) mesh vertices of each face."""
        if landmarks68.dim() != 3 or landmarks68.shape[-1] != 2:
            raise ValueError(f"expected (B, 68, 2) landmarks, got {tuple(landmarks68.shape)}")
        lm = landmarks68[:, list(self.landmark_index)].float()
        bnd = self.boundary.to(lm.device).expand(lm.shape[0], -1, -1)
        return torch.cat([lm, bnd], dim=1)


def dlib_frontal_template(size: int = 150, padding: float = 0.25) -> tuple[torch.Tensor, tuple[int, ...]]:
    """dlib's mean face (the alignment template of ``facexplain.faces.align``) in chip pixels.

    Returns the (51, 2) positions of landmarks 17..67 (dlib's mean face has no jaw line) in a
    ``size`` chip with ``padding``, and their indices. Scale them like any chip landmarks to use them
    in another frame (``SADFADNet``'s 96-px input, for example).
    """
    xy = torch.tensor([_MEAN_FACE_X, _MEAN_FACE_Y], dtype=torch.float64).T
    pts = (padding + xy) / (2 * padding + 1) * size
    index = tuple(range(_FIRST_TEMPLATE_POINT, _FIRST_TEMPLATE_POINT + pts.shape[0]))
    return pts.float(), index


def mean_template(landmarks68: torch.Tensor) -> torch.Tensor:
    """(N, 68, 2) landmarks of aligned faces -> (68, 2) mean: a frontal template in the same frame."""
    if landmarks68.dim() != 3 or landmarks68.shape[0] == 0:
        raise ValueError("mean_template needs at least one (68, 2) landmark set")
    return landmarks68.float().mean(dim=0)


def barycentric(points: torch.Tensor, triangles: torch.Tensor) -> torch.Tensor:
    """Barycentric coordinates of (B, Q, 2) points in each of (B, T, 3, 2) triangles -> (B, Q, T, 3).

    Degenerate (zero-area) triangles get NaN coordinates, which no inside test accepts.
    """
    a, b, c = triangles[:, :, 0], triangles[:, :, 1], triangles[:, :, 2]  # (B, T, 2)
    v0, v1 = b - a, c - a
    det = v0[..., 0] * v1[..., 1] - v0[..., 1] * v1[..., 0]  # (B, T)
    det = torch.where(det.abs() < 1e-12, torch.full_like(det, float("nan")), det)
    d = points[:, :, None, :] - a[:, None, :, :]  # (B, Q, T, 2)
    u = (d[..., 0] * v1[:, None, :, 1] - d[..., 1] * v1[:, None, :, 0]) / det[:, None]
    v = (v0[:, None, :, 0] * d[..., 1] - v0[:, None, :, 1] * d[..., 0]) / det[:, None]
    return torch.stack([1 - u - v, u, v], dim=-1)


def warp_points(
    points: torch.Tensor,
    src_vertices: torch.Tensor,
    dst_vertices: torch.Tensor,
    triangles: torch.Tensor,
    chunk: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map (B, Q, 2) points through the piecewise-affine warp ``src`` mesh -> ``dst`` mesh.

    ``src_vertices`` / ``dst_vertices`` are (B, P, 2) or (P, 2) (broadcast); each point takes the
    first triangle of ``src`` that contains it and the same barycentric coordinates in ``dst``.
    Returns the mapped points and a (B, Q) bool saying which points lay in some triangle (the others
    come back unchanged).
    """
    bsz = points.shape[0]
    src = src_vertices if src_vertices.dim() == 3 else src_vertices.expand(bsz, -1, -1)
    dst = dst_vertices if dst_vertices.dim() == 3 else dst_vertices.expand(bsz, -1, -1)
    src = src.to(points.device, points.dtype)
    dst = dst.to(points.device, points.dtype)
    tri = triangles.to(points.device)
    src_tri = src[:, tri]  # (B, T, 3, 2)
    dst_tri = dst[:, tri]
    out = points.clone()
    valid = torch.zeros(points.shape[:2], dtype=torch.bool, device=points.device)
    for s in range(0, points.shape[1], chunk):
        p = points[:, s : s + chunk]
        bc = barycentric(p, src_tri)  # (B, q, T, 3)
        inside = (bc >= -_EPS).all(dim=-1)  # NaN compares False
        found = inside.any(dim=-1)
        first = inside.float().argmax(dim=-1)  # (B, q): first containing triangle
        w = torch.gather(bc, 2, first[..., None, None].expand(-1, -1, 1, 3)).squeeze(2)  # (B, q, 3)
        corners = torch.gather(
            dst_tri[:, None].expand(-1, p.shape[1], -1, -1, -1), 2, first[..., None, None, None].expand(-1, -1, 1, 3, 2)
        ).squeeze(2)  # (B, q, 3, 2)
        mapped = (w[..., None] * corners).sum(dim=-2)
        out[:, s : s + chunk] = torch.where(found[..., None], mapped, p)
        valid[:, s : s + chunk] = found
    return out, valid


def sample_rectangle(
    seed: int,
    size: int,
    width: tuple[float, float] = (32.0, 32.0),
    height: tuple[float, float] = (12.0, 12.0),
    margin: float = 4.0,
) -> OcclusionRect:
    """A random rectangle in the template frame, drawn from ``seed`` alone (same seed, same rectangle).

    Width and height are uniform in the given ranges (the authors use a fixed 32 x 12 occluder on
    96-px faces); the rectangle lies inside ``[margin, size - 1 - margin]`` and its top-left corner is
    uniform over the positions that allow.
    """
    rng = np.random.default_rng(seed)
    w = float(rng.uniform(width[0], width[1])) if width[1] > width[0] else float(width[0])
    h = float(rng.uniform(height[0], height[1])) if height[1] > height[0] else float(height[0])
    span = size - 1 - 2 * margin
    if w > span or h > span:
        raise ValueError(f"a {w:.0f} x {h:.0f} occluder does not fit a {size}-px frame with margin {margin}")
    x0 = margin + float(rng.uniform(0.0, span - w))
    y0 = margin + float(rng.uniform(0.0, span - h))
    return OcclusionRect(x0, y0, x0 + w, y0 + h, seed)


def occlusion_masks(
    mesh: FaceMesh, landmarks68: torch.Tensor, rect: OcclusionRect, out_size: int | None = None
) -> torch.Tensor:
    """(B, 68, 2) face landmarks -> (B, 1, S, S) bool masks of the template rectangle on each face.

    A pixel centre is occluded when it maps (face mesh -> template mesh) into ``rect``. Only the
    triangles whose template bounding box meets the rectangle can hold occluded pixels, so only
    those are searched, and only over the pixels of their bounding box on the batch's faces: a pixel
    in any other triangle maps outside the rectangle by construction.
    """
    size = out_size or mesh.size
    device = landmarks68.device
    bsz = landmarks68.shape[0]
    pts = mesh.points
    tri = mesh.triangles
    tp = pts[tri]  # (T, 3, 2)
    lo, hi = tp.min(dim=1).values, tp.max(dim=1).values
    meets = (lo[:, 0] <= rect.x1) & (hi[:, 0] >= rect.x0) & (lo[:, 1] <= rect.y1) & (hi[:, 1] >= rect.y0)
    if not bool(meets.any()):
        return torch.zeros(bsz, 1, size, size, dtype=torch.bool, device=device)
    sub = tri[meets]
    face = mesh.face_points(landmarks68.to(device))
    # Only pixels inside the bounding box of those triangles on some face of the batch can be occluded.
    corners = face[:, sub.to(device)].reshape(-1, 2)
    x_lo = max(0, int(torch.floor(corners[:, 0].min())))
    y_lo = max(0, int(torch.floor(corners[:, 1].min())))
    x_hi = min(size - 1, int(torch.ceil(corners[:, 0].max())))
    y_hi = min(size - 1, int(torch.ceil(corners[:, 1].max())))
    masks = torch.zeros(bsz, 1, size, size, dtype=torch.bool, device=device)
    if x_hi < x_lo or y_hi < y_lo:
        return masks
    ys = torch.arange(y_lo, y_hi + 1, dtype=torch.float32, device=device)
    xs = torch.arange(x_lo, x_hi + 1, dtype=torch.float32, device=device)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    grid = torch.stack([gx, gy], dim=-1).reshape(1, -1, 2).expand(bsz, -1, -1)
    mapped, valid = warp_points(grid, face, pts.to(device), sub)
    inside = valid & rect.contains(mapped)
    masks[:, 0, y_lo : y_hi + 1, x_lo : x_hi + 1] = inside.reshape(bsz, len(ys), len(xs))
    return masks


def occlude(images: torch.Tensor, masks: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Paint ``fill`` (0: black in [0, 255]) where ``masks`` (B, 1, H, W) is set; a new tensor."""
    return torch.where(masks.to(images.device), torch.as_tensor(fill, dtype=images.dtype, device=images.device), images)


def occlude_batch(
    images: torch.Tensor,
    landmarks68: torch.Tensor,
    mesh: FaceMesh,
    seed: int,
    width: tuple[float, float] = (32.0, 32.0),
    height: tuple[float, float] = (12.0, 12.0),
    margin: float = 4.0,
    fill: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, OcclusionRect]:
    """One physical occlusion for the whole batch: draw the rectangle from ``seed``, warp, paint.

    Returns (occluded images, masks, rectangle); the rectangle records the seed.
    """
    rect = sample_rectangle(seed, mesh.size, width, height, margin)
    masks = occlusion_masks(mesh, landmarks68, rect, images.shape[-1])
    return occlude(images, masks, fill), masks, rect


# Named face regions for occlusion analysis (DFD §4.3.2): the landmarks (iBUG 68) whose frontal
# positions a region's occluder covers. A named region is a rectangle over the *frontal template* (not
# over one face's pixels), so "eyes" hides the same physical part of every face however it is posed.
OCCLUSION_REGIONS: dict[str, tuple[int, ...]] = {
    "eyes": tuple(range(36, 48)),  # both eyes (a bar across them, as sunglasses would be)
    "nose": tuple(range(27, 36)),
    "mouth": tuple(range(48, 68)),
}


def region_rect(region: str, size: int = 150, padding: float = 0.25, margin: float = 0.06) -> OcclusionRect:
    """The rectangle hiding ``region`` in the frontal template of a ``size`` chip with ``padding``.

    The bounding box of the region's landmarks on dlib's mean face, grown by ``margin * size`` pixels
    on every side (a tight box would leave the eye corners and lashes visible). Raises ``KeyError`` for
    an unknown region.
    """
    index = OCCLUSION_REGIONS[region]
    pts, tmpl_index = dlib_frontal_template(size, padding)
    rows = [tmpl_index.index(i) for i in index]
    p = pts[rows]
    m = margin * size
    lo, hi = p.min(dim=0).values - m, p.max(dim=0).values + m
    return OcclusionRect(float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1]))


def chip_mesh(size: int = 150, padding: float = 0.25) -> FaceMesh:
    """The mesh over dlib's mean face in a ``size`` chip: what region occluders are warped through."""
    pts, index = dlib_frontal_template(size, padding)
    return FaceMesh.from_template(pts, size, index)
