"""Mirror invariance: how alike an FR model finds a face and its mirror image.

Mirroring swaps left and right, which negates head yaw and roll and moves any asymmetric feature to
the other side. A model that gives a face and its mirror templates at least as alike as two photos of
one person cannot keep those in its templates; the comparison with same-person and other-person
pairs of the same faces is what makes the number readable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike


@dataclass(frozen=True)
class MirrorInvariance:
    """Cosines: each face vs its mirror (mean, lowest), and all pairs of the faces by identity (NaN if none)."""

    n_faces: int
    mirror_cosine_mean: float
    mirror_cosine_min: float
    same_person_pairs: int
    same_person_cosine_mean: float
    other_person_pairs: int
    other_person_cosine_mean: float

    @property
    def keeps_no_side(self) -> bool:
        """True when a face and its mirror are at least as alike as two photos of one person."""
        return self.mirror_cosine_mean >= self.same_person_cosine_mean


def _unit(t: ArrayLike) -> np.ndarray:
    x = np.asarray(t, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def mirror_cosines(templates: ArrayLike, mirrored: ArrayLike) -> np.ndarray:
    """(N,) cosine of each face's template and its mirror image's ((N, d) each, row i the same face)."""
    own, flip = _unit(templates), _unit(mirrored)
    if own.shape != flip.shape:
        raise ValueError(f"templates {own.shape} and mirrored {flip.shape} differ")
    return np.asarray((own * flip).sum(axis=1))


def mirror_invariance(templates: ArrayLike, mirrored: ArrayLike, identities: Sequence[str]) -> MirrorInvariance:
    """(N, d) templates of faces, (N, d) templates of the same faces mirrored, and the faces' identities."""
    mirror = mirror_cosines(templates, mirrored)
    own = _unit(templates)
    if own.shape[0] != len(identities):
        raise ValueError(f"{own.shape[0]} templates but {len(identities)} identities")
    n = own.shape[0]
    ids = np.asarray(identities)
    upper = np.triu(np.ones((n, n), dtype=bool), k=1)
    same = (ids[:, None] == ids[None, :]) & upper
    other = (ids[:, None] != ids[None, :]) & upper
    sims = own @ own.T

    def mean(mask: np.ndarray) -> float:
        return float(sims[mask].mean()) if mask.any() else math.nan

    return MirrorInvariance(
        n_faces=n,
        mirror_cosine_mean=float(mirror.mean()) if n else math.nan,
        mirror_cosine_min=float(mirror.min()) if n else math.nan,
        same_person_pairs=int(same.sum()),
        same_person_cosine_mean=mean(same),
        other_person_pairs=int(other.sum()),
        other_person_cosine_mean=mean(other),
    )
