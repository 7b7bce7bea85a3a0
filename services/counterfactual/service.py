"""CounterfactualService: the gRPC adapter over :mod:`facexplain.attacks` and :mod:`facexplain.counterfactual`.

An attack perturbs the probe *image* in its own pixel grid, in [0, 1] pixel units: the face is detected
and its 68 landmarks found once on the clean probe, then held fixed, and the differentiable alignment
(:func:`facexplain.faces.align.align_faces`) maps the perturbed image to the chip the FR net sees. So
the returned adversarial PNG is a real image a client can send to the embedding service, and every
reported norm is measured on it. Scores and decisions are measured on the returned 8-bit image (the
adversarial image is rounded to 8 bits before it is scored), so a client re-embedding the PNG with the
same landmarks gets the same numbers; an early-stopped attack that sits exactly on the threshold can
therefore report ``flipped = false`` after rounding. The image is aligned with the clean probe's
landmarks in both cases; a client that re-detects the face may see slightly different scores.

Models: the served FR model (``FACEXPLAIN_FR_MODEL_NAME`` at its alias) is the default surrogate
(white box) and target. ``dlib`` (ModelRef name ``dlib``) is dlib's own 128-d descriptor, a black-box
target without gradients (FAILED_PRECONDITION as a surrogate), scored on the same aligned chips,
rounded to 8 bits, under dlib's rule (L2 < 0.6). Other names are NOT_FOUND.

Budgets: every AttackSpec is resolved (defaults filled, reported back as ``spec_used``) and checked
against the server limits (:class:`facexplain.attacks.BudgetLimits` from the settings) before any image
is decoded: malformed -> INVALID_ARGUMENT, over a limit -> RESOURCE_EXHAUSTED. A running attack polls
the client's call between steps: a passed deadline or a cancelled call stops it (DEADLINE_EXCEEDED),
and so does the server's own time limit (``FACEXPLAIN_MAX_ATTACK_SECONDS``, DEADLINE_EXCEEDED naming it).

Explain decodes the surrogate templates of probe, reference and adversarial probe with the served
decoder (which must invert the served FR version: FAILED_PRECONDITION otherwise), recovers attributes
with the default catalogue (plus the accessory probe set when one is configured and loaded,
``FACEXPLAIN_PROBES_MODEL_NAME``) and reports s_a (see
:mod:`facexplain.counterfactual.explain` for zero denominators: ``inf`` / ``NaN``). Random controls are
uniform-sign (L-inf) or Gaussian-direction (L2) perturbations with the same norm as the returned
perturbation, seeded by the spec's seed. DefenceReport is a streaming job (the directions' job
runner): per pair attack, then decode the attacked probe's surrogate template and re-embed the
decoded face with the target, then ROC; pairs without a face or with a bad image are skipped and
reported.

Images and templates are never logged; logs carry RPC names, codes, timings and counts.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import grpc
import numpy as np
import torch

from facexplain.artifacts.decoder import LoadedDecoder
from facexplain.attacks import (
    AttackBudget,
    AttackCancelled,
    AttackResult,
    BudgetError,
    Norm,
    VerificationObjective,
    cw_l2,
    fgsm,
    iterative_fgsm,
    minimal_epsilon,
    pgd,
    quantise,
)
from facexplain.attributes.catalog import UnknownAttributeError
from facexplain.counterfactual.defence import defence_summary
from facexplain.counterfactual.explain import explain_counterfactual, heatmap_png
from facexplain.faces.align import align_faces
from facexplain.metrics.reconstruction import resize01
from facexplain.metrics.verification import DLIB_L2_RULE, VerificationRule
from facexplain.pipeline import FacePipeline, FaceSelection
from services.api.v1 import common_pb2, counterfactual_pb2, counterfactual_pb2_grpc
from services.counterfactual.settings import CounterfactualSettings
from services.kit.embedder import face_selection, rule_to_proto
from services.kit.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NoFaceFound,
    NotFound,
    ResourceExhausted,
    ServiceError,
)
from services.kit.images import decode_image, png_image
from services.kit.jobs import JobContext, run_job
from services.kit.metrics import ServiceMetrics
from services.kit.models import ModelSlot, ServedModel, combined_status
from services.kit.probes import Catalogs
from services.kit.reload import reload_response
from services.kit.rpc import check_batch, check_deadline, streaming, unary

log = logging.getLogger("facexplain.counterfactual")
SERVICE_NAME = counterfactual_pb2.DESCRIPTOR.services_by_name["CounterfactualService"].full_name
Spec = counterfactual_pb2.AttackSpec
DLIB_NAMES = ("dlib", "dlib_face_recognition_resnet_model_v1")
DEFAULT_N_RANDOM = 10
_METHOD_NAMES = {Spec.METHOD_FGSM: "fgsm", Spec.METHOD_IFGSM: "ifgsm", Spec.METHOD_PGD: "pgd", Spec.METHOD_CW: "cw"}
_DEFAULT_STEPS = {Spec.METHOD_FGSM: 1, Spec.METHOD_IFGSM: 10, Spec.METHOD_PGD: 10, Spec.METHOD_CW: 100}

StopFn = Callable[[], bool]


# -- the attack spec ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedSpec:
    """An AttackSpec with every default filled and the budget checked against the server limits."""

    proto: counterfactual_pb2.AttackSpec  # spec_used (goal stays unset until the clean pair decides it)
    method: int
    budget: AttackBudget
    goal: str | None  # "dodge" / "impersonate"; None = from the clean pair
    cw_c: float
    cw_confidence: float
    minimal: bool
    resolution_255: float
    seed: int


def _finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise InvalidArgument(f"spec.{name} must be finite, got {value}")


def resolve_spec(spec: counterfactual_pb2.AttackSpec, settings: CounterfactualSettings) -> ResolvedSpec:
    """Defaults (see counterfactual.proto) and limits; INVALID_ARGUMENT / RESOURCE_EXHAUSTED when they break."""
    method = spec.method or Spec.METHOD_PGD
    if method not in _METHOD_NAMES:
        raise InvalidArgument(f"unknown attack method {spec.method}")
    if spec.goal not in (Spec.GOAL_UNSPECIFIED, Spec.GOAL_DODGE, Spec.GOAL_IMPERSONATE):
        raise InvalidArgument(f"unknown attack goal {spec.goal}")
    if spec.norm not in (Spec.NORM_UNSPECIFIED, Spec.NORM_LINF, Spec.NORM_L2):
        raise InvalidArgument(f"unknown norm {spec.norm}")
    norm = spec.norm or (Spec.NORM_L2 if method == Spec.METHOD_CW else Spec.NORM_LINF)
    if method == Spec.METHOD_CW and norm != Spec.NORM_L2:
        raise InvalidArgument("Carlini-Wagner is an L2 attack: use NORM_L2 (or leave the norm unset)")
    for name in ("epsilon", "step_size", "cw_c", "cw_confidence", "cw_learning_rate", "epsilon_tolerance"):
        value = float(getattr(spec, name))
        _finite(name, value)
        if value < 0:
            raise InvalidArgument(f"spec.{name} must be >= 0 (0 = default), got {value:g}")
    if spec.steps < 0:
        raise InvalidArgument(f"spec.steps must be >= 0 (0 = default), got {spec.steps}")
    if spec.minimal_epsilon and method == Spec.METHOD_CW:
        raise InvalidArgument("minimal_epsilon searches FGSM/IFGSM/PGD budgets; CW already minimises the L2 norm")
    norm_name: Norm = "linf" if norm == Spec.NORM_LINF else "l2"
    if norm_name == "linf" and spec.epsilon > 1.0:
        raise InvalidArgument(f"spec.epsilon {spec.epsilon:g} is outside [0, 1]: an L-inf budget is in pixel units")
    limits = settings.budget_limits()
    epsilon = float(spec.epsilon)
    if epsilon == 0:  # CW without a cap: the server's
        default = 8 / 255 if norm_name == "linf" else 1.0
        epsilon = limits.max_epsilon_l2 if method == Spec.METHOD_CW else default
    steps = int(spec.steps) or _DEFAULT_STEPS[method]
    if method == Spec.METHOD_FGSM:
        steps = 1
    step_size: float | None = None
    restarts = 0
    if method == Spec.METHOD_CW:
        step_size = float(spec.cw_learning_rate) or 0.01
        restarts = settings.cw_search_rounds - 1
    elif method != Spec.METHOD_FGSM and spec.step_size > 0:
        step_size = float(spec.step_size)
    random_start = bool(spec.random_start) and method == Spec.METHOD_PGD
    try:
        budget = AttackBudget(
            epsilon=epsilon,
            steps=steps,
            step_size=step_size,
            norm=norm_name,
            restarts=restarts,
            random_start=random_start,
        ).validate(limits)
    except BudgetError as exc:
        env = {
            "max_steps": "FACEXPLAIN_MAX_ATTACK_STEPS",
            "max_total_steps": "FACEXPLAIN_MAX_TOTAL_STEPS",
            "max_restarts": "FACEXPLAIN_CW_SEARCH_ROUNDS",
            "max_epsilon_linf": "FACEXPLAIN_MAX_EPSILON_LINF",
            "max_epsilon_l2": "FACEXPLAIN_MAX_EPSILON_L2",
            "max_seconds": "FACEXPLAIN_MAX_ATTACK_SECONDS",
        }.get(exc.limit)
        msg = f"attack budget: {exc}" + (f" ({env})" if env else "")
        raise (ResourceExhausted(msg) if exc.exceeded else InvalidArgument(msg)) from None
    tolerance = float(spec.epsilon_tolerance) or 1 / 255
    if spec.minimal_epsilon and tolerance > epsilon:
        raise InvalidArgument(f"epsilon_tolerance {tolerance:g} is larger than the search's upper end {epsilon:g}")
    goal = {Spec.GOAL_DODGE: "dodge", Spec.GOAL_IMPERSONATE: "impersonate"}.get(spec.goal)
    used = counterfactual_pb2.AttackSpec()
    used.CopyFrom(spec)
    used.method = method
    used.norm = norm
    used.epsilon = epsilon
    used.steps = steps
    used.step_size = float(budget.alpha()) if method in (Spec.METHOD_IFGSM, Spec.METHOD_PGD) else 0.0
    if method == Spec.METHOD_FGSM:
        used.step_size = epsilon
    used.random_start = random_start
    if method == Spec.METHOD_CW:
        used.cw_c = float(spec.cw_c) or 1.0
        used.cw_learning_rate = float(budget.step_size or 0.01)
    if spec.minimal_epsilon:
        used.epsilon_tolerance = tolerance
    used.seed = int(spec.seed)
    return ResolvedSpec(
        proto=used,
        method=method,
        budget=budget,
        goal=goal,
        cw_c=float(spec.cw_c) or 1.0,
        cw_confidence=float(spec.cw_confidence),
        minimal=bool(spec.minimal_epsilon),
        resolution_255=tolerance * 255.0,
        seed=int(spec.seed),
    )


# -- models as attack roles ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Role:
    """A model as surrogate or target: chips in [0, 1] at its chip size -> templates, and its rule."""

    ref: common_pb2.ModelRef
    embed: Callable[[torch.Tensor], torch.Tensor]
    rule: VerificationRule
    white_box: bool
    quantise_input: bool  # a black box receives 8-bit images


class DlibDescriptor:
    """dlib's own 128-d descriptor over (N, 3, 150, 150) chips in [0, 1] (rounded to 8 bits; no gradients)."""

    def __init__(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import dlib
            import face_recognition_models
        self.version = str(getattr(dlib, "__version__", "local"))
        self.net = dlib.face_recognition_model_v1(face_recognition_models.face_recognition_model_location())
        self._lock = threading.Lock()

    def __call__(self, chips: torch.Tensor) -> torch.Tensor:
        arr = (chips.detach() * 255).round().clamp(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy()
        imgs = [np.ascontiguousarray(c) for c in arr]
        with self._lock:
            out = self.net.compute_face_descriptor(imgs)
        return torch.tensor(np.array([np.array(d) for d in out]), dtype=torch.float32)


def dlib_available() -> bool:
    return (
        importlib.util.find_spec("dlib") is not None and importlib.util.find_spec("face_recognition_models") is not None
    )


# -- one prepared pair -------------------------------------------------------------------------------------------


@dataclass
class Pair:
    """A probe image (1, 3, H, W) in [0, 1] with its fixed landmarks, and the reference's aligned chip."""

    image: torch.Tensor
    landmarks: torch.Tensor  # (1, 68, 2)
    ref_chip: torch.Tensor  # (1, 3, S, S) in [0, 1]


@dataclass
class AttackOutcome:
    response: counterfactual_pb2.AttackResponse
    adversarial: torch.Tensor  # (1, 3, H, W) in [0, 1], 8-bit values
    adv_chip: torch.Tensor  # (1, 3, S, S)
    clean_chip: torch.Tensor
    goal: str
    target_before: float
    target_after: float


def _png01(image: torch.Tensor) -> common_pb2.Image:
    return png_image(image.detach().float().cpu().clamp(0.0, 1.0).reshape(3, *image.shape[-2:]) * 255.0)


def perturbation_png(adversarial: torch.Tensor, clean: torch.Tensor) -> common_pb2.Image:
    """(adversarial - probe) amplified so its largest |value| maps to +-127, 128 = no change."""
    d = (adversarial - clean).detach().float().cpu().reshape(3, *adversarial.shape[-2:])
    peak = float(d.abs().max())
    scaled = d * (127.0 / peak) if peak > 0 else torch.zeros_like(d)
    return png_image((128.0 + scaled).clamp(0, 255))


class CounterfactualServicer(counterfactual_pb2_grpc.CounterfactualServiceServicer):
    def __init__(
        self,
        fr_slot: ModelSlot[FacePipeline],
        decoder_slot: ModelSlot[LoadedDecoder],
        catalogs: Catalogs,
        settings: CounterfactualSettings,
        metrics: ServiceMetrics,
    ) -> None:
        self.fr_slot = fr_slot
        self.decoder_slot = decoder_slot
        self.catalogs = catalogs
        self.settings = settings
        self.metrics = metrics
        self._dlib: DlibDescriptor | None = None
        self._lock = threading.Lock()

    # -- models ------------------------------------------------------------------------------------------
    def _slots(self) -> list[ModelSlot[Any]]:
        slots: list[ModelSlot[Any]] = [self.fr_slot, self.decoder_slot]
        if self.catalogs.probes_slot is not None:
            slots.append(self.catalogs.probes_slot)
        return slots

    def _dlib_model(self) -> DlibDescriptor:
        with self._lock:
            if self._dlib is None:
                if not dlib_available():
                    raise NotFound("the black-box model 'dlib' is not installed on this server (dlib-bin)")
                self._dlib = DlibDescriptor()
            return self._dlib

    def _decoder(self, fr: ServedModel[FacePipeline]) -> ServedModel[LoadedDecoder]:
        decoder = self.decoder_slot.peek()
        if decoder is None:
            raise FailedPrecondition(
                f"no decoder loaded for {fr.name} v{fr.version}: register one as "
                f"{self.settings.decoder_model_name}@{self.settings.decoder_model_alias}"
            )
        dec = decoder.model
        if (dec.fr_name, dec.fr_version) != (fr.name, fr.version):
            raise FailedPrecondition(
                f"no decoder for the served FR model: decoder {decoder.name} v{decoder.version} inverts "
                f"{dec.fr_name} v{dec.fr_version}, but this service serves {fr.name} v{fr.version}"
            )
        return decoder

    def _role(self, ref: common_pb2.ModelRef, fr: ServedModel[FacePipeline], which: str) -> Role:
        if not ref.name or (
            ref.name == fr.name
            and ref.version in ("", fr.version)
            and ref.alias in ("", fr.alias, self.settings.fr_model_alias)
        ):
            pipe = fr.model
            return Role(
                ref=fr.ref(),
                embed=lambda chips: pipe.embed_chips(chips * 255.0),
                rule=pipe.info.rule,
                white_box=True,
                quantise_input=False,
            )
        if ref.name in DLIB_NAMES:
            if which == "surrogate":
                raise FailedPrecondition(
                    f"surrogate {ref.name!r} has no gradients (a black-box model): attack with the served FR "
                    f"model and name {ref.name!r} as the target to measure transfer"
                )
            model = self._dlib_model()
            return Role(
                ref=common_pb2.ModelRef(name="dlib", version=model.version),
                embed=model,
                rule=DLIB_L2_RULE,
                white_box=False,
                quantise_input=True,
            )
        served = f"{fr.name} v{fr.version}" + (f" ({fr.alias})" if fr.alias else "")
        raise NotFound(
            f"unknown {which} model {ref.name!r}"
            + (f" v{ref.version}" if ref.version else "")
            + f"; this service serves {served} and the black-box target 'dlib'"
        )

    # -- inputs --------------------------------------------------------------------------------------------
    def _face(
        self, image_msg: common_pb2.Image, fr: ServedModel[FacePipeline], selection: FaceSelection, which: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, 3, H, W) image in [0, 1] on the FR device and its face's (1, 68, 2) landmarks."""
        try:
            image = decode_image(image_msg, self.settings.max_image_pixels)
            result = fr.model.analyze([image], selection)[0]
            if result is None:
                raise NoFaceFound(f"the detector found no face in the {image.shape[2]}x{image.shape[1]} image")
        except ServiceError as exc:
            prefixed = type(exc).__new__(type(exc))
            ServiceError.__init__(prefixed, f"{which}: {exc.message}")
            raise prefixed from None
        device = fr.model.device
        return (image / 255.0).clamp(0, 1)[None].to(device), result.face.landmarks[None].to(device, torch.float32)

    def _pair(
        self,
        probe: common_pb2.Image,
        reference: common_pb2.Image,
        fr: ServedModel[FacePipeline],
        selection: FaceSelection,
        names: tuple[str, str] = ("probe", "reference"),
    ) -> Pair:
        image, lm = self._face(probe, fr, selection, names[0])
        h, w = image.shape[-2:]
        if h * w > self.settings.max_attack_pixels:
            raise ResourceExhausted(
                f"{names[0]}: a {w}x{h} image is over the attack limit of {self.settings.max_attack_pixels} pixels "
                "(FACEXPLAIN_MAX_ATTACK_PIXELS); crop or downscale it around the face"
            )
        ref_image, ref_lm = self._face(reference, fr, selection, names[1])
        return Pair(image=image, landmarks=lm, ref_chip=self._align(fr, ref_image, ref_lm))

    @staticmethod
    def _align(fr: ServedModel[FacePipeline], images: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        info = fr.model.info
        n = images.shape[0]
        return (
            align_faces(images * 255.0, landmarks.expand(n, -1, -1), size=info.chip_size, padding=info.chip_padding)
            / 255.0
        )

    # -- the attack ------------------------------------------------------------------------------------------
    def _attack(
        self,
        pair: Pair,
        spec: ResolvedSpec,
        fr: ServedModel[FacePipeline],
        surrogate: Role,
        target: Role,
        should_stop: StopFn,
        goal: str | None = None,
    ) -> AttackOutcome:
        x = pair.image

        def chip_of(images: torch.Tensor) -> torch.Tensor:
            return self._align(fr, images, pair.landmarks)

        def target_embed(chips: torch.Tensor) -> torch.Tensor:
            return target.embed(quantise(chips) if target.quantise_input else chips)

        with torch.no_grad():
            clean_chip = chip_of(x)
            t_ref = target_embed(pair.ref_chip)
            t_clean = target_embed(clean_chip)
            score_before = float(target.rule.score(t_clean, t_ref)[0])
            same_before = bool(target.rule.accepts(t_clean, t_ref)[0])
            s_ref = surrogate.embed(pair.ref_chip)
        goal = goal or spec.goal or ("dodge" if same_before else "impersonate")
        objective = VerificationObjective(surrogate.rule, goal)  # type: ignore[arg-type]

        def embedder(images: torch.Tensor) -> torch.Tensor:
            return surrogate.embed(chip_of(images))

        budget, seed = spec.budget, spec.seed
        epsilon_used = budget.epsilon
        try:
            result: AttackResult
            if spec.minimal:
                search_budget = budget
                if spec.method == Spec.METHOD_FGSM:
                    search_budget = replace(budget, steps=1, random_start=False)
                elif spec.method == Spec.METHOD_IFGSM:
                    search_budget = replace(budget, random_start=False)
                found = minimal_epsilon(
                    embedder,
                    x,
                    s_ref,
                    objective,
                    search_budget,
                    resolution_255=spec.resolution_255,
                    seed=seed,
                    should_stop=should_stop,
                )
                result = found.result
                if bool(found.found[0]):
                    epsilon_used = float(found.epsilon[0])
            elif spec.method == Spec.METHOD_FGSM:
                result = fgsm(embedder, x, s_ref, objective, budget, seed=seed, should_stop=should_stop)
            elif spec.method == Spec.METHOD_IFGSM:
                result = iterative_fgsm(embedder, x, s_ref, objective, budget, seed=seed, should_stop=should_stop)
            elif spec.method == Spec.METHOD_PGD:
                result = pgd(embedder, x, s_ref, objective, budget, seed=seed, should_stop=should_stop)
            else:
                result = cw_l2(
                    embedder,
                    x,
                    s_ref,
                    objective,
                    budget,
                    confidence=spec.cw_confidence,
                    initial_const=spec.cw_c,
                    seed=seed,
                    should_stop=should_stop,
                )
        except AttackCancelled as exc:
            if exc.reason == "time_limit":
                raise DeadlineExceeded(
                    f"attack stopped at the server's time limit of {budget.time_limit:g} s after {exc.steps_done} "
                    "steps (FACEXPLAIN_MAX_ATTACK_SECONDS)"
                ) from None
            raise DeadlineExceeded(
                f"attack stopped after {exc.steps_done} steps: the deadline passed or the call was cancelled"
            ) from None
        except ValueError as exc:
            raise InvalidArgument(f"attack: {exc}") from None
        adversarial = quantise(result.adversarial.detach()).clamp(0, 1)
        with torch.no_grad():
            adv_chip = chip_of(adversarial)
            t_adv = target_embed(adv_chip)
            score_after = float(target.rule.score(t_adv, t_ref)[0])
            same_after = bool(target.rule.accepts(t_adv, t_ref)[0])
            surrogate_after = float(surrogate.rule.score(surrogate.embed(adv_chip), s_ref)[0])
        d = (adversarial - x).flatten()
        used = counterfactual_pb2.AttackSpec()
        used.CopyFrom(spec.proto)
        used.goal = Spec.GOAL_DODGE if goal == "dodge" else Spec.GOAL_IMPERSONATE
        response = counterfactual_pb2.AttackResponse(
            adversarial=_png01(adversarial),
            perturbation=perturbation_png(adversarial, x),
            linf=float(d.abs().max()) if d.numel() else 0.0,
            l2=float(d.norm()),
            score_before=score_before,
            score_after=score_after,
            same_before=same_before,
            same_after=same_after,
            flipped=same_before != same_after,
            epsilon_used=float(epsilon_used),
            steps_used=int(result.steps[0]),
            surrogate=surrogate.ref,
            target=target.ref,
            seed=int(result.seed if result.seed is not None else seed),
            rule=rule_to_proto(target.rule),
            spec_used=used,
            surrogate_score_after=surrogate_after,
        )
        return AttackOutcome(
            response=response,
            adversarial=adversarial,
            adv_chip=adv_chip,
            clean_chip=clean_chip,
            goal=goal,
            target_before=score_before,
            target_after=score_after,
        )

    def _unattacked(self, pair: Pair, fr: ServedModel[FacePipeline], target: Role) -> AttackOutcome:
        """The clean pair scored by the target, as an outcome whose adversarial image is the probe itself."""
        with torch.no_grad():
            chip = self._align(fr, pair.image, pair.landmarks)
            t_ref = target.embed(quantise(pair.ref_chip) if target.quantise_input else pair.ref_chip)
            t = target.embed(quantise(chip) if target.quantise_input else chip)
            score = float(target.rule.score(t, t_ref)[0])
        return AttackOutcome(
            response=counterfactual_pb2.AttackResponse(),
            adversarial=pair.image,
            adv_chip=chip,
            clean_chip=chip,
            goal="",
            target_before=score,
            target_after=score,
        )

    @staticmethod
    def _stop(context: grpc.ServicerContext) -> StopFn:
        def stop() -> bool:
            if not context.is_active():
                return True
            remaining = context.time_remaining()
            return remaining is not None and remaining <= 0

        return stop

    def _roles(self, spec: counterfactual_pb2.AttackSpec, fr: ServedModel[FacePipeline]) -> tuple[Role, Role]:
        return self._role(spec.surrogate_model, fr, "surrogate"), self._role(spec.target_model, fr, "target")

    # -- RPCs ------------------------------------------------------------------------------------------------
    @unary
    def Attack(
        self, request: counterfactual_pb2.AttackRequest, context: grpc.ServicerContext
    ) -> counterfactual_pb2.AttackResponse:
        spec = resolve_spec(request.spec, self.settings)
        selection = face_selection(request.selection)
        fr = self.fr_slot.current()
        surrogate, target = self._roles(request.spec, fr)
        pair = self._pair(request.probe, request.reference, fr, selection)
        check_deadline(context, "face detection")
        return self._attack(pair, spec, fr, surrogate, target, self._stop(context)).response

    @unary
    def Explain(
        self, request: counterfactual_pb2.ExplainRequest, context: grpc.ServicerContext
    ) -> counterfactual_pb2.ExplainResponse:
        spec = resolve_spec(request.spec, self.settings)
        selection = face_selection(request.selection)
        if request.n_random < 0:
            raise InvalidArgument(f"n_random must be >= 0 (0 = {DEFAULT_N_RANDOM}), got {request.n_random}")
        n_random = request.n_random or DEFAULT_N_RANDOM
        if n_random > self.settings.max_random_controls:
            raise ResourceExhausted(
                f"n_random {n_random} exceeds the limit of {self.settings.max_random_controls} "
                "(FACEXPLAIN_MAX_RANDOM_CONTROLS)"
            )
        fr = self.fr_slot.current()
        surrogate, target = self._roles(request.spec, fr)
        decoder = self._decoder(fr)
        catalog, _probes, _key = self.catalogs.current()
        try:
            specs = catalog.resolve(list(request.attributes))
        except UnknownAttributeError as exc:
            raise InvalidArgument(str(exc)) from None
        pair = self._pair(request.probe, request.reference, fr, selection)
        check_deadline(context, "face detection")
        outcome = self._attack(pair, spec, fr, surrogate, target, self._stop(context))
        check_deadline(context, "attack")
        with torch.no_grad():
            z = surrogate.embed(outcome.clean_chip)[0]
            z_ref = surrogate.embed(pair.ref_chip)[0]
            z_adv = surrogate.embed(outcome.adv_chip)[0]
            z_random = self._random_controls(pair, outcome, fr, surrogate, n_random, spec.seed)
        explanation = explain_counterfactual(
            decoder.model.decode,
            catalog,
            z,
            z_ref,
            z_adv,
            [s.name for s in specs],
            z_random=z_random,
        )
        check_deadline(context, "recovery")
        return counterfactual_pb2.ExplainResponse(
            attack=outcome.response,
            significance=[
                counterfactual_pb2.AttributeSignificance(
                    attribute=r.attribute,
                    group=r.group,
                    s_a=r.s_a,
                    significant=r.significant,
                    delta=r.delta,
                    delta_reference=r.delta_reference,
                    delta_control=r.delta_control,
                )
                for r in explanation.rows
            ],
            lbp_significance_map=common_pb2.Image(
                encoded=heatmap_png(
                    explanation.lbp_map, size=fr.model.info.chip_size, background=explanation.decoded_probe
                )
            ),
            decoded_probe=_png01(explanation.decoded_probe),
            decoded_reference=_png01(explanation.decoded_reference),
            decoded_adversarial=_png01(explanation.decoded_adversarial),
            decoder=decoder.ref(),
        )

    def _random_controls(
        self, pair: Pair, outcome: AttackOutcome, fr: ServedModel[FacePipeline], surrogate: Role, n: int, seed: int
    ) -> torch.Tensor | None:
        """Surrogate templates of ``n`` random perturbations with the norm of the attack's (8-bit) perturbation."""
        if n == 0:
            return None
        x = pair.image
        d = outcome.adversarial - x
        gen = torch.Generator(device="cpu").manual_seed(seed)
        shape = (n, *x.shape[1:])
        if outcome.response.spec_used.norm == Spec.NORM_LINF:
            noise = (torch.randint(0, 2, shape, generator=gen).float() * 2 - 1) * float(d.abs().max())
        else:
            g = torch.randn(shape, generator=gen)
            noise = g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1) * float(d.norm())
        noisy = quantise((x + noise.to(x.device)).clamp(0, 1))
        out = []
        for s in range(0, n, self.settings.batch_size):
            chunk = noisy[s : s + self.settings.batch_size]
            out.append(surrogate.embed(self._align(fr, chunk, pair.landmarks)).cpu())
        return torch.cat(out)

    @streaming
    def DefenceReport(
        self, request: counterfactual_pb2.DefenceRequest, context: grpc.ServicerContext
    ) -> Iterator[counterfactual_pb2.DefenceEvent]:
        spec = resolve_spec(request.spec, self.settings)
        selection = face_selection(request.selection)
        check_batch(len(request.pairs), self.settings.max_defence_pairs, "pairs (FACEXPLAIN_MAX_DEFENCE_PAIRS)")
        labels = {bool(p.genuine) for p in request.pairs}
        if labels != {True, False}:
            raise InvalidArgument("a ROC needs both genuine and impostor pairs (set ImagePair.genuine)")
        fr = self.fr_slot.current()
        surrogate, target = self._roles(request.spec, fr)
        decoder = self._decoder(fr)
        result: list[counterfactual_pb2.DefenceResult] = []

        def work(job: JobContext) -> list[Any]:
            result.append(self._defence(request, spec, selection, fr, decoder, surrogate, target, job))
            return []

        for event in run_job(context, work, "defence"):
            yield counterfactual_pb2.DefenceEvent(progress=event.progress)
        yield counterfactual_pb2.DefenceEvent(result=result[0])

    def _defence(
        self,
        request: counterfactual_pb2.DefenceRequest,
        spec: ResolvedSpec,
        selection: FaceSelection,
        fr: ServedModel[FacePipeline],
        decoder: ServedModel[LoadedDecoder],
        surrogate: Role,
        target: Role,
        job: JobContext,
    ) -> counterfactual_pb2.DefenceResult:
        n = len(request.pairs)
        skipped: list[counterfactual_pb2.SkippedPair] = []
        genuine: list[bool] = []
        attacked: list[bool] = []
        dodge: list[bool] = []
        s_clean: list[float] = []
        s_adv: list[float] = []
        z_adv: list[torch.Tensor] = []
        t_refs: list[torch.Tensor] = []
        fixed = spec.goal
        job.progress(0, n, "attack", f"attacking {n} pairs", force=True)
        for i, item in enumerate(request.pairs):
            if job.stop():
                raise Cancelled(f"cancelled after {i} of {n} pairs")
            try:
                pair = self._pair(item.a, item.b, fr, selection, names=(f"pairs[{i}].a", f"pairs[{i}].b"))
            except ServiceError as exc:
                skipped.append(counterfactual_pb2.SkippedPair(index=i, id=item.id, error=exc.item_error()))
                job.progress(i + 1, n, "attack", f"pair {i + 1} of {n} skipped")
                continue
            goal = "dodge" if item.genuine else "impersonate"
            applies = fixed is None or fixed == goal
            try:
                outcome = (
                    self._attack(pair, spec, fr, surrogate, target, job.stop, goal=goal)
                    if applies
                    else self._unattacked(pair, fr, target)  # a fixed goal attacks only the pairs it applies to
                )
            except DeadlineExceeded:
                if job.stop():
                    raise Cancelled(f"cancelled during pair {i + 1} of {n}") from None
                raise
            with torch.no_grad():
                z_adv.append(surrogate.embed(outcome.adv_chip)[0].cpu())
                t_ref = target.embed(quantise(pair.ref_chip) if target.quantise_input else pair.ref_chip)
            t_refs.append(t_ref[0].cpu())
            genuine.append(bool(item.genuine))
            attacked.append(applies)
            dodge.append(goal == "dodge")
            s_clean.append(outcome.target_before)
            s_adv.append(outcome.target_after)
            job.progress(i + 1, n, "attack", f"{i + 1} of {n} pairs attacked")
        used = len(genuine)
        if used == 0 or len(set(genuine)) < 2:
            raise FailedPrecondition(
                f"after skipping {len(skipped)} of {n} pairs ({', '.join(s.error.message for s in skipped[:3])}), "
                "the usable pairs no longer hold both genuine and impostor pairs: no ROC"
            )
        job.progress(0, used, "defence", "decoding the attacked templates", force=True)
        s_def: list[float] = []
        bs = self.settings.batch_size
        size = fr.model.info.chip_size
        for s in range(0, used, bs):
            if job.stop():
                raise Cancelled(f"cancelled during the defence after {s} of {used} pairs")
            with torch.no_grad():
                decoded = decoder.model.decode(torch.stack(z_adv[s : s + bs])).float().clamp(0, 1)
                chips = resize01(decoded, size).clamp(0, 1).to(fr.model.device)
                t_def = target.embed(quantise(chips) if target.quantise_input else chips).cpu()
                s_def += target.rule.score(t_def, torch.stack(t_refs[s : s + bs])).tolist()
            job.progress(min(s + bs, used), used, "defence", f"{min(s + bs, used)} of {used} pairs decoded")
        job.progress(0, 1, "roc", "ROC curves", force=True)
        summary = defence_summary(target.rule, genuine, s_clean, s_adv, s_def, attacked=attacked, dodge=dodge)
        job.progress(1, 1, "roc", "done", force=True)

        def points(curve: Any) -> list[counterfactual_pb2.RocPoint]:
            return [counterfactual_pb2.RocPoint(fpr=f, tpr=t, threshold=h) for f, t, h in curve.points()]

        spec_used = counterfactual_pb2.AttackSpec()
        spec_used.CopyFrom(spec.proto)
        log.info(
            "defence report: %d pairs used, %d skipped, %d eligible",
            used,
            len(skipped),
            summary.n_eligible,
            extra={"fx_rpc": "DefenceReport"},
        )
        return counterfactual_pb2.DefenceResult(
            roc_without=points(summary.attacked),
            roc_with=points(summary.defended),
            auc_without=summary.attacked.auc,
            auc_with=summary.defended.auc,
            n_pairs=used,
            roc_clean=points(summary.clean),
            auc_clean=summary.clean.auc,
            attack_success_rate=summary.attack_success_rate,
            attack_success_rate_with=summary.attack_success_rate_with,
            skipped=skipped,
            target=target.ref,
            decoder=decoder.ref(),
            spec_used=spec_used,
        )

    @unary
    def ModelStatus(
        self, request: common_pb2.ModelStatusRequest, context: grpc.ServicerContext
    ) -> common_pb2.ModelStatusResponse:
        resp = combined_status(self._slots())
        if dlib_available():
            resp.models.append(
                common_pb2.LoadedModel(
                    model=common_pb2.ModelRef(name="dlib", version="local"),
                    kind="embedder",
                    metadata={
                        "gradients": "false",
                        "role": "black-box target only",
                        "source": "dlib-bin + face-recognition-models (dlib_face_recognition_resnet_model_v1)",
                        "verification_metric": DLIB_L2_RULE.metric,
                        "verification_threshold": str(DLIB_L2_RULE.threshold),
                    },
                    serving=True,
                    device="cpu",
                )
            )
        return resp

    @unary
    def Reload(self, request: common_pb2.ReloadRequest, context: grpc.ServicerContext) -> common_pb2.ReloadResponse:
        return reload_response(self._slots(), request)
