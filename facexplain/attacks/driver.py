"""One attack from a resolved plan: the method named by a spec, with its budget, seed and stop check.

A server (or a script) resolves a request into an :class:`AttackPlan` once (defaults filled, budget
validated) and runs it with :func:`run_plan`; the plan, not the caller, picks FGSM, I-FGSM, PGD, CW or
the minimal-epsilon search, so every caller draws the same random numbers for the same plan.
Cancellation surfaces as ``AttackCancelled``, inputs an attack rejects as :class:`AttackInputError`
(a ``ValueError`` of the attack itself, told apart from errors of the code around it); mapping them
to a transport's errors is the caller's business.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch

from facexplain.attacks.budget import AttackBudget
from facexplain.attacks.control import StopCheck
from facexplain.attacks.cw import cw_l2
from facexplain.attacks.gradient import fgsm, iterative_fgsm, pgd
from facexplain.attacks.objective import Embedder, VerificationObjective
from facexplain.attacks.result import AttackResult
from facexplain.attacks.search import minimal_epsilon

Method = Literal["fgsm", "ifgsm", "pgd", "cw"]
METHODS: tuple[Method, ...] = ("fgsm", "ifgsm", "pgd", "cw")


class AttackInputError(ValueError):
    """The attack rejected its inputs (shapes, ranges): the caller's mistake, not a fault of the method."""


@dataclass(frozen=True)
class AttackPlan:
    """A resolved attack: the method and its validated budget, and the knobs only some methods read."""

    method: Method
    budget: AttackBudget
    seed: int = 0
    minimal: bool = False  # bisect the smallest epsilon that reaches the goal (FGSM / I-FGSM / PGD)
    resolution_255: float = 1.0  # the bisection's grid, in 1/255 pixel units
    cw_c: float = 1.0
    cw_confidence: float = 0.0
    # I-FGSM / PGD: stop moving an item once it reaches the goal (the smallest change), or run every step
    # (False: the whole budget, a perturbation that transfers further to a black-box model)
    early_stop: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown attack method {self.method!r}; one of {', '.join(METHODS)}")
        if self.minimal and self.method == "cw":
            raise ValueError("the minimal-epsilon search runs FGSM/IFGSM/PGD budgets; CW already minimises the L2 norm")
        if not self.early_stop and (self.minimal or self.method in ("fgsm", "cw")):
            raise ValueError("the whole budget (no early stop) applies to I-FGSM and PGD without the minimal search")


@dataclass(frozen=True)
class PlannedAttack:
    """The attack's result and the epsilon it used (the found one after a successful minimal search)."""

    result: AttackResult
    epsilon_used: float


def run_plan(
    embedder: Embedder,
    x: torch.Tensor,
    refs: torch.Tensor,
    objective: VerificationObjective,
    plan: AttackPlan,
    *,
    should_stop: StopCheck | None = None,
) -> PlannedAttack:
    """Run ``plan`` on inputs ``x`` against reference templates ``refs``.

    Raises ``AttackCancelled`` when ``should_stop`` or the budget's time limit stops it, and
    :class:`AttackInputError` when the attack rejects its inputs.
    """
    try:
        return _run_plan(embedder, x, refs, objective, plan, should_stop)
    except ValueError as exc:
        raise AttackInputError(str(exc)) from exc


def _run_plan(
    embedder: Embedder,
    x: torch.Tensor,
    refs: torch.Tensor,
    objective: VerificationObjective,
    plan: AttackPlan,
    should_stop: StopCheck | None,
) -> PlannedAttack:
    budget, seed = plan.budget, plan.seed
    if plan.minimal:
        search_budget = budget
        if plan.method == "fgsm":
            search_budget = replace(budget, steps=1, random_start=False)
        elif plan.method == "ifgsm":
            search_budget = replace(budget, random_start=False)
        found = minimal_epsilon(
            embedder,
            x,
            refs,
            objective,
            search_budget,
            resolution_255=plan.resolution_255,
            seed=seed,
            should_stop=should_stop,
        )
        epsilon = float(found.epsilon[0]) if bool(found.found[0]) else budget.epsilon
        return PlannedAttack(result=found.result, epsilon_used=epsilon)
    result: AttackResult
    if plan.method == "fgsm":
        result = fgsm(embedder, x, refs, objective, budget, seed=seed, should_stop=should_stop)
    elif plan.method == "ifgsm":
        result = iterative_fgsm(
            embedder, x, refs, objective, budget, seed=seed, early_stop=plan.early_stop, should_stop=should_stop
        )
    elif plan.method == "pgd":
        result = pgd(
            embedder, x, refs, objective, budget, seed=seed, early_stop=plan.early_stop, should_stop=should_stop
        )
    else:
        result = cw_l2(
            embedder,
            x,
            refs,
            objective,
            budget,
            confidence=plan.cw_confidence,
            initial_const=plan.cw_c,
            seed=seed,
            should_stop=should_stop,
        )
    return PlannedAttack(result=result, epsilon_used=budget.epsilon)
