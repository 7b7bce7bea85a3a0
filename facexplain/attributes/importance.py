"""Model-specific attribute importance: how much of an attribute survives the FR template.

Ren et al. ("Understanding Deep Face Representation via Attribute Recovery", TIFS 2024, eq. 13–14)
cannot measure I(a; z) between an attribute ``a`` of a face x and its template ``z = f(x)`` directly
(z has hundreds of dimensions), so they measure the attribute on the face *recovered* from the
template, ``â = E(D(z))`` with D the decoder and E the attribute estimator. ``a → z → â`` is a Markov
chain (â is computed from z alone), so by the data-processing inequality

    I(a; â) ≤ I(a; z),

i.e. the reported number is a **lower bound** of what the template carries about the attribute: a
large value proves the attribute is encoded; a small value may also mean the decoder or the estimator
lost it. Comparing two FR models with the same decoder recipe and estimators ranks what each encodes.

Estimators (both in nats):

* ``"knn"`` – Kraskov, Stögbauer & Grassberger (2004), algorithm 1, with the max-norm and the digamma
  form ``I = ψ(k) + ψ(N) − ⟨ψ(n_a + 1) + ψ(n_â + 1)⟩``. It works on multivariate a and â (colour
  moments, expression probabilities, LBP histograms) without binning, which is why it is the default.
  Each component is standardised (the max-norm compares components, so they must share a scale) and
  a seeded jitter of 1e-10 × max(1, mean |x|) is added, as scikit-learn does, so that tied values
  (saturated probabilities, rounded ratios) do not give zero k-NN distances. The estimate can be
  slightly negative for independent data; it is clipped at 0 (reported MI is never negative), but
  the bootstrap works on the unclipped values so the interval is not squashed.
* ``"discrete"`` – the plug-in (maximum-likelihood) estimator ``Σ p(a,â) log p(a,â)/(p(a)p(â))`` on
  cell ids. Continuous components are cut into equal-frequency bins (quantile edges of that
  component, ties kept in one bin) and a vector's cell id is the tuple of its components' bins.
  Bin rule: the number of cells per side ``C = round(sqrt(1 + sqrt(1 + 24 N)) / sqrt(2))`` is
  Hacine-Gharbi et al.'s (Pattern Recognit. Lett. 2012) low-bias choice for MI between two
  variables with correlation 0 (10 cells at N = 2000); a d-component attribute gets
  ``max(2, floor(C^(1/d)))`` bins per component. The plug-in estimator is biased upwards by about
  (cells_a − 1)(cells_â − 1) / 2N; for vectors with many components even two bins each give far more
  cells than faces, so there it is only comparable with its own shuffled control — use ``"knn"``.

Attributes whose spec is ``discrete`` (category codes) are never binned or jittered: their values
are the cells. The KSG estimator is undefined for such atoms (k-NN distances are 0), so they are
always estimated with the plug-in estimator, whichever estimator was asked for; the row says which.

Confidence intervals (why half-sampling, not the ordinary bootstrap): resampling faces *with*
replacement duplicates rows, and a duplicated row is its own nearest neighbour in both a and â at
distance ~0 – the KSG estimate then rises sharply (dependence "at infinitely small scale"), and a
jitter only moves the duplicate by 1e-10, which does not help. So each replicate takes a random
half of the faces *without* replacement (m = ⌊N/2⌋; the delete-d jackknife with d = N/2, Shao & Wu
1989, consistent also for non-smooth statistics). For a statistic with variance σ²/n, a
without-replacement subsample of m deviates from the full-sample value with variance
σ²(1/m − 1/N), so the replicate deviations from their mean are scaled by sqrt(m / (N − m)) (= 1 at
m = N/2) and added to the full-sample estimate; the percentile interval of those values is reported.
Centring on the replicates' mean removes the shift from the estimators' sample-size dependent bias
(KSG and plug-in both depend on N), so the interval describes sampling variability around the
full-sample estimate. The same scheme is used for both estimators so their intervals compare.

The shuffled control permutes the recovered values across faces (seeded) and re-estimates: the true
MI of the permuted pair is 0, so the control shows the estimator's bias/noise floor at this N and
dimension, and any real attribute worth reporting must be well above it. One shuffle is a noisy
reading of that floor (KSG at N ≈ 800 scatters by a few hundredths of a nat), so ``n_permutations``
shuffles are drawn: ``control_mi`` is their mean (clipped at 0 like every reported MI) and
``p_value`` the permutation test's ``(1 + #{shuffles with MI >= the real MI}) / (1 + n_permutations)``
(Phipson & Smyth 2010: never 0), i.e. how often independence alone gives an estimate this large. An
attribute with a p-value above, say, 0.05 is not shown to survive in the template at all.

Everything is seeded per attribute from ``(seed, crc32(name))``, so a row does not change when other
attributes are added to or removed from the request.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
from numpy.typing import ArrayLike
from scipy.spatial import cKDTree
from scipy.special import digamma

from facexplain.attributes.catalog import AttributeSpec

MIEstimatorName = Literal["knn", "discrete"]
ESTIMATORS: tuple[str, ...] = ("knn", "discrete")
ProgressFn = Callable[[int, int], None]
StopFn = Callable[[], bool]

_JITTER = 1e-10
DEFAULT_PERMUTATIONS = 20


class Cancelled(Exception):
    """Raised when ``should_stop()`` returns true; carries how many units of work were done."""

    def __init__(self, done: int, total: int, what: str = "attributes") -> None:
        super().__init__(f"cancelled after {done} of {total} {what}")
        self.done = done
        self.total = total


class MIEstimate(NamedTuple):
    """An MI estimate in nats and the number of faces it used (rows with NaN in a or â dropped)."""

    mi: float
    n: int


@dataclass(frozen=True)
class ImportanceRow:
    """One attribute's line of the importance table (the API's ``ImportanceRow`` plus the estimator).

    ``ci_low``/``ci_high`` equal ``mi`` when no bootstrap was asked for; ``control_mi`` is 0 and
    ``p_value`` 1 without a shuffled control (as in the API). All are NaN when fewer faces than the
    estimator needs had a value for the attribute. ``estimator`` is the one actually used:
    ``"discrete"`` for categorical attributes even when ``"knn"`` was requested.
    """

    attribute: str
    group: str
    mi: float
    ci_low: float
    ci_high: float
    control_mi: float
    n: int
    estimator: str = ""
    p_value: float = 1.0


# --------------------------------------------------------------------------------------------------
# input handling


def _as_2d(x: ArrayLike, label: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"{label} must be an (N,) or (N, d) array, got shape {arr.shape}")
    if arr.shape[1] == 0:
        raise ValueError(f"{label} has no components (shape {arr.shape})")
    return arr


def _check_estimator(estimator: str, k: int) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown MI estimator {estimator!r}; expected one of {', '.join(ESTIMATORS)}")
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k (neighbours of the knn estimator) must be a positive integer, got {k!r}")


def _valid_pair(a: np.ndarray, a_hat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if a.shape[0] != a_hat.shape[0]:
        raise ValueError(f"a has {a.shape[0]} faces but a_hat has {a_hat.shape[0]}: they must be the same faces")
    if a.shape[0] == 0:
        raise ValueError("empty data: no faces to estimate mutual information on")
    keep = ~(np.isnan(a).any(axis=1) | np.isnan(a_hat).any(axis=1))
    return a[keep], a_hat[keep]


def _min_rows(method: str, k: int) -> int:
    """Fewest faces an estimate makes sense on: KSG needs k neighbours besides the point itself."""
    return k + 1 if method == "knn" else 2


def _seed_for(seed: int, name: str) -> list[int]:
    # SeedSequence wants non-negative entropy; the API's int64 seed may be negative.
    return [int(seed) % 2**64, zlib.crc32(name.encode())]


# --------------------------------------------------------------------------------------------------
# KSG (algorithm 1)


def _standardise_jitter(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-component z-score plus a tiny seeded jitter, as scikit-learn's ``_compute_mi_cc``.

    A constant component keeps scale 1 (it is 0 after centring and contributes no distance).
    """
    x = x - x.mean(axis=0)
    std = x.std(axis=0, ddof=1) if x.shape[0] > 1 else np.zeros(x.shape[1])
    x = x / np.where(std > 0, std, 1.0)
    return x + _JITTER * np.maximum(1.0, np.abs(x).mean(axis=0)) * rng.standard_normal(x.shape)


def _ksg_raw(x: np.ndarray, y: np.ndarray, k: int) -> float:
    """KSG algorithm 1 on prepared (standardised, jittered) data; may be negative."""
    n = x.shape[0]
    joint = np.hstack([x, y])
    # k + 1 because the query point is its own first neighbour.
    dist, _ = cKDTree(joint).query(joint, k=k + 1, p=np.inf)
    # Counts are of points *strictly* closer than eps (algorithm 1), hence the radius just below eps;
    # query_ball_point counts the point itself, hence -1 later and +1 in ψ(n + 1) cancel to ψ(count).
    radius = np.nextafter(dist[:, -1], 0.0)
    nx = cKDTree(x).query_ball_point(x, radius, p=np.inf, return_length=True)
    ny = cKDTree(y).query_ball_point(y, radius, p=np.inf, return_length=True)
    return float(digamma(k) + digamma(n) - np.mean(digamma(nx)) - np.mean(digamma(ny)))


# --------------------------------------------------------------------------------------------------
# plug-in estimator


def cells_per_side(n: int) -> int:
    """Hacine-Gharbi et al. (2012) histogram size for MI at correlation 0: about N^(1/4) · 1.57."""
    return max(2, round(math.sqrt(1.0 + math.sqrt(1.0 + 24.0 * n)) / math.sqrt(2.0)))


def bins_per_component(n: int, dim: int) -> int:
    """Equal-frequency bins per component so that a d-component vector has about ``cells_per_side`` cells."""
    return max(2, math.floor(cells_per_side(n) ** (1.0 / dim) + 1e-9))


def _cell_ids(x: np.ndarray, categorical: bool) -> np.ndarray:
    """(N, d) values -> (N,) int cell ids: categories as they are, else equal-frequency bins per component."""
    if not categorical:
        b = bins_per_component(x.shape[0], x.shape[1])
        cols = []
        for j in range(x.shape[1]):
            col = x[:, j]
            edges = np.unique(np.quantile(col, np.arange(1, b) / b))
            cols.append(np.searchsorted(edges, col, side="right"))
        x = np.stack(cols, axis=1).astype(np.float64)
    _, ids = np.unique(x, axis=0, return_inverse=True)
    return np.asarray(ids, dtype=np.int64).reshape(-1)


def _plugin_raw(cx: np.ndarray, cy: np.ndarray) -> float:
    """Plug-in MI of two cell-id vectors (ids need not be contiguous within a subsample)."""
    n = cx.shape[0]
    _, cx = np.unique(cx, return_inverse=True)
    _, cy = np.unique(cy, return_inverse=True)
    my = int(cy.max()) + 1
    joint = np.bincount(cx * my + cy).astype(np.float64)
    px = np.bincount(cx).astype(np.float64) / n
    py = np.bincount(cy).astype(np.float64) / n
    nz = np.nonzero(joint)[0]
    pxy = joint[nz] / n
    return float(np.sum(pxy * (np.log(pxy) - np.log(px[nz // my]) - np.log(py[nz % my]))))


# --------------------------------------------------------------------------------------------------
# public estimators


class _Prepared:
    """Data ready for repeated estimates on subsets (bootstrap, control) with the same metric/bins."""

    def __init__(self, a: np.ndarray, a_hat: np.ndarray, method: str, k: int, categorical: bool, seed: list[int]):
        self.method = method
        self.k = k
        self.n = a.shape[0]
        if method == "knn":
            rng = np.random.default_rng(seed)
            self.x = _standardise_jitter(a, rng)
            self.y = _standardise_jitter(a_hat, rng)
        else:
            self.x = _cell_ids(a, categorical)
            self.y = _cell_ids(a_hat, categorical)

    def raw(self, rows: np.ndarray | None = None, y_rows: np.ndarray | None = None) -> float:
        x = self.x if rows is None else self.x[rows]
        y = self.y if rows is None else self.y[rows]
        if y_rows is not None:
            y = y[y_rows]
        return _ksg_raw(x, y, self.k) if self.method == "knn" else _plugin_raw(x, y)


def _method(estimator: str, discrete: bool) -> str:
    return "discrete" if discrete else estimator


def mutual_information(
    a: ArrayLike,
    a_hat: ArrayLike,
    estimator: str = "knn",
    k: int = 3,
    seed: int = 0,
    discrete: bool = False,
) -> MIEstimate:
    """I(a; â) in nats between (N, d) arrays (or (N,)) of the same faces, clipped at 0.

    ``discrete`` marks category codes (used as cells, never binned; KSG does not apply to them).
    Rows with NaN in a or â are dropped and the rows used are returned as ``n``.
    """
    _check_estimator(estimator, k)
    x, y = _valid_pair(_as_2d(a, "a"), _as_2d(a_hat, "a_hat"))
    method = _method(estimator, discrete)
    need = _min_rows(method, k)
    if x.shape[0] < need:
        raise ValueError(
            f"only {x.shape[0]} faces have values in both a and a_hat (NaN rows dropped); "
            f"the {method} estimator needs at least {need}"
        )
    prep = _Prepared(x, y, method, k, discrete, _seed_for(seed, ""))
    return MIEstimate(max(0.0, prep.raw()), prep.n)


def _half_sample_interval(
    prep: _Prepared, point: float, n_bootstrap: int, ci_level: float, rng: np.random.Generator, stop: StopFn
) -> tuple[float, float]:
    """Percentile interval from rescaled half-sample replicates (see the module docstring for why)."""
    n = prep.n
    m = n // 2
    if m < _min_rows(prep.method, prep.k):
        return math.nan, math.nan
    reps = np.empty(n_bootstrap)
    for b in range(n_bootstrap):
        if stop():
            raise _Stop
        reps[b] = prep.raw(np.sort(rng.choice(n, size=m, replace=False)))
    dev = (reps - reps.mean()) * math.sqrt(m / (n - m))
    alpha = 1.0 - ci_level
    lo, hi = np.quantile(dev, [alpha / 2.0, 1.0 - alpha / 2.0])
    return point + float(lo), point + float(hi)


class _Stop(Exception):
    """Internal: a stop request seen inside one attribute's work."""


def importance_table(
    original: Mapping[str, ArrayLike],
    recovered: Mapping[str, ArrayLike],
    specs: Sequence[AttributeSpec],
    *,
    estimator: str = "knn",
    k: int = 3,
    n_bootstrap: int = 200,
    ci_level: float = 0.95,
    seed: int = 0,
    shuffled_control: bool = True,
    n_permutations: int = DEFAULT_PERMUTATIONS,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> list[ImportanceRow]:
    """One :class:`ImportanceRow` per spec, MI descending (NaN rows last, ties in ``specs`` order).

    With ``shuffled_control``, ``n_permutations`` shuffles give each row's control and p-value.

    ``original[name]`` / ``recovered[name]`` are (N, spec.dim) values on the original faces and on the
    faces decoded from their templates, row i the same face in both. ``progress(done, total)`` counts
    attributes; ``should_stop()`` is polled before each attribute and between bootstrap replicates,
    and raises :class:`Cancelled`. The result depends only on the inputs and ``seed``.
    """
    _check_estimator(estimator, k)
    if not specs:
        raise ValueError("no attributes to rank: specs is empty")
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, int | np.integer) or n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be a non-negative integer, got {n_bootstrap!r}")
    if n_bootstrap == 1:
        raise ValueError("n_bootstrap = 1 gives no interval: use 0 (none) or at least 2")
    if not 0.0 < ci_level < 1.0:
        raise ValueError(f"ci_level must be in (0, 1), got {ci_level!r}")
    if shuffled_control and (
        isinstance(n_permutations, bool) or not isinstance(n_permutations, int | np.integer) or n_permutations < 1
    ):
        raise ValueError(f"n_permutations must be a positive integer, got {n_permutations!r}")

    pairs: list[tuple[AttributeSpec, np.ndarray, np.ndarray]] = []
    n_faces: int | None = None
    for spec in specs:
        for label, values in (("original", original), ("recovered", recovered)):
            if spec.name not in values:
                raise ValueError(f"attribute {spec.name!r} is missing from the {label} values")
        a = _as_2d(original[spec.name], f"original[{spec.name!r}]")
        b = _as_2d(recovered[spec.name], f"recovered[{spec.name!r}]")
        for label, arr in (("original", a), ("recovered", b)):
            if arr.shape[1] != spec.dim:
                raise ValueError(f"{label}[{spec.name!r}] has {arr.shape[1]} components, the attribute has {spec.dim}")
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"attribute {spec.name!r}: {a.shape[0]} original faces but {b.shape[0]} recovered faces")
        if n_faces is not None and a.shape[0] != n_faces:
            raise ValueError(f"attribute {spec.name!r} has {a.shape[0]} faces, earlier attributes have {n_faces}")
        n_faces = a.shape[0]
        pairs.append((spec, a, b))
    if not n_faces:
        raise ValueError("empty data set: no faces to estimate attribute importance on")

    stop = should_stop or (lambda: False)
    total = len(pairs)
    rows: list[ImportanceRow] = []
    for done, (spec, a, b) in enumerate(pairs):
        if stop():
            raise Cancelled(done, total)
        try:
            permutations = n_permutations if shuffled_control else 0
            rows.append(_row(spec, a, b, estimator, k, n_bootstrap, ci_level, seed, permutations, stop))
        except _Stop:
            raise Cancelled(done, total) from None
        if progress is not None:
            progress(done + 1, total)
    # sorted() is stable, so equal MI keeps the order of ``specs``; NaN rows go last.
    return sorted(rows, key=lambda r: (math.isnan(r.mi), 0.0 if math.isnan(r.mi) else -r.mi))


def _row(
    spec: AttributeSpec,
    a: np.ndarray,
    b: np.ndarray,
    estimator: str,
    k: int,
    n_bootstrap: int,
    ci_level: float,
    seed: int,
    n_permutations: int,
    stop: StopFn,
) -> ImportanceRow:
    method = _method(estimator, spec.discrete)
    x, y = _valid_pair(a, b)
    n = x.shape[0]
    if n < _min_rows(method, k):
        nan = math.nan
        return ImportanceRow(spec.name, spec.group, nan, nan, nan, nan, n, method, nan)
    seeds = np.random.SeedSequence(_seed_for(seed, spec.name)).spawn(3)
    prep = _Prepared(x, y, method, k, spec.discrete, [int(s) for s in seeds[0].generate_state(2)])
    raw = prep.raw()
    if n_bootstrap:
        lo, hi = _half_sample_interval(prep, raw, n_bootstrap, ci_level, np.random.default_rng(seeds[1]), stop)
    else:
        lo = hi = raw
    control, p_value = 0.0, 1.0
    if n_permutations:
        rng = np.random.default_rng(seeds[2])
        null = np.empty(n_permutations)
        for j in range(n_permutations):
            if stop():
                raise _Stop
            null[j] = prep.raw(None, rng.permutation(n))
        control = max(0.0, float(null.mean()))
        p_value = float((1 + np.count_nonzero(null >= raw)) / (1 + n_permutations))
    return ImportanceRow(
        attribute=spec.name,
        group=spec.group,
        mi=max(0.0, raw),
        ci_low=max(0.0, lo) if not math.isnan(lo) else lo,
        ci_high=max(0.0, hi) if not math.isnan(hi) else hi,
        control_mi=control,
        n=n,
        estimator=method,
        p_value=p_value,
    )
