"""Attack one verification pair in the probe's own pixel grid, and explain the attack (issue 7).

The probe's face is aligned by landmarks found once on the clean image and then held fixed, so the
differentiable alignment maps every perturbed image to the chip the FR net sees and the adversarial
image is a real picture a client can re-embed. Scores are measured on the adversarial image rounded
to 8 bits, the image a client actually receives. Models enter as :class:`ScoringModel` (a template
function, its rule, and whether it sees 8-bit chips like a black box); nothing here knows about
requests, protos or errors of a transport.

A target may bring its own alignment (``ScoringModel.align``): an independent FR model with another
chip geometry (e.g. HSE FaceRes, five points onto a 224x224 chip) then reads the 8-bit *images*, the
clean probe and the adversarial one, through its own alignment with the clean probe's landmarks, and
the reference through its own alignment with the reference's landmarks, as its own pipeline would
with those landmarks. Without one it scores the surrogate's chips (dlib's descriptor: same geometry).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from facexplain.attacks.budget import Norm
from facexplain.attacks.control import StopCheck
from facexplain.attacks.driver import AttackPlan, run_plan
from facexplain.attacks.objective import Goal, VerificationObjective
from facexplain.attacks.result import AttackResult
from facexplain.attacks.transfer import quantise
from facexplain.counterfactual.explain import DecodeFn, Explanation, explain_counterfactual
from facexplain.faces.align import DLIB_ALIGNMENT, align_faces
from facexplain.metrics.verification import VerificationRule

if TYPE_CHECKING:
    from facexplain.pipeline import FacePipeline

# (images (N, 3, H, W) in [0, 1], landmarks (1, 68, 2)) -> aligned chips (N, 3, S, S) in [0, 1]
Align = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def fixed_landmark_aligner(
    size: int, padding: float, alignment: str = DLIB_ALIGNMENT, reference: torch.Tensor | None = None
) -> Align:
    """An FR model's alignment (dlib's 68-point chip, or a five-point similarity onto ``reference``, as
    :func:`~facexplain.faces.align.align_faces` takes them), differentiable in the pixels, with one face's
    landmarks for every image."""

    def align(images: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        n = images.shape[0]
        chips = align_faces(
            images * 255.0,
            landmarks.expand(n, -1, -1),
            size=size,
            padding=padding,
            alignment=alignment,
            reference=reference,
        )
        return chips / 255.0

    return align


@dataclass(frozen=True)
class ScoringModel:
    """A model as surrogate or target: chips in [0, 1] at its chip size -> templates, and its rule."""

    embed: Callable[[torch.Tensor], torch.Tensor]
    rule: VerificationRule
    quantise_input: bool = False  # a black box receives 8-bit images
    # its own alignment of the images (chips at its own size); None = it reads the surrogate's chips
    align: Align | None = None

    def templates(self, chips: torch.Tensor) -> torch.Tensor:
        """Templates of chips as this model is scored on them (8-bit when it is a black box)."""
        return self.embed(quantise(chips) if self.quantise_input else chips)

    def image_templates(self, images: torch.Tensor, landmarks: torch.Tensor, chips: torch.Tensor) -> torch.Tensor:
        """Templates of ``images`` (N, 3, H, W) in [0, 1] whose surrogate chips are ``chips``.

        With its own alignment the model reads the (8-bit, when a black box) images through it with
        ``landmarks`` (1, 68, 2); the chips it cuts are not rounded again, as its pipeline does not round
        them. Without one it reads ``chips`` (:meth:`templates`).
        """
        if self.align is None:
            return self.templates(chips)
        return self.embed(self.align(quantise(images) if self.quantise_input else images, landmarks))


def pipeline_aligner(pipeline: FacePipeline) -> Align:
    """``pipeline``'s own alignment (its chip size and geometry) with one face's fixed landmarks."""
    info = pipeline.info
    reference = torch.tensor(info.reference, dtype=torch.float64) if info.reference is not None else None
    return fixed_landmark_aligner(info.chip_size, info.chip_padding, info.alignment, reference)


def pipeline_scoring_model(pipeline: FacePipeline, *, black_box: bool = False) -> ScoringModel:
    """An FR pipeline under its stored rule: white box (differentiable, reads the chips it is given, the
    attack aligning with :func:`pipeline_aligner` of the same pipeline), or a black-box target that reads
    8-bit images through its own alignment (landmarks held fixed, its template computed without gradients)."""

    def embed(chips: torch.Tensor) -> torch.Tensor:
        return pipeline.embed_chips(chips * 255.0)

    if not black_box:
        return ScoringModel(embed=embed, rule=pipeline.info.rule)
    return ScoringModel(embed=embed, rule=pipeline.info.rule, quantise_input=True, align=pipeline_aligner(pipeline))


@dataclass
class FacePair:
    """A probe image (1, 3, H, W) in [0, 1] with its fixed landmarks, and the reference's aligned chip.

    ``ref_image`` / ``ref_landmarks``: the reference photo and its landmarks, needed only by a target
    with its own alignment (it cuts its own reference chip).
    """

    image: torch.Tensor
    landmarks: torch.Tensor  # (1, 68, 2)
    ref_chip: torch.Tensor  # (1, 3, S, S) in [0, 1]
    ref_image: torch.Tensor | None = None  # (1, 3, H', W') in [0, 1]
    ref_landmarks: torch.Tensor | None = None  # (1, 68, 2)

    def reference_templates(self, model: ScoringModel) -> torch.Tensor:
        """``model``'s template of the reference: from its own alignment of the photo when it has one."""
        if model.align is None:
            return model.templates(self.ref_chip)
        if self.ref_image is None or self.ref_landmarks is None:
            raise ValueError("a model with its own alignment needs the reference photo and its landmarks")
        return model.image_templates(self.ref_image, self.ref_landmarks, self.ref_chip)


@dataclass(frozen=True)
class PairAttack:
    """One attacked pair: the 8-bit adversarial image, its chips, and the scores before and after."""

    adversarial: torch.Tensor  # (1, 3, H, W) in [0, 1], 8-bit values
    adv_chip: torch.Tensor  # (1, 3, S, S)
    clean_chip: torch.Tensor
    goal: Goal
    score_before: float  # the target's, under its rule
    score_after: float
    same_before: bool
    same_after: bool
    surrogate_score_after: float
    linf: float  # of adversarial - probe, in pixel units
    l2: float
    epsilon_used: float
    result: AttackResult

    @property
    def flipped(self) -> bool:
        return self.same_before != self.same_after


def attack_pair(
    pair: FacePair,
    align: Align,
    surrogate: ScoringModel,
    target: ScoringModel,
    plan: AttackPlan,
    *,
    goal: Goal | None = None,
    should_stop: StopCheck | None = None,
) -> PairAttack:
    """Attack the probe with the surrogate's gradients and score the 8-bit result with the target.

    ``goal`` None: dodge when the target accepts the clean pair, impersonate otherwise. Raises what
    :func:`~facexplain.attacks.driver.run_plan` raises (``AttackCancelled``, ``ValueError``).
    """
    x = pair.image

    def chip_of(images: torch.Tensor) -> torch.Tensor:
        return align(images, pair.landmarks)

    with torch.no_grad():
        clean_chip = chip_of(x)
        t_ref = pair.reference_templates(target)
        t_clean = target.image_templates(x, pair.landmarks, clean_chip)
        score_before = float(target.rule.score(t_clean, t_ref)[0])
        same_before = bool(target.rule.accepts(t_clean, t_ref)[0])
        s_ref = surrogate.embed(pair.ref_chip)
    chosen: Goal = goal or ("dodge" if same_before else "impersonate")
    objective = VerificationObjective(surrogate.rule, chosen)

    def embedder(images: torch.Tensor) -> torch.Tensor:
        return surrogate.embed(chip_of(images))

    planned = run_plan(embedder, x, s_ref, objective, plan, should_stop=should_stop)
    adversarial = quantise(planned.result.adversarial.detach()).clamp(0, 1)
    with torch.no_grad():
        adv_chip = chip_of(adversarial)
        t_adv = target.image_templates(adversarial, pair.landmarks, adv_chip)
        score_after = float(target.rule.score(t_adv, t_ref)[0])
        same_after = bool(target.rule.accepts(t_adv, t_ref)[0])
        surrogate_after = float(surrogate.rule.score(surrogate.embed(adv_chip), s_ref)[0])
    d = (adversarial - x).flatten()
    return PairAttack(
        adversarial=adversarial,
        adv_chip=adv_chip,
        clean_chip=clean_chip,
        goal=chosen,
        score_before=score_before,
        score_after=score_after,
        same_before=same_before,
        same_after=same_after,
        surrogate_score_after=surrogate_after,
        linf=float(d.abs().max()) if d.numel() else 0.0,
        l2=float(d.norm()),
        epsilon_used=float(planned.epsilon_used),
        result=planned.result,
    )


def random_controls(
    pair: FacePair,
    adversarial: torch.Tensor,
    align: Align,
    surrogate: ScoringModel,
    n: int,
    *,
    seed: int,
    norm: Norm,
    batch_size: int,
) -> torch.Tensor | None:
    """Surrogate templates of ``n`` random perturbations with the norm of the attack's (8-bit) perturbation.

    Uniform-sign noise for L-inf, a Gaussian direction for L2, drawn from a CPU generator seeded with
    ``seed`` so the controls repeat; None when ``n`` is 0.
    """
    if n == 0:
        return None
    x = pair.image
    d = adversarial - x
    gen = torch.Generator(device="cpu").manual_seed(seed)
    shape = (n, *x.shape[1:])
    if norm == "linf":
        noise = (torch.randint(0, 2, shape, generator=gen).float() * 2 - 1) * float(d.abs().max())
    else:
        g = torch.randn(shape, generator=gen)
        noise = g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1) * float(d.norm())
    noisy = quantise((x + noise.to(x.device)).clamp(0, 1))
    out = []
    for s in range(0, n, batch_size):
        chunk = noisy[s : s + batch_size]
        out.append(surrogate.embed(align(chunk, pair.landmarks)).cpu())
    return torch.cat(out)


@dataclass(frozen=True)
class ExplainedAttack:
    attack: PairAttack
    explanation: Explanation


def attack_and_explain(
    pair: FacePair,
    align: Align,
    surrogate: ScoringModel,
    target: ScoringModel,
    plan: AttackPlan,
    decode: DecodeFn,
    catalog: Any,
    attributes: Sequence[str],
    *,
    n_random: int = 0,
    batch_size: int = 16,
    goal: Goal | None = None,
    should_stop: StopCheck | None = None,
    after_attack: Callable[[], None] | None = None,
) -> ExplainedAttack:
    """Attack the pair, then decode the surrogate templates of probe, reference and adversarial probe
    (and ``n_random`` random controls seeded by the plan's seed) and rank the attributes by s_a.

    ``after_attack`` runs between the two halves (a server checks its deadline there).
    """
    attack = attack_pair(pair, align, surrogate, target, plan, goal=goal, should_stop=should_stop)
    if after_attack is not None:
        after_attack()
    with torch.no_grad():
        z = surrogate.embed(attack.clean_chip)[0]
        z_ref = surrogate.embed(pair.ref_chip)[0]
        z_adv = surrogate.embed(attack.adv_chip)[0]
        z_random = random_controls(
            pair,
            attack.adversarial,
            align,
            surrogate,
            n_random,
            seed=plan.seed,
            norm=plan.budget.norm,
            batch_size=batch_size,
        )
    explanation = explain_counterfactual(decode, catalog, z, z_ref, z_adv, list(attributes), z_random=z_random)
    return ExplainedAttack(attack=attack, explanation=explanation)
