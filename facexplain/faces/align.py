"""Differentiable alignment of faces to the recognition net's 150x150 chip, reproducing dlib.

``FaceRecognitionNet`` was trained on chips from ``dlib.get_face_chip(shape, size=150,
padding=0.25)``; a chip framed or sampled differently costs agreement with dlib's descriptor.
So the geometry here follows dlib's ``get_face_chip_details`` and ``extract_image_chips``
(``dlib/image_transforms/interpolation.h``) step by step, while the sampling is a
``grid_sample`` so attributions can flow from the template back to the original image pixels.
Landmarks are treated as constants (detached): only pixels carry gradients.

Coordinates are pixel-index coordinates throughout (pixel ``i`` covers [i - 0.5, i + 0.5]),
as dlib's landmarks and bilinear interpolation use them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

# Canonical mean face for 68-point landmarks 17..67, in units of the (unpadded) face square.
# Copied from dlib's get_face_chip_details(), dlib/image_transforms/interpolation.h
# (github.com/davisking/dlib, ``mean_face_shape_x`` / ``mean_face_shape_y``).
_MEAN_FACE_X = (
    0.000213256, 0.0752622, 0.18113, 0.29077, 0.393397, 0.586856, 0.689483, 0.799124,
    0.904991, 0.98004, 0.490127, 0.490127, 0.490127, 0.490127, 0.36688, 0.426036,
    0.490127, 0.554217, 0.613373, 0.121737, 0.187122, 0.265825, 0.334606, 0.260918,
    0.182743, 0.645647, 0.714428, 0.793132, 0.858516, 0.79751, 0.719335, 0.254149,
    0.340985, 0.428858, 0.490127, 0.551395, 0.639268, 0.726104, 0.642159, 0.556721,
    0.490127, 0.423532, 0.338094, 0.290379, 0.428096, 0.490127, 0.552157, 0.689874,
    0.553364, 0.490127, 0.42689,
)  # fmt: skip
_MEAN_FACE_Y = (
    0.106454, 0.038915, 0.0187482, 0.0344891, 0.0773906, 0.0773906, 0.0344891,
    0.0187482, 0.038915, 0.106454, 0.203352, 0.307009, 0.409805, 0.515625, 0.587326,
    0.609345, 0.628106, 0.609345, 0.587326, 0.216423, 0.178758, 0.179852, 0.231733,
    0.245099, 0.244077, 0.231733, 0.179852, 0.178758, 0.216423, 0.244077, 0.245099,
    0.780233, 0.745405, 0.727388, 0.742578, 0.727388, 0.745405, 0.780233, 0.864805,
    0.902192, 0.909281, 0.902192, 0.864805, 0.784792, 0.778746, 0.785343, 0.778746,
    0.784792, 0.824182, 0.831803, 0.824182,
)  # fmt: skip
_FIRST_TEMPLATE_POINT = 17

# dlib fits on landmarks 17..67 minus the eyebrows (17-26) and the lower lip (55-59, 65-67),
# which move with expression: nose, eyes, upper outer lip, upper inner lip.
ALIGNMENT_POINTS = tuple(i for i in range(27, 68) if not (55 <= i <= 59 or 65 <= i <= 67))


def chip_template(size: int = 150, padding: float = 0.25) -> torch.Tensor:
    """Chip pixel positions of ``ALIGNMENT_POINTS`` in dlib's canonical face, (K, 2) float64."""
    idx = [i - _FIRST_TEMPLATE_POINT for i in ALIGNMENT_POINTS]
    xy = torch.tensor([[_MEAN_FACE_X[i], _MEAN_FACE_Y[i]] for i in idx], dtype=torch.float64)
    return (padding + xy) / (2 * padding + 1) * size


def similarity_transform(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) src -> dst.

    ``src`` and ``dst`` are (N, K, 2) or (K, 2) and broadcast against each other; the result is
    (N, 2, 3) ``[A | t]`` with ``dst ~ A @ src + t``. In 2-D the Umeyama solution dlib's
    ``find_similarity_transform`` computes has the closed form ``A = [[a, -b], [b, a]]`` below
    (scale and rotation together, which cannot express a reflection), so no SVD is needed.
    Computed in float64; returned in the promoted input dtype.
    """
    out_dtype = torch.promote_types(src.dtype, dst.dtype)
    src, dst = torch.broadcast_tensors(src.to(torch.float64), dst.to(torch.float64))
    if src.dim() == 2:
        src, dst = src.unsqueeze(0), dst.unsqueeze(0)
    mu_s, mu_d = src.mean(dim=-2, keepdim=True), dst.mean(dim=-2, keepdim=True)
    s, d = src - mu_s, dst - mu_d
    var = (s * s).sum(dim=(-2, -1))
    a = (s[..., 0] * d[..., 0] + s[..., 1] * d[..., 1]).sum(-1) / var
    b = (s[..., 0] * d[..., 1] - s[..., 1] * d[..., 0]).sum(-1) / var
    rot_scale = torch.stack([torch.stack([a, -b], -1), torch.stack([b, a], -1)], -2)
    t = mu_d.squeeze(-2) - (rot_scale @ mu_s.transpose(-1, -2)).squeeze(-1)
    return torch.cat([rot_scale, t.unsqueeze(-1)], dim=-1).to(out_dtype)


def chip_transforms(landmarks68: torch.Tensor, size: int = 150, padding: float = 0.25) -> torch.Tensor:
    """(N, 68, 2) image landmarks -> (N, 2, 3) affine maps from chip pixel to image pixel coordinates.

    Not simply the fitted similarity: dlib turns the fit into a rectangle
    (``centered_drect(center, size * scale, size * scale)``, whose corners lie (size*scale - 1)/2
    from the centre) and maps chip pixels 0 and size-1 onto its corners, so the effective
    scale is ``(size * scale - 1) / (size - 1)`` about the chip centre ``(size - 1) / 2``.
    """
    pts = landmarks68.detach()[:, list(ALIGNMENT_POINTS)]
    template = chip_template(size, padding).to(pts.device)
    fit = similarity_transform(template, pts.to(torch.float64))  # chip -> image, as dlib fits it
    rot_scale, t = fit[:, :, :2], fit[:, :, 2]
    scale = rot_scale[:, :, 0].norm(dim=-1)  # |A @ (1, 0)|
    rotation = rot_scale / scale.view(-1, 1, 1)
    centre = (rot_scale @ torch.full((2, 1), size / 2, dtype=torch.float64, device=pts.device)).squeeze(-1) + t
    eff = rotation * ((size * scale - 1) / (size - 1)).view(-1, 1, 1)
    offset = centre - (eff @ torch.full((2, 1), (size - 1) / 2, dtype=torch.float64, device=pts.device)).squeeze(-1)
    dtype = landmarks68.dtype if landmarks68.is_floating_point() else torch.float32
    return torch.cat([eff, offset.unsqueeze(-1)], dim=-1).to(dtype)


# Five points from the 68 iBUG landmarks, in the order of MTCNN/InsightFace's five: the eye centres
# (mean of each eye's six points; the eye on the image's left first), the nose tip, the mouth corners.
FIVE_POINT_GROUPS = ((36, 37, 38, 39, 40, 41), (42, 43, 44, 45, 46, 47), (30,), (48,), (54,))
DLIB_ALIGNMENT = "dlib"
ARCFACE_5PT_ALIGNMENT = "arcface_5pt"
ALIGNMENTS = (DLIB_ALIGNMENT, ARCFACE_5PT_ALIGNMENT)


def five_points(landmarks68: torch.Tensor) -> torch.Tensor:
    """(N, 68, 2) -> (N, 5, 2): eye centres, nose tip, mouth corners."""
    return torch.stack([landmarks68[:, list(g)].mean(dim=1) for g in FIVE_POINT_GROUPS], dim=1)


def five_point_transforms(landmarks68: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(N, 68, 2) image landmarks -> (N, 2, 3) chip-to-image maps for a five-point reference (5, 2).

    InsightFace-style: the least-squares similarity from the image's five points onto the reference
    (what ``skimage``'s ``SimilarityTransform.estimate(src=landmarks, dst=reference)`` fits), inverted
    here because sampling needs chip -> image. Pixel-index coordinates on both sides, as cv2's
    ``warpAffine`` uses them.
    """
    pts = five_points(landmarks68.detach().to(torch.float64))
    fit = similarity_transform(pts, reference.to(pts.device, torch.float64))  # image -> chip
    a, t = fit[:, :, :2], fit[:, :, 2:]
    a_inv = torch.linalg.inv(a)
    inv = torch.cat([a_inv, -(a_inv @ t)], dim=-1)
    dtype = landmarks68.dtype if landmarks68.is_floating_point() else torch.float32
    return inv.to(dtype)


def face_transforms(
    landmarks68: torch.Tensor,
    size: int,
    padding: float,
    alignment: str = DLIB_ALIGNMENT,
    reference: torch.Tensor | None = None,
) -> torch.Tensor:
    """Chip-to-image maps of either alignment (``reference``: the five-point template, chip pixels)."""
    if alignment == DLIB_ALIGNMENT:
        return chip_transforms(landmarks68, size, padding)
    if alignment == ARCFACE_5PT_ALIGNMENT:
        if reference is None:
            raise ValueError("five-point alignment needs its reference points")
        return five_point_transforms(landmarks68, reference)
    raise ValueError(f"unknown alignment {alignment!r}; expected one of {ALIGNMENTS}")


def _to_homogeneous(m: torch.Tensor) -> torch.Tensor:
    bottom = torch.tensor([0.0, 0.0, 1.0], dtype=m.dtype, device=m.device).expand(m.shape[0], 1, 3)
    return torch.cat([m, bottom], dim=1)


def _pixel_map(sx: float, tx: float, sy: float, ty: float, device: torch.device) -> torch.Tensor:
    """3x3 axis-aligned affine ``(x, y) -> (sx x + tx, sy y + ty)`` in float64."""
    rows = [[sx, 0.0, tx], [0.0, sy, ty], [0.0, 0.0, 1.0]]
    return torch.tensor(rows, dtype=torch.float64, device=device)


def _sample_chips(canvas: torch.Tensor, chip_to_image: torch.Tensor, image_wh: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear chips from ``canvas`` (N, C, Hc, Wc); ``image_wh`` (N, 2) is each face's real image size.

    ``affine_grid``/``grid_sample`` with ``align_corners=False`` put pixel ``i`` at normalised
    ``(2i + 1) / n - 1``; we conjugate the pixel-space map with that convention on both sides.
    dlib leaves a chip pixel black unless all four bilinear neighbours are inside the image
    (``0 <= x < W - 1``), which the mask reproduces; it also hides any canvas padding.
    """
    n, _, hc, wc = canvas.shape
    out_to_px = _pixel_map(size / 2, (size - 1) / 2, size / 2, (size - 1) / 2, canvas.device)
    px_to_in = _pixel_map(2.0 / wc, 1.0 / wc - 1, 2.0 / hc, 1.0 / hc - 1, canvas.device)
    theta = (px_to_in @ _to_homogeneous(chip_to_image.to(torch.float64)) @ out_to_px)[:, :2]
    grid = F.affine_grid(theta, [n, 1, size, size], align_corners=False)
    chips = F.grid_sample(canvas, grid.to(canvas.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)
    x = ((grid[..., 0] + 1) * wc - 1) / 2
    y = ((grid[..., 1] + 1) * hc - 1) / 2
    wh = image_wh.to(torch.float64).view(n, 1, 1, 2)
    inside = (x >= 0) & (y >= 0) & (x < wh[..., 0] - 1) & (y < wh[..., 1] - 1)
    return chips * inside.unsqueeze(1).to(chips.dtype)


def align_faces(
    image_batch: torch.Tensor,
    landmarks68: torch.Tensor,
    size: int = 150,
    padding: float = 0.25,
    alignment: str = DLIB_ALIGNMENT,
    reference: torch.Tensor | None = None,
) -> torch.Tensor:
    """(N, C, H, W) images, one face each, + (N, 68, 2) landmarks -> (N, C, size, size) dlib-style chips.

    Differentiable with respect to ``image_batch``. Values are not quantised: dlib truncates its
    chips to uint8, so ``floor`` of our chip reproduces ``dlib.get_face_chip`` (mean absolute
    difference < 0.01 grey levels on ORL/CelebA), while the float chip sits ~0.5 above it.
    """
    n, _, h, w = image_batch.shape
    wh = torch.tensor([[w, h]], device=image_batch.device).expand(n, 2)
    return _sample_chips(image_batch, face_transforms(landmarks68, size, padding, alignment, reference), wh, size)


def align_faces_from_images(
    images: Sequence[torch.Tensor],
    image_index: torch.Tensor,
    landmarks68: torch.Tensor,
    size: int = 150,
    padding: float = 0.25,
    alignment: str = DLIB_ALIGNMENT,
    reference: torch.Tensor | None = None,
) -> torch.Tensor:
    """Chips for N faces drawn from differently sized (C, H_i, W_i) images in one batched call.

    ``image_index[k]`` says which image face ``k`` (landmarks ``landmarks68[k]``) comes from.
    Images are zero-padded onto a common canvas, and the per-image validity mask keeps the
    padding out of the chips, so the result equals aligning each image on its own. Gradients
    reach every image in ``images``.
    """
    hmax = max(int(img.shape[-2]) for img in images)
    wmax = max(int(img.shape[-1]) for img in images)
    canvas = torch.stack([F.pad(img, (0, wmax - img.shape[-1], 0, hmax - img.shape[-2])) for img in images])
    sizes = torch.tensor([[img.shape[-1], img.shape[-2]] for img in images], device=canvas.device)
    index = image_index.to(device=canvas.device, dtype=torch.long)
    transforms = face_transforms(landmarks68, size, padding, alignment, reference)
    return _sample_chips(canvas[index], transforms, sizes[index], size)
