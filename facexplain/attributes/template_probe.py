"""How much of an attribute a template carries *linearly*, measured without the decoder.

I(a; â) (:mod:`facexplain.attributes.importance`) is a lower bound of I(a; z): a small value may mean
the template does not carry the attribute, or that the decoder or the estimator lost it. This probe
separates the two for one model: a ridge regression from templates to the attribute measured on the
original faces, fitted on some identities and scored on others. A clearly positive held-out R² proves
the template carries the attribute (so a low I(a; â) is the decoder's loss); an R² near 0 with a low
I(a; â) points at the template itself (the probe is linear, so it cannot prove absence, only fail to
find it).

:func:`knn_decodability` is the non-linear companion: the mean attribute of the ``k`` templates nearest
in angle (training identities only). It finds what a linear fit cannot: an attribute carried only in
magnitude (|yaw| by a model that maps a face and its mirror image to one template) or in a curved
region of the sphere. When both probes score about 0 on held-out identities, the template carries
too little of the attribute for either to use, and by the data-processing inequality no decoder can
put it back (I(a; â) <= I(a; z)).

Why ridge on L2-normalised templates with a fixed penalty: FR models compare templates by angle, so
direction is what they encode; a closed-form fit has no randomness to seed; and ``alpha = 1`` on unit
vectors of 128-512 components is a mild penalty that keeps a fit on ~10^3 faces from memorising its
training identities. Scores are on *held-out identities*, so an identity-specific attribute (face
shape) counts only as far as it generalises across people.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike


@dataclass(frozen=True)
class ProbeScore:
    """Held-out fit of one attribute: R² (mean over components), Pearson r (1-component attributes, else
    NaN), and the faces used on each side (rows with NaN dropped). All NaN when too few faces had values."""

    r2: float
    r: float
    n_train: int
    n_test: int


def _unit(t: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(t, axis=1, keepdims=True)
    return t / np.where(norm > 0, norm, 1.0)


def _score(pred: np.ndarray, yb: np.ndarray, n_train: int) -> ProbeScore:
    """R² per component around the test faces' own mean, averaged; Pearson r for 1-component attributes."""
    sst = ((yb - yb.mean(axis=0)) ** 2).sum(axis=0)
    sse = ((yb - pred) ** 2).sum(axis=0)
    ok = sst > 0
    r2 = float(np.mean(1.0 - sse[ok] / sst[ok])) if ok.any() else math.nan
    r = math.nan
    if yb.shape[1] == 1 and ok.all() and pred[:, 0].std() > 0:
        r = float(np.corrcoef(pred[:, 0], yb[:, 0])[0, 1])
    return ProbeScore(r2, r, n_train, int(yb.shape[0]))


def _rows(t: ArrayLike, v: ArrayLike, label: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(t, dtype=np.float64)
    y = np.asarray(v, dtype=np.float64)
    y = y[:, None] if y.ndim == 1 else y
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"{label}: need (N, D) templates and (N,) or (N, d) values, got {x.shape} and {y.shape}")
    keep = np.isfinite(y).all(axis=1) & np.isfinite(x).all(axis=1)
    return _unit(x[keep]), y[keep]


def _sides(
    train_t: ArrayLike, train_v: ArrayLike, test_t: ArrayLike, test_v: ArrayLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    xa, ya = _rows(train_t, train_v, "train")
    xb, yb = _rows(test_t, test_v, "test")
    if xa.shape[1] != xb.shape[1] or ya.shape[1] != yb.shape[1]:
        raise ValueError("train and test differ in template or attribute dimension")
    return xa, ya, xb, yb


def linear_decodability(
    train_templates: ArrayLike,
    train_values: ArrayLike,
    test_templates: ArrayLike,
    test_values: ArrayLike,
    alpha: float = 1.0,
) -> ProbeScore:
    """Ridge fit (with intercept) on the train faces, scored on the test faces (other identities).

    R² per component is ``1 - SSE / SST`` on the test faces around *their* mean, so predicting the
    training mean scores about 0 and worse than that is negative; the reported R² averages components.
    """
    pred, yb, n_train = linear_predictions(train_templates, train_values, test_templates, test_values, alpha)
    if pred.shape[0] == 0:
        return ProbeScore(math.nan, math.nan, n_train, int(yb.shape[0]))
    return _score(pred, yb, n_train)


def linear_predictions(
    train_templates: ArrayLike,
    train_values: ArrayLike,
    test_templates: ArrayLike,
    test_values: ArrayLike,
    alpha: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, int]:
    """The ridge probe's predictions on the test faces, with the values they predict and the training size.

    Returned rather than only scored because the prediction is itself a function of the template, so
    I(a; probe(z)) is a second lower bound of I(a; z) beside I(a; â), estimable with the very estimator
    of the importance table: where it exceeds I(a; â), the decoder path provably leaves that much out
    (``bench/bench_attributes.py``, "slack"). Rows with a non-finite value are dropped on both sides, as
    in the scores; with fewer than 3 faces on a side the predictions are empty (0 rows).
    """
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    xa, ya, xb, yb = _sides(train_templates, train_values, test_templates, test_values)
    if xa.shape[0] < 3 or xb.shape[0] < 3:
        return np.empty((0, yb.shape[1])), yb, int(xa.shape[0])
    mx, my = xa.mean(axis=0), ya.mean(axis=0)
    xc = xa - mx
    w = np.linalg.solve(xc.T @ xc + alpha * np.eye(xc.shape[1]), xc.T @ (ya - my))
    return (xb - mx) @ w + my, yb, int(xa.shape[0])


def knn_decodability(
    train_templates: ArrayLike,
    train_values: ArrayLike,
    test_templates: ArrayLike,
    test_values: ArrayLike,
    k: int = 20,
) -> ProbeScore:
    """Predict each test face's attribute as the mean over its ``k`` nearest training templates by cosine.

    Scored like :func:`linear_decodability` (held-out R², Pearson r). ``k = 20`` averages enough
    neighbours that one noisy attribute estimate does not decide a prediction, yet on ~10^3 training
    faces stays local; no fitting, so nothing to seed. Ties in distance are broken by training order.
    """
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    xa, ya, xb, yb = _sides(train_templates, train_values, test_templates, test_values)
    if xa.shape[0] < k or xb.shape[0] < 3:
        return ProbeScore(math.nan, math.nan, int(xa.shape[0]), int(xb.shape[0]))
    near = np.argsort(-(xb @ xa.T), axis=1, kind="stable")[:, :k]  # unit rows: largest cosine first
    pred = ya[near].mean(axis=1)
    return _score(pred, yb, int(xa.shape[0]))
