"""Verification measures against independent implementations and hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from facexplain.data.splits import held_apart_sample, split_identities
from facexplain.metrics.verification import DLIB_L2_RULE, VerificationRule, rank1_accuracy, roc_auc


def test_roc_auc_matches_sklearn_with_ties() -> None:
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=300), 1)  # many ties
    labels = rng.integers(0, 2, size=300)
    assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_roc_auc_needs_both_classes() -> None:
    with pytest.raises(ValueError):
        roc_auc(np.array([1.0, 2.0]), np.array([1, 1]))


def test_l2_rule_decides_on_raw_distance() -> None:
    a = torch.zeros(1, 4)
    assert bool(DLIB_L2_RULE.accepts(a, a + 0.29)[0])  # distance 0.58
    assert not bool(DLIB_L2_RULE.accepts(a, a + 0.31)[0])  # distance 0.62
    cos = VerificationRule("cosine", 0.9, False, "test")
    assert bool(cos.accepts(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.1]]))[0])


def test_rank1_leave_one_out() -> None:
    t = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0], [0.2, 0.1]])
    assert rank1_accuracy(t, ["a", "a", "b", "b", "a"], DLIB_L2_RULE) == 1.0
    # every nearest neighbour now carries the other label
    assert rank1_accuracy(t, ["a", "b", "b", "a", "a"], DLIB_L2_RULE) == 0.0
    assert rank1_accuracy(t, ["a", "a", "b", "c", "a"], DLIB_L2_RULE) == pytest.approx(3 / 5)


def test_identity_split_is_stable_and_disjoint() -> None:
    ids = [str(i) for i in range(500)]
    s1 = split_identities(ids, test_fraction=0.2, val_fraction=0.1, seed=3)
    s2 = split_identities([*reversed(ids), "new"], test_fraction=0.2, val_fraction=0.1, seed=3)
    assert all(s1[i] == s2[i] for i in ids)  # adding identities moves nobody
    frac = np.mean([v == "test" for v in s1.values()])
    assert 0.14 < frac < 0.26
    assert split_identities(ids, seed=4) != split_identities(ids, seed=3)


def test_held_apart_sample_takes_test_identities_in_order() -> None:
    from pathlib import Path

    from facexplain.data.faces import FaceRecord

    records = [FaceRecord(Path(f"{i:03d}_{k}.jpg"), f"id{i:03d}") for i in range(60) for k in range(9)]
    paths, labels = held_apart_sample(records, n_identities=5, per_identity=3)
    split = split_identities({r.identity for r in records})
    assert len(paths) == 15 and len(set(labels)) == 5
    assert all(split[i] == "test" for i in labels) and labels == sorted(labels)
    assert [p.name for p in paths[:3]] == [f"{labels[0][2:]}_{k}.jpg" for k in range(3)]
