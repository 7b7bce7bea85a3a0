"""Verification against the number of templates aggregated per identity (DFD §4.4, Fig. 16).

An enrolment built from n photos of a person (the normalised mean of their n templates,
:func:`facexplain.directions.aggregate.mean_template` with ``normalize_inputs``) should verify that
person's other photos more reliably as n grows: pose, light and expression average out. The protocol
keeps everything but n fixed, so the curve shows aggregation and nothing else:

* only identities with at least ``max(ns) + 1`` faces take part, the same ones for every n;
* per identity and repeat, a seeded permutation of its faces; the first is the probe, and the
  enrolment for n is the mean of the next n (so the enrolment for 2n contains the one for n);
* genuine pairs: each enrolment against its own identity's probe; impostor pairs: against every other
  identity's probe (same repeat);
* TAR / FAR are the shares of genuine / impostor pairs the model's own rule accepts (the threshold is
  the model's calibrated one, not refitted per n); AUC is the Mann-Whitney area over the rule's score.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from facexplain.directions.aggregate import mean_template
from facexplain.metrics.verification import VerificationRule, roc_auc


@dataclass(frozen=True)
class AggregationPoint:
    """Verification with n aggregated templates per enrolment."""

    n: int
    tar: float  # genuine pairs accepted by the rule
    far: float  # impostor pairs accepted by the rule
    auc: float
    genuine_score_mean: float  # in the rule's metric (L2 distance or cosine)
    impostor_score_mean: float
    n_genuine: int
    n_impostor: int
    identities: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def powers_of_two(max_n: int) -> list[int]:
    """1, 2, 4, ... up to ``max_n`` (and ``max_n`` itself when it is not a power of two)."""
    if max_n < 1:
        raise ValueError(f"max_n must be >= 1, got {max_n}")
    ns = [1]
    while ns[-1] * 2 <= max_n:
        ns.append(ns[-1] * 2)
    if ns[-1] != max_n:
        ns.append(max_n)
    return ns


def largest_n(identities: Sequence[str], min_identities: int = 2) -> int:
    """The largest n for which at least ``min_identities`` identities have n + 1 faces (0 if none)."""
    counts = sorted((int(c) for c in np.unique(np.asarray(identities), return_counts=True)[1]), reverse=True)
    if len(counts) < min_identities:
        return 0
    return max(0, counts[min_identities - 1] - 1)


def aggregation_curve(
    templates: torch.Tensor,
    identities: Sequence[str],
    ns: Sequence[int],
    rule: VerificationRule,
    seed: int,
    repeats: int = 5,
) -> list[AggregationPoint]:
    """Verification for each n in ``ns`` on (N, D) raw ``templates`` of ``identities`` (see module docstring)."""
    if templates.dim() != 2 or templates.shape[0] != len(identities):
        raise ValueError("one (D,) template per identity label")
    if not ns or min(ns) < 1:
        raise ValueError("ns must be non-empty and >= 1")
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    need = max(ns) + 1
    ids = np.asarray(identities)
    names = sorted({str(i) for i in ids if int((ids == i).sum()) >= need})
    if len(names) < 2:
        raise ValueError(f"aggregating up to {max(ns)} templates needs 2 identities with >= {need} faces")
    x = templates.detach().double().cpu()
    rng = np.random.default_rng(seed)
    per_id = {name: np.flatnonzero(ids == name) for name in names}
    orders = [{name: rng.permutation(per_id[name]) for name in names} for _ in range(repeats)]
    points = []
    for n in ns:
        genuine: list[np.ndarray] = []
        impostor: list[np.ndarray] = []
        g_ok: list[np.ndarray] = []
        i_ok: list[np.ndarray] = []
        for order in orders:
            probes = torch.stack([x[int(order[name][0])] for name in names])
            enrol = torch.stack(
                [mean_template(x[order[name][1 : 1 + n].tolist()], normalize_inputs=True) for name in names]
            )
            k = len(names)
            a = enrol.repeat_interleave(k, dim=0)
            b = probes.repeat(k, 1)
            same = np.repeat(np.arange(k), k) == np.tile(np.arange(k), k)
            score = rule.score(a, b).numpy()
            accept = rule.accepts(a, b).numpy()
            genuine.append(score[same])
            impostor.append(score[~same])
            g_ok.append(accept[same])
            i_ok.append(accept[~same])
        g, i = np.concatenate(genuine), np.concatenate(impostor)
        sim = np.concatenate([g, i]) * (-1.0 if rule.accept_below else 1.0)
        labels = np.concatenate([np.ones(len(g), bool), np.zeros(len(i), bool)])
        points.append(
            AggregationPoint(
                n=int(n),
                tar=float(np.concatenate(g_ok).mean()),
                far=float(np.concatenate(i_ok).mean()),
                auc=roc_auc(sim, labels),
                genuine_score_mean=float(g.mean()),
                impostor_score_mean=float(i.mean()),
                n_genuine=len(g),
                n_impostor=len(i),
                identities=len(names),
            )
        )
    return points
