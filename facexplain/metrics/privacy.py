"""Validating a template modification for soft-biometric privacy (DFD §4.5): what it hides, what it keeps.

A modification (``facexplain.directions.suppress``) is worth its name only if, after it, an attribute is
harder to read from the template while the template still verifies its person. Both sides are measured
on the same faces, before and after:

* **suppressed**: a linear probe (ridge, :func:`facexplain.attributes.template_probe.linear_decodability`)
  scored on held-out identities, twice: fitted on the original templates and applied to the modified ones
  (an attacker who trained before the modification), and refitted on the modified ones (an attacker who
  trains on what the system stores). The decoder path (decode, then estimate) is measured by the caller
  with :func:`attribute_auc` on the estimates for original and modified templates.
* **kept**: verification over every pair of faces at the model's own rule (TAR, FAR) and its AUC, and
  the cosine of each modified template to its original.

Identities are split in two seeded halves; each probe score is the mean of fitting on one half and
scoring on the other, both ways, so no identity is scored by a probe that saw it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike

from facexplain.attributes.template_probe import linear_decodability
from facexplain.metrics.verification import VerificationRule, roc_auc


@dataclass(frozen=True)
class Verification:
    """Every pair of faces at the rule: genuine / impostor acceptance and the AUC of the rule's score."""

    tar: float
    far: float
    auc: float
    genuine_pairs: int
    impostor_pairs: int


@dataclass(frozen=True)
class PrivacyReport:
    probe_r2_before: float  # probe fitted and scored on original templates (held-out identities)
    probe_r2_fixed: float  # fitted on original templates, scored on modified ones
    probe_r2_refit: float  # fitted and scored on modified templates
    probe_auc_before: float  # the same three probes' held-out predictions as a classifier's AUC (binary labels;
    probe_auc_fixed: float  # NaN otherwise): 0.5 = the attribute is not linearly readable
    probe_auc_refit: float
    verification_before: Verification
    verification_after: Verification
    cosine_to_original_mean: float
    cosine_to_original_min: float
    faces: int
    identities: int

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def verification(templates: torch.Tensor, identities: Sequence[str], rule: VerificationRule) -> Verification:
    """TAR / FAR at ``rule`` and AUC over all unordered pairs of ``templates``."""
    n = templates.shape[0]
    i, j = np.triu_indices(n, k=1)
    ids = np.asarray(identities)
    genuine = ids[i] == ids[j]
    a, b = templates.double()[torch.from_numpy(i)], templates.double()[torch.from_numpy(j)]
    accept = rule.accepts(a, b).numpy()
    sim = rule.similarity(a, b).numpy()
    if not genuine.any() or genuine.all():
        raise ValueError("verification needs both genuine and impostor pairs")
    return Verification(
        tar=float(accept[genuine].mean()),
        far=float(accept[~genuine].mean()),
        auc=roc_auc(sim, genuine),
        genuine_pairs=int(genuine.sum()),
        impostor_pairs=int((~genuine).sum()),
    )


def identity_halves(identities: Sequence[str], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Face indices of two seeded halves of the identities."""
    names = sorted(set(identities))
    if len(names) < 2:
        raise ValueError("a held-out probe needs at least 2 identities")
    order = np.random.default_rng(seed).permutation(len(names))
    first = {names[k] for k in order[: len(names) // 2]}
    side = np.array([i in first for i in identities])
    return np.flatnonzero(side), np.flatnonzero(~side)


def _probe(fit: np.ndarray, score: np.ndarray, y: np.ndarray, halves: tuple[np.ndarray, np.ndarray]) -> float:
    a, b = halves
    r2 = [linear_decodability(fit[p], y[p], score[q], y[q]).r2 for p, q in ((a, b), (b, a))]
    ok = [r for r in r2 if math.isfinite(r)]
    return float(np.mean(ok)) if ok else math.nan


def _ridge_predict(xa: np.ndarray, ya: np.ndarray, xb: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """The ridge fit of ``linear_decodability`` (unit templates, intercept, alpha 1): predictions on ``xb``."""

    def unit(x: np.ndarray) -> np.ndarray:
        n = np.linalg.norm(x, axis=1, keepdims=True)
        return x / np.where(n > 0, n, 1.0)

    xa, xb = unit(xa), unit(xb)
    mx, my = xa.mean(axis=0), ya.mean(axis=0)
    xc = xa - mx
    w = np.linalg.solve(xc.T @ xc + alpha * np.eye(xc.shape[1]), xc.T @ (ya - my))
    return (xb - mx) @ w + my


def _probe_auc(fit: np.ndarray, score: np.ndarray, y: np.ndarray, halves: tuple[np.ndarray, np.ndarray]) -> float:
    """Held-out predictions of both halves pooled, as a classifier's AUC (NaN unless the labels are 0/1)."""
    known = np.isfinite(y[:, 0])
    if not set(np.unique(y[known, 0]).tolist()) <= {0.0, 1.0}:
        return math.nan
    preds, labels = [], []
    for p, q in (halves, halves[::-1]):
        p, q = p[known[p]], q[known[q]]
        if len(p) < 3 or len(q) < 1:
            continue
        preds.append(_ridge_predict(fit[p], y[p], score[q])[:, 0])
        labels.append(y[q, 0])
    if not preds:
        return math.nan
    return attribute_auc(np.concatenate(preds), np.concatenate(labels))


def privacy_validation(
    before: torch.Tensor,
    after: torch.Tensor,
    values: Sequence[float],
    identities: Sequence[str],
    rule: VerificationRule,
    seed: int,
) -> PrivacyReport:
    """Compare original (N, D) templates ``before`` with modified ``after`` (see the module docstring).

    ``values`` is the suppressed attribute per face (NaN where unknown: left out of the probes).
    """
    if before.shape != after.shape or before.shape[0] != len(identities) or len(values) != len(identities):
        raise ValueError("one original template, one modified template, one value and one identity per face")
    halves = identity_halves(identities, seed)
    x0, x1 = before.double().numpy(), after.double().numpy()
    y = np.asarray(values, dtype=np.float64)[:, None]
    cos = F.cosine_similarity(before.double(), after.double(), dim=1)
    return PrivacyReport(
        probe_r2_before=_probe(x0, x0, y, halves),
        probe_r2_fixed=_probe(x0, x1, y, halves),
        probe_r2_refit=_probe(x1, x1, y, halves),
        probe_auc_before=_probe_auc(x0, x0, y, halves),
        probe_auc_fixed=_probe_auc(x0, x1, y, halves),
        probe_auc_refit=_probe_auc(x1, x1, y, halves),
        verification_before=verification(before, identities, rule),
        verification_after=verification(after, identities, rule),
        cosine_to_original_mean=float(cos.mean()),
        cosine_to_original_min=float(cos.min()),
        faces=int(before.shape[0]),
        identities=len(set(identities)),
    )


def attribute_auc(scores: ArrayLike, labels: ArrayLike) -> float:
    """How well an estimate (a probability, say) separates faces labelled 1 from 0; NaN labels skipped.

    0.5 is chance: the attribute is not readable from the estimate.
    """
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    ok = np.isfinite(s) & np.isfinite(y)
    yb = y[ok] > 0.5
    if yb.all() or not yb.any():
        return math.nan
    return roc_auc(s[ok], yb)
