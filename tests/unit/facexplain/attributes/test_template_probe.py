"""The template probes: find an attribute a template carries, score ~0 for one it does not."""

from __future__ import annotations

import math

import numpy as np
import pytest

from facexplain.attributes.template_probe import knn_decodability, linear_decodability, linear_predictions


def _templates(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal((n, 64))


def test_carried_attribute_is_found_and_absent_one_is_not() -> None:
    rng = np.random.default_rng(0)
    ta, tb = _templates(800, rng), _templates(400, rng)
    direction = rng.standard_normal(64)

    def carried(t: np.ndarray) -> np.ndarray:  # a linear function of the template's direction + noise
        u = t / np.linalg.norm(t, axis=1, keepdims=True)
        return 10.0 * u @ direction + 0.1 * rng.standard_normal(len(t))

    found = linear_decodability(ta, carried(ta), tb, carried(tb))
    assert found.r2 > 0.9 and found.r > 0.95 and (found.n_train, found.n_test) == (800, 400)
    absent = linear_decodability(ta, rng.standard_normal(800), tb, rng.standard_normal(400))
    assert -0.1 < absent.r2 < 0.05 and abs(absent.r) < 0.15
    # vector attributes: R² averages components, r is undefined
    both = linear_decodability(
        ta,
        np.stack([carried(ta), rng.standard_normal(800)], 1),
        tb,
        np.stack([carried(tb), rng.standard_normal(400)], 1),
    )
    assert 0.4 < both.r2 < 0.55 and math.isnan(both.r)


def test_nan_rows_are_dropped_and_bad_input_refused() -> None:
    rng = np.random.default_rng(1)
    ta, tb = _templates(50, rng), _templates(20, rng)
    ya, yb = rng.standard_normal(50), rng.standard_normal(20)
    ya[:10] = np.nan
    assert linear_decodability(ta, ya, tb, yb).n_train == 40
    few = linear_decodability(ta[:2], ya[10:12], tb, yb)
    assert math.isnan(few.r2) and few.n_train == 2
    with pytest.raises(ValueError, match="alpha"):
        linear_decodability(ta, ya, tb, yb, alpha=0.0)
    with pytest.raises(ValueError, match="train"):
        linear_decodability(ta, ya[:5], tb, yb)
    with pytest.raises(ValueError, match="dimension"):
        linear_decodability(ta, ya, tb[:, :10], yb)


def test_knn_probe_finds_what_the_linear_one_cannot() -> None:
    """An attribute carried only in magnitude (like |yaw| under mirror invariance: t and its mirror are one
    template, the sign is lost) is invisible to a linear fit and plain to the k-NN probe."""
    rng = np.random.default_rng(2)
    mixing = rng.standard_normal((4, 64))  # templates near a 4-D subspace, as real ones are far from isotropic
    latent_a, latent_b = rng.standard_normal((1500, 4)), rng.standard_normal((500, 4))
    ta = latent_a @ mixing + 0.05 * rng.standard_normal((1500, 64))
    tb = latent_b @ mixing + 0.05 * rng.standard_normal((500, 64))
    direction = np.linalg.pinv(mixing)[:, 0]  # reads the first latent back from a template
    direction /= np.linalg.norm(direction)

    def magnitude(t: np.ndarray) -> np.ndarray:
        u = t / np.linalg.norm(t, axis=1, keepdims=True)
        return np.abs(u @ direction) * 10 + 0.1 * rng.standard_normal(len(t))

    lin = linear_decodability(ta, magnitude(ta), tb, magnitude(tb))
    knn = knn_decodability(ta, magnitude(ta), tb, magnitude(tb), k=10)
    assert lin.r2 < 0.05 and knn.r2 > 0.2 and knn.r > 0.5, (lin, knn)
    absent = knn_decodability(ta, rng.standard_normal(1500), tb, rng.standard_normal(500))
    assert -0.15 < absent.r2 < 0.05 and abs(absent.r) < 0.15
    # deterministic, NaN rows dropped, too few training faces for k -> NaN, bad k refused
    ya, yb = magnitude(ta), magnitude(tb)
    assert knn_decodability(ta, ya, tb, yb) == knn_decodability(ta, ya, tb, yb)
    ya[:100] = np.nan
    assert knn_decodability(ta, ya, tb, yb).n_train == 1400
    assert math.isnan(knn_decodability(ta[:5], ya[100:105], tb, yb, k=10).r2)
    with pytest.raises(ValueError, match="k must"):
        knn_decodability(ta, ya, tb, yb, k=0)


def test_linear_predictions_are_what_the_score_is_computed_from() -> None:
    rng = np.random.default_rng(3)
    z = rng.normal(size=(300, 16))
    a = z[:, 0] + 0.1 * rng.normal(size=300)
    a[205] = np.nan  # dropped on the test side, so predictions and observed values stay aligned
    pred, observed, n_train = linear_predictions(z[:200], a[:200], z[200:], a[200:])
    assert n_train == 200 and pred.shape == observed.shape == (99, 1)
    r = np.corrcoef(pred[:, 0], observed[:, 0])[0, 1]
    assert r == pytest.approx(linear_decodability(z[:200], a[:200], z[200:], a[200:]).r)
    assert r > 0.9


def test_linear_predictions_empty_when_too_few_faces() -> None:
    z = np.eye(4)
    pred, observed, _ = linear_predictions(z[:2], [0.0, 1.0], z[2:], [1.0, 2.0])
    assert pred.shape[0] == 0 and observed.shape == (2, 1)
