"""SSI discovery: the one-pass covariance equals the literal computation, planted directions come back,
and the full blend -> embed -> PCA run reports progress, stops on request and works on real faces."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from facexplain.data.faceset import FaceSet
from facexplain.directions.ssi import (
    DiscoveryCancelled,
    SSIAccumulator,
    discover_ssi,
    ssi_components,
    top_components,
    within_donor_covariance,
)
from facexplain.faces.blend import iter_blends


def _grouped(seed: int, groups: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Templates with a large common offset, a per-donor offset and uneven group sizes, shuffled."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(2, 9, (groups,), generator=g)
    ids = torch.repeat_interleave(torch.arange(groups), counts)
    base = 5.0 + torch.randn(groups, dim, generator=g, dtype=torch.float64)
    x = base[ids] + 0.05 * torch.randn(len(ids), dim, generator=g, dtype=torch.float64)
    perm = torch.randperm(len(ids), generator=g)
    return x[perm], ids[perm]


def test_streaming_covariance_equals_batch_computation() -> None:
    x, ids = _grouped(seed=0, groups=7, dim=12)
    acc = SSIAccumulator(12)
    g = torch.Generator().manual_seed(1)
    s = 0
    while s < len(ids):  # random batch sizes, donors spread across batches
        b = int(torch.randint(1, 6, (1,), generator=g))
        acc.update(x[s : s + b], ids[s : s + b])
        s += b
    assert acc.n_samples == len(ids) and acc.n_groups == 7
    ref = within_donor_covariance(x, ids)
    assert torch.allclose(acc.covariance(), ref, rtol=1e-9, atol=1e-14)
    a, b_ = acc.components(4), ssi_components(x, ids, 4)
    assert torch.allclose(a.directions, b_.directions, atol=1e-8)  # same sign convention too
    assert torch.allclose(a.eigenvalues, b_.eigenvalues, rtol=1e-9)
    # the literal per-group loop agrees with the plain formula
    centred = x.clone()
    for k in range(7):
        centred[ids == k] -= x[ids == k].mean(0)
    assert torch.allclose(ref, centred.T @ centred / (len(ids) - 7))


def test_components_are_orthonormal_and_ratios_sum_to_one() -> None:
    x, ids = _grouped(seed=2, groups=5, dim=6)
    c = ssi_components(x, ids, 6)
    assert torch.allclose(c.directions @ c.directions.T, torch.eye(6, dtype=torch.float64), atol=1e-10)
    assert bool((c.eigenvalues[:-1] >= c.eigenvalues[1:]).all())
    assert abs(float(c.explained_variance.sum()) - 1.0) < 1e-10
    pivot = c.directions.abs().argmax(dim=1)
    assert bool((c.directions.gather(1, pivot[:, None]) > 0).all())
    with pytest.raises(ValueError):
        top_components(torch.eye(3), 4)


def test_planted_direction_is_recovered_despite_donor_identity() -> None:
    g = torch.Generator().manual_seed(3)
    dim, donors, per = 16, 20, 12
    v = F.normalize(torch.randn(dim, generator=g, dtype=torch.float64), dim=0)
    identity = 3.0 * torch.randn(donors, dim, generator=g, dtype=torch.float64)  # large, must be removed
    ids = torch.arange(donors).repeat_interleave(per)
    amount = torch.randn(len(ids), generator=g, dtype=torch.float64)
    x = identity[ids] + amount[:, None] * v + 0.02 * torch.randn(len(ids), dim, generator=g, dtype=torch.float64)
    acc = SSIAccumulator(dim)
    for s in range(0, len(ids), 37):
        acc.update(x[s : s + 37], ids[s : s + 37])
    c = acc.components(3)
    assert abs(float(c.directions[0] @ v)) > 0.999
    assert float(c.explained_variance[0]) > 0.9


def test_accumulator_rejects_bad_input() -> None:
    acc = SSIAccumulator(4)
    with pytest.raises(ValueError, match="templates"):
        acc.update(torch.zeros(2, 5), [0, 1])
    with pytest.raises(ValueError, match="ids"):
        acc.update(torch.zeros(2, 4), [0])
    with pytest.raises(ValueError, match="NaN"):
        acc.update(torch.full((1, 4), float("nan")), [0])
    acc.update(torch.zeros(2, 4), [0, 1])
    with pytest.raises(ValueError, match="more templates than face donors"):
        acc.covariance()


def _synthetic_faces(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    chips = torch.randint(0, 256, (n, 3, 48, 48), generator=g, dtype=torch.uint8)
    landmarks = 10.0 + 28.0 * torch.rand(n, 68, 2, generator=g)
    return chips, landmarks


def _linear_embedder(seed: int, dim: int = 8):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, 3 * 8 * 8, generator=g)

    def embed(x: torch.Tensor) -> torch.Tensor:
        assert x.dtype == torch.float32
        return F.avg_pool2d(x / 255.0, 6).flatten(1) @ w.T

    return embed


def test_discover_ssi_matches_materialised_blends_and_reports_progress() -> None:
    chips, lms = _synthetic_faces(5, seed=4)
    embed = _linear_embedder(5)
    calls: list[tuple[int, int]] = []
    res = discover_ssi(
        chips, lms, embed, "nose", n_components=3, batch_size=6, progress=lambda d, t: calls.append((d, t))
    )
    assert res.n_blends == 20 and res.n_faces == 5 and res.dim == 8 and res.region == "nose"
    assert calls[-1] == (20, 20) and [d for d, _ in calls] == sorted(d for d, _ in calls) and len(calls) == 4
    assert res.directions.shape == (3, 8) and res.directions.dtype == torch.float32
    assert torch.allclose(res.directions.double().norm(dim=1), torch.ones(3, dtype=torch.float64), atol=1e-6)
    assert float(res.explained_variance.sum()) <= 1.0 + 1e-9 and bool((res.stddev > 0).all())
    # same as embedding every blend at once and running the literal computation
    fi, _, blends = next(iter_blends(chips, lms, "nose", batch_size=100))
    ref = ssi_components(embed(blends), fi, 3)
    assert torch.allclose(res.directions.double(), ref.directions, atol=1e-5)
    assert torch.allclose(res.eigenvalues, ref.eigenvalues, rtol=1e-5)
    # explicit landmark groups are a "custom" region
    custom = discover_ssi(chips, lms, embed, [[30, 31], [48, 54]], n_components=2, batch_size=50)
    assert custom.region == "custom" and custom.points == ((30, 31), (48, 54))


def test_discover_ssi_stops_when_asked() -> None:
    chips, lms = _synthetic_faces(4, seed=6)
    polls = {"n": 0}

    def stop_after_two_batches() -> bool:
        polls["n"] += 1
        return polls["n"] > 3  # 1 poll for the originals, then one per blend batch

    with pytest.raises(DiscoveryCancelled) as info:
        discover_ssi(chips, lms, _linear_embedder(7), "eyes", 2, batch_size=4, should_stop=stop_after_two_batches)
    assert (info.value.done, info.value.total) == (8, 12)
    with pytest.raises(ValueError, match="n_components"):
        discover_ssi(chips, lms, _linear_embedder(7), "eyes", 9, batch_size=4)


def test_discover_ssi_on_real_faces(sample_faceset: FaceSet, default_pipeline) -> None:  # type: ignore[no-untyped-def]
    """8 real faces (56 blends) through the real FR model: a well-formed nose direction set."""
    fs = sample_faceset.subset(range(8))
    t0 = time.perf_counter()
    res = discover_ssi(
        fs.chips, fs.landmarks, default_pipeline.embed_chips, "nose", n_components=5, batch_size=28,
        original_templates=fs.templates,
    )  # fmt: skip
    elapsed = time.perf_counter() - t0
    assert res.n_blends == 56 and res.dim == 128
    assert abs(float(res.directions[0].double().norm()) - 1.0) < 1e-5
    ev = res.explained_variance
    assert float(ev.sum()) <= 1.0 and bool((ev[:-1] >= ev[1:]).all())
    assert float(ev[0]) > 1.0 / 128  # a nose swap changes templates along a few axes, not isotropically
    assert bool((res.stddev > 0).all())
    assert elapsed < 60.0
