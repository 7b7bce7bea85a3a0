"""Attribute importance (Ren et al.): the MI estimators against analytic values, the importance table's
interval/control/determinism/cancellation contract, the two-stage recovery loop and DiffAttributes.

Tolerances for the KSG checks (N = 2000, k = 3) come from 30 independent data sets per case, measured
when these tests were written: rho = 0.6 scalar: bias +0.001, sd 0.019; rho = 0.9: bias 0.000, sd 0.026;
three components at rho = 0.6 (I = 0.669): bias -0.045 (KSG's known downward bias in 6-d), sd 0.023;
independent scalar / 3-d: mean 0.010 / 0.008, sd 0.012 / 0.010, max of 30 0.037 / 0.036. Each bound is
|bias| + 4 sd, so a correct implementation fails with probability < 1e-4 per check while a wrong count
(e.g. <= instead of <, a missing -1) shifts the estimate by more than that.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from facexplain.attributes.catalog import AttributeCatalog, AttributeSpec, FaceBatch
from facexplain.attributes.importance import (
    Cancelled,
    bins_per_component,
    cells_per_side,
    importance_table,
    mutual_information,
)
from facexplain.attributes.recovery import (
    attribute_deltas,
    recover_dataset,
    reference_scales,
)

N = 2000


def _gauss(seed: int, rhos: list[float], n: int = N) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (x_i, y_i) of unit Gaussians with correlation rho_i, independent across i."""
    rng = np.random.default_rng(seed)
    r = np.asarray(rhos)
    x = rng.standard_normal((n, len(rhos)))
    y = r * x + np.sqrt(1.0 - r**2) * rng.standard_normal((n, len(rhos)))
    return x, y


def _gauss_mi(rhos: list[float]) -> float:
    return float(-0.5 * np.sum(np.log(1.0 - np.asarray(rhos) ** 2)))


def _spec(name: str, dim: int = 1, discrete: bool = False, group: str = "geometry") -> AttributeSpec:
    comps = tuple(f"c{i}" for i in range(dim)) if dim > 1 else ("value",)
    return AttributeSpec(name, group, "", comps, f"test attribute {name}", discrete=discrete)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# KSG


@pytest.mark.parametrize(("rho", "tol"), [(0.6, 0.08), (0.9, 0.105)])
def test_ksg_scalar_matches_gaussian_mi(rho: float, tol: float) -> None:
    x, y = _gauss(1, [rho])
    est = mutual_information(x, y, k=3, seed=0)
    assert est.n == N
    assert abs(est.mi - _gauss_mi([rho])) < tol


def test_ksg_vector_matches_gaussian_mi() -> None:
    rhos = [0.6, 0.6, 0.6]
    x, y = _gauss(2, rhos)
    true = _gauss_mi(rhos)  # 0.669: MI adds over independent pairs
    est = mutual_information(x, y).mi
    assert abs(est - true) < 0.045 + 4 * 0.023
    # and it is the *multivariate* MI: far above any single component's 0.223
    assert est > 0.45


def test_ksg_equals_scikit_learn_on_scalars() -> None:
    """Same algorithm, scaling and jitter rule as sklearn's ``_compute_mi_cc``: the numbers agree."""
    from sklearn.feature_selection import mutual_info_regression

    x, y = _gauss(3, [0.6], n=800)
    ours = mutual_information(x, y, k=3).mi
    ref = mutual_info_regression(x, y[:, 0], n_neighbors=3, random_state=0)[0]
    assert ours == pytest.approx(ref, abs=1e-9)


@pytest.mark.parametrize(("dim", "bound"), [(1, 0.01 + 4 * 0.012), (3, 0.008 + 4 * 0.010)])
def test_ksg_independent_is_near_zero(dim: int, bound: float) -> None:
    x, y = _gauss(4, [0.0] * dim)
    mi = mutual_information(x, y).mi
    assert 0.0 <= mi < bound


def test_ksg_invariant_to_per_component_scale_and_handles_ties() -> None:
    x, y = _gauss(5, [0.7], n=600)
    base = mutual_information(x, y).mi
    assert mutual_information(1000.0 * x + 7.0, 0.01 * y).mi == pytest.approx(base, abs=1e-6)
    # heavy ties (values rounded to one decimal): the jitter keeps every k-NN distance positive
    tied = mutual_information(np.round(x, 1), np.round(y, 1)).mi
    assert math.isfinite(tied) and abs(tied - base) < 0.1


# --------------------------------------------------------------------------------------------------
# plug-in estimator


def test_discrete_on_known_categorical_joint() -> None:
    """X uniform on 3 codes; Y = X w.p. 0.7, else one of the other two: I = log 3 - H(0.7, 0.15, 0.15)."""
    rng = np.random.default_rng(6)
    n = 5000
    x = rng.integers(0, 3, n)
    other = (x + rng.integers(1, 3, n)) % 3
    y = np.where(rng.random(n) < 0.7, x, other)
    true = math.log(3) + 0.7 * math.log(0.7) + 2 * 0.15 * math.log(0.15)  # 0.2798
    # codes need not be 0..K-1: they are used as they are
    est = mutual_information(10.0 * x + 5, y.astype(float), estimator="discrete", discrete=True)
    # plug-in sd at n = 5000 ~ 0.009, bias (3-1)^2 / 2n = 0.0004
    assert est.n == n and abs(est.mi - true) < 0.035
    # a categorical attribute is never fed to KSG: "knn" falls back to the same plug-in estimate
    assert mutual_information(x, y, estimator="knn", discrete=True).mi == pytest.approx(est.mi)


def test_discrete_vector_uses_joint_cells() -> None:
    """Two binary components; only the first is transmitted (10 % flips): I = log 2 - h(0.1)."""
    rng = np.random.default_rng(7)
    n = 5000
    a = rng.integers(0, 2, (n, 2)).astype(float)
    b = np.stack([np.where(rng.random(n) < 0.1, 1 - a[:, 0], a[:, 0]), rng.integers(0, 2, n)], axis=1)
    true = math.log(2) + 0.1 * math.log(0.1) + 0.9 * math.log(0.9)  # 0.368
    assert abs(mutual_information(a, b, estimator="discrete", discrete=True).mi - true) < 0.035
    indep = mutual_information(a, rng.integers(0, 2, (n, 2)), estimator="discrete", discrete=True).mi
    assert indep < 0.005  # plug-in bias (4-1)^2 / 2n = 0.001


def test_binned_estimator_and_bin_rule() -> None:
    assert cells_per_side(2000) == 10 and cells_per_side(500) == 7
    assert bins_per_component(2000, 1) == 10 and bins_per_component(2000, 3) == 2
    assert bins_per_component(2000, 10) == 2  # never fewer than 2
    x, y = _gauss(8, [0.6])
    # 30 data sets: mean 0.220 (binning loss and plug-in bias nearly cancel), sd 0.012
    assert abs(mutual_information(x, y, estimator="discrete").mi - _gauss_mi([0.6])) < 0.05
    xi, yi = _gauss(9, [0.0])
    assert mutual_information(xi, yi, estimator="discrete").mi < 0.04  # bias 81 / 4000 = 0.02


def test_nan_rows_are_dropped() -> None:
    x, y = _gauss(10, [0.8, 0.5], n=500)
    xn, yn = x.copy(), y.copy()
    xn[::7, 1] = np.nan
    yn[3::11, 0] = np.nan
    keep = ~(np.isnan(xn).any(1) | np.isnan(yn).any(1))
    got = mutual_information(xn, yn)
    assert got.n == int(keep.sum()) < 500
    assert got.mi == pytest.approx(mutual_information(x[keep], y[keep]).mi)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"a": np.zeros((5, 1)), "a_hat": np.zeros((6, 1))}, "5 faces but a_hat has 6"),
        ({"a": np.zeros((0, 2)), "a_hat": np.zeros((0, 2))}, "empty data"),
        ({"a": np.ones((9, 1)), "a_hat": np.ones((9, 1)), "estimator": "binning"}, "unknown MI estimator 'binning'"),
        ({"a": np.ones((9, 1)), "a_hat": np.ones((9, 1)), "k": 0}, "positive integer"),
        ({"a": np.full((9, 1), np.nan), "a_hat": np.ones((9, 1))}, "only 0 faces"),
        ({"a": np.ones((2, 2, 2)), "a_hat": np.ones((2, 2, 2))}, r"\(N, d\) array"),
    ],
)
def test_mutual_information_bad_input(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        mutual_information(**kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# importance table


def _table_data(n: int = 500) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[AttributeSpec]]:
    rng = np.random.default_rng(11)
    strong_x, strong_y = _gauss(12, [0.95], n)
    weak_x, weak_y = _gauss(13, [0.5, 0.5], n)
    noise_x, noise_y = _gauss(14, [0.0], n)
    cat_x = rng.integers(0, 2, n)
    cat_y = np.where(rng.random(n) < 0.9, cat_x, 1 - cat_x)
    original = {"strong": strong_x, "weak": weak_x, "noise": noise_x, "cat": cat_x[:, None].astype(float)}
    recovered = {"strong": strong_y, "weak": weak_y, "noise": noise_y, "cat": cat_y[:, None].astype(float)}
    specs = [_spec("noise"), _spec("weak", 2, group="colour"), _spec("cat", discrete=True), _spec("strong")]
    return original, recovered, specs


def test_table_ranks_with_intervals_and_control() -> None:
    original, recovered, specs = _table_data()
    calls: list[tuple[int, int]] = []
    rows = importance_table(
        original, recovered, specs, n_bootstrap=40, seed=3, progress=lambda d, t: calls.append((d, t))
    )
    assert [r.attribute for r in rows] == ["strong", "cat", "weak", "noise"]  # 1.16, 0.37, 0.29, ~0
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    by = {r.attribute: r for r in rows}
    assert by["weak"].group == "colour" and by["weak"].estimator == "knn" and by["cat"].estimator == "discrete"
    assert by["strong"].mi == pytest.approx(_gauss_mi([0.95]), abs=0.12)
    for r in rows:
        assert r.n == 500
        assert r.ci_low <= r.mi <= r.ci_high
        assert r.control_mi < 0.06  # permuted: true MI 0
    real = [r for r in rows if r.attribute != "noise"]
    assert max(r.control_mi for r in rows) < min(r.mi for r in real)
    assert by["strong"].ci_high - by["strong"].ci_low < 0.3
    # the permutation test: no shuffle reaches a real attribute (p = 1/21, the smallest possible);
    # the independent one is reached by many
    assert all(r.p_value == pytest.approx(1 / 21) for r in real)
    assert by["noise"].p_value > 0.2


def test_control_averages_shuffles_and_their_number_is_checked() -> None:
    original, recovered, specs = _table_data(300)
    one = importance_table(original, recovered, specs, n_bootstrap=0, seed=2, n_permutations=1)
    many = importance_table(original, recovered, specs, n_bootstrap=0, seed=2, n_permutations=60)
    noise_one = next(r for r in one if r.attribute == "noise")
    noise_many = next(r for r in many if r.attribute == "noise")
    assert noise_many.control_mi < 0.02  # the mean of 60 shuffles sits near the estimator's floor
    assert noise_one.p_value in (0.5, 1.0) and 0.0 < noise_many.p_value <= 1.0
    for bad in (0, -3, True, 2.5):
        with pytest.raises(ValueError, match="n_permutations"):
            importance_table(original, recovered, specs, n_permutations=bad)  # type: ignore[arg-type]
    # without a control the permutation count is not used at all
    importance_table(original, recovered, specs, n_bootstrap=0, shuffled_control=False, n_permutations=0)


def test_table_is_deterministic_and_per_attribute_seeded() -> None:
    original, recovered, specs = _table_data(300)
    first = importance_table(original, recovered, specs, n_bootstrap=20, seed=5)
    assert first == importance_table(original, recovered, specs, n_bootstrap=20, seed=5)
    other = importance_table(original, recovered, specs, n_bootstrap=20, seed=6)
    assert [r.ci_low for r in first] != [r.ci_low for r in other]
    # a row does not depend on which other attributes were asked for
    alone = importance_table(original, recovered, [s for s in specs if s.name == "weak"], n_bootstrap=20, seed=5)
    assert alone[0] == next(r for r in first if r.attribute == "weak")


def test_table_without_bootstrap_or_control_and_with_nan() -> None:
    original, recovered, specs = _table_data(300)
    original = dict(original)
    weak = original["weak"].copy()
    weak[:40, 0] = np.nan
    original["weak"] = weak
    original["empty"] = np.full((300, 1), np.nan)
    recovered = dict(recovered, empty=np.zeros((300, 1)))
    rows = importance_table(original, recovered, [*specs, _spec("empty")], n_bootstrap=0, shuffled_control=False)
    by = {r.attribute: r for r in rows}
    assert by["weak"].n == 260
    assert all(
        r.ci_low == r.mi == r.ci_high and r.control_mi == 0.0 and r.p_value == 1.0
        for r in rows
        if r.attribute != "empty"
    )
    assert rows[-1].attribute == "empty" and math.isnan(rows[-1].mi) and rows[-1].n == 0


def test_table_cancellation() -> None:
    original, recovered, specs = _table_data(300)
    seen: list[int] = []
    with pytest.raises(Cancelled) as exc:
        importance_table(
            original,
            recovered,
            specs,
            n_bootstrap=5,
            progress=lambda d, t: seen.append(d),
            should_stop=lambda: len(seen) >= 2,
        )
    assert exc.value.done == 2 and exc.value.total == 4
    # also stops inside one attribute's bootstrap, not only between attributes
    polls = iter(range(1000))
    with pytest.raises(Cancelled) as exc:
        importance_table(original, recovered, specs, n_bootstrap=50, should_stop=lambda: next(polls) == 10)
    assert exc.value.done == 0


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ("mismatch", "300 original faces but 299 recovered"),
        ("empty", "empty data set"),
        ("missing", "'weak' is missing from the recovered values"),
        ("dim", "has 3 components, the attribute has 2"),
        ("estimator", "unknown MI estimator 'mine'"),
        ("no_specs", "specs is empty"),
        ("ci", "ci_level"),
        ("boot", "n_bootstrap"),
    ],
)
def test_table_bad_input(change: str, match: str) -> None:
    original, recovered, specs = _table_data(300)
    original, recovered = dict(original), dict(recovered)
    kwargs: dict[str, object] = {}
    if change == "mismatch":
        recovered["noise"] = recovered["noise"][:299]
    elif change == "empty":
        original = {k: v[:0] for k, v in original.items()}
        recovered = {k: v[:0] for k, v in recovered.items()}
    elif change == "missing":
        del recovered["weak"]
    elif change == "dim":
        original["weak"] = np.zeros((300, 3))
    elif change == "estimator":
        kwargs["estimator"] = "mine"
    elif change == "no_specs":
        specs = []
    elif change == "ci":
        kwargs["ci_level"] = 95.0
    elif change == "boot":
        kwargs["n_bootstrap"] = -1
    with pytest.raises(ValueError, match=match):
        importance_table(original, recovered, specs, **kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# recovery loop


class _ColourStats:
    """A fake estimator: per-channel mean (3 components) and left/right brightness asymmetry."""

    specs = (
        AttributeSpec("mean_rgb", "colour", "", ("r", "g", "b"), "mean intensity per channel"),
        AttributeSpec("asym", "geometry", "", ("value",), "left half minus right half brightness"),
    )

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def estimate(self, faces: FaceBatch, names: Sequence[str]) -> dict[str, np.ndarray]:
        self.sizes.append(faces.size)
        x = faces.images.double()
        half = faces.size // 2
        out = {
            "mean_rgb": x.mean(dim=(2, 3)).numpy(),
            "asym": (x[..., :half].mean(dim=(1, 2, 3)) - x[..., half:].mean(dim=(1, 2, 3))).numpy()[:, None],
        }
        return {n: out[n] for n in names}


def _catalog() -> tuple[AttributeCatalog, _ColourStats, list[int]]:
    est = _ColourStats()
    calls: list[int] = []

    def landmarker(images: torch.Tensor) -> torch.Tensor:
        calls.append(images.shape[-1])
        return torch.zeros(images.shape[0], 68, 2)

    return AttributeCatalog([est], landmarker=landmarker), est, calls


def _faces(n: int = 7, s: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    chips = torch.randint(0, 256, (n, 3, s, s), generator=g, dtype=torch.uint8)
    templates = chips.float().reshape(n, -1) / 255.0  # "template" = the pixels, so decoding can be exact
    return chips, templates


def test_recover_dataset_identity_decoder_recovers_exactly() -> None:
    chips, templates = _faces()
    catalog, _, lm_calls = _catalog()
    progress: list[tuple[int, int]] = []
    original, recovered = recover_dataset(
        chips,
        templates,
        lambda t: t.reshape(-1, 3, 16, 16),
        catalog,
        batch_size=3,
        progress=lambda *p: progress.append(p),
    )
    assert list(original) == ["mean_rgb", "asym"] and original["mean_rgb"].shape == (7, 3)
    for name in original:
        np.testing.assert_allclose(recovered[name], original[name], atol=1e-6)
    np.testing.assert_allclose(original["mean_rgb"], chips.double().mean(dim=(2, 3)).numpy() / 255.0, atol=1e-6)
    assert progress == [(3, 7), (6, 7), (7, 7)]
    assert len(lm_calls) == 6  # the landmark net runs on the originals and on the decoded faces, per batch


def test_recover_dataset_blur_decoder_and_batching() -> None:
    chips, templates = _faces()

    def blur_half(t: torch.Tensor) -> torch.Tensor:  # a lossy decoder at another resolution
        return F.avg_pool2d(t.reshape(-1, 3, 16, 16), 2)

    catalog, est, _ = _catalog()
    original, recovered = recover_dataset(chips, templates, blur_half, catalog, names=["mean_rgb"], batch_size=4)
    assert list(recovered) == ["mean_rgb"]
    np.testing.assert_allclose(recovered["mean_rgb"], original["mean_rgb"], atol=1e-6)  # pooling keeps the mean
    assert set(est.sizes) == {16, 8}
    catalog2, _, _ = _catalog()
    _, rec_all = recover_dataset(chips, templates, blur_half, catalog2, names=["asym"], batch_size=7)
    _, rec_split = recover_dataset(chips, templates, blur_half, _catalog()[0], names=["asym"], batch_size=2)
    np.testing.assert_allclose(rec_all["asym"], rec_split["asym"], atol=1e-9)


def test_recover_dataset_float_chips_cancel_and_errors() -> None:
    chips, templates = _faces()

    def ident(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, 3, 16, 16)

    a, _ = recover_dataset(chips, templates, ident, _catalog()[0])
    b, _ = recover_dataset(chips.float() / 255.0, templates, ident, _catalog()[0], chip_max=1.0)
    np.testing.assert_allclose(a["mean_rgb"], b["mean_rgb"], atol=1e-6)
    with pytest.raises(ValueError, match="chip_max"):
        recover_dataset(chips.float(), templates, ident, _catalog()[0], chip_max=1.0)

    done: list[int] = []
    with pytest.raises(Cancelled) as exc:
        recover_dataset(
            chips,
            templates,
            ident,
            _catalog()[0],
            batch_size=2,
            progress=lambda d, t: done.append(d),
            should_stop=lambda: len(done) == 2,
        )
    assert (exc.value.done, exc.value.total) == (4, 7) and "faces" in str(exc.value)

    with pytest.raises(ValueError, match="7 chips but 6 templates"):
        recover_dataset(chips, templates[:6], ident, _catalog()[0])
    with pytest.raises(ValueError, match="empty data set"):
        recover_dataset(chips[:0], templates[:0], ident, _catalog()[0])
    with pytest.raises(ValueError, match="decode returned"):
        recover_dataset(chips, templates, lambda t: t, _catalog()[0])
    with pytest.raises(ValueError, match="unknown attribute"):
        recover_dataset(chips, templates, ident, _catalog()[0], names=["hair_colour"])


# --------------------------------------------------------------------------------------------------
# DiffAttributes


def test_attribute_deltas() -> None:
    specs = [_spec("yaw"), _spec("rgb", 3, group="colour"), _spec("age", group="age"), _spec("gone")]
    arr = np.array
    a = {"yaw": arr([10.0]), "rgb": arr([[0.2, 0.3, 0.4]]), "age": arr([30.0]), "gone": arr([np.nan])}
    b = {"yaw": arr([-20.0]), "rgb": arr([0.5, 0.7, 0.4]), "age": arr([32.0]), "gone": arr([1.0])}
    rows = attribute_deltas(a, b, specs)
    by = {r.attribute: r for r in rows}
    assert by["rgb"].delta == pytest.approx((0.3, 0.4, 0.0)) and by["rgb"].magnitude == pytest.approx(0.5)
    assert by["yaw"].delta == (-30.0,) and by["yaw"].magnitude == 30.0 and by["yaw"].standardized == 0.0
    assert [r.attribute for r in rows] == ["yaw", "age", "rgb", "gone"]  # no scale known: by magnitude
    assert math.isnan(rows[-1].magnitude)

    ref_values = {"yaw": np.array([[-30.0], [30.0]]), "age": np.array([[10.0], [50.0]]), "rgb": np.zeros((4, 3))}
    ref_values["rgb"][:, 0] = [0.0, 0.2, 0.4, 0.6]
    scales = reference_scales(ref_values)
    assert scales["yaw"] == pytest.approx(math.sqrt(1800.0)) and scales["rgb"] == pytest.approx(0.2582, abs=1e-4)
    rows = attribute_deltas(a, b, specs, reference_std=scales)
    assert [r.attribute for r in rows] == ["rgb", "yaw", "age", "gone"]  # 1.94 > 0.71 > 0.07 scales
    assert rows[1].standardized == pytest.approx(30.0 / math.sqrt(1800.0))

    with pytest.raises(ValueError, match="'age' is missing from the values of face b"):
        attribute_deltas(a, {k: v for k, v in b.items() if k != "age"}, specs)
    with pytest.raises(ValueError, match=r"must be \(3,\)"):
        attribute_deltas(a, dict(b, rgb=np.zeros(2)), specs)


def test_ksg_equals_literal_algorithm_on_vectors() -> None:
    """O(N²) transcription of KSG algorithm 1 (max-norm, strict counts) on a 2-d / 3-d pair."""
    from scipy.special import digamma

    from facexplain.attributes.importance import _ksg_raw

    rng = np.random.default_rng(15)
    x = rng.standard_normal((150, 2))
    y = np.hstack([x @ rng.standard_normal((2, 2)), rng.standard_normal((150, 1))]) + rng.standard_normal((150, 3))
    k = 4
    dx = np.abs(x[:, None] - x[None]).max(-1)
    dy = np.abs(y[:, None] - y[None]).max(-1)
    dz = np.maximum(dx, dy)
    np.fill_diagonal(dz, np.inf)
    eps = np.sort(dz, axis=1)[:, k - 1]
    nx = (dx < eps[:, None]).sum(1) - 1  # minus the point itself
    ny = (dy < eps[:, None]).sum(1) - 1
    literal = digamma(k) + digamma(150) - np.mean(digamma(nx + 1) + digamma(ny + 1))
    assert _ksg_raw(x, y, k) == pytest.approx(literal, abs=1e-12)
