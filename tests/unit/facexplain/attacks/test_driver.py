"""run_plan: the plan picks the method; same plan and seed, same numbers."""

from __future__ import annotations

import pytest
import torch

from facexplain.attacks import AttackBudget, AttackInputError, AttackPlan, VerificationObjective, pgd, run_plan
from facexplain.metrics.verification import VerificationRule

RULE = VerificationRule(metric="l2", threshold=0.5, accept_below=True, source="toy")
_W = torch.randn(3 * 8 * 8, 8, generator=torch.Generator().manual_seed(0)) * 0.1


def _embed(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1) @ _W


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 8, 8, generator=gen)
    with torch.no_grad():
        return x, _embed(x + 0.01)


def test_run_plan_is_the_named_method() -> None:
    x, refs = _inputs()
    objective = VerificationObjective(RULE, "dodge")
    budget = AttackBudget(8 / 255, steps=3, random_start=True)
    planned = run_plan(_embed, x, refs, objective, AttackPlan(method="pgd", budget=budget, seed=4))
    direct = pgd(_embed, x, refs, objective, budget, seed=4)
    assert torch.equal(planned.result.adversarial, direct.adversarial)
    assert planned.epsilon_used == budget.epsilon


@pytest.mark.parametrize("method", ["fgsm", "ifgsm", "pgd", "cw"])
def test_every_method_repeats_under_a_seed(method: str) -> None:
    x, refs = _inputs()
    objective = VerificationObjective(RULE, "dodge")
    norm = "l2" if method == "cw" else "linf"
    budget = AttackBudget(1.0 if norm == "l2" else 8 / 255, steps=1 if method == "fgsm" else 3, norm=norm)
    plan = AttackPlan(method=method, budget=budget, seed=2)  # type: ignore[arg-type]
    a = run_plan(_embed, x, refs, objective, plan)
    b = run_plan(_embed, x, refs, objective, plan)
    assert torch.equal(a.result.adversarial, b.result.adversarial)


def test_minimal_search_reports_the_found_epsilon() -> None:
    x, refs = _inputs()
    plan = AttackPlan(method="pgd", budget=AttackBudget(32 / 255, steps=3), minimal=True, resolution_255=4.0)
    out = run_plan(_embed, x, refs, VerificationObjective(RULE, "dodge"), plan)
    assert 0 < out.epsilon_used <= 32 / 255


def test_plan_checks_and_input_errors() -> None:
    with pytest.raises(ValueError):
        AttackPlan(method="deepfool", budget=AttackBudget(0.1))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        AttackPlan(method="cw", budget=AttackBudget(1.0, norm="l2"), minimal=True)
    x, refs = _inputs()
    with pytest.raises(AttackInputError):
        run_plan(_embed, x * 2, refs, VerificationObjective(RULE, "dodge"), AttackPlan("pgd", AttackBudget(0.1)))


@pytest.mark.parametrize("method", ["ifgsm", "pgd"])
def test_a_full_budget_plan_runs_every_step(method: str) -> None:
    x, refs = _inputs()
    objective = VerificationObjective(RULE, "dodge")
    budget = AttackBudget(32 / 255, steps=6)
    stopped = run_plan(_embed, x, refs, objective, AttackPlan(method=method, budget=budget))  # type: ignore[arg-type]
    full = run_plan(_embed, x, refs, objective, AttackPlan(method=method, budget=budget, early_stop=False))  # type: ignore[arg-type]
    assert bool(stopped.result.success[0]) and bool(full.result.success[0])
    assert int(stopped.result.steps[0]) < 6 == int(full.result.steps[0])  # the toy pair flips early
    d_stopped, d_full = stopped.result.adversarial - x, full.result.adversarial - x
    assert d_full.abs().max() <= 32 / 255 + 1e-6
    assert d_stopped.norm() < d_full.norm()  # the whole budget moves further from the clean input


def test_full_budget_needs_an_iterative_attack() -> None:
    for kwargs in ({"method": "fgsm"}, {"method": "cw"}, {"method": "pgd", "minimal": True}):
        norm = "l2" if kwargs["method"] == "cw" else "linf"
        with pytest.raises(ValueError, match="whole budget"):
            AttackPlan(budget=AttackBudget(0.1, norm=norm), early_stop=False, **kwargs)  # type: ignore[arg-type]
