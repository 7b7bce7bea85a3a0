"""The per-pair flows of facexplain.counterfactual on a toy linear FR model: cheap, deterministic, exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from facexplain.attacks import AttackBudget, AttackPlan, quantise
from facexplain.counterfactual import (
    FacePair,
    ScoringModel,
    attack_and_explain,
    attack_pair,
    defence_pair,
    defence_report,
    fixed_landmark_aligner,
    random_controls,
)
from facexplain.metrics.verification import VerificationRule

CHIP = 24
RULE = VerificationRule(metric="l2", threshold=0.5, accept_below=True, source="toy")
_W = torch.randn(3 * CHIP * CHIP, 16, generator=torch.Generator().manual_seed(0)) * 0.05
_D = torch.randn(16, 3 * 16 * 16, generator=torch.Generator().manual_seed(1))
ALIGN = fixed_landmark_aligner(CHIP, 0.25)


def _embed(chips: torch.Tensor) -> torch.Tensor:
    return chips.flatten(1) @ _W


def _decode(t: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(t @ _D).view(-1, 3, 16, 16)


class _MeanColour:
    """A cheap catalogue: each channel's mean is an attribute."""

    def estimate(self, images: torch.Tensor, names: list[str]) -> dict[str, np.ndarray]:
        return {c: images[:, i].mean(dim=(1, 2)).numpy() for i, c in enumerate("rgb")}


def _pair(i: int, j: int) -> FacePair:
    def landmarks(seed: int) -> torch.Tensor:
        grid = torch.stack(torch.meshgrid(torch.linspace(12, 36, 17), torch.linspace(12, 36, 4), indexing="ij"), -1)
        return (grid.reshape(-1, 2)[:68] + torch.rand(68, 2, generator=torch.Generator().manual_seed(seed)))[None]

    def image(seed: int) -> torch.Tensor:
        return torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(seed))

    return FacePair(image=image(i), landmarks=landmarks(i), ref_chip=ALIGN(image(j), landmarks(j)))


MODEL = ScoringModel(embed=_embed, rule=RULE)
BLACK_BOX = ScoringModel(embed=_embed, rule=RULE, quantise_input=True)
PLAN = AttackPlan(method="pgd", budget=AttackBudget(8 / 255, steps=4, random_start=True), seed=3)


def test_attack_pair_returns_an_8bit_image_within_budget() -> None:
    out = attack_pair(_pair(1, 2), ALIGN, MODEL, BLACK_BOX, PLAN)
    assert out.adversarial.shape == (1, 3, 48, 48) and out.adv_chip.shape == (1, 3, CHIP, CHIP)
    assert torch.equal(out.adversarial, (out.adversarial * 255).round() / 255)
    assert out.linf <= 8 / 255 + 1 / 255 and out.epsilon_used == 8 / 255
    assert out.goal == ("dodge" if out.same_before else "impersonate")
    assert out.flipped == (out.same_before != out.same_after)


def test_attack_and_explain_is_deterministic_for_a_seed() -> None:
    def run() -> tuple[list[tuple[str, float]], torch.Tensor]:
        calls: list[int] = []
        ex = attack_and_explain(
            _pair(3, 4),
            ALIGN,
            MODEL,
            MODEL,
            PLAN,
            _decode,
            _MeanColour(),
            [],
            n_random=4,
            batch_size=3,
            after_attack=lambda: calls.append(1),
        )
        assert calls == [1]
        return [(r.attribute, r.s_a) for r in ex.explanation.rows], ex.attack.adversarial

    (rows_a, adv_a), (rows_b, adv_b) = run(), run()
    assert rows_a == rows_b and torch.equal(adv_a, adv_b)
    assert sorted(a for a, _ in rows_a) == ["b", "g", "r"]


def test_random_controls_match_the_perturbation_norm() -> None:
    pair = _pair(5, 6)
    adversarial = (pair.image + 4 / 255).clamp(0, 1)
    for norm in ("linf", "l2"):
        z = random_controls(pair, adversarial, ALIGN, MODEL, 5, seed=1, norm=norm, batch_size=2)
        again = random_controls(pair, adversarial, ALIGN, MODEL, 5, seed=1, norm=norm, batch_size=5)
        assert z is not None and again is not None and z.shape == (5, 16)
        assert torch.allclose(z, again, atol=1e-5)  # batching changes only the float summation order
    assert random_controls(pair, adversarial, ALIGN, MODEL, 0, seed=1, norm="linf", batch_size=2) is None


def test_defence_report_over_toy_models() -> None:
    pairs = [
        defence_pair(_pair(10 + i, 10 + i if i % 2 == 0 else 40 + i), i % 2 == 0, ALIGN, MODEL, MODEL, PLAN)
        for i in range(5)
    ]
    assert [p.attacked for p in pairs] == [True] * 5 and [p.dodge for p in pairs] == [p.genuine for p in pairs]
    fixed = defence_pair(_pair(11, 41), False, ALIGN, MODEL, MODEL, PLAN, fixed_goal="dodge")
    assert not fixed.attacked and fixed.score_clean == fixed.score_attacked
    steps: list[tuple[str, int, int]] = []
    summary = defence_report(pairs, _decode, MODEL, chip_size=CHIP, batch_size=2, step=lambda *s: steps.append(s))
    assert summary.n_pairs == 5
    for curve in (summary.clean, summary.attacked, summary.defended):
        assert curve.fpr.shape == curve.tpr.shape == curve.thresholds.shape
        assert curve.fpr[0] == 0.0 and curve.tpr[-1] == 1.0 and 0.0 <= curve.auc <= 1.0
    assert [s for s in steps if s[0] == "decode"] == [("decode", 0, 5), ("decode", 2, 5), ("decode", 4, 5)]
    assert steps[-2:] == [("roc", 0, 1), ("roc", 1, 1)]


OWN_CHIP = 16
_W_OWN = torch.randn(3 * OWN_CHIP * OWN_CHIP, 8, generator=torch.Generator().manual_seed(7)) * 0.05
OWN_ALIGN = fixed_landmark_aligner(OWN_CHIP, 0.1)


def _embed_own(chips: torch.Tensor) -> torch.Tensor:
    assert chips.shape[-2:] == (OWN_CHIP, OWN_CHIP), "the target must read its own chips"
    return chips.flatten(1) @ _W_OWN


def _full_pair(i: int, j: int) -> FacePair:
    p, r = _pair(i, i), _pair(j, j)
    return FacePair(
        image=p.image, landmarks=p.landmarks, ref_chip=r.ref_chip, ref_image=r.image, ref_landmarks=r.landmarks
    )


def test_a_target_with_its_own_alignment_reads_the_8bit_images_through_it() -> None:
    own = ScoringModel(embed=_embed_own, rule=RULE, quantise_input=True, align=OWN_ALIGN)
    pair = _full_pair(1, 2)
    out = attack_pair(pair, ALIGN, MODEL, own, PLAN)
    with torch.no_grad():
        ref = _embed_own(OWN_ALIGN(quantise(pair.ref_image), pair.ref_landmarks))  # type: ignore[arg-type]
        before = RULE.score(_embed_own(OWN_ALIGN(quantise(pair.image), pair.landmarks)), ref)
        after = RULE.score(_embed_own(OWN_ALIGN(out.adversarial, pair.landmarks)), ref)
    assert out.score_before == pytest.approx(float(before[0]), rel=1e-6)
    assert out.score_after == pytest.approx(float(after[0]), rel=1e-6)
    assert out.adv_chip.shape[-1] == CHIP  # the attack itself still runs on the surrogate's chips
    # the surrogate's own view of the same image is a different model's, so the scores differ
    assert out.score_after != pytest.approx(out.surrogate_score_after)
    with pytest.raises(ValueError, match="reference photo"):
        attack_pair(_pair(1, 2), ALIGN, MODEL, own, PLAN)  # no reference photo to align
    with pytest.raises(ValueError, match="own alignment"):
        defence_pair(pair, True, ALIGN, MODEL, own, PLAN)
