"""Label-guided directions (centroid, regression, alpha to a target), MDS of centroids, and traversal."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.linear_model import Ridge

from facexplain.directions.labels import (
    alpha_to_target,
    bin_values,
    centroid_directions,
    centroid_mds,
    classical_mds,
    regression_direction,
)
from facexplain.directions.traverse import projected_std, traverse, traverse_std, unit


def _groups(seed: int, means: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor, list[int]]:
    """Rows whose group means are exactly ``means``: noise comes in +/- pairs."""
    g = torch.Generator().manual_seed(seed)
    rows, labels = [], []
    for k, (m, c) in enumerate(zip(means, counts, strict=True)):
        noise = torch.randn(c // 2, means.shape[1], generator=g, dtype=torch.float64)
        rows.append(m + torch.cat([noise, -noise]))
        labels += [k] * c
    return torch.cat(rows), labels


def test_centroid_directions_of_constructed_groups() -> None:
    g = torch.Generator().manual_seed(0)
    means = torch.randn(3, 10, generator=g, dtype=torch.float64)
    x, labels = _groups(1, means, [6, 8, 10])
    names = ["neutral", "happy", "sad"]
    res = centroid_directions(x.float(), [names[k] for k in labels], reference="neutral")
    assert res.classes == ["neutral", "happy", "sad"] and res.counts == [6, 8, 10]
    assert torch.allclose(res.directions[0], means[1] - means[0], atol=1e-5)
    assert torch.allclose(res.direction("sad"), means[2] - means[0], atol=1e-5)
    with pytest.raises(ValueError, match="reference"):
        res.direction("neutral")
    with pytest.raises(ValueError, match="unknown class"):
        res.direction("angry")
    # default reference: the smallest value (CelebA's -1 = attribute absent); NaN labels are skipped
    y = torch.tensor([-1.0] * 6 + [1.0] * 8 + [float("nan")] * 10)
    binary = centroid_directions(x, y)
    assert binary.classes == [-1.0, 1.0] and binary.reference == -1.0 and binary.counts == [6, 8]
    assert torch.allclose(binary.directions[0], means[1] - means[0], atol=1e-12)


def test_centroid_directions_errors() -> None:
    x = torch.randn(7, 4, generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match=r"at least 5 templates; too few in \{1: 2\}"):
        centroid_directions(x, [0, 0, 0, 0, 0, 1, 1])
    with pytest.raises(ValueError, match="two classes"):
        centroid_directions(x, [0] * 7)
    with pytest.raises(ValueError, match="does not occur"):
        centroid_directions(x, [0, 0, 0, 1, 1, 1, 1], reference=5, min_count=1)
    with pytest.raises(ValueError, match="labels"):
        centroid_directions(x, [0, 1])


def test_bin_values() -> None:
    v = torch.tensor([-40.0, -10.0, 0.0, 9.9, 10.0, float("nan")])
    b = bin_values(v, [-15.0, 10.0])
    assert b[:5].tolist() == [0.0, 1.0, 1.0, 1.0, 2.0] and math.isnan(float(b[5]))
    with pytest.raises(ValueError):
        bin_values(v, [1.0, 1.0])


def test_regression_recovers_planted_coefficients_and_alpha_hits_target() -> None:
    g = torch.Generator().manual_seed(3)
    n, d = 200, 16
    x = 1.5 + torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    y = x @ w + 0.7
    reg = regression_direction(x, y)
    assert torch.allclose(reg.coef, w, atol=1e-9) and abs(reg.intercept - 0.7) < 1e-9
    assert abs(reg.r2 - 1.0) < 1e-12 and reg.n == n
    assert torch.allclose(reg.direction, w / w.norm(), atol=1e-9)

    probes = torch.randn(5, d, generator=g, dtype=torch.float64)
    alpha = alpha_to_target(probes, reg, 3.0)
    moved = probes + alpha[:, None] * reg.coef
    assert torch.allclose(reg.predict(moved), torch.full((5,), 3.0, dtype=torch.float64), atol=1e-10)
    # eq. 12-13 in closed form
    expected = (3.0 - (probes @ w + 0.7)) / (w @ w)
    assert torch.allclose(alpha, expected, atol=1e-10)
    alpha_u = alpha_to_target(probes, reg, 3.0, along="unit")
    assert torch.allclose(
        reg.predict(probes + alpha_u[:, None] * reg.direction), torch.full((5,), 3.0, dtype=torch.float64)
    )
    # a single template gives a scalar; traverse with it lands on the target
    a0 = alpha_to_target(probes[0], reg, -2.0)
    assert a0.dim() == 0
    strip = traverse(probes[0], reg.coef, [0.0, float(a0)])
    assert torch.equal(strip[0], probes[0]) and abs(float(reg.predict(strip[1])) + 2.0) < 1e-10


def test_ridge_matches_sklearn_and_nan_labels_are_skipped() -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(40, 8, generator=g, dtype=torch.float64)
    y = x[:, 0] - 2 * x[:, 3] + 0.1 * torch.randn(40, generator=g, dtype=torch.float64)
    ref = Ridge(alpha=2.5, fit_intercept=True).fit(x.numpy(), y.numpy())
    y_nan = torch.cat([y, torch.tensor([float("nan")] * 3)])
    x_more = torch.cat([x, torch.zeros(3, 8, dtype=torch.float64)])
    reg = regression_direction(x_more, y_nan, ridge=2.5)
    assert reg.n == 40
    assert torch.allclose(reg.coef, torch.from_numpy(ref.coef_), atol=1e-10)
    assert abs(reg.intercept - float(ref.intercept_)) < 1e-10
    assert float(reg.coef.norm()) < float(regression_direction(x, y).coef.norm())  # shrinkage
    with pytest.raises(ValueError, match="all label values are equal"):
        regression_direction(x, torch.ones(40))
    with pytest.raises(ValueError, match="ridge"):
        regression_direction(x, y, ridge=-1.0)


def test_mds_reproduces_distances_of_planar_points() -> None:
    g = torch.Generator().manual_seed(5)
    plane = torch.randn(6, 2, generator=g, dtype=torch.float64) * 3
    basis, _ = torch.linalg.qr(torch.randn(12, 2, generator=g, dtype=torch.float64))
    centroids = plane @ basis.T + torch.randn(12, generator=g, dtype=torch.float64)
    coords = centroid_mds(centroids)
    assert coords.shape == (6, 2)
    assert torch.allclose(torch.cdist(coords, coords), torch.cdist(plane, plane), atol=1e-9)
    assert torch.allclose(coords.mean(0), torch.zeros(2, dtype=torch.float64), atol=1e-9)  # centred
    # collinear points: the second axis is zero, and asking for more axes than points pads with zeros
    line = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)
    c, vals = classical_mds(torch.cdist(line, line), n_components=4)
    assert c.shape == (3, 4) and torch.allclose(c[:, 1:], torch.zeros(3, 3, dtype=torch.float64), atol=1e-7)
    assert torch.allclose(torch.cdist(c, c), torch.cdist(line, line), atol=1e-9)
    assert vals.shape == (4,)


def test_traverse_shapes_and_std_units() -> None:
    t = torch.tensor([1.0, 2.0, 3.0])
    v = torch.tensor([0.0, 3.0, 4.0])
    out = traverse(t, v, [-1.0, 0.0, 2.0])
    assert out.shape == (3, 3) and out.dtype == torch.float32
    assert torch.equal(out[1], t) and torch.allclose(out[2], t + 2 * v)
    batch = traverse(torch.stack([t, 2 * t]), v, torch.tensor([0.5]))
    assert batch.shape == (2, 1, 3) and torch.allclose(batch[1, 0], 2 * t + 0.5 * v)
    assert torch.allclose(traverse_std(t, v, [2.0], std=0.5)[0], t + torch.tensor([0.0, 0.6, 0.8]))
    assert torch.allclose(unit(v), torch.tensor([0.0, 0.6, 0.8]))
    data = torch.tensor([[0.0, 0.0, 0.0], [0.0, 3.0, 4.0], [0.0, 6.0, 8.0]])
    assert torch.allclose(projected_std(data, v), torch.tensor([5.0], dtype=torch.float64))
    with pytest.raises(ValueError):
        traverse(t, v, [])
    with pytest.raises(ValueError):
        unit(torch.zeros(3))
    with pytest.raises(ValueError):
        traverse(t, torch.ones(4), [1.0])
