"""Verification decisions and the identity measures that judge an FR model.

Templates of the default model are not unit length (norm about 1.49), so a rule says which metric
and which side of the threshold accepts; rules are stored with the model version, never picked by eye.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch


@dataclass(frozen=True)
class VerificationRule:
    """``same person`` when ``metric(a, b)`` is below (``accept_below``) or above ``threshold``."""

    metric: Literal["l2", "cosine"]
    threshold: float
    accept_below: bool
    source: str

    def score(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The rule's metric between matching rows of ``a`` and ``b`` (raw templates)."""
        if self.metric == "l2":
            return l2_distance(a, b)
        return cosine_similarity(a, b)

    def accepts(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        s = self.score(a, b)
        return s < self.threshold if self.accept_below else s > self.threshold

    def similarity(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Larger-is-more-similar version of the score, for ROC curves."""
        s = self.score(a, b)
        return -s if self.accept_below else s


DLIB_L2_RULE = VerificationRule(
    metric="l2",
    threshold=0.6,
    accept_below=True,
    source="dlib: same person when the L2 distance between raw 128-d templates is below 0.6",
)


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


def l2_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).norm(dim=-1)


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve as the Mann-Whitney probability (ties count half); labels 1 = genuine."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("ROC AUC needs both genuine and impostor pairs")
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order), dtype=np.float64)
    ranks[order] = np.arange(1, len(order) + 1)
    allv = np.concatenate([pos, neg])
    # average ranks over ties
    _, inv, counts = np.unique(allv, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    ranks = (sums / counts)[inv]
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def all_pairs(identities: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every unordered pair (i < j) with its genuine flag."""
    n = len(identities)
    i, j = np.triu_indices(n, k=1)
    ids = np.asarray(identities)
    return i, j, ids[i] == ids[j]


def pair_scores(templates: torch.Tensor, rule: VerificationRule) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Similarity (larger = more alike) of all pairs under ``rule``, with pair indices."""
    n = templates.shape[0]
    i, j = np.triu_indices(n, k=1)
    t = templates.double()
    sim = rule.similarity(t[torch.from_numpy(i)], t[torch.from_numpy(j)]).numpy()
    return sim, i, j


def rank1_accuracy(templates: torch.Tensor, identities: list[str], rule: VerificationRule) -> float:
    """Leave-one-out nearest neighbour identification: each template against all the others."""
    t = templates.double()
    if rule.metric == "l2":
        sim = -torch.cdist(t, t)
    else:
        tn = torch.nn.functional.normalize(t, dim=1)
        sim = tn @ tn.T
    sim.fill_diagonal_(-float("inf"))
    nn_idx = sim.argmax(dim=1).numpy()
    ids = np.asarray(identities)
    return float((ids[nn_idx] == ids).mean())
