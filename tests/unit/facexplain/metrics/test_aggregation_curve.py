"""Verification against the number of aggregated templates, on synthetic identities with known noise."""

from __future__ import annotations

import pytest
import torch

from facexplain.metrics.aggregation import aggregation_curve, largest_n, powers_of_two
from facexplain.metrics.verification import DLIB_L2_RULE, VerificationRule

COSINE = VerificationRule("cosine", 0.5, False, "test")


def _faces(ids: int, per_id: int, noise: float, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(ids, 32, generator=g), dim=1)
    x = centres.repeat_interleave(per_id, 0) + noise * torch.randn(ids * per_id, 32, generator=g)
    return x, [f"id{i}" for i in range(ids) for _ in range(per_id)]


def test_powers_of_two_and_largest_n() -> None:
    assert powers_of_two(1) == [1]
    assert powers_of_two(8) == [1, 2, 4, 8]
    assert powers_of_two(6) == [1, 2, 4, 6]
    with pytest.raises(ValueError):
        powers_of_two(0)
    assert largest_n(["a"] * 5 + ["b"] * 3 + ["c"]) == 2
    assert largest_n(["a"] * 5) == 0


def test_aggregating_noisy_templates_raises_tar_and_auc() -> None:
    x, ids = _faces(12, 9, noise=0.25)
    curve = aggregation_curve(x, ids, [1, 2, 4, 8], COSINE, seed=1, repeats=3)
    assert [p.n for p in curve] == [1, 2, 4, 8]
    assert all(p.identities == 12 and p.n_genuine == 36 and p.n_impostor == 12 * 11 * 3 for p in curve)
    # the mean of more noisy templates is nearer the identity: genuine cosine rises, so TAR does
    assert curve[-1].genuine_score_mean > curve[0].genuine_score_mean
    assert curve[-1].tar >= curve[0].tar and curve[-1].auc >= curve[0].auc
    assert curve[-1].tar > curve[0].tar or curve[0].tar == 1.0


def test_same_seed_same_curve_and_l2_rule_orientation() -> None:
    x, ids = _faces(5, 4, noise=0.1)
    a = aggregation_curve(x, ids, [1, 3], DLIB_L2_RULE, seed=7)
    b = aggregation_curve(x, ids, [1, 3], DLIB_L2_RULE, seed=7)
    assert a == b
    # well separated identities: AUC near 1 under an accept-below distance rule (the sign is handled)
    assert a[0].auc > 0.95 and a[0].genuine_score_mean < a[0].impostor_score_mean


def test_refuses_too_few_faces() -> None:
    x, ids = _faces(3, 2, noise=0.1)
    with pytest.raises(ValueError, match="needs 2 identities"):
        aggregation_curve(x, ids, [1, 2], COSINE, seed=0)
    with pytest.raises(ValueError):
        aggregation_curve(x, ids[:-1], [1], COSINE, seed=0)
