"""Getting face-api's 112-px network input out of an aligned chip (or a decoded face).

face-api's landmark and expression nets see a face cut from a box, padded to a square with black
(centred) and resized with tf's legacy bilinear resize (:func:`facexplain.models.landmarks.tf_resize_bilinear`).
An aligned chip has no detector box, and a decoded face has no landmarks either, so the box comes
from one of two places:

* **landmarks** (:func:`landmark_boxes`): face-api's own expression pipeline crops the box of the 68
  points grown by 20 % of its width/height (``FaceLandmarks.align()`` -> ``alignMinBbox(0.2)``), so a
  chip with landmarks gets exactly the crop face-api would make in that frame;
* **the aligned frame** (:data:`CHIP_FACE_BOX`, :data:`CHIP_DETECTOR_BOX`): alignment puts every face
  at nearly the same place, so one fixed box, measured on real chips and stored as fractions of the
  chip side, serves faces without landmarks (decoded images at any resolution).

Images may be ``[0, 1]`` floats (decoder output) or ``[0, 255]`` (uint8 chips, FR-model input);
:func:`to_255` settles that once so every estimator accepts both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from facexplain.models.feature_extractor import INPUT_SIZE
from facexplain.models.landmarks import tf_resize_bilinear

# Box = (x1, y1, x2, y2) as fractions of the chip side, exclusive right/bottom, for dlib-geometry chips
# (padding 0.25, the default FR model's alignment).
#
# CHIP_FACE_BOX: face-api's expression crop (68-point bounding box grown by 20 %) of the *mean* face.
# Measured on the 5,303 CelebA chips of the project's face set (150 px): the 68-point box averages
# x 9.4..133.7, y 23.1..139.7 px; grown by 20 % of width/height that is x -3.0..146.2, y 11.5..151.3 px.
CHIP_FACE_BOX = (-3.0 / 150, 11.5 / 150, 146.2 / 150, 151.3 / 150)
# CHIP_DETECTOR_BOX: the box the landmark net gets on a chip: the whole chip. The net was trained on
# detector boxes, which a chip does not have; the fixed box that best reproduces the landmarks the net
# gave on the original photo's detector box (mapped into the chip) was searched on 150 CelebA chips
# (centre x 0.48-0.52, y 0.52-0.64, side 0.72-0.96 of the chip): mean point error over the outer-eye-corner
# distance 3.78 % at the best box, 3.79 % for the whole chip, 4-18 % for smaller ones. The whole chip is
# as good and is left-right symmetric, so a mirrored chip gets the mirrored crop.
CHIP_DETECTOR_BOX = (0.0, 0.0, 1.0, 1.0)

Box = tuple[float, float, float, float]

# Float images whose maximum is at most this are [0, 1] images (see to_255).
UNIT_RANGE_MAX = 1.5


def to_255(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) images -> float32 in [0, 255].

    uint8 is taken as [0, 255]. A float tensor whose largest value is at most
    :data:`UNIT_RANGE_MAX` is taken as [0, 1], scaled and clamped: resizing (antialiased or bicubic)
    overshoots 1.0 by a little, and a test of ``max <= 1`` would then read a [0, 1] image as an
    almost black [0, 255] one. A [0, 255] image that dark is black either way. Anything else is
    taken as [0, 255].
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected (N, 3, H, W) RGB images, got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.to(torch.float32)
    x = images.to(torch.float32)
    if x.numel() and float(x.max()) <= UNIT_RANGE_MAX:
        return (x * 255.0).clamp_(0.0, 255.0)
    return x


def scale_points(points: torch.Tensor, from_size: int, to_size: int) -> torch.Tensor:
    """Pixel-index coordinates in a ``from_size`` image -> the same points in a ``to_size`` resize of it.

    Pixel ``i`` covers [i - 0.5, i + 0.5], so the map is ``(p + 0.5) * to / from - 0.5``.
    """
    return (points + 0.5) * (to_size / from_size) - 0.5


def landmark_boxes(landmarks: torch.Tensor, pad: float = 0.2) -> torch.Tensor:
    """(N, 68, 2) points -> (N, 4) boxes: their bounding box grown by ``pad`` of its width and height.

    face-api's ``alignMinBbox(minBoxPadding=0.2)``: ``Box.pad(w * pad, h * pad)`` moves each side out by
    half of that.
    """
    lo = landmarks.min(dim=1).values
    hi = landmarks.max(dim=1).values
    grow = (hi - lo) * (pad / 2)
    return torch.cat([lo - grow, hi + grow], dim=1)


def fixed_boxes(n: int, size: int, box: Box) -> torch.Tensor:
    """The same fractional ``box`` for ``n`` images of side ``size``, in pixels: (n, 4)."""
    return torch.tensor(box, dtype=torch.float32).mul(size).expand(n, 4).clone()


def _crop_geometry(box: Sequence[float], height: int, width: int) -> tuple[slice, slice, tuple[int, int, int, int]]:
    """face-api's crop of a box: clip to the image, floor origin and size, then the centred square padding.

    Returns the row and column slices to cut and the (left, right, top, bottom) zero padding.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    cx, cy = max(x1, 0.0), max(y1, 0.0)
    x0, y0 = math.floor(cx), math.floor(cy)
    w = math.floor(min(x2 - cx, width - cx))
    h = math.floor(min(y2 - cy, height - cy))
    if w <= 0 or h <= 0:
        raise ValueError(f"face box {list(box)} lies outside the {width}x{height} image")
    side = max(w, h)
    diff = side - min(w, h)
    append = math.floor(diff / 2 + 0.5)  # JS Math.round of the half difference goes after the image
    prepend = diff - append
    pad_left, pad_top = (prepend, 0) if w < h else (0, prepend)
    return slice(y0, y0 + h), slice(x0, x0 + w), (pad_left, side - w - pad_left, pad_top, side - h - pad_top)


def crop_faces(images255: torch.Tensor, boxes: torch.Tensor, out: int = INPUT_SIZE) -> torch.Tensor:
    """(N, 3, H, W) images in [0, 255] and (N, 4) pixel boxes -> (N, 3, out, out) net inputs.

    Identical boxes (the fixed-box case) are cropped and resized as one batch.
    """
    if boxes.shape != (images255.shape[0], 4):
        raise ValueError(f"{images255.shape[0]} images but boxes of shape {tuple(boxes.shape)}")
    if images255.shape[0] == 0:
        return images255.new_zeros(0, 3, out, out)
    height, width = images255.shape[-2:]
    if bool((boxes == boxes[:1]).all()):
        rows, cols, pad = _crop_geometry(boxes[0].tolist(), height, width)
        return tf_resize_bilinear(torch.nn.functional.pad(images255[:, :, rows, cols], pad), out)
    outs = []
    for image, box in zip(images255, boxes, strict=True):
        rows, cols, pad = _crop_geometry(box.tolist(), height, width)
        outs.append(tf_resize_bilinear(torch.nn.functional.pad(image[None, :, rows, cols], pad), out))
    return torch.cat(outs)


def crop_frame(box: Sequence[float], height: int, width: int) -> tuple[float, float, float]:
    """Where a box's net input lies in the image: (x, y) of its top-left corner and its side, in pixels.

    A point at ``rel`` (in [0, 1] of the 112-px input, as the landmark net outputs) is at
    ``origin + rel * side`` in the image: the exact inverse of :func:`crop_faces`' crop and padding.
    """
    rows, cols, pad = _crop_geometry(box, height, width)
    side = max(rows.stop - rows.start, cols.stop - cols.start)
    return float(cols.start - pad[0]), float(rows.start - pad[2]), float(side)
