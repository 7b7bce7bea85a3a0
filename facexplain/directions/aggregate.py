"""Template construction from many images of one identity (DFD §4.4): mean and cluster centroids.

Several photos of one person give several templates; one representative template is more stable than
any single photo (pose, light, expression average out) and decodes to a cleaner face. The plain mean
is the simplest such template. One bad photo (a profile, a mis-detection) drags the mean away, so the
alternative is agglomerative clustering: group the templates, keep cluster centroids, and use the
largest cluster's centroid as the identity's template, which ignores outlying photos.

Clustering uses ``scipy.cluster.hierarchy`` (a declared dependency): average linkage on Euclidean or
cosine distances, or Ward on Euclidean. It is deterministic (no seed needed); clusters are numbered
by size, largest first (ties: the cluster holding the lower template index first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy.cluster import hierarchy

Linkage = Literal["average", "ward", "complete", "single"]
Metric = Literal["euclidean", "cosine"]


def _templates64(templates: torch.Tensor) -> torch.Tensor:
    x = templates.detach().to("cpu", torch.float64)
    if x.dim() != 2 or x.shape[0] < 1:
        raise ValueError(f"expected (n >= 1, D) templates, got {tuple(templates.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("templates contain NaN or infinite values")
    return x


def mean_template(templates: torch.Tensor, normalize_inputs: bool = False) -> torch.Tensor:
    """(n, D) templates of one identity -> (D,) mean, in the templates' dtype.

    ``normalize_inputs`` L2-normalises each template first and rescales the mean to the average input
    norm, so photos whose templates happen to be longer do not weigh more (useful for models whose
    rule is cosine); the default is the plain mean, as in the paper.
    """
    x = _templates64(templates)
    if normalize_inputs:
        norms = x.norm(dim=1, keepdim=True)
        if bool((norms == 0).any()):
            raise ValueError("cannot normalise a zero template")
        m = (x / norms).mean(dim=0)
        m = m / m.norm().clamp_min(1e-12) * norms.mean()
    else:
        m = x.mean(dim=0)
    return m.to(templates.dtype if templates.is_floating_point() else torch.float32)


@dataclass(frozen=True)
class ClusterResult:
    """Agglomerative clusters of templates, largest first."""

    centroids: torch.Tensor  # (k, D) float64, mean template of each cluster
    assignments: torch.Tensor  # (n,) int64, cluster number of each template (0 = largest cluster)
    sizes: list[int]  # templates per cluster, descending
    linkage: str
    metric: str

    @property
    def largest(self) -> torch.Tensor:
        """(D,) centroid of the largest cluster: the identity's template with outlying photos left out."""
        return self.centroids[0]


def agglomerative_clusters(
    templates: torch.Tensor,
    n_clusters: int | None = None,
    distance_threshold: float | None = None,
    linkage: Linkage = "average",
    metric: Metric = "euclidean",
) -> ClusterResult:
    """Cluster (n, D) templates bottom-up; cut the tree at ``n_clusters`` or at ``distance_threshold``.

    Give exactly one of the two cuts. ``distance_threshold`` is in the linkage's distance (for the
    default model's L2 rule, 0.6 says "clusters that would all verify as one person"); ``n_clusters``
    may yield fewer clusters when merge distances tie. Centroids are means of the raw templates.
    """
    if (n_clusters is None) == (distance_threshold is None):
        raise ValueError("give exactly one of n_clusters and distance_threshold")
    if linkage == "ward" and metric != "euclidean":
        raise ValueError("Ward linkage needs the euclidean metric")
    if linkage not in ("average", "ward", "complete", "single"):
        raise ValueError(f"unknown linkage {linkage!r}")
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"unknown metric {metric!r}")
    x = _templates64(templates)
    n = x.shape[0]
    if n_clusters is not None and not 1 <= n_clusters <= n:
        raise ValueError(f"n_clusters must be in 1..{n}, got {n_clusters}")
    if distance_threshold is not None and not distance_threshold >= 0:
        raise ValueError(f"distance_threshold must be >= 0, got {distance_threshold}")
    if metric == "cosine" and bool((x.norm(dim=1) == 0).any()):
        raise ValueError("cosine distance is undefined for a zero template")

    if n == 1:
        raw = np.zeros(1, dtype=np.int64)
    else:
        z = hierarchy.linkage(x.numpy(), method=linkage, metric=metric)
        if n_clusters is not None:
            raw = hierarchy.fcluster(z, t=n_clusters, criterion="maxclust")
        else:
            raw = hierarchy.fcluster(z, t=float(distance_threshold), criterion="distance")  # type: ignore[arg-type]
    labels = np.unique(raw)
    order = sorted(labels.tolist(), key=lambda c: (-int((raw == c).sum()), int(np.argmax(raw == c))))
    remap = {c: k for k, c in enumerate(order)}
    assign = torch.tensor([remap[int(c)] for c in raw], dtype=torch.int64)
    centroids = torch.stack([x[assign == k].mean(dim=0) for k in range(len(order))])
    sizes = [int((assign == k).sum()) for k in range(len(order))]
    return ClusterResult(centroids, assign, sizes, linkage, metric)
