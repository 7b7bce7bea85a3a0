"""Face shape as scale-free ratios of distances between the 68 landmarks (issue 6, Ren et al.).

Attribute recovery asks whether a decoded face keeps the *shape* of the original. Absolute distances
would mostly measure how large the face sits in the frame (and a decoded 64-px face is smaller than
a 150-px chip), so every attribute here is a ratio of two Euclidean distances: a similarity transform
of the landmarks (shift, rotation, uniform scale) multiplies every distance by the same factor and
leaves each ratio unchanged, exactly. What remains is what anthropometry measures with proportions:
how wide the nose is relative to the mouth, how long the lower face is relative to the whole, and so on.

Each ratio is one row of :data:`RATIOS`: a name, a numerator and a denominator :class:`Length`, and
a description. A length is the mean of one or more point-to-point distances (left and right features
are averaged, so a ratio does not flip with the head's yaw sign); a point is a landmark or the mean
of several (an eye's centre is the mean of its six contour points, which is steadier than any one of
them). Indices follow the iBUG 68-point scheme: jaw 0-16 (0 on the image's left, 8 the chin), brows
17-21 and 22-26, nose bridge 27-30 (30 the tip), nostrils 31-35 (33 below the tip), eyes 36-41 and
42-47 (36 and 45 the outer corners, 39 and 42 the inner ones), outer lips 48-59 (48 and 54 the
corners, 51 the top of the upper lip, 57 the bottom of the lower lip), inner lips 60-67 (62 top, 66
bottom).

Ratios that would be zero for ordinary faces (mouth opening of a closed mouth) are left out: each
attribute is positive on a face, and a zero denominator gives NaN rather than inf.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from facexplain.attributes.catalog import AttributeSpec, FaceBatch, UnknownAttributeError

# A point: one landmark index, or several whose mean is the point.
Point = int | tuple[int, ...]

_RIGHT_EYE = tuple(range(36, 42))  # the subject's right eye: the image's left
_LEFT_EYE = tuple(range(42, 48))
_MOUTH = tuple(range(48, 60))  # outer lip contour; its mean is the mouth's centre
_BROWS = tuple(range(17, 27))
_RIGHT_BROW = tuple(range(17, 22))
_LEFT_BROW = tuple(range(22, 27))


@dataclass(frozen=True)
class Length:
    """The mean of the distances between the point pairs ``pairs`` (left and right features averaged)."""

    pairs: tuple[tuple[Point, Point], ...]


def _len(*pairs: tuple[Point, Point]) -> Length:
    return Length(tuple(pairs))


# The lengths the ratios are built from, named once so two ratios that share a length share its definition.
MOUTH_WIDTH = _len((48, 54))
NOSE_WIDTH = _len((31, 35))
INTEROCULAR = _len((_RIGHT_EYE, _LEFT_EYE))  # eye centre to eye centre
OUTER_CANTHAL = _len((36, 45))
INNER_CANTHAL = _len((39, 42))
EYE_WIDTH = _len((36, 39), (42, 45))
EYE_HEIGHT = _len((37, 41), (38, 40), (43, 47), (44, 46))
EYE_TO_FACE_EDGE = _len((36, 0), (45, 16))
FACE_WIDTH = _len((0, 16))  # jaw line at the level of the eyes
JAW_WIDTH = _len((4, 12))  # jaw line at the level of the mouth
CHIN_WIDTH = _len((6, 10))
FACE_HEIGHT = _len((27, 8))  # top of the nose bridge to the chin
NOSE_LENGTH = _len((27, 33))
NOSE_TO_JAW = _len((33, 8))
MOUTH_TO_JAW = _len((_MOUTH, 8))
BROW_TO_MOUTH = _len((_BROWS, _MOUTH))
BROW_WIDTH = _len((17, 21), (22, 26))
BROW_SPAN = _len((17, 26))
BROW_GAP = _len((21, 22))
BROW_TO_EYE = _len((_RIGHT_BROW, _RIGHT_EYE), (_LEFT_BROW, _LEFT_EYE))
# Short vertical lengths around the mouth span a few pixels in a 64-px face: three parallel distances
# (or three-point means) each, so one landmark's jitter moves them a third as much.
UPPER_LIP = _len((50, 61), (51, 62), (52, 63))
LOWER_LIP = _len((58, 67), (57, 66), (56, 65))
NOSE_TO_MOUTH = _len(((32, 33, 34), (50, 51, 52)))  # philtrum: below the nose to the top of the upper lip
LIP_TO_CHIN = _len(((56, 57, 58), (7, 8, 9)))


@dataclass(frozen=True)
class Ratio:
    """One geometry attribute: ``numerator / denominator``, with what it measures."""

    name: str
    numerator: Length
    denominator: Length
    description: str


RATIOS: tuple[Ratio, ...] = (
    Ratio("nose_width_to_mouth_width", NOSE_WIDTH, MOUTH_WIDTH, "alar (nostril) width over mouth-corner width"),
    Ratio("interocular_to_mouth_width", INTEROCULAR, MOUTH_WIDTH, "eye-centre distance over mouth width"),
    Ratio(
        "eye_to_face_edge_to_mouth_width",
        EYE_TO_FACE_EDGE,
        MOUTH_WIDTH,
        "outer eye corner to the jaw contour beside it (both sides averaged) over mouth width: temple breadth",
    ),
    Ratio(
        "nose_length_to_nose_to_jaw",
        NOSE_LENGTH,
        NOSE_TO_JAW,
        "nose bridge top to below the nose, over below the nose to the chin: middle vs lower face",
    ),
    Ratio(
        "mouth_to_jaw_to_brow_to_mouth",
        MOUTH_TO_JAW,
        BROW_TO_MOUTH,
        "mouth centre to chin over brow centre to mouth centre: chin length",
    ),
    Ratio("brow_width_to_nose_width", BROW_WIDTH, NOSE_WIDTH, "eyebrow length (both averaged) over nose width"),
    Ratio("interocular_to_face_width", INTEROCULAR, FACE_WIDTH, "eye-centre distance over face width at the eyes"),
    Ratio("eye_height_to_width", EYE_HEIGHT, EYE_WIDTH, "eye opening over eye length: how open/round the eyes are"),
    Ratio("upper_lip_to_mouth_width", UPPER_LIP, MOUTH_WIDTH, "upper-lip thickness (vermilion) over mouth width"),
    Ratio("lower_lip_to_mouth_width", LOWER_LIP, MOUTH_WIDTH, "lower-lip thickness (vermilion) over mouth width"),
    Ratio("jaw_width_to_face_height", JAW_WIDTH, FACE_HEIGHT, "jaw width at the mouth over nose-bridge-to-chin height"),
    Ratio("face_width_to_face_height", FACE_WIDTH, FACE_HEIGHT, "face width at the eyes over face height: face aspect"),
    Ratio("jaw_width_to_face_width", JAW_WIDTH, FACE_WIDTH, "jaw width at the mouth over width at the eyes: jaw taper"),
    Ratio(
        "chin_width_to_jaw_width", CHIN_WIDTH, JAW_WIDTH, "width near the chin over jaw width: pointed vs square chin"
    ),
    Ratio(
        "inner_to_outer_canthal",
        INNER_CANTHAL,
        OUTER_CANTHAL,
        "inner-corner over outer-corner eye distance: eye spacing",
    ),
    Ratio("eye_width_to_interocular", EYE_WIDTH, INTEROCULAR, "eye length over eye-centre distance"),
    Ratio(
        "nose_width_to_inner_canthal",
        NOSE_WIDTH,
        INNER_CANTHAL,
        "nose width over the gap between the eyes (neoclassical canon: about 1)",
    ),
    Ratio("brow_to_eye_to_eye_width", BROW_TO_EYE, EYE_WIDTH, "brow centre to eye centre over eye length: brow height"),
    Ratio("philtrum_to_mouth_width", NOSE_TO_MOUTH, MOUTH_WIDTH, "below the nose to the upper lip, over mouth width"),
    Ratio("mouth_width_to_jaw_width", MOUTH_WIDTH, JAW_WIDTH, "mouth width over jaw width at the mouth"),
    Ratio("nose_to_jaw_to_face_height", NOSE_TO_JAW, FACE_HEIGHT, "lower face (below the nose) over face height"),
    Ratio("nose_length_to_face_height", NOSE_LENGTH, FACE_HEIGHT, "nose length over face height"),
    Ratio("brow_span_to_face_width", BROW_SPAN, FACE_WIDTH, "outer brow end to outer brow end over face width"),
    Ratio("brow_gap_to_interocular", BROW_GAP, INTEROCULAR, "gap between the inner brow ends over eye-centre distance"),
    Ratio(
        "philtrum_to_lip_to_chin",
        NOSE_TO_MOUTH,
        LIP_TO_CHIN,
        "below the nose to the upper lip over the lower lip to the chin",
    ),
)
RATIO_NAMES: tuple[str, ...] = tuple(r.name for r in RATIOS)
_BY_NAME = {r.name: r for r in RATIOS}


def _point(lm: np.ndarray, p: Point) -> np.ndarray:
    """(N, 68, 2) -> (N, 2)."""
    if isinstance(p, int):
        return lm[:, p]
    return lm[:, list(p)].mean(axis=1)


def length(landmarks: np.ndarray, spec: Length) -> np.ndarray:
    """(N, 68, 2) float64 landmarks -> (N,) the mean distance of ``spec``'s point pairs."""
    d = [np.linalg.norm(_point(landmarks, a) - _point(landmarks, b), axis=-1) for a, b in spec.pairs]
    return np.mean(d, axis=0)


def _as_landmarks(landmarks: torch.Tensor | np.ndarray) -> np.ndarray:
    lm = landmarks.detach().to("cpu", torch.float64).numpy() if isinstance(landmarks, torch.Tensor) else landmarks
    lm = np.asarray(lm, dtype=np.float64)
    if lm.ndim != 3 or lm.shape[1:] != (68, 2):
        raise ValueError(f"expected (N, 68, 2) landmarks, got {tuple(lm.shape)}")
    return lm


def geometry_ratios(landmarks: torch.Tensor | np.ndarray, names: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """(N, 68, 2) landmarks (any pixel frame) -> {ratio name: (N,) float64}; empty ``names`` = all ratios.

    NaN where a landmark is not finite or the denominator is zero (a degenerate landmark set).
    """
    lm = _as_landmarks(landmarks)
    wanted = list(names) or list(RATIO_NAMES)
    unknown = [n for n in wanted if n not in _BY_NAME]
    if unknown:
        raise UnknownAttributeError(f"unknown geometry ratio(s) {unknown}; known: {', '.join(RATIO_NAMES)}")
    cache: dict[Length, np.ndarray] = {}

    def get(spec: Length) -> np.ndarray:
        if spec not in cache:
            cache[spec] = length(lm, spec)
        return cache[spec]

    out: dict[str, np.ndarray] = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        for name in wanted:
            r = _BY_NAME[name]
            num, den = get(r.numerator), get(r.denominator)
            out[name] = np.where((den > 0) & np.isfinite(num), num / den, np.nan)
    return out


class GeometryEstimator:
    """The :data:`RATIOS` as attributes (group "geometry"): one unitless scalar each, from landmarks only."""

    def __init__(self) -> None:
        self._specs = tuple(
            AttributeSpec(name=r.name, group="geometry", unit="", components=(r.name,), description=r.description)
            for r in RATIOS
        )

    @property
    def specs(self) -> tuple[AttributeSpec, ...]:
        return self._specs

    def estimate(self, faces: FaceBatch, names: Sequence[str]) -> dict[str, np.ndarray]:
        ratios = geometry_ratios(faces.landmarks, list(names) or list(RATIO_NAMES))
        return {k: v.reshape(-1, 1) for k, v in ratios.items()}
