"""The decoder as a defence (DFD §4.3.3, Fig. 13): verify attacked pairs after template -> D -> embed.

An adversarial perturbation is tuned to the FR net's gradients; decoding the attacked template into a
face and embedding that face again passes it through a generative bottleneck that was never shown
the perturbation, which may undo part of the attack. The check: score every pair (a, b) where a may
be attacked, under the FR model's rule, in four ways

* clean: s(a, b);
* attacked (no defence): s(a_adv, b);
* attacked + decoded: s(E(D(z_adv)), b), the defence;
* clean + decoded: s(E(D(z_a)), b), what the defence costs on clean pairs (the fair reference for the
  defended curve, since decoding loses identity even without an attack);

and compare ROC curves and AUCs (genuine pairs positive). Attack success counts, among the pairs that
were attacked and whose clean decision was not already the attacker's goal, those whose decision
flipped to the goal; with the defence, those whose defended decision is still on the goal's side.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import ArrayLike

from facexplain.attacks.control import StopCheck
from facexplain.attacks.driver import AttackPlan
from facexplain.attacks.objective import Goal
from facexplain.counterfactual.attack import Align, FacePair, ScoringModel, attack_pair
from facexplain.metrics.reconstruction import embed_images, resize01
from facexplain.metrics.verification import VerificationRule, roc_auc


@dataclass(frozen=True)
class RocCurve:
    """A ROC curve, fpr ascending, with each point's threshold in the rule's metric units."""

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray  # +-inf at the (0, 0) end
    auc: float

    def points(self) -> list[tuple[float, float, float]]:
        return list(zip(self.fpr.tolist(), self.tpr.tolist(), self.thresholds.tolist(), strict=True))


def roc_curve(scores: ArrayLike, genuine: ArrayLike, rule: VerificationRule) -> RocCurve:
    """ROC of pair ``scores`` (the rule's metric: distance for L2, similarity for cosine); genuine pairs positive.

    One point per distinct score (accept every pair at least as close as it), plus the (0, 0) point;
    the AUC is the Mann-Whitney probability (ties count half), equal to the trapezoidal area.
    NaN scores are dropped. Needs both genuine and impostor pairs.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    g = np.asarray(genuine).astype(bool).reshape(-1)
    if s.shape != g.shape:
        raise ValueError(f"{s.size} scores but {g.size} labels")
    keep = ~np.isnan(s)
    s, g = s[keep], g[keep]
    n_pos, n_neg = int(g.sum()), int((~g).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("a ROC needs both genuine and impostor pairs")
    sim = -s if rule.accept_below else s  # larger = more alike
    order = np.argsort(-sim, kind="mergesort")
    sim_sorted, g_sorted = sim[order], g[order]
    tp = np.cumsum(g_sorted)
    fp = np.cumsum(~g_sorted)
    last = np.r_[np.nonzero(np.diff(sim_sorted))[0], sim_sorted.size - 1]  # last index of each distinct value
    tpr = np.r_[0.0, tp[last] / n_pos]
    fpr = np.r_[0.0, fp[last] / n_neg]
    thr_sim = np.r_[np.inf, sim_sorted[last]]
    thresholds = -thr_sim if rule.accept_below else thr_sim
    return RocCurve(fpr=fpr, tpr=tpr, thresholds=thresholds, auc=roc_auc(sim, g))


@torch.no_grad()
def decode_and_reembed(
    templates: torch.Tensor,
    decode: Callable[[torch.Tensor], torch.Tensor],
    embed_chips: Callable[[torch.Tensor], torch.Tensor],
    chip_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """template -> D -> embed: (decoded faces (N, 3, S', S') in [0, 1], templates of those faces (N, D)).

    ``embed_chips`` takes (N, 3, chip_size, chip_size) chips in [0, 255] (``FacePipeline.embed_chips``);
    decoded faces are resized to the chip size first, as the decoding service's Reconstruct does.
    """
    decoded = decode(templates).detach().float().clamp(0.0, 1.0)
    return decoded, embed_images(embed_chips, decoded, chip_size)


@dataclass(frozen=True)
class DefenceSummary:
    """ROC curves and attack success rates for one set of attacked pairs (DFD Fig. 13)."""

    clean: RocCurve
    attacked: RocCurve
    defended: RocCurve
    clean_defended: RocCurve | None
    attack_success_rate: float  # flipped to the goal / eligible attacked pairs
    attack_success_rate_with: float  # still on the goal's side with the defence / same pairs
    n_pairs: int
    n_eligible: int

    def aucs(self) -> dict[str, float]:
        out = {"clean": self.clean.auc, "attacked": self.attacked.auc, "attacked_decoded": self.defended.auc}
        if self.clean_defended is not None:
            out["clean_decoded"] = self.clean_defended.auc
        return out


def defence_summary(
    rule: VerificationRule,
    genuine: ArrayLike,
    scores_clean: ArrayLike,
    scores_attacked: ArrayLike,
    scores_defended: ArrayLike,
    *,
    attacked: ArrayLike | None = None,
    dodge: ArrayLike | None = None,
    scores_clean_defended: ArrayLike | None = None,
) -> DefenceSummary:
    """Summarise per-pair scores (the rule's metric) into ROCs and success rates.

    ``attacked``: which pairs were attacked (default all); ``dodge``: each pair's goal, True = dodge
    (push to reject), False = impersonate (default: genuine pairs dodge, impostor pairs impersonate).
    A pair is eligible when attacked and its clean decision is not already the goal; the rates are NaN
    when no pair is eligible.
    """
    g = np.asarray(genuine).astype(bool).reshape(-1)
    n = g.size
    sc = np.asarray(scores_clean, dtype=np.float64).reshape(-1)
    sa = np.asarray(scores_attacked, dtype=np.float64).reshape(-1)
    sd = np.asarray(scores_defended, dtype=np.float64).reshape(-1)
    if not sc.size == sa.size == sd.size == n:
        raise ValueError("genuine and every score array need one entry per pair")
    att = np.ones(n, dtype=bool) if attacked is None else np.asarray(attacked).astype(bool).reshape(-1)
    dg = g.copy() if dodge is None else np.asarray(dodge).astype(bool).reshape(-1)

    def accepts(s: np.ndarray) -> np.ndarray:
        return s < rule.threshold if rule.accept_below else s > rule.threshold

    def on_goal(s: np.ndarray) -> np.ndarray:
        acc = accepts(s)
        return np.where(dg, ~acc, acc)

    eligible = att & ~on_goal(sc) & ~np.isnan(sc)
    n_elig = int(eligible.sum())
    success = eligible & on_goal(sa) & ~np.isnan(sa)
    still = eligible & on_goal(sd) & ~np.isnan(sd)
    cd = None
    if scores_clean_defended is not None:
        cd = roc_curve(scores_clean_defended, g, rule)
    return DefenceSummary(
        clean=roc_curve(sc, g, rule),
        attacked=roc_curve(sa, g, rule),
        defended=roc_curve(sd, g, rule),
        clean_defended=cd,
        attack_success_rate=float(success.sum()) / n_elig if n_elig else math.nan,
        attack_success_rate_with=float(still.sum()) / n_elig if n_elig else math.nan,
        n_pairs=n,
        n_eligible=n_elig,
    )


# -- the per-pair pipeline: attack -> decode the attacked template -> re-embed -> ROC ------------------------


@dataclass(frozen=True)
class DefencePair:
    """What the defence needs of one pair once attacked: labels, target scores, and two templates."""

    genuine: bool
    attacked: bool  # False when a fixed goal did not apply to this pair: scored clean
    dodge: bool  # the pair's goal: genuine pairs dodge, impostor pairs impersonate
    score_clean: float  # the target's, under its rule
    score_attacked: float
    z_adv: torch.Tensor  # (D,) the surrogate's template of the attacked probe, on the CPU
    t_ref: torch.Tensor  # (D',) the target's template of the reference, on the CPU


def defence_pair(
    pair: FacePair,
    genuine: bool,
    align: Align,
    surrogate: ScoringModel,
    target: ScoringModel,
    plan: AttackPlan,
    *,
    fixed_goal: Goal | None = None,
    should_stop: StopCheck | None = None,
) -> DefencePair:
    """Attack one labelled pair towards the goal its label implies (a ``fixed_goal`` attacks only the pairs
    it applies to; the rest are scored clean). Raises what :func:`attack_pair` raises, and ``ValueError``
    for a target with its own alignment: the defence re-embeds decoded faces, which are drawn in the
    surrogate's chip geometry, and such a target cannot read them as its own chips."""
    if target.align is not None:
        raise ValueError(
            "the defence re-embeds decoded faces in the surrogate's chip geometry; a target with its own "
            "alignment cannot read them"
        )
    goal: Goal = "dodge" if genuine else "impersonate"
    applies = fixed_goal is None or fixed_goal == goal
    if applies:
        outcome = attack_pair(pair, align, surrogate, target, plan, goal=goal, should_stop=should_stop)
        adv_chip, before, after = outcome.adv_chip, outcome.score_before, outcome.score_after
    else:
        with torch.no_grad():
            adv_chip = align(pair.image, pair.landmarks)
            t_ref = target.templates(pair.ref_chip)
            before = after = float(target.rule.score(target.templates(adv_chip), t_ref)[0])
    with torch.no_grad():
        z_adv = surrogate.embed(adv_chip)[0].cpu()
        t_ref = target.templates(pair.ref_chip)
    return DefencePair(
        genuine=genuine,
        attacked=applies,
        dodge=goal == "dodge",
        score_clean=before,
        score_attacked=after,
        z_adv=z_adv,
        t_ref=t_ref[0].cpu(),
    )


@torch.no_grad()
def defended_scores(
    z_adv: torch.Tensor,
    t_ref: torch.Tensor,
    decode: Callable[[torch.Tensor], torch.Tensor],
    target: ScoringModel,
    *,
    chip_size: int,
    device: torch.device | str = "cpu",
) -> list[float]:
    """Scores of (E(D(z_adv)), reference) for a batch: decode, resize to the chip size, re-embed with the target."""
    decoded = decode(z_adv).float().clamp(0, 1)
    chips = resize01(decoded, chip_size).clamp(0, 1).to(device)
    t_def = target.templates(chips).cpu()
    return target.rule.score(t_def, t_ref).tolist()


# (stage, done, total): "decode" before each batch (raise to stop), "decoded" after it, "roc" 0 / 1 around the ROCs
DefenceStep = Callable[[str, int, int], None]


def defence_report(
    pairs: Sequence[DefencePair],
    decode: Callable[[torch.Tensor], torch.Tensor],
    target: ScoringModel,
    *,
    chip_size: int,
    device: torch.device | str = "cpu",
    batch_size: int = 16,
    step: DefenceStep | None = None,
) -> DefenceSummary:
    """Decode the attacked templates in batches, re-embed them and summarise clean / attacked / defended ROCs."""
    used = len(pairs)
    s_def: list[float] = []
    for s in range(0, used, batch_size):
        if step is not None:
            step("decode", s, used)
        chunk = pairs[s : s + batch_size]
        z_adv = torch.stack([p.z_adv for p in chunk])
        t_ref = torch.stack([p.t_ref for p in chunk])
        s_def += defended_scores(z_adv, t_ref, decode, target, chip_size=chip_size, device=device)
        if step is not None:
            step("decoded", min(s + batch_size, used), used)
    if step is not None:
        step("roc", 0, 1)
    summary = defence_summary(
        target.rule,
        [p.genuine for p in pairs],
        [p.score_clean for p in pairs],
        [p.score_attacked for p in pairs],
        s_def,
        attacked=[p.attacked for p in pairs],
        dodge=[p.dodge for p in pairs],
    )
    if step is not None:
        step("roc", 1, 1)
    return summary
