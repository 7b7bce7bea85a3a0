"""Explicit, bounded attack budgets.

A served attack is user-controlled compute: every knob that scales the work (steps, restarts, time)
or the size of the change (epsilon) is named here and checked against server limits before anything
runs. ``BudgetError`` says which limit broke and whether the request was malformed (``exceeded`` is
False: INVALID_ARGUMENT) or merely too large for this server (``exceeded`` is True: RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

Norm = Literal["linf", "l2"]
NORMS: tuple[Norm, ...] = ("linf", "l2")

# The largest L2 norm a perturbation of a [0, 1] chip of 3x150x150 can have; anything above is not a
# budget, it is a typo.
_CHIP_DIM = 3 * 150 * 150
_L2_DIAMETER = math.sqrt(_CHIP_DIM)


class BudgetError(ValueError):
    """A budget that is malformed or beyond a server limit; ``limit`` names the rule that was broken."""

    def __init__(self, message: str, *, field: str, limit: str, exceeded: bool) -> None:
        super().__init__(message)
        self.field = field
        self.limit = limit
        self.exceeded = exceeded


@dataclass(frozen=True)
class BudgetLimits:
    """What a server allows per request. Defaults suit the CPU reference deployment (one pair ~50 ms/step)."""

    max_steps: int = 1000
    max_restarts: int = 10
    max_total_steps: int = 5000  # steps * (restarts + 1): the gradient evaluations one request may cost
    max_epsilon_linf: float = 32 / 255
    max_epsilon_l2: float = 20.0
    max_seconds: float = 120.0

    def max_epsilon(self, norm: Norm) -> float:
        return self.max_epsilon_linf if norm == "linf" else self.max_epsilon_l2


def _finite_number(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BudgetError(f"{name} must be a number, got {value!r}", field=name, limit="type", exceeded=False)
    if not math.isfinite(value):
        raise BudgetError(f"{name} must be finite, got {value!r}", field=name, limit="finite", exceeded=False)


@dataclass(frozen=True)
class AttackBudget:
    """How far and how long an attack may go; all image quantities in [0, 1] chip units.

    ``epsilon`` is the radius of the ``norm`` ball around the clean chip (L-inf: per pixel, so 8/255 is
    the usual "invisible" budget; L2: over the whole 3x150x150 chip). ``steps`` is the number of gradient
    steps per run and ``restarts`` the number of extra runs: random restarts for PGD, extra binary-search
    rounds over the constant c for Carlini–Wagner; either way the work is ``steps * (restarts + 1)``.
    ``step_size`` defaults to Madry et al.'s 2.5 * epsilon / steps (for CW it is Adam's learning rate,
    default 0.01). ``time_limit`` (seconds) bounds wall-clock time; ``validate`` fills it with the
    server's maximum when the request leaves it open.
    """

    epsilon: float
    steps: int = 10
    step_size: float | None = None
    norm: Norm = "linf"
    restarts: int = 0
    random_start: bool = True
    time_limit: float | None = None

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise BudgetError(
                f"unknown norm {self.norm!r}; expected one of {NORMS}", field="norm", limit="norm", exceeded=False
            )
        _finite_number("epsilon", self.epsilon)
        if self.epsilon <= 0:
            raise BudgetError(
                f"epsilon must be > 0, got {self.epsilon}", field="epsilon", limit="positive", exceeded=False
            )
        bound = 1.0 if self.norm == "linf" else _L2_DIAMETER
        if self.epsilon > bound:
            raise BudgetError(
                f"epsilon {self.epsilon} is larger than the whole [0, 1] image range allows in {self.norm} "
                f"({bound:.4g})",
                field="epsilon",
                limit="image_range",
                exceeded=False,
            )
        for name in ("steps", "restarts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise BudgetError(f"{name} must be an integer, got {value!r}", field=name, limit="type", exceeded=False)
        if self.steps < 1:
            raise BudgetError(f"steps must be >= 1, got {self.steps}", field="steps", limit="positive", exceeded=False)
        if self.restarts < 0:
            raise BudgetError(
                f"restarts must be >= 0, got {self.restarts}", field="restarts", limit="non_negative", exceeded=False
            )
        if self.step_size is not None:
            _finite_number("step_size", self.step_size)
            if self.step_size <= 0:
                raise BudgetError(
                    f"step_size must be > 0, got {self.step_size}", field="step_size", limit="positive", exceeded=False
                )
        if self.time_limit is not None:
            _finite_number("time_limit", self.time_limit)
            if self.time_limit <= 0:
                raise BudgetError(
                    f"time_limit must be > 0 seconds, got {self.time_limit}",
                    field="time_limit",
                    limit="positive",
                    exceeded=False,
                )

    @property
    def runs(self) -> int:
        return self.restarts + 1

    @property
    def total_steps(self) -> int:
        return self.steps * self.runs

    def alpha(self) -> float:
        """The PGD step size: explicit, or 2.5 * epsilon / steps so that a run can cross the ball and back."""
        return self.step_size if self.step_size is not None else 2.5 * self.epsilon / self.steps

    def validate(self, limits: BudgetLimits) -> AttackBudget:
        """This budget if it fits ``limits`` (with the time limit filled in), else ``BudgetError``."""
        checks: list[tuple[str, str, float, float]] = [
            ("steps", "max_steps", self.steps, limits.max_steps),
            ("restarts", "max_restarts", self.restarts, limits.max_restarts),
            ("steps", "max_total_steps", self.total_steps, limits.max_total_steps),
            ("epsilon", f"max_epsilon_{self.norm}", self.epsilon, limits.max_epsilon(self.norm)),
        ]
        if self.time_limit is not None:
            checks.append(("time_limit", "max_seconds", self.time_limit, limits.max_seconds))
        for field, limit, value, bound in checks:
            if value > bound:
                raise BudgetError(
                    f"{field} {value:g} exceeds the server limit {limit} = {bound:g}",
                    field=field,
                    limit=limit,
                    exceeded=True,
                )
        return self if self.time_limit is not None else replace(self, time_limit=limits.max_seconds)
