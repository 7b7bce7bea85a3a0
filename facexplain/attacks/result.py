"""What an attack returns: enough to show the counterfactual and to audit that the budget held."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch

from facexplain.attacks.budget import Norm
from facexplain.attacks.objective import Embedder, Goal, VerificationObjective


@dataclass
class AttackResult:
    """Per-item outcome of one batched attack; all tensors have the batch as their first dimension."""

    method: str
    goal: Goal
    norm: Norm
    epsilon: torch.Tensor  # (N,) the ball radius each item was attacked with
    adversarial: torch.Tensor  # (N, 3, S, S) in [0, 1]
    linf: torch.Tensor  # (N,) max |x_adv - x|
    l2: torch.Tensor  # (N,) ||x_adv - x||_2 over the whole chip
    score_before: torch.Tensor  # (N,) the rule's metric on the clean pair
    score_after: torch.Tensor
    accept_before: torch.Tensor  # (N,) bool
    accept_after: torch.Tensor
    steps: torch.Tensor  # (N,) gradient steps spent on each item (over all runs)
    seed: int | None

    @property
    def success(self) -> torch.Tensor:
        """Goal decision reached (for dodging: rejected), whether or not it already held before."""
        return ~self.accept_after if self.goal == "dodge" else self.accept_after

    @property
    def flipped(self) -> torch.Tensor:
        """The decision changed, in the attacker's direction: the counterfactual exists."""
        return (self.accept_before != self.accept_after) & self.success

    def success_rate(self) -> float:
        """Flips among the pairs where there was something to flip (a genuine pair already rejected is no dodge)."""
        eligible = self.accept_before if self.goal == "dodge" else ~self.accept_before
        n = int(eligible.sum())
        return float(self.flipped[eligible].float().mean()) if n else float("nan")

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> AttackResult:
        values: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            values[f.name] = fn(v) if isinstance(v, torch.Tensor) else v
        return AttackResult(**values)

    def cpu(self) -> AttackResult:
        return self._map(lambda t: t.cpu())

    def select(self, index: torch.Tensor) -> AttackResult:
        """The rows ``index`` (indices or a mask) of every per-item tensor."""
        return self._map(lambda t: t[index])

    def assign(self, index: torch.Tensor, other: AttackResult) -> None:
        """Overwrite rows ``index`` with ``other``'s rows, in place (merging partial batched runs)."""
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v[index] = getattr(other, f.name)


def perturbation_norms(adversarial: torch.Tensor, clean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = (adversarial - clean).flatten(1)
    return d.abs().amax(dim=1), d.norm(dim=1)


@torch.no_grad()
def finalise(
    *,
    method: str,
    objective: VerificationObjective,
    norm: Norm,
    epsilon: torch.Tensor,
    embedder: Embedder,
    clean: torch.Tensor,
    adversarial: torch.Tensor,
    refs: torch.Tensor,
    score_before: torch.Tensor,
    accept_before: torch.Tensor,
    steps: torch.Tensor,
    seed: int | None,
) -> AttackResult:
    """Score the adversarial chips once more, from scratch, so the reported decision is the real one."""
    templates = embedder(adversarial)
    linf, l2 = perturbation_norms(adversarial, clean)
    return AttackResult(
        method=method,
        goal=objective.goal,
        norm=norm,
        epsilon=epsilon,
        adversarial=adversarial.detach(),
        linf=linf,
        l2=l2,
        score_before=score_before,
        score_after=objective.score(templates, refs),
        accept_before=accept_before,
        accept_after=objective.accepts(templates, refs),
        steps=steps,
        seed=seed,
    )
