"""The verification decision an attack tries to flip, and the margin loss that pushes it there.

Attacks here target a *decision* (probe vs. reference under a calibrated ``VerificationRule``), not a
classifier's label: Ren et al. §III-D read an adversarial example as a counterfactual ("the smallest
change that makes the model say *not the same person*"), and DFD §4.3.3 attacks verification pairs in
both directions. Hence two goals:

- ``dodge`` (untargeted): a genuine pair that the rule accepts is pushed across the threshold to reject;
- ``impersonate`` (targeted): an impostor pair that the rule rejects is pulled across it to accept.

The loss is a margin (signed distance to the threshold) rather than the raw score, so that gradients
stop mattering once an item is over the line, and Carlini–Wagner's confidence ``kappa`` is just an
offset of the same quantity.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from facexplain.metrics.verification import VerificationRule

Goal = Literal["dodge", "impersonate"]
GOALS: tuple[Goal, ...] = ("dodge", "impersonate")

# chips in [0, 1], (N, 3, S, S) -> (N, d) raw templates; differentiable for white-box attacks
Embedder = Callable[[torch.Tensor], torch.Tensor]


def chip_embedder(net: torch.nn.Module) -> Embedder:
    """Adapt a recognition net that takes [0, 255] chips (the face-api ports) to the [0, 1] attack domain.

    Attacks work in [0, 1] so that epsilons read as the literature writes them (8/255); the scaling lives
    here, once, instead of in every attack.
    """

    def embed(chips: torch.Tensor) -> torch.Tensor:
        return net(chips * 255.0)

    return embed


@dataclass(frozen=True)
class VerificationObjective:
    """A rule plus the side of it the attacker wants to end on."""

    rule: VerificationRule
    goal: Goal

    def __post_init__(self) -> None:
        if self.goal not in GOALS:
            raise ValueError(f"unknown attack goal {self.goal!r}; expected one of {GOALS}")

    def score(self, templates: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
        """The rule's raw metric (distance or similarity), what a client sees as before/after."""
        return self.rule.score(templates, refs)

    def accepts(self, templates: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
        return self.rule.accepts(templates, refs)

    def success(self, templates: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
        """Whether each pair's decision is the one the attacker wants (uses the rule's own strictness)."""
        accepted = self.accepts(templates, refs)
        return ~accepted if self.goal == "dodge" else accepted

    def margin(self, templates: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
        """Signed distance to the threshold, negative once the goal holds; the quantity attacks minimise.

        Written so that one expression covers both metrics and both goals: ``accept_side`` is positive
        while the rule accepts, whichever way its threshold points.
        """
        s = self.score(templates, refs)
        accept_side = (self.rule.threshold - s) if self.rule.accept_below else (s - self.rule.threshold)
        return accept_side if self.goal == "dodge" else -accept_side


def decision(embedder: Embedder, chips: torch.Tensor, refs: torch.Tensor, rule: VerificationRule) -> torch.Tensor:
    """Accept/reject of each (chip, reference template) pair, without gradients (e.g. for a black-box target)."""
    with torch.no_grad():
        return rule.accepts(embedder(chips), refs.to(chips.device))
