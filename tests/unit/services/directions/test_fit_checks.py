"""The fit checks the directions service reports: cross-validated R^2 and the centroid MDS map."""

from __future__ import annotations

import pytest
import torch

from facexplain.directions.fit_checks import centroid_mds, cross_validated_r2


def test_cross_validated_r2_is_seeded_and_high_on_a_linear_label() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, dtype=torch.float64, generator=gen)
    y = x @ torch.arange(1.0, 7.0, dtype=torch.float64) + 0.01 * torch.randn(40, dtype=torch.float64, generator=gen)
    r2 = cross_validated_r2(x, y, folds=4, ridge=1e-3, seed=1)
    assert 0.99 < r2 <= 1.0 and r2 == cross_validated_r2(x, y, folds=4, ridge=1e-3, seed=1)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_centroid_mds_shape_and_stress(metric: str) -> None:
    c = torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    coords, stress = centroid_mds(c, metric)  # type: ignore[arg-type]
    assert coords.shape == (5, 2) and 0.0 <= stress < 1.0
    assert torch.equal(coords, centroid_mds(c, metric)[0])  # type: ignore[arg-type]
