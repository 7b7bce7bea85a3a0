"""Minimal-perturbation search: the smallest epsilon on a grid at which an attack flips the decision.

A single success rate at 8/255 says little about one pair; the smallest epsilon that flips it is a
per-pair robustness figure, and the adversarial example found there is the tightest counterfactual
the attack can offer (Ren et al. §III-D). The search bisects over grid indices k (epsilon = k ·
resolution / 255), batched: every item is attacked at its own midpoint in the same PGD call.

What it guarantees: at the returned epsilon the attack (with this seed and budget) flips, and one
grid step below it does not (or that step is 0, i.e. the clean pair, which does not by eligibility).
It does not claim global minimality: attacks are not monotone in epsilon, so a smaller epsilon two
steps down might flip under another random start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from facexplain.attacks.budget import AttackBudget
from facexplain.attacks.control import StopCheck
from facexplain.attacks.gradient import run_attack
from facexplain.attacks.objective import Embedder, VerificationObjective
from facexplain.attacks.result import AttackResult


@dataclass
class MinimalEpsilon:
    """Per item: the smallest flipping epsilon on the grid (NaN if none up to the budget's epsilon)."""

    epsilon: torch.Tensor  # (N,) float, NaN where not found or not eligible
    epsilon_below: torch.Tensor  # (N,) epsilon - one grid step (tested, did not flip)
    found: torch.Tensor  # (N,) bool
    eligible: torch.Tensor  # (N,) bool: the clean decision was not already the goal
    below_flipped: torch.Tensor  # (N,) bool: the run one step below flipped (False wherever found)
    result: AttackResult  # the attack at ``epsilon`` (at the maximum where not found)
    resolution: float  # grid step, in epsilon units
    runs: int  # batched attack calls made

    @property
    def adversarial(self) -> torch.Tensor:
        return self.result.adversarial


def minimal_epsilon(
    embedder: Embedder,
    chips: torch.Tensor,
    refs: torch.Tensor,
    objective: VerificationObjective,
    budget: AttackBudget,
    *,
    resolution_255: float = 1.0,
    seed: int | None = 0,
    should_stop: StopCheck | None = None,
) -> MinimalEpsilon:
    """Bisect epsilon in (0, ``budget.epsilon``] on a grid of ``resolution_255`` / 255 with PGD in ``budget.norm``.

    ``budget.epsilon`` is the largest radius tried; steps, restarts and random start come from the
    budget, and the step size scales with each radius (Madry's 2.5 · eps / steps; an explicit
    ``budget.step_size`` would be wrong at most radii, so it is dropped). A fixed seed (default 0) makes
    every call reproducible; it is reused for each bisection round so that rounds differ only in epsilon.
    """
    if not (math.isfinite(resolution_255) and resolution_255 > 0):
        raise ValueError(f"resolution_255 must be > 0, got {resolution_255}")
    step = resolution_255 / 255.0
    top = math.floor(budget.epsilon / step + 1e-9)
    if top < 1:
        raise ValueError(f"budget epsilon {budget.epsilon:g} is below one grid step ({step:g})")
    budget = replace(budget, step_size=None)
    n = chips.shape[0]
    device = chips.device

    def attack(k: torch.Tensor, skip: torch.Tensor | None) -> AttackResult:
        # the whole batch every round (skipped items stay clean) so each item sees the same random start
        # at every radius, as a caller re-running ``pgd`` on this batch with this seed would
        return run_attack(
            f"pgd_{budget.norm}",
            embedder,
            chips,
            refs,
            objective,
            budget,
            steps=budget.steps,
            runs=budget.runs,
            start=budget.random_start,
            epsilon=k.to(torch.float32) * step,
            seed=seed,
            should_stop=should_stop,
            skip=skip,
        )

    hi = torch.full((n,), top, dtype=torch.long, device=device)
    at_hi = attack(hi, None)
    runs = 1
    eligible = at_hi.accept_before.clone() if objective.goal == "dodge" else ~at_hi.accept_before
    found = eligible & at_hi.success
    lo = torch.zeros(n, dtype=torch.long, device=device)
    below_flipped = torch.zeros(n, dtype=torch.bool, device=device)
    while True:
        active_mask = found & (hi - lo > 1)
        active = active_mask.nonzero().squeeze(1)
        if active.numel() == 0:
            break
        mid = torch.where(active_mask, (lo + hi) // 2, hi)
        r = attack(mid, ~active_mask)
        runs += 1
        ok = r.success[active]
        below_flipped[active[~ok]] = ok[~ok]  # the record of the run at the new lower end (all False)
        hi[active[ok]] = mid[active[ok]]
        lo[active[~ok]] = mid[active[~ok]]
        at_hi.assign(active[ok], r.select(active[ok]))
    nan = torch.full((n,), float("nan"), device=device)
    epsilon = torch.where(found, hi.to(torch.float32) * step, nan)
    epsilon_below = torch.where(found, lo.to(torch.float32) * step, nan)
    return MinimalEpsilon(
        epsilon=epsilon,
        epsilon_below=epsilon_below,
        found=found,
        eligible=eligible,
        below_flipped=below_flipped,
        result=at_hi,
        resolution=step,
        runs=runs,
    )
