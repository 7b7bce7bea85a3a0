"""Carlini–Wagner L2 against a verification decision (tCW in DFD §4.3.3 when impersonating).

Where PGD asks "does a flip exist inside this ball?", CW asks "what is the smallest L2 change that
flips?", which is the counterfactual Ren et al. §III-D want to read. It optimises in tanh space
(x_adv = (tanh w + 1) / 2 keeps the box without clipping, so Adam sees a smooth problem) the loss
||x_adv - x||² + c · max(margin, -kappa), and binary-searches c per item: a round that flips lowers c
(trade success for smaller perturbations), a round that fails raises it (x10 until a first success).
"""

from __future__ import annotations

import torch

from facexplain.attacks.budget import AttackBudget
from facexplain.attacks.control import AttackCancelled, StopCheck, Stopper
from facexplain.attacks.gradient import check_chips, make_generator, project
from facexplain.attacks.objective import Embedder, VerificationObjective
from facexplain.attacks.result import AttackResult, finalise

_TANH_EDGE = 1 - 1e-6  # atanh(±1) is infinite; chips at exactly 0 or 255 start a hair inside


def cw_l2(
    embedder: Embedder,
    chips: torch.Tensor,
    refs: torch.Tensor,
    objective: VerificationObjective,
    budget: AttackBudget,
    *,
    confidence: float = 0.0,
    initial_const: float = 10.0,
    seed: int | None = None,
    early_stop: bool = True,
    should_stop: StopCheck | None = None,
) -> AttackResult:
    """CW-L2 with ``budget.steps`` Adam steps (lr ``budget.step_size``, default 0.01) per binary-search round.

    Rounds = ``budget.restarts + 1`` (so the budget's total-step bound covers CW too). ``budget.epsilon``
    caps the accepted L2: a success beyond it does not count, and an item that never succeeds within it
    returns its last iterate projected into the ball, so the budget's promise holds for every method.
    ``confidence`` is kappa: success requires the margin to pass the threshold by that much.
    ``early_stop`` enables CW's abort-early (a round ends when the loss stops falling) and skips items
    whose clean decision already meets the goal. CW has no randomness; ``seed`` is only recorded.
    """
    if budget.norm != "l2":
        raise ValueError("Carlini–Wagner L2 needs an l2 budget (epsilon is the largest L2 accepted)")
    if confidence < 0 or initial_const <= 0:
        raise ValueError("confidence must be >= 0 and initial_const > 0")
    check_chips(chips, refs)
    x = chips.detach()
    refs = refs.to(x.device).detach()
    n = x.shape[0]
    _, seed = make_generator(x.device, seed)
    lr = budget.step_size if budget.step_size is not None else 0.01
    eps = torch.full((n,), budget.epsilon, device=x.device, dtype=x.dtype)
    stopper = Stopper(should_stop, budget.time_limit)
    with torch.no_grad():
        t0 = embedder(x)
        score_before = objective.score(t0, refs)
        accept_before = objective.accepts(t0, refs)
        clean_success = objective.success(t0, refs)
    w0 = torch.atanh((2 * x - 1) * _TANH_EDGE)
    lower = torch.zeros(n, device=x.device)
    upper = torch.full((n,), float("inf"), device=x.device)
    const = torch.full((n,), float(initial_const), device=x.device)
    best_l2 = torch.full((n,), float("inf"), device=x.device)
    best_adv = x.clone()
    last_adv = x.clone()
    total = torch.zeros(n, dtype=torch.long, device=x.device)
    idx = (~clean_success).nonzero().squeeze(1) if early_stop else torch.arange(n, device=x.device)

    def result() -> AttackResult:
        found = torch.isfinite(best_l2)
        fallback = x + project(last_adv - x, x, eps, "l2")
        adv = torch.where(found.view(-1, 1, 1, 1), best_adv, fallback)
        return finalise(
            method="cw_l2",
            objective=objective,
            norm="l2",
            epsilon=eps,
            embedder=embedder,
            clean=x,
            adversarial=adv,
            refs=refs,
            score_before=score_before,
            accept_before=accept_before,
            steps=total,
            seed=seed,
        )

    # CW abort-early: compare the loss every tenth of a round, but not so often that Adam's first wobbles end it
    check_every = max(10, budget.steps // 10)
    for _ in range(budget.runs):
        if idx.numel() == 0:
            break
        xs, rs, c = x[idx], refs[idx], const[idx]
        w = w0[idx].clone().requires_grad_(True)
        opt = torch.optim.Adam([w], lr=lr)
        round_ok = torch.zeros(idx.numel(), dtype=torch.bool, device=x.device)
        previous = float("inf")
        for step in range(budget.steps):
            why = stopper.tick()
            if why is not None:
                raise AttackCancelled(why, stopper.steps_done, result())
            adv = (torch.tanh(w) + 1) / 2
            templates = embedder(adv)
            margin = objective.margin(templates, rs)
            dist = (adv - xs).flatten(1).pow(2).sum(dim=1)
            loss = (dist + c * (margin + confidence).clamp(min=0)).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total[idx] += 1
            with torch.no_grad():
                l2 = dist.sqrt()
                ok = objective.success(templates, rs) & (margin <= -confidence) & (l2 <= eps[idx])
                round_ok |= ok
                better = ok & (l2 < best_l2[idx])
                best_l2[idx[better]] = l2[better]
                best_adv[idx[better]] = adv[better].detach()
                last_adv[idx] = adv.detach()
            if early_stop and step % check_every == check_every - 1:
                if loss.item() > previous * 0.9999:
                    break
                previous = loss.item()
        # binary search on c, per item
        lo, hi = lower[idx], upper[idx]
        hi = torch.where(round_ok, torch.minimum(hi, c), hi)
        lo = torch.where(round_ok, lo, torch.maximum(lo, c))
        c = torch.where(torch.isfinite(hi), (lo + hi) / 2, c * 10)
        lower[idx], upper[idx], const[idx] = lo, hi, c
    return result()
