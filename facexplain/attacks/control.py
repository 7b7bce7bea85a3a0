"""Cancellation: attacks are long loops, so a server must be able to stop one between steps.

Design choice: a stopped attack *raises* ``AttackCancelled`` (carrying the partial result reached so
far) instead of returning normally with a flag. A partial attack is not an answer to the request, and
an exception cannot be silently mistaken for one; the service maps ``reason`` to CANCELLED or
DEADLINE_EXCEEDED and may still show ``partial`` for debugging.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from facexplain.attacks.result import AttackResult

StopCheck = Callable[[], bool]
StopReason = Literal["cancelled", "time_limit"]


class AttackCancelled(RuntimeError):
    """The attack stopped before finishing, because ``should_stop`` said so or its time limit passed."""

    def __init__(self, reason: StopReason, steps_done: int, partial: AttackResult | None = None) -> None:
        super().__init__(f"attack stopped ({reason}) after {steps_done} steps")
        self.reason: StopReason = reason
        self.steps_done = steps_done
        self.partial = partial


def deadline(seconds: float) -> StopCheck:
    """A ``should_stop`` that turns true ``seconds`` from now (monotonic clock)."""
    end = time.monotonic() + seconds
    return lambda: time.monotonic() >= end


class Stopper:
    """Combines the caller's ``should_stop`` with the budget's time limit; polled once per step."""

    def __init__(self, should_stop: StopCheck | None, time_limit: float | None) -> None:
        self.should_stop = should_stop
        self.end = None if time_limit is None else time.monotonic() + time_limit
        self.steps_done = 0

    def reason(self) -> StopReason | None:
        if self.should_stop is not None and self.should_stop():
            return "cancelled"
        if self.end is not None and time.monotonic() >= self.end:
            return "time_limit"
        return None

    def tick(self) -> StopReason | None:
        """Count one step and say whether (and why) to stop before taking it."""
        why = self.reason()
        if why is None:
            self.steps_done += 1
        return why
