"""Attacks on verification decisions (issue 7), on real aligned chips of the bundled sample faces.

The default model is very fragile to white-box attacks: PGD at 8/255 flips a genuine pair in one or two
steps, so these tests run few steps and still assert full success. Cancellation is by exception
(``AttackCancelled``, carrying the partial result), never by a flag on a normal return.
"""

from __future__ import annotations

import math

import pytest
import torch

from facexplain.attacks import (
    AttackBudget,
    AttackCancelled,
    BudgetError,
    BudgetLimits,
    VerificationObjective,
    chip_embedder,
    cw_l2,
    deadline,
    decision,
    evaluate_transfer,
    fgsm,
    iterative_fgsm,
    minimal_epsilon,
    pgd,
)
from facexplain.metrics.verification import DLIB_L2_RULE, VerificationRule, all_pairs

EPS8 = 8 / 255
TOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _one_thread():  # type: ignore[no-untyped-def]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(sample_faceset, default_pipeline):  # type: ignore[no-untyped-def]
    """Chips in [0, 1], the embedder, and the first accepted genuine / closest rejected impostor pairs."""
    embed = chip_embedder(default_pipeline.recognition_net)
    x = sample_faceset.chips.float() / 255
    with torch.no_grad():
        t = embed(x)
    i, j, genuine = all_pairs(sample_faceset.identities)
    d = (t[torch.from_numpy(i)] - t[torch.from_numpy(j)]).norm(dim=1)
    used: set[int] = set()
    gen: list[tuple[int, int]] = []
    for a, b, g, dist in zip(i.tolist(), j.tolist(), genuine.tolist(), d.tolist(), strict=True):
        if g and dist < 0.6 and a not in used and b not in used:  # disjoint pairs: different identities/images
            gen.append((a, b))
            used |= {a, b}
    order = torch.argsort(d)
    imp = [(int(i[k]), int(j[k])) for k in order.tolist() if not genuine[k] and d[k] >= 0.6][:3]
    return {"embed": embed, "x": x, "t": t, "genuine": gen, "impostor": imp}


def _pairs(setup, kind: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    pairs = setup[kind][:n]
    a = torch.tensor([p[0] for p in pairs])
    b = torch.tensor([p[1] for p in pairs])
    return setup["x"][a], setup["t"][b]


def _in_ball_and_box(r, clean: torch.Tensor, eps: float, norm: str) -> None:  # type: ignore[no-untyped-def]
    assert float(r.adversarial.min()) >= 0.0 and float(r.adversarial.max()) <= 1.0
    delta = (r.adversarial - clean).flatten(1)
    if norm == "linf":
        assert float(delta.abs().max()) <= eps + TOL
    else:
        assert float(delta.norm(dim=1).max()) <= eps + TOL
    assert torch.allclose(r.linf, delta.abs().amax(dim=1)) and torch.allclose(r.l2, delta.norm(dim=1))


@pytest.fixture(scope="module")
def dodge(setup):  # type: ignore[no-untyped-def]
    probe, refs = _pairs(setup, "genuine", 4)
    obj = VerificationObjective(DLIB_L2_RULE, "dodge")
    return probe, refs, obj, pgd(setup["embed"], probe, refs, obj, AttackBudget(EPS8, steps=5), seed=0)


def test_pgd_linf_8_dodges_genuine_pairs(setup, dodge) -> None:  # type: ignore[no-untyped-def]
    probe, refs, _, r = dodge
    assert len(setup["genuine"]) >= 4
    assert r.accept_before.all() and (r.score_before < 0.6).all()
    assert r.flipped.all() and r.success_rate() == 1.0
    assert (r.score_after >= 0.6).all()
    _in_ball_and_box(r, probe, EPS8, "linf")
    # the reported decision is the real one: recompute it from the returned chips
    assert not decision(setup["embed"], r.adversarial, refs, DLIB_L2_RULE).any()
    assert (r.steps >= 1).all() and (r.steps <= 5).all()


def test_pgd_linf_8_impersonates_impostor_pairs(setup) -> None:  # type: ignore[no-untyped-def]
    probe, refs = _pairs(setup, "impostor", 3)
    obj = VerificationObjective(DLIB_L2_RULE, "impersonate")
    r = pgd(setup["embed"], probe, refs, obj, AttackBudget(EPS8, steps=5), seed=0)
    assert not r.accept_before.any()
    assert r.flipped.all() and (r.score_after < 0.6).all()
    _in_ball_and_box(r, probe, EPS8, "linf")


def test_cosine_rule_margin_and_goal_signs() -> None:
    rule = VerificationRule(metric="cosine", threshold=0.9, accept_below=False, source="test")
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[1.0, 0.1], [0.0, 1.0]])  # cosine ~0.995 (accepted), 0 (rejected)
    dodge = VerificationObjective(rule, "dodge")
    imp = VerificationObjective(rule, "impersonate")
    assert dodge.margin(a, b)[0] > 0 > dodge.margin(a, b)[1]
    assert imp.margin(a, b)[1] > 0 > imp.margin(a, b)[0]
    assert dodge.success(a, b).tolist() == [False, True]
    with pytest.raises(ValueError, match="goal"):
        VerificationObjective(rule, "confuse")  # type: ignore[arg-type]


def test_fgsm_ifgsm_pgd_l2_are_finite_and_bounded(setup) -> None:  # type: ignore[no-untyped-def]
    probe, refs = _pairs(setup, "genuine", 3)
    obj = VerificationObjective(DLIB_L2_RULE, "dodge")
    embed = setup["embed"]
    for fn, budget in [
        (fgsm, AttackBudget(EPS8)),
        (iterative_fgsm, AttackBudget(EPS8, steps=4, step_size=2 / 255)),
        (pgd, AttackBudget(2.0, steps=4, norm="l2")),
    ]:
        r = fn(embed, probe, refs, obj, budget, seed=1)
        assert torch.isfinite(r.adversarial).all() and torch.isfinite(r.score_after).all()
        _in_ball_and_box(r, probe, budget.epsilon, budget.norm)
        assert r.flipped.all(), r.method  # measured: every one of these flips these pairs


def test_cw_l2_finds_smaller_perturbations_than_pgd_l2(setup) -> None:  # type: ignore[no-untyped-def]
    """Same pairs, both flip: CW's L2 is below the first flip of a fine-stepped PGD-L2 from the clean chip.

    The PGD-L2 baseline is deliberately strong (no random start, which alone would cost ~epsilon, steps
    of 0.05 and early stop, so it returns the first flip along the gradient path). The pairs are the two
    most clearly accepted ones, where a flip takes a real perturbation: measured CW 0.67 / 0.39 vs PGD-L2
    0.84 / 0.46. Where a pair sits near the threshold, a couple of gradient steps flip it and CW's Adam
    steps (every pixel moves at first) do no better: on a pair at distance 0.46, PGD 0.098 vs CW 0.10-0.13.
    So it is not a law: on 8 CelebA pairs (bench, cw_vs_pgd_l2) CW was smaller on 7, mean ratio 0.88.
    """
    d = setup["t"][[a for a, _ in setup["genuine"]]] - setup["t"][[b for _, b in setup["genuine"]]]
    clearest = [setup["genuine"][k] for k in d.norm(dim=1).argsort()[:2].tolist()]
    probe = setup["x"][[a for a, _ in clearest]]
    refs = setup["t"][[b for _, b in clearest]]
    obj = VerificationObjective(DLIB_L2_RULE, "dodge")
    cw = cw_l2(
        setup["embed"],
        probe,
        refs,
        obj,
        AttackBudget(10.0, steps=40, norm="l2", restarts=2, step_size=0.005),
        early_stop=False,
    )
    base = pgd(
        setup["embed"], probe, refs, obj, AttackBudget(2.0, steps=40, norm="l2", step_size=0.05, random_start=False)
    )
    assert cw.flipped.all() and base.flipped.all()
    assert torch.isfinite(cw.adversarial).all()
    assert float(cw.adversarial.min()) >= 0 and float(cw.adversarial.max()) <= 1
    assert (cw.l2 < base.l2).all(), (cw.l2, base.l2)


def test_minimal_epsilon_flips_and_one_step_below_does_not(setup) -> None:  # type: ignore[no-untyped-def]
    probe, refs = _pairs(setup, "genuine", 3)
    obj = VerificationObjective(DLIB_L2_RULE, "dodge")
    budget = AttackBudget(EPS8, steps=5)
    m = minimal_epsilon(setup["embed"], probe, refs, obj, budget, seed=0)
    assert m.found.all() and m.eligible.all() and not m.below_flipped.any()
    assert torch.allclose(m.epsilon - m.epsilon_below, torch.full((3,), 1 / 255))
    assert (m.epsilon <= EPS8 + 1e-7).all()
    assert m.result.flipped.all()
    assert (m.result.linf <= m.epsilon + TOL).all()
    # independent re-run with the same seed on the same batch: at eps it flips, one grid step below it does not
    at = pgd(setup["embed"], probe, refs, obj, budget, seed=0, epsilon=m.epsilon)
    assert at.flipped.all()
    below = m.epsilon_below.clamp_min(1e-6)
    rb = pgd(setup["embed"], probe, refs, obj, budget, seed=0, epsilon=below)
    assert not (rb.flipped & (m.epsilon_below > 0)).any()


def test_same_seed_same_adversarial_chips(setup) -> None:  # type: ignore[no-untyped-def]
    probe, refs = _pairs(setup, "genuine", 2)
    obj = VerificationObjective(DLIB_L2_RULE, "dodge")
    budget = AttackBudget(4 / 255, steps=2, restarts=1)
    r1 = pgd(setup["embed"], probe, refs, obj, budget, seed=7, early_stop=False)
    r2 = pgd(setup["embed"], probe, refs, obj, budget, seed=7, early_stop=False)
    r3 = pgd(setup["embed"], probe, refs, obj, budget, seed=8, early_stop=False)
    assert r1.seed == 7 and torch.equal(r1.adversarial, r2.adversarial) and torch.equal(r1.steps, r2.steps)
    assert not torch.equal(r1.adversarial, r3.adversarial)
    r4 = pgd(setup["embed"], probe, refs, obj, AttackBudget(4 / 255, steps=1), early_stop=False)
    assert isinstance(r4.seed, int)  # a drawn seed is reported, so any run can be replayed


@pytest.mark.parametrize(
    ("kwargs", "field", "limit", "exceeded"),
    [
        ({"epsilon": EPS8, "steps": 10**6}, "steps", "max_steps", True),
        ({"epsilon": 0.9}, "epsilon", "max_epsilon_linf", True),
        ({"epsilon": 100.0, "norm": "l2"}, "epsilon", "max_epsilon_l2", True),
        ({"epsilon": EPS8, "steps": 1000, "restarts": 10}, "steps", "max_total_steps", True),
        ({"epsilon": EPS8, "time_limit": 3600.0}, "time_limit", "max_seconds", True),
    ],
)
def test_budget_beyond_server_limits(kwargs, field, limit, exceeded) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BudgetError) as err:
        AttackBudget(**kwargs).validate(BudgetLimits())
    assert isinstance(err.value, ValueError)
    assert (err.value.field, err.value.limit, err.value.exceeded) == (field, limit, exceeded)
    assert limit in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"epsilon": -EPS8}, "epsilon"),
        ({"epsilon": 0.0}, "epsilon"),
        ({"epsilon": 2.0}, "epsilon"),  # > the whole [0, 1] range in L-inf
        ({"epsilon": math.nan}, "epsilon"),
        ({"epsilon": EPS8, "steps": -5}, "steps"),
        ({"epsilon": EPS8, "steps": 0}, "steps"),
        ({"epsilon": EPS8, "restarts": -1}, "restarts"),
        ({"epsilon": EPS8, "step_size": -0.1}, "step_size"),
        ({"epsilon": EPS8, "time_limit": -1.0}, "time_limit"),
        ({"epsilon": EPS8, "norm": "l1"}, "norm"),
        ({"epsilon": EPS8, "steps": 2.5}, "steps"),
    ],
)
def test_malformed_budget(kwargs, field) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BudgetError) as err:
        AttackBudget(**kwargs)
    assert err.value.field == field and not err.value.exceeded


def test_validate_fills_time_limit_and_keeps_valid_budgets() -> None:
    limits = BudgetLimits(max_seconds=30)
    b = AttackBudget(EPS8, steps=50, restarts=2).validate(limits)
    assert b.time_limit == 30 and b.steps == 50 and b.total_steps == 150
    assert AttackBudget(EPS8, time_limit=5).validate(limits).time_limit == 5


def test_should_stop_cancels_mid_attack_with_partial_result(setup) -> None:  # type: ignore[no-untyped-def]
    probe, refs = _pairs(setup, "genuine", 2)
    obj = VerificationObjective(DLIB_L2_RULE, "dodge")
    calls = {"n": 0}

    def stop_after_three() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    with pytest.raises(AttackCancelled) as err:
        pgd(
            setup["embed"],
            probe,
            refs,
            obj,
            AttackBudget(EPS8, steps=50),
            seed=0,
            early_stop=False,
            should_stop=stop_after_three,
        )
    assert err.value.reason == "cancelled" and err.value.steps_done == 3
    partial = err.value.partial
    assert partial is not None and (partial.steps == 3).all()
    _in_ball_and_box(partial, probe, EPS8, "linf")

    with pytest.raises(AttackCancelled) as err:
        cw_l2(setup["embed"], probe, refs, obj, AttackBudget(10.0, steps=50, norm="l2"), should_stop=deadline(0.0))
    assert err.value.reason == "cancelled" and err.value.steps_done == 0


def test_time_limit_stops_attack(setup) -> None:  # type: ignore[no-untyped-def]
    probe, refs = _pairs(setup, "genuine", 1)
    obj = VerificationObjective(DLIB_L2_RULE, "dodge")
    with pytest.raises(AttackCancelled) as err:
        pgd(setup["embed"], probe, refs, obj, AttackBudget(EPS8, steps=1000, time_limit=0.3), early_stop=False)
    assert err.value.reason == "time_limit" and 0 < err.value.steps_done < 1000


def test_transfer_to_an_identical_target_matches_white_box(setup, dodge) -> None:  # type: ignore[no-untyped-def]
    """A transfer report against the surrogate itself must reproduce the white-box outcome (up to 8-bit rounding)."""
    probe, refs, _, r = dodge
    rep = evaluate_transfer(r, probe, setup["embed"], refs, DLIB_L2_RULE, quantise_images=False)
    assert torch.equal(rep.target_accept_after, r.accept_after)
    rates = rep.rates()
    assert rates["surrogate_success_rate"] == 1.0 and rates["transfer_rate_given_surrogate_flip"] == 1.0


def test_rejects_uint8_or_unscaled_chips(setup) -> None:  # type: ignore[no-untyped-def]
    probe, refs = _pairs(setup, "genuine", 1)
    obj = VerificationObjective(DLIB_L2_RULE, "dodge")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pgd(setup["embed"], probe * 255, refs, obj, AttackBudget(EPS8, steps=1))
