"""Template aggregation: the mean template and agglomerative-clustering centroids."""

from __future__ import annotations

import pytest
import torch

from facexplain.directions.aggregate import agglomerative_clusters, mean_template


def _blobs(seed: int, sizes: list[int], d: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = 10.0 * torch.randn(len(sizes), d, generator=g, dtype=torch.float64)
    labels = torch.cat([torch.full((s,), k) for k, s in enumerate(sizes)])
    x = centres[labels] + 0.1 * torch.randn(len(labels), d, generator=g, dtype=torch.float64)
    perm = torch.randperm(len(labels), generator=g)
    return x[perm], labels[perm], centres


def test_mean_template() -> None:
    x = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    assert torch.equal(mean_template(x), torch.tensor([2.0, 2.0]))
    assert mean_template(x).dtype == torch.float32
    # normalised inputs: both weigh the same, the result has the average norm (3)
    m = mean_template(torch.tensor([[2.0, 0.0], [0.0, 4.0]]), normalize_inputs=True)
    assert torch.allclose(m, torch.tensor([1.0, 1.0]) / 2**0.5 * 3.0)
    with pytest.raises(ValueError):
        mean_template(torch.zeros(0, 3))


@pytest.mark.parametrize("linkage", ["average", "ward"])
def test_clusters_recover_blobs_largest_first(linkage: str) -> None:
    x, labels, _ = _blobs(0, [3, 9, 5])
    res = agglomerative_clusters(x, n_clusters=3, linkage=linkage)  # type: ignore[arg-type]
    assert res.sizes == [9, 5, 3]
    by_size = {9: 1, 5: 2, 3: 0}  # blob of each size
    for k, size in enumerate(res.sizes):
        members = res.assignments == k
        assert bool((labels[members] == by_size[size]).all())
        assert torch.allclose(res.centroids[k], x[members].mean(0))
    assert torch.allclose(res.largest, x[labels == 1].mean(0))


def test_distance_threshold_cosine_and_outliers() -> None:
    x, labels, centres = _blobs(1, [6, 1])  # one outlying photo
    res = agglomerative_clusters(x, distance_threshold=2.0)
    assert res.sizes == [6, 1] and torch.allclose(res.largest, x[labels == 0].mean(0))
    assert float((res.largest - centres[0]).norm()) < float((mean_template(x) - centres[0]).norm())
    cos = agglomerative_clusters(x, n_clusters=2, metric="cosine")
    assert cos.metric == "cosine" and sorted(cos.sizes) == [1, 6]
    one = agglomerative_clusters(x[:1], n_clusters=1)
    assert one.sizes == [1] and torch.equal(one.assignments, torch.tensor([0]))


def test_cluster_argument_errors() -> None:
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match="exactly one"):
        agglomerative_clusters(x)
    with pytest.raises(ValueError, match="exactly one"):
        agglomerative_clusters(x, n_clusters=2, distance_threshold=1.0)
    with pytest.raises(ValueError, match="Ward"):
        agglomerative_clusters(x, n_clusters=2, linkage="ward", metric="cosine")
    with pytest.raises(ValueError, match="n_clusters"):
        agglomerative_clusters(x, n_clusters=5)
    with pytest.raises(ValueError, match="NaN"):
        agglomerative_clusters(torch.full((2, 3), float("nan")), n_clusters=1)
