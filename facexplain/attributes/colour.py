"""Colour moments of skin, hair and iris regions found from the 68 landmarks (issue 6, Ren et al.).

Attribute recovery compares an original aligned face with the face decoded from its template, so
colour is measured where it means something about the person rather than over the whole chip (which
is mostly background and lighting): three regions, each built from landmark hulls, and per region
the first three colour moments of each RGB channel (Stricker & Orengo, "Similarity of color
images", 1995): mean, standard deviation and skewness, 9 numbers. Mean and std are intensities in
[0, 1]; skewness ``E[(x - mean)^3] / std^3`` is unitless, and 0 for a region of one colour (std 0),
where it is undefined: a single colour has no asymmetry, and a NaN there would read as "region
missing", which it is not.

Regions (all sizes are fractions of the eye-centre distance, so masks scale with the image: 64-px
decoded faces and 150-px chips get the same regions):

* ``skin_colour``: both cheeks (below the eyes, between the nose and the jaw line pulled 20 % in
  towards the nose tip, so the face's edge and background stay out) and the nose bridge (27-30),
  with eyes, brows, nostrils and mouth cut out with a margin. The forehead is not used: bangs cover
  it in many faces and would turn "skin colour" into hair colour.
* ``hair_colour``: the band from the image's top edge down to a little above the highest brow point,
  measured perpendicular to the eye line (so a rolled face gets a tilted band), across the whole
  image width; "above the highest jaw or brow point" keeps it outside the face's hull by
  construction. In an aligned chip the face fills most of the frame: the
  band is about the top 15 % of a 150-px chip, and where hair is short or swept back it holds the
  forehead and background, not hair. The estimate is "colour above the face", hair where there is any.
* ``iris_colour``: pixels inside the eye contours (36-41, 42-47), both eyes pooled, of which the
  darker half by luminance is kept. The eye opening also holds the white sclera and the lids' edge;
  iris and pupil are its darker part, so the darker half approximates them (it includes the pupil
  and lashes, so it is darker than the iris alone). Closed or tiny eyes (an opening of fewer than
  ``2 * MIN_PIXELS`` pixels) give NaN.

A region with fewer than :data:`MIN_PIXELS` pixels gives NaN for all 9 components.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from facexplain.attributes.catalog import AttributeSpec, FaceBatch, UnknownAttributeError
from facexplain.attributes.crops import to_255
from facexplain.faces.blend import hull_outside_distance, segment_distance
from facexplain.faces.regions import convex_hull

COMPONENTS: tuple[str, ...] = tuple(f"{c}_{m}" for m in ("mean", "std", "skew") for c in ("r", "g", "b"))
REGIONS: tuple[str, ...] = ("skin_colour", "hair_colour", "iris_colour")
MIN_PIXELS = 5
# Below this std (intensity in [0, 1], ~ 1/20 of an 8-bit level) a channel counts as one colour: skew 0.
_FLAT_STD = 2e-4

_DESCRIPTIONS = {
    "skin_colour": "RGB mean/std/skewness of the cheeks and nose bridge (eyes, brows, nostrils, mouth cut out)",
    "hair_colour": "RGB mean/std/skewness of the band above the brows up to the image top, outside the face "
    "(in an aligned chip often forehead or background when hair is short)",
    "iris_colour": "RGB mean/std/skewness of the darker half of the pixels inside both eye contours (iris and pupil)",
}

_RIGHT_EYE = list(range(36, 42))
_LEFT_EYE = list(range(42, 48))
_RIGHT_BROW = list(range(17, 22))
_LEFT_BROW = list(range(22, 27))
_MOUTH = list(range(48, 60))
_NOSTRILS = list(range(31, 36))
_NOSE_BRIDGE = [27, 28, 29, 30]
# Cheek outline: lower eyelid, nose side, mouth corner and three jaw points (pulled in towards the nose tip).
_RIGHT_CHEEK_INNER = [41, 40, 31, 48]
_RIGHT_CHEEK_JAW = [1, 2, 3]
_LEFT_CHEEK_INNER = [46, 47, 35, 54]
_LEFT_CHEEK_JAW = [15, 14, 13]
_JAW_PULL = 0.2
# Margins, in eye-centre distances.
_EYE_MARGIN = 0.12
_BROW_MARGIN = 0.08
_MOUTH_MARGIN = 0.06
_NOSTRIL_MARGIN = 0.04
_BRIDGE_HALF_WIDTH = 0.08
_HAIR_MARGIN = 0.1


def _pixel_grid(size: int) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32)
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")
    return torch.stack([gx, gy], dim=-1)


def _in_hull(pix: torch.Tensor, points: torch.Tensor, grow: float) -> torch.Tensor:
    """(S, S, 2) pixel centres, (K, 2) points -> (S, S) bool: within ``grow`` pixels of their convex hull.

    Inside comes from :func:`~facexplain.faces.blend.hull_outside_distance`; the margin is measured
    exactly (distance to the nearest hull edge), because that function's edge-line distance runs far
    out along the acute corners of thin hulls (nostrils, brows, the nose bridge) and would cut stripes
    across the cheeks.
    """
    out = torch.zeros(pix.shape[:2], dtype=torch.bool)
    if not bool(torch.isfinite(points).all()):
        return out
    # only pixels near the hull can be in it: evaluate its bounding box alone (as blend.region_mask does)
    size_y, size_x = pix.shape[0], pix.shape[1]
    lo = (points.min(dim=0).values - grow - 1).floor().long().tolist()
    hi = (points.max(dim=0).values + grow + 2).ceil().long().tolist()
    x0, x1 = max(lo[0], 0), min(hi[0], size_x)
    y0, y1 = max(lo[1], 0), min(hi[1], size_y)
    if x0 >= x1 or y0 >= y1:
        return out
    box = pix[y0:y1, x0:x1]
    inside = hull_outside_distance(box, points) <= 0
    if grow > 0:
        hull = torch.tensor(convex_hull([(float(x), float(y)) for x, y in points.tolist()]), dtype=pix.dtype)
        n = len(hull)
        edges = [hull[:1]] if n == 1 else [torch.stack([hull[k], hull[(k + 1) % n]]) for k in range(n)]
        inside |= torch.stack([segment_distance(box, e) for e in edges]).amin(0) <= grow
    out[y0:y1, x0:x1] = inside
    return out


def region_masks(landmarks: torch.Tensor, size: int) -> dict[str, torch.Tensor]:
    """(N, 68, 2) pixel landmarks of ``size`` x ``size`` images -> {"skin", "hair", "eyes": (N, S, S) bool}.

    ``eyes`` is the whole eye opening; :func:`colour_moments_of_faces` keeps its darker half for the iris.
    """
    if landmarks.dim() != 3 or landmarks.shape[1:] != (68, 2):
        raise ValueError(f"expected (N, 68, 2) landmarks, got {tuple(landmarks.shape)}")
    if size < 1:
        raise ValueError(f"image size must be positive, got {size}")
    pix = _pixel_grid(size)
    lm = landmarks.detach().to("cpu", torch.float32)
    n = lm.shape[0]
    out = {k: torch.zeros(n, size, size, dtype=torch.bool) for k in ("skin", "hair", "eyes")}
    for i in range(n):
        p = lm[i]
        if not bool(torch.isfinite(p).all()):
            continue
        re, le = p[_RIGHT_EYE].mean(0), p[_LEFT_EYE].mean(0)
        iod = float((le - re).norm())
        if iod <= 0:
            continue
        tip = p[30]
        cheeks = torch.zeros(size, size, dtype=torch.bool)
        for inner, jaw in ((_RIGHT_CHEEK_INNER, _RIGHT_CHEEK_JAW), (_LEFT_CHEEK_INNER, _LEFT_CHEEK_JAW)):
            pulled = p[jaw] + _JAW_PULL * (tip - p[jaw])
            cheeks |= _in_hull(pix, torch.cat([p[inner], pulled]), 0.0)
        bridge = _in_hull(pix, p[_NOSE_BRIDGE], _BRIDGE_HALF_WIDTH * iod)
        cut = (
            _in_hull(pix, p[_RIGHT_EYE], _EYE_MARGIN * iod)
            | _in_hull(pix, p[_LEFT_EYE], _EYE_MARGIN * iod)
            | _in_hull(pix, p[_RIGHT_BROW], _BROW_MARGIN * iod)
            | _in_hull(pix, p[_LEFT_BROW], _BROW_MARGIN * iod)
            | _in_hull(pix, p[_MOUTH], _MOUTH_MARGIN * iod)
            | _in_hull(pix, p[_NOSTRILS], _NOSTRIL_MARGIN * iod)
        )
        out["skin"][i] = (cheeks | bridge) & ~cut
        # hair: above the highest brow point by a margin, measured along the face's "down" direction
        axis = (le - re) / iod
        down = torch.stack([-axis[1], axis[0]])  # eye line rotated by +90 degrees: towards the chin (y down)
        height = (pix - re) @ down
        # ``top``: the highest jaw or brow point (the brows, in any face), so the band never enters the face's hull
        top = float(((p[:27] - re) @ down).min())
        out["hair"][i] = height < top - _HAIR_MARGIN * iod
        out["eyes"][i] = _in_hull(pix, p[_RIGHT_EYE], 0.0) | _in_hull(pix, p[_LEFT_EYE], 0.0)
    return out


def colour_moments(pixels: np.ndarray) -> np.ndarray:
    """(K, 3) RGB values -> (9,) mean R,G,B, std R,G,B, skewness R,G,B (NaN if K < MIN_PIXELS).

    Population moments (divide by K): the region *is* the population measured, not a sample of one.
    """
    px = np.asarray(pixels, dtype=np.float64)
    if px.ndim != 2 or px.shape[1] != 3:
        raise ValueError(f"expected (K, 3) RGB pixels, got {tuple(px.shape)}")
    if px.shape[0] < MIN_PIXELS:
        return np.full(9, np.nan)
    mean = px.mean(axis=0)
    dev = px - mean
    std = np.sqrt((dev**2).mean(axis=0))
    third = (dev**3).mean(axis=0)
    flat = std < _FLAT_STD
    skew = np.where(flat, 0.0, third / np.where(flat, 1.0, std) ** 3)
    return np.concatenate([mean, np.where(flat, 0.0, std), skew])


def colour_moments_of_faces(
    images: torch.Tensor, landmarks: torch.Tensor, names: Sequence[str] = ()
) -> dict[str, np.ndarray]:
    """(N, 3, S, S) faces ([0, 1] or [0, 255]) + (N, 68, 2) landmarks -> {region name: (N, 9) float64}."""
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
        raise ValueError(f"expected (N, 3, S, S) images, got {tuple(images.shape)}")
    if landmarks.shape != (images.shape[0], 68, 2):
        raise ValueError(f"expected ({images.shape[0]}, 68, 2) landmarks, got {tuple(landmarks.shape)}")
    wanted = list(names) or list(REGIONS)
    unknown = [n for n in wanted if n not in REGIONS]
    if unknown:
        raise UnknownAttributeError(f"unknown colour attribute(s) {unknown}; known: {', '.join(REGIONS)}")
    size = int(images.shape[-1])
    x = (to_255(images.detach().cpu()) / 255.0).to(torch.float64).permute(0, 2, 3, 1).numpy()  # (N, S, S, 3)
    masks = {k: v.numpy() for k, v in region_masks(landmarks, size).items()}
    out = {k: np.full((x.shape[0], 9), np.nan) for k in wanted}
    luma = np.array([0.299, 0.587, 0.114])
    for i in range(x.shape[0]):
        for name in wanted:
            if name == "skin_colour":
                px = x[i][masks["skin"][i]]
            elif name == "hair_colour":
                px = x[i][masks["hair"][i]]
            else:
                px = x[i][masks["eyes"][i]]
                if px.shape[0] >= 2 * MIN_PIXELS:
                    y = px @ luma
                    px = px[y <= np.median(y)]
                else:
                    px = px[:0]
            out[name][i] = colour_moments(px)
    return out


class ColourEstimator:
    """Skin, hair and iris colour moments (group "colour"), 9 components each, from pixels and landmarks."""

    def __init__(self) -> None:
        self._specs = tuple(
            AttributeSpec(name=n, group="colour", unit="", components=COMPONENTS, description=_DESCRIPTIONS[n])
            for n in REGIONS
        )

    @property
    def specs(self) -> tuple[AttributeSpec, ...]:
        return self._specs

    def estimate(self, faces: FaceBatch, names: Sequence[str]) -> dict[str, np.ndarray]:
        return colour_moments_of_faces(faces.images, faces.landmarks, names)
