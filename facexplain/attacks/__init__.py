"""Adversarial attacks on a verification decision, as plain functions over tensors (issue 7).

Chips are aligned, float, in [0, 1]; an embedder maps them to templates (``chip_embedder`` adapts the
[0, 255] face-api nets). Budgets are explicit (``AttackBudget``, checked by ``validate`` against
``BudgetLimits``); cancellation raises ``AttackCancelled`` with the partial result.
"""

from facexplain.attacks.budget import NORMS, AttackBudget, BudgetError, BudgetLimits, Norm
from facexplain.attacks.control import AttackCancelled, StopCheck, deadline
from facexplain.attacks.cw import cw_l2
from facexplain.attacks.driver import METHODS, AttackInputError, AttackPlan, Method, PlannedAttack, run_plan
from facexplain.attacks.gradient import fgsm, iterative_fgsm, pgd
from facexplain.attacks.objective import GOALS, Embedder, Goal, VerificationObjective, chip_embedder, decision
from facexplain.attacks.result import AttackResult, perturbation_norms
from facexplain.attacks.search import MinimalEpsilon, minimal_epsilon
from facexplain.attacks.transfer import TransferReport, evaluate_transfer, quantise, transfer_attack

__all__ = [
    "GOALS",
    "METHODS",
    "NORMS",
    "AttackBudget",
    "AttackCancelled",
    "AttackInputError",
    "AttackPlan",
    "AttackResult",
    "BudgetError",
    "BudgetLimits",
    "Embedder",
    "Goal",
    "Method",
    "MinimalEpsilon",
    "Norm",
    "PlannedAttack",
    "StopCheck",
    "TransferReport",
    "VerificationObjective",
    "chip_embedder",
    "cw_l2",
    "deadline",
    "decision",
    "evaluate_transfer",
    "fgsm",
    "iterative_fgsm",
    "minimal_epsilon",
    "perturbation_norms",
    "pgd",
    "quantise",
    "run_plan",
    "transfer_attack",
]
