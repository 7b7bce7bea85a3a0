"""The attribute-recovery gate, restated over the attributes a template is shown to carry.

The first form of the gate asked the shuffled control to lie below the smallest I(a; â) over *every*
attribute. That cannot hold for a model that does not carry an attribute at all: a mirror-invariant
model (face vs mirror cosine 0.991 for the default model) keeps neither the sign nor the size of yaw
(held-out probe R² about 0), and by the data-processing inequality I(a; â) <= I(a; z) no decoder can
recover what z lacks, so the gate failed on a property of the model, not of the method.

Restated: an attribute is *carried* when a probe from templates predicts it on held-out identities
with R² above :data:`CARRIED_R2` (either probe of :mod:`facexplain.attributes.template_probe`: the
ridge or the k-nearest-template one, whichever finds more); the gate asks the largest shuffled control
to lie below the smallest I(a; â) over the carried attributes. The rest are listed as "not carried" with
their probe R², and attributes no probe scored (categorical ones) as "not probed"; neither is gated.
0.05 is a small effect that ~800 held-out faces measure well clear of 0 (the R² of a probe that has
learnt nothing scatters by about ±0.02 at that size), so "carried" means a shown, not a presumed, signal.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

CARRIED_R2 = 0.05


class ScoredAttribute(Protocol):
    """What the gate reads of an importance row (``ImportanceRow`` and :class:`GateRow` fit)."""

    @property
    def attribute(self) -> str: ...
    @property
    def mi(self) -> float: ...
    @property
    def control_mi(self) -> float: ...


@dataclass(frozen=True)
class GateRow:
    """A minimal importance row: enough for the gate."""

    attribute: str
    mi: float
    control_mi: float


@dataclass(frozen=True)
class AttributeGate:
    passed: bool
    carried: list[str]
    smallest_carried_mi: float
    smallest_carried: str
    largest_control_mi: float
    below_or_at_control: list[str]
    not_carried: dict[str, float] = field(default_factory=dict)
    not_probed: list[str] = field(default_factory=list)
    min_r2: float = CARRIED_R2


def _best_r2(scores: Mapping[str, float | None]) -> float:
    vals = [float(v) for v in scores.values() if v is not None and math.isfinite(float(v))]
    return max(vals) if vals else math.nan


def attribute_gate(
    rows: Sequence[ScoredAttribute], probe_r2: Mapping[str, Mapping[str, float | None]], min_r2: float = CARRIED_R2
) -> AttributeGate:
    """The restated gate over ``rows`` (finite MI only), given each attribute's held-out probe R² values
    (``{"linear": r2, "knn": r2}``; the best of them decides whether the attribute is carried)."""
    finite = [r for r in rows if math.isfinite(r.mi) and math.isfinite(r.control_mi)]
    if not finite:
        raise ValueError("no attribute has a finite MI and control: nothing to gate")
    carried: list[ScoredAttribute] = []
    not_carried: dict[str, float] = {}
    not_probed: list[str] = []
    for r in finite:
        best = _best_r2(probe_r2.get(r.attribute, {}))
        if math.isnan(best):
            not_probed.append(r.attribute)
        elif best > min_r2:
            carried.append(r)
        else:
            not_carried[r.attribute] = best
    largest_control = max(r.control_mi for r in finite)
    if not carried:
        return AttributeGate(False, [], math.nan, "", largest_control, [], not_carried, not_probed, min_r2)
    smallest = min(carried, key=lambda r: r.mi)
    return AttributeGate(
        passed=bool(largest_control < smallest.mi),
        carried=[r.attribute for r in carried],
        smallest_carried_mi=smallest.mi,
        smallest_carried=smallest.attribute,
        largest_control_mi=largest_control,
        below_or_at_control=sorted(r.attribute for r in carried if r.mi <= largest_control),
        not_carried=not_carried,
        not_probed=not_probed,
        min_r2=min_r2,
    )
