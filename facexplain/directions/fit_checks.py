"""How well a fitted direction or centroid layout holds up: cross-validated R^2 of a label regression,
and a 2-D MDS map of centroids with its stress. Plain functions over tensors; the directions service
reports both next to the sets it discovers.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from facexplain.directions.labels import classical_mds, regression_direction


def cross_validated_r2(x: torch.Tensor, y: torch.Tensor, folds: int, ridge: float, seed: int) -> float:
    """Pooled out-of-fold R^2 over ``folds`` folds of a seeded permutation.

    A fold whose training part cannot be fitted raises ``ValueError`` naming the fold.
    """
    n = x.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    pred = torch.empty(n, dtype=torch.float64)
    for k in range(folds):
        held = perm[k::folds]
        train = torch.cat([perm[j::folds] for j in range(folds) if j != k])
        try:
            fit = regression_direction(x[train], y[train], ridge)
        except ValueError as exc:
            raise ValueError(f"cross-validation fold {k + 1} of {folds}: {exc}") from None
        pred[held] = fit.predict(x[held])
    resid = y - pred
    total = y - y.mean()
    return 1.0 - float(resid @ resid) / float(total @ total)


def centroid_mds(centroids: torch.Tensor, metric: Literal["cosine", "l2"] = "cosine") -> tuple[torch.Tensor, float]:
    """2-D classical (Torgerson) MDS of (K, D) float64 centroids: (K, 2) coordinates and Kruskal's stress-1.

    Deterministic: classical MDS draws nothing at random. Cosine distances are 1 - cos, clamped at 0.
    """
    if metric == "l2":
        dist = torch.cdist(centroids, centroids)
    else:
        unit = F.normalize(centroids, dim=1)
        dist = (1.0 - unit @ unit.T).clamp_min(0.0)
        dist.fill_diagonal_(0.0)
    coords, _ = classical_mds(dist, 2)
    fitted = torch.cdist(coords, coords)
    k = centroids.shape[0]
    upper = torch.triu_indices(k, k, offset=1)
    d, dhat = dist[upper[0], upper[1]], fitted[upper[0], upper[1]]
    denom = float((d * d).sum())
    stress = math.sqrt(float(((d - dhat) ** 2).sum()) / denom) if denom > 0 else 0.0
    return coords, stress
