"""Gradient-sign and projected-gradient attacks on a verification decision: FGSM, I-FGSM (BIM), PGD.

These are the "FGSM family" of DFD §4.3.3 (tFGSM / itFGSM are the targeted single-step and iterative
forms, here ``goal="impersonate"``) and the adversarial counterfactuals of Ren et al. §III-D; PGD
(Madry et al.) adds the random start and L2 ball. All three share one loop because they differ only
in step count, step size and start: FGSM is one step of size epsilon from the clean chip, I-FGSM many
small steps from it, PGD many small steps from a seeded random point in the ball, with restarts.

Everything works on the aligned chip in [0, 1] (the attack never touches detection or alignment, so
the perturbation is exactly what the recognition net sees), batched, on whatever device the chips are.
Items that reach the goal are frozen (``early_stop``) so the returned example is the first one that
flips, not one pushed arbitrarily deep, and so that a batch gets cheaper as it succeeds.
"""

from __future__ import annotations

import torch

from facexplain.attacks.budget import AttackBudget, Norm
from facexplain.attacks.control import AttackCancelled, StopCheck, Stopper, StopReason
from facexplain.attacks.objective import Embedder, VerificationObjective
from facexplain.attacks.result import AttackResult, finalise


class _Interrupted(Exception):
    def __init__(self, reason: StopReason, delta: torch.Tensor, steps_used: torch.Tensor) -> None:
        super().__init__(reason)
        self.reason: StopReason = reason
        self.delta = delta
        self.steps_used = steps_used


def check_chips(chips: torch.Tensor, refs: torch.Tensor) -> None:
    """Fail early on the two mistakes that otherwise give silently meaningless attacks."""
    if chips.dim() != 4 or not chips.is_floating_point():
        raise ValueError(f"chips must be float (N, 3, S, S) in [0, 1], got {chips.dtype} {tuple(chips.shape)}")
    if chips.numel() and (float(chips.min()) < 0.0 or float(chips.max()) > 1.0):
        raise ValueError("chips must lie in [0, 1] (divide uint8 chips by 255)")
    if refs.shape[0] != chips.shape[0]:
        raise ValueError(f"need one reference template per chip, got {refs.shape[0]} for {chips.shape[0]}")


def make_generator(device: torch.device, seed: int | None) -> tuple[torch.Generator, int]:
    """A generator on ``device`` and the seed it got: a fresh seed is drawn (and reported) when none is given."""
    gen = torch.Generator(device=device)
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    gen.manual_seed(seed)
    return gen, seed


def _view(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def project(delta: torch.Tensor, x: torch.Tensor, eps: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Into the epsilon ball, then into the [0, 1] box (the box only shrinks a perturbation, so both hold)."""
    if norm == "linf":
        e = _view(eps)
        delta = torch.maximum(torch.minimum(delta, e), -e)
    else:
        n = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        delta = delta * _view((eps / n).clamp(max=1.0))
    return (x + delta).clamp(0.0, 1.0) - x


def random_start(x: torch.Tensor, eps: torch.Tensor, norm: Norm, gen: torch.Generator) -> torch.Tensor:
    """A uniform point in the ball: uniform per pixel for L-inf, uniform in volume for L2."""
    if norm == "linf":
        u = torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        return (2 * u - 1) * _view(eps)
    g = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    g = g / _view(g.flatten(1).norm(dim=1).clamp_min(1e-12))
    d = x[0].numel()
    r = torch.rand(x.shape[0], generator=gen, device=x.device, dtype=x.dtype) ** (1.0 / d)
    return g * _view(r * eps)


def _ascent(grad: torch.Tensor, alpha: torch.Tensor, norm: Norm) -> torch.Tensor:
    if norm == "linf":
        return _view(alpha) * grad.sign()
    return _view(alpha) * grad / _view(grad.flatten(1).norm(dim=1).clamp_min(1e-12))


def _run(
    embedder: Embedder,
    x: torch.Tensor,
    refs: torch.Tensor,
    objective: VerificationObjective,
    eps: torch.Tensor,
    alpha: torch.Tensor,
    steps: int,
    norm: Norm,
    init: torch.Tensor | None,
    early_stop: bool,
    stopper: Stopper,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One run from ``init`` (or the clean chip): (delta, steps used, success, final margin) per item."""
    n = x.shape[0]
    delta = project(init, x, eps, norm) if init is not None else torch.zeros_like(x)
    used = torch.zeros(n, dtype=torch.long, device=x.device)
    success = torch.zeros(n, dtype=torch.bool, device=x.device)
    margin = torch.full((n,), float("inf"), device=x.device)
    for t in range(steps + 1):
        idx = (~success).nonzero().squeeze(1) if early_stop else torch.arange(n, device=x.device)
        if idx.numel() == 0:
            break
        last = t == steps
        if not last:
            why = stopper.tick()
            if why is not None:
                raise _Interrupted(why, delta, used)
        d = delta[idx].clone().requires_grad_(not last)
        with torch.set_grad_enabled(not last):
            templates = embedder(x[idx] + d)
            m = objective.margin(templates, refs[idx])
        ok = objective.success(templates.detach(), refs[idx])
        success[idx] = ok
        margin[idx] = m.detach()
        if last:
            break
        (grad,) = torch.autograd.grad(m.sum(), d)
        step = project(d.detach() - _ascent(grad, alpha[idx], norm), x[idx], eps[idx], norm)
        move = ~ok if early_stop else torch.ones_like(ok)
        delta[idx[move]] = step[move]
        used[idx[move]] += 1
    return delta, used, success, margin


def run_attack(
    method: str,
    embedder: Embedder,
    chips: torch.Tensor,
    refs: torch.Tensor,
    objective: VerificationObjective,
    budget: AttackBudget,
    *,
    steps: int,
    runs: int,
    start: bool,
    epsilon: torch.Tensor | None = None,
    seed: int | None = None,
    early_stop: bool = True,
    should_stop: StopCheck | None = None,
    skip: torch.Tensor | None = None,
) -> AttackResult:
    """The shared driver: clean scores, runs with restarts (only for items still failing), final scoring.

    ``epsilon`` overrides ``budget.epsilon`` per item (the minimal-epsilon search attacks every item at
    its own radius in one batch); the default step size scales with it. ``skip`` marks items to leave
    clean. Random starts are drawn for the whole batch at every run, whichever items still need one, so
    an item's trajectory depends on the seed and its place in the batch, not on how the others fared.
    """
    check_chips(chips, refs)
    x = chips.detach()
    refs = refs.to(x.device).detach()
    n = x.shape[0]
    eps = (
        torch.full((n,), budget.epsilon, device=x.device, dtype=x.dtype)
        if epsilon is None
        else epsilon.to(x.device, x.dtype)
    )
    alpha = (
        (torch.full_like(eps, budget.step_size) if budget.step_size is not None else 2.5 * eps / steps)
        if method != "fgsm"
        else eps.clone()
    )
    gen, seed = make_generator(x.device, seed)
    stopper = Stopper(should_stop, budget.time_limit)
    with torch.no_grad():
        t0 = embedder(x)
        score_before = objective.score(t0, refs)
        accept_before = objective.accepts(t0, refs)
        best_success = objective.success(t0, refs)
        best_margin = objective.margin(t0, refs)
    best_delta = torch.zeros_like(x)
    total = torch.zeros(n, dtype=torch.long, device=x.device)
    todo = ~best_success if early_stop else torch.ones_like(best_success)
    if skip is not None:
        todo &= ~skip.to(x.device)

    def result(delta: torch.Tensor) -> AttackResult:
        return finalise(
            method=method,
            objective=objective,
            norm=budget.norm,
            epsilon=eps,
            embedder=embedder,
            clean=x,
            adversarial=x + delta,
            refs=refs,
            score_before=score_before,
            accept_before=accept_before,
            steps=total,
            seed=seed,
        )

    for r in range(runs):
        init = random_start(x, eps, budget.norm, gen) if start or r > 0 else None
        idx = todo.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        try:
            delta, used, ok, m = _run(
                embedder,
                x[idx],
                refs[idx],
                objective,
                eps[idx],
                alpha[idx],
                steps,
                budget.norm,
                None if init is None else init[idx],
                early_stop,
                stopper,
            )
        except _Interrupted as stop:
            partial = best_delta.clone()
            keep = ~best_success[idx]
            partial[idx[keep]] = stop.delta[keep]
            total[idx] += stop.steps_used
            raise AttackCancelled(stop.reason, stopper.steps_done, result(partial)) from None
        total[idx] += used
        # keep this run where it succeeded, or where both failed and it got closer to the threshold
        prev = best_success[idx]
        better = (ok & ~prev) | ((ok == prev) & (m < best_margin[idx]))
        best_delta[idx[better]] = delta[better]
        best_margin[idx[better]] = m[better]
        best_success[idx[better]] = ok[better]
        todo[idx] = ~best_success[idx]
    return result(best_delta)


def fgsm(
    embedder: Embedder,
    chips: torch.Tensor,
    refs: torch.Tensor,
    objective: VerificationObjective,
    budget: AttackBudget,
    *,
    seed: int | None = None,
    should_stop: StopCheck | None = None,
) -> AttackResult:
    """One step of size epsilon (sign of the gradient for L-inf; normalised gradient for L2).

    Steps, step size, restarts and random start in ``budget`` are ignored: FGSM is the single-step
    baseline of DFD §4.3.3 (tFGSM when impersonating) that the iterative attacks are compared against.
    """
    return run_attack(
        "fgsm",
        embedder,
        chips,
        refs,
        objective,
        budget,
        steps=1,
        runs=1,
        start=False,
        seed=seed,
        should_stop=should_stop,
    )


def iterative_fgsm(
    embedder: Embedder,
    chips: torch.Tensor,
    refs: torch.Tensor,
    objective: VerificationObjective,
    budget: AttackBudget,
    *,
    seed: int | None = None,
    early_stop: bool = True,
    should_stop: StopCheck | None = None,
) -> AttackResult:
    """I-FGSM / BIM (Kurakin et al.; itFGSM in DFD §4.3.3): ``budget.steps`` clipped steps from the clean chip.

    Deterministic by construction (no random start, hence no restarts): the seed is only recorded.
    """
    return run_attack(
        "ifgsm",
        embedder,
        chips,
        refs,
        objective,
        budget,
        steps=budget.steps,
        runs=1,
        start=False,
        seed=seed,
        early_stop=early_stop,
        should_stop=should_stop,
    )


def pgd(
    embedder: Embedder,
    chips: torch.Tensor,
    refs: torch.Tensor,
    objective: VerificationObjective,
    budget: AttackBudget,
    *,
    seed: int | None = None,
    early_stop: bool = True,
    should_stop: StopCheck | None = None,
    epsilon: torch.Tensor | None = None,
) -> AttackResult:
    """PGD (Madry et al.) in the L-inf or L2 ball, seeded random start, ``budget.restarts`` extra restarts.

    Restarts rerun only the items that have not reached the goal, which is what makes restarts cheap
    enough to offer as a server option.
    """
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
        epsilon=epsilon,
        seed=seed,
        early_stop=early_stop,
        should_stop=should_stop,
    )
