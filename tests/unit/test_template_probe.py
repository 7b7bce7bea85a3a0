"""The linear template probe: finds an attribute a template carries, scores ~0 for one it does not."""

from __future__ import annotations

import math

import numpy as np
import pytest

from facexplain.attributes.template_probe import linear_decodability


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
