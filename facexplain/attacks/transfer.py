"""Transfer (black-box) mode: craft on a surrogate with gradients, judge on a target without them.

The TALFW-style question is whether a counterfactual found on one FR model is a property of the face
or of that model. The target is any callable from chips to templates (dlib's descriptor, a registered
embedder behind a service), with its own references and its own calibrated rule; it never needs
gradients. Adversarial chips are quantised to 8 bits before they reach the target by default, because
a real black-box model receives images, and rounding alone can undo a flip that sits on the threshold.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from facexplain.attacks.objective import Embedder, Goal
from facexplain.attacks.result import AttackResult
from facexplain.metrics.verification import VerificationRule


def quantise(chips: torch.Tensor) -> torch.Tensor:
    """Round [0, 1] chips to the 256 levels an 8-bit image can carry."""
    return (chips * 255).round() / 255


@dataclass
class TransferReport:
    surrogate: AttackResult
    goal: Goal
    target_score_before: torch.Tensor  # (N,)
    target_score_after: torch.Tensor
    target_accept_before: torch.Tensor  # (N,) bool
    target_accept_after: torch.Tensor

    @property
    def target_success(self) -> torch.Tensor:
        return ~self.target_accept_after if self.goal == "dodge" else self.target_accept_after

    @property
    def target_eligible(self) -> torch.Tensor:
        """Pairs whose clean target decision is not already the goal (there is something to flip)."""
        return self.target_accept_before if self.goal == "dodge" else ~self.target_accept_before

    @property
    def target_flipped(self) -> torch.Tensor:
        return self.target_eligible & self.target_success

    def rates(self) -> dict[str, Any]:
        """White-box rate, target rate over its eligible pairs, and transfer rate given a white-box flip."""
        s_elig = self.surrogate.accept_before if self.goal == "dodge" else ~self.surrogate.accept_before
        both = s_elig & self.target_eligible
        transferred = both & self.surrogate.flipped

        def rate(hit: torch.Tensor, over: torch.Tensor) -> float:
            n = int(over.sum())
            return float((hit & over).sum()) / n if n else float("nan")

        return {
            "pairs": int(self.target_accept_before.numel()),
            "surrogate_eligible": int(s_elig.sum()),
            "surrogate_success_rate": rate(self.surrogate.flipped, s_elig),
            "target_eligible": int(self.target_eligible.sum()),
            "target_success_rate": rate(self.target_flipped, both),
            "transfer_rate_given_surrogate_flip": rate(self.target_flipped, transferred),
            "surrogate_flipped_and_target_eligible": int(transferred.sum()),
        }


@torch.no_grad()
def evaluate_transfer(
    result: AttackResult,
    clean: torch.Tensor,
    target: Embedder,
    target_refs: torch.Tensor,
    target_rule: VerificationRule,
    *,
    quantise_images: bool = True,
) -> TransferReport:
    """Score clean and adversarial chips of ``result`` on the target, with the target's own rule."""
    adv = quantise(result.adversarial) if quantise_images else result.adversarial
    base = quantise(clean) if quantise_images else clean
    t_clean = target(base)
    t_adv = target(adv)
    refs = target_refs.to(t_clean.device)
    return TransferReport(
        surrogate=result,
        goal=result.goal,
        target_score_before=target_rule.score(t_clean, refs),
        target_score_after=target_rule.score(t_adv, refs),
        target_accept_before=target_rule.accepts(t_clean, refs),
        target_accept_after=target_rule.accepts(t_adv, refs),
    )


def transfer_attack(
    attack: Callable[..., AttackResult],
    surrogate: Embedder,
    target: Embedder,
    chips: torch.Tensor,
    surrogate_refs: torch.Tensor,
    target_refs: torch.Tensor,
    target_rule: VerificationRule,
    *args: Any,
    quantise_images: bool = True,
    **kwargs: Any,
) -> TransferReport:
    """Run ``attack(surrogate, chips, surrogate_refs, *args, **kwargs)`` and judge it on ``target``."""
    result = attack(surrogate, chips, surrogate_refs, *args, **kwargs)
    return evaluate_transfer(result, chips, target, target_refs, target_rule, quantise_images=quantise_images)
