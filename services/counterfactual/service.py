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

Models: the served FR model (``FACEXPLAIN_FR_MODEL_NAME`` at its alias) is the default surrogate (white
box) and target; an auditor's black-box model (``blackbox`` bundle) served as the FR model has no
gradients, so it is a target only (FAILED_PRECONDITION as the surrogate). The attack aligns with its own
geometry (dlib's chip, or five points for a model like HSE FaceRes). ``dlib`` (ModelRef name ``dlib``) is
dlib's own 128-d descriptor, a black-box target without gradients (FAILED_PRECONDITION as a surrogate),
scored on the same aligned chips, rounded to 8 bits, under dlib's rule (L2 < 0.6). The registered model
the service follows as a black-box target (``FACEXPLAIN_TARGET_MODEL_NAME`` at its alias, e.g. the
independent HSE FaceRes) is named by its registered name: it reads the 8-bit images (clean and
adversarial probe, reference) through its own pipeline's alignment with the landmarks found on the clean
images and decides under its own stored rule (:func:`facexplain.counterfactual.pipeline_scoring_model`).
As a surrogate it is refused (FAILED_PRECONDITION): Explain decodes the surrogate's templates with the
decoder of the served FR model, so a white-box attack on it means serving it as the FR model.
DefenceReport re-embeds decoded faces, which are drawn in the served model's chip geometry, so it refuses
a target with its own alignment (FAILED_PRECONDITION). Other names are NOT_FOUND, listing what is
available.

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
perturbation, seeded by the spec's seed. DefenceReport is a streaming job (the kit's job runner): per
pair attack, then decode the attacked probe's surrogate template and re-embed the decoded face with
the target, then ROC; pairs without a face or with a bad image are skipped and reported. The method
itself (the attack driver, the per-pair attack, attack-then-explain, the defence pipeline) lives in
:mod:`facexplain.attacks.driver`, :mod:`facexplain.counterfactual.attack` and
:mod:`facexplain.counterfactual.defence`; this module converts protos, checks limits and streams.

Images and templates are never logged; logs carry RPC names, codes, timings and counts.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, TypeAlias

import grpc
import torch

from facexplain.artifacts.decoder import LoadedDecoder
from facexplain.artifacts.embedder import KIND_EMBEDDER
from facexplain.attacks import (
    AttackBudget,
    AttackCancelled,
    AttackInputError,
    AttackPlan,
    BudgetError,
    Goal,
    Method,
    Norm,
)
from facexplain.attributes.catalog import UnknownAttributeError
from facexplain.counterfactual.attack import (
    Align,
    FacePair,
    PairAttack,
    ScoringModel,
    attack_and_explain,
    attack_pair,
    fixed_landmark_aligner,
    pipeline_aligner,
    pipeline_scoring_model,
)
from facexplain.counterfactual.defence import DefencePair, RocCurve, defence_pair, defence_report
from facexplain.counterfactual.explain import heatmap_png
from facexplain.faces.align import DLIB_ALIGNMENT
from facexplain.metrics.verification import DLIB_L2_RULE
from facexplain.models.dlib_descriptor import DlibDescriptor, dlib_available
from facexplain.models.program import is_differentiable
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
_METHOD_NAMES: dict[int, Method] = {
    Spec.METHOD_FGSM: "fgsm",
    Spec.METHOD_IFGSM: "ifgsm",
    Spec.METHOD_PGD: "pgd",
    Spec.METHOD_CW: "cw",
}
_DEFAULT_STEPS: dict[int, int] = {Spec.METHOD_FGSM: 1, Spec.METHOD_IFGSM: 10, Spec.METHOD_PGD: 10, Spec.METHOD_CW: 100}

StopFn = Callable[[], bool]
MethodValue: TypeAlias = Spec.Method.ValueType
NormValue: TypeAlias = Spec.Norm.ValueType


# -- the attack spec ------------------------------------------------------------------------------------------

_LIMIT_ENV = {
    "max_steps": "FACEXPLAIN_MAX_ATTACK_STEPS",
    "max_total_steps": "FACEXPLAIN_MAX_TOTAL_STEPS",
    "max_restarts": "FACEXPLAIN_CW_SEARCH_ROUNDS",
    "max_epsilon_linf": "FACEXPLAIN_MAX_EPSILON_LINF",
    "max_epsilon_l2": "FACEXPLAIN_MAX_EPSILON_L2",
    "max_seconds": "FACEXPLAIN_MAX_ATTACK_SECONDS",
}


_GOALS: dict[int, Goal] = {Spec.GOAL_DODGE: "dodge", Spec.GOAL_IMPERSONATE: "impersonate"}


@dataclass(frozen=True)
class ResolvedSpec:
    """An AttackSpec with every default filled and the budget checked against the server limits."""

    proto: counterfactual_pb2.AttackSpec  # spec_used (goal stays unset until the clean pair decides it)
    method: int
    goal: Goal | None  # None = from the clean pair
    plan: AttackPlan

    @property
    def budget(self) -> AttackBudget:
        return self.plan.budget

    @property
    def seed(self) -> int:
        return self.plan.seed


def _finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise InvalidArgument(f"spec.{name} must be finite, got {value}")


def _check_spec(spec: counterfactual_pb2.AttackSpec) -> tuple[MethodValue, NormValue, Norm]:
    """The spec's method and norm (defaults filled) after the checks that need no server limit."""
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
    if spec.full_budget and (method in (Spec.METHOD_FGSM, Spec.METHOD_CW) or spec.minimal_epsilon):
        raise InvalidArgument(
            "full_budget runs every IFGSM/PGD step without early stop; it does not apply to FGSM, CW or minimal_epsilon"
        )
    norm_name: Norm = "linf" if norm == Spec.NORM_LINF else "l2"
    if norm_name == "linf" and spec.epsilon > 1.0:
        raise InvalidArgument(f"spec.epsilon {spec.epsilon:g} is outside [0, 1]: an L-inf budget is in pixel units")
    return method, norm, norm_name


def _budget(
    spec: counterfactual_pb2.AttackSpec, method: MethodValue, norm: Norm, settings: CounterfactualSettings
) -> AttackBudget:
    """The spec's budget with defaults filled, validated against the server limits (named by their variables)."""
    limits = settings.budget_limits()
    epsilon = float(spec.epsilon)
    if epsilon == 0:  # CW without a cap: the server's
        default = 8 / 255 if norm == "linf" else 1.0
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
        return AttackBudget(
            epsilon=epsilon,
            steps=steps,
            step_size=step_size,
            norm=norm,
            restarts=restarts,
            random_start=random_start,
        ).validate(limits)
    except BudgetError as exc:
        env = _LIMIT_ENV.get(exc.limit)
        msg = f"attack budget: {exc}" + (f" ({env})" if env else "")
        raise (ResourceExhausted(msg) if exc.exceeded else InvalidArgument(msg)) from None


def _spec_used(
    spec: counterfactual_pb2.AttackSpec,
    method: MethodValue,
    norm: NormValue,
    budget: AttackBudget,
    tolerance: float,
) -> counterfactual_pb2.AttackSpec:
    """The spec as run, reported back so a client can repeat it exactly."""
    used = counterfactual_pb2.AttackSpec()
    used.CopyFrom(spec)
    used.method = method
    used.norm = norm
    used.epsilon = budget.epsilon
    used.steps = budget.steps
    used.step_size = float(budget.alpha()) if method in (Spec.METHOD_IFGSM, Spec.METHOD_PGD) else 0.0
    if method == Spec.METHOD_FGSM:
        used.step_size = budget.epsilon
    used.random_start = budget.random_start
    if method == Spec.METHOD_CW:
        used.cw_c = float(spec.cw_c) or 1.0
        used.cw_learning_rate = float(budget.step_size or 0.01)
    if spec.minimal_epsilon:
        used.epsilon_tolerance = tolerance
    used.seed = int(spec.seed)
    return used


def resolve_spec(spec: counterfactual_pb2.AttackSpec, settings: CounterfactualSettings) -> ResolvedSpec:
    """Defaults (see counterfactual.proto) and limits; INVALID_ARGUMENT / RESOURCE_EXHAUSTED when they break."""
    method, norm, norm_name = _check_spec(spec)
    budget = _budget(spec, method, norm_name, settings)
    tolerance = float(spec.epsilon_tolerance) or 1 / 255
    if spec.minimal_epsilon and tolerance > budget.epsilon:
        raise InvalidArgument(
            f"epsilon_tolerance {tolerance:g} is larger than the search's upper end {budget.epsilon:g}"
        )
    plan = AttackPlan(
        method=_METHOD_NAMES[method],
        budget=budget,
        seed=int(spec.seed),
        minimal=bool(spec.minimal_epsilon),
        resolution_255=tolerance * 255.0,
        cw_c=float(spec.cw_c) or 1.0,
        cw_confidence=float(spec.cw_confidence),
        early_stop=not spec.full_budget,
    )
    return ResolvedSpec(
        proto=_spec_used(spec, method, norm, budget, tolerance),
        method=method,
        goal=_GOALS.get(spec.goal),
        plan=plan,
    )


# -- models as attack roles ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Role:
    """A model as surrogate or target: the method's view of it, and how the API names it."""

    ref: common_pb2.ModelRef
    model: ScoringModel
    white_box: bool


# -- protos ----------------------------------------------------------------------------------------------------


def _png01(image: torch.Tensor) -> common_pb2.Image:
    return png_image(image.detach().float().cpu().clamp(0.0, 1.0).reshape(3, *image.shape[-2:]) * 255.0)


def perturbation_png(adversarial: torch.Tensor, clean: torch.Tensor) -> common_pb2.Image:
    """(adversarial - probe) amplified so its largest |value| maps to +-127, 128 = no change."""
    d = (adversarial - clean).detach().float().cpu().reshape(3, *adversarial.shape[-2:])
    peak = float(d.abs().max())
    scaled = d * (127.0 / peak) if peak > 0 else torch.zeros_like(d)
    return png_image((128.0 + scaled).clamp(0, 255))


def _attack_response(
    outcome: PairAttack, pair: FacePair, spec: ResolvedSpec, surrogate: Role, target: Role
) -> counterfactual_pb2.AttackResponse:
    used = counterfactual_pb2.AttackSpec()
    used.CopyFrom(spec.proto)
    used.goal = Spec.GOAL_DODGE if outcome.goal == "dodge" else Spec.GOAL_IMPERSONATE
    result = outcome.result
    return counterfactual_pb2.AttackResponse(
        adversarial=_png01(outcome.adversarial),
        perturbation=perturbation_png(outcome.adversarial, pair.image),
        linf=outcome.linf,
        l2=outcome.l2,
        score_before=outcome.score_before,
        score_after=outcome.score_after,
        same_before=outcome.same_before,
        same_after=outcome.same_after,
        flipped=outcome.flipped,
        epsilon_used=outcome.epsilon_used,
        steps_used=int(result.steps[0]),
        surrogate=surrogate.ref,
        target=target.ref,
        seed=int(result.seed if result.seed is not None else spec.seed),
        rule=rule_to_proto(target.model.rule),
        spec_used=used,
        surrogate_score_after=outcome.surrogate_score_after,
    )


def _roc_points(curve: RocCurve) -> list[counterfactual_pb2.RocPoint]:
    return [counterfactual_pb2.RocPoint(fpr=f, tpr=t, threshold=h) for f, t, h in curve.points()]


def _aligner(fr: ServedModel[FacePipeline]) -> Align:
    """The served FR model's own alignment with one face's fixed landmarks (chips in [0, 1])."""
    return pipeline_aligner(fr.model)


@contextmanager
def _attack_errors(spec: ResolvedSpec) -> Iterator[None]:
    """A stopped attack -> DEADLINE_EXCEEDED (naming the server's time limit when that stopped it); a bad
    input the attack rejected -> INVALID_ARGUMENT."""
    try:
        yield
    except AttackCancelled as exc:
        if exc.reason == "time_limit":
            raise DeadlineExceeded(
                f"attack stopped at the server's time limit of {spec.budget.time_limit:g} s after {exc.steps_done} "
                "steps (FACEXPLAIN_MAX_ATTACK_SECONDS)"
            ) from None
        raise DeadlineExceeded(
            f"attack stopped after {exc.steps_done} steps: the deadline passed or the call was cancelled"
        ) from None
    except AttackInputError as exc:
        raise InvalidArgument(f"attack: {exc}") from None


class CounterfactualServicer(counterfactual_pb2_grpc.CounterfactualServiceServicer):
    def __init__(
        self,
        fr_slot: ModelSlot[FacePipeline],
        decoder_slot: ModelSlot[LoadedDecoder],
        catalogs: Catalogs,
        settings: CounterfactualSettings,
        metrics: ServiceMetrics,
        *,
        target_slot: ModelSlot[FacePipeline] | None = None,
    ) -> None:
        self.fr_slot = fr_slot
        self.target_slot = target_slot  # the registered black-box target the service follows, if any
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
        if self.target_slot is not None:
            slots.append(self.target_slot)
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
            white_box = is_differentiable(pipe.recognition_net)
            if which == "surrogate" and not white_box:
                raise FailedPrecondition(
                    f"the served FR model {fr.name} v{fr.version} is a black-box model (templates from its owner's "
                    "endpoint, no gradients) and cannot be the attack surrogate; register it as a TorchScript "
                    "program for white-box attacks"
                )
            scoring = pipeline_scoring_model(pipe)
            if not white_box:
                scoring = replace(scoring, quantise_input=True)  # a black box receives 8-bit chips
            return Role(ref=fr.ref(), model=scoring, white_box=white_box)
        if self.target_slot is not None and ref.name == self.settings.target_model_name:
            return self._black_box_role(ref, which)
        if ref.name in DLIB_NAMES:
            if which == "surrogate":
                raise FailedPrecondition(
                    f"surrogate {ref.name!r} has no gradients (a black-box model): attack with the served FR "
                    f"model and name {ref.name!r} as the target to measure transfer"
                )
            model = self._dlib_model()
            info = fr.model.info
            # dlib reads dlib's 150-px chip: the served model's when it has that geometry, else its own
            same = (info.alignment, info.chip_size, info.chip_padding) == (DLIB_ALIGNMENT, 150, 0.25)
            return Role(
                ref=common_pb2.ModelRef(name="dlib", version=model.version),
                model=ScoringModel(
                    embed=model,
                    rule=DLIB_L2_RULE,
                    quantise_input=True,
                    align=None if same else fixed_landmark_aligner(150, 0.25),
                ),
                white_box=False,
            )
        served = f"{fr.name} v{fr.version}" + (f" ({fr.alias})" if fr.alias else "")
        targets = ["'dlib'"] if dlib_available() else []
        if self.target_slot is not None:
            targets.append(f"{self.settings.target_model_name!r}")
        plural = "s" if len(targets) > 1 else ""
        offered = f" and the black-box target{plural} {' and '.join(targets)}" if targets else ""
        raise NotFound(
            f"unknown {which} model {ref.name!r}"
            + (f" v{ref.version}" if ref.version else "")
            + f"; this service serves {served}{offered}"
        )

    def _black_box_role(self, ref: common_pb2.ModelRef, which: str) -> Role:
        """The registered independent FR model as a black-box target: its own pipeline, alignment and rule."""
        assert self.target_slot is not None
        name = self.settings.target_model_name
        if which == "surrogate":
            raise FailedPrecondition(
                f"{name!r} is offered as a black-box target only: Explain decodes the surrogate's templates with "
                "the served FR model's decoder, so attack it white-box by serving it as the FR model "
                "(FACEXPLAIN_FR_MODEL_NAME), or name it as the target to measure transfer"
            )
        served = self.target_slot.current()  # UNAVAILABLE until the watcher has loaded it
        alias = self.settings.target_model_alias
        if ref.version not in ("", served.version) or ref.alias not in ("", served.alias, alias):
            raise NotFound(
                f"target {name!r}"
                + (f" v{ref.version}" if ref.version else "")
                + (f" @{ref.alias}" if ref.alias else "")
                + f" is not loaded: this service follows {name}@{alias}, now v{served.version}"
            )
        return Role(ref=served.ref(), model=pipeline_scoring_model(served.model, black_box=True), white_box=False)

    def _roles(self, spec: counterfactual_pb2.AttackSpec, fr: ServedModel[FacePipeline]) -> tuple[Role, Role]:
        return self._role(spec.surrogate_model, fr, "surrogate"), self._role(spec.target_model, fr, "target")

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
    ) -> FacePair:
        image, lm = self._face(probe, fr, selection, names[0])
        h, w = image.shape[-2:]
        if h * w > self.settings.max_attack_pixels:
            raise ResourceExhausted(
                f"{names[0]}: a {w}x{h} image is over the attack limit of {self.settings.max_attack_pixels} pixels "
                "(FACEXPLAIN_MAX_ATTACK_PIXELS); crop or downscale it around the face"
            )
        ref_image, ref_lm = self._face(reference, fr, selection, names[1])
        return FacePair(
            image=image,
            landmarks=lm,
            ref_chip=_aligner(fr)(ref_image, ref_lm),
            ref_image=ref_image,
            ref_landmarks=ref_lm,
        )

    @staticmethod
    def _stop(context: grpc.ServicerContext) -> StopFn:
        def stop() -> bool:
            if not context.is_active():
                return True
            remaining = context.time_remaining()
            return remaining is not None and remaining <= 0

        return stop

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
        with _attack_errors(spec):
            outcome = attack_pair(
                pair,
                _aligner(fr),
                surrogate.model,
                target.model,
                spec.plan,
                goal=spec.goal,
                should_stop=self._stop(context),
            )
        return _attack_response(outcome, pair, spec, surrogate, target)

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
        with _attack_errors(spec):
            explained = attack_and_explain(
                pair,
                _aligner(fr),
                surrogate.model,
                target.model,
                spec.plan,
                decoder.model.decode,
                catalog,
                [s.name for s in specs],
                n_random=n_random,
                batch_size=self.settings.batch_size,
                goal=spec.goal,
                should_stop=self._stop(context),
                after_attack=lambda: check_deadline(context, "attack"),
            )
        check_deadline(context, "recovery")
        explanation = explained.explanation
        return counterfactual_pb2.ExplainResponse(
            attack=_attack_response(explained.attack, pair, spec, surrogate, target),
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
        if target.model.align is not None:
            raise FailedPrecondition(
                f"DefenceReport re-embeds decoded faces, drawn in {fr.name}'s chip geometry; target "
                f"{target.ref.name!r} has its own alignment and cannot read them: use Attack or Explain to "
                "measure transfer to it"
            )
        decoder = self._decoder(fr)
        result: list[counterfactual_pb2.DefenceResult] = []

        def work(job: JobContext) -> list[Any]:
            result.append(self._defence(request, spec, selection, fr, decoder, surrogate, target, job))
            return []

        for event in run_job(context, work, "defence"):
            yield counterfactual_pb2.DefenceEvent(progress=event.progress)
        yield counterfactual_pb2.DefenceEvent(result=result[0])

    def _defence_pairs(
        self,
        request: counterfactual_pb2.DefenceRequest,
        spec: ResolvedSpec,
        selection: FaceSelection,
        fr: ServedModel[FacePipeline],
        surrogate: Role,
        target: Role,
        job: JobContext,
    ) -> tuple[list[DefencePair], list[counterfactual_pb2.SkippedPair]]:
        """Attack every usable pair; a pair without a face or with a bad image is skipped and reported."""
        n = len(request.pairs)
        skipped: list[counterfactual_pb2.SkippedPair] = []
        pairs: list[DefencePair] = []
        align = _aligner(fr)
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
            try:
                with _attack_errors(spec):
                    scored = defence_pair(
                        pair,
                        bool(item.genuine),
                        align,
                        surrogate.model,
                        target.model,
                        spec.plan,
                        fixed_goal=spec.goal,
                        should_stop=job.stop,
                    )
            except DeadlineExceeded:
                if job.stop():
                    raise Cancelled(f"cancelled during pair {i + 1} of {n}") from None
                raise
            pairs.append(scored)
            job.progress(i + 1, n, "attack", f"{i + 1} of {n} pairs attacked")
        return pairs, skipped

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
        pairs, skipped = self._defence_pairs(request, spec, selection, fr, surrogate, target, job)
        used = len(pairs)
        if used == 0 or len({p.genuine for p in pairs}) < 2:
            raise FailedPrecondition(
                f"after skipping {len(skipped)} of {n} pairs ({', '.join(s.error.message for s in skipped[:3])}), "
                "the usable pairs no longer hold both genuine and impostor pairs: no ROC"
            )

        def step(stage: str, done: int, total: int) -> None:
            if stage == "decode":
                if done == 0:
                    job.progress(0, total, "defence", "decoding the attacked templates", force=True)
                if job.stop():
                    raise Cancelled(f"cancelled during the defence after {done} of {total} pairs")
            elif stage == "decoded":
                job.progress(done, total, "defence", f"{done} of {total} pairs decoded")
            else:
                job.progress(done, total, "roc", "done" if done else "ROC curves", force=True)

        summary = defence_report(
            pairs,
            decoder.model.decode,
            target.model,
            chip_size=fr.model.info.chip_size,
            device=fr.model.device,
            batch_size=self.settings.batch_size,
            step=step,
        )
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
            roc_without=_roc_points(summary.attacked),
            roc_with=_roc_points(summary.defended),
            auc_without=summary.attacked.auc,
            auc_with=summary.defended.auc,
            n_pairs=used,
            roc_clean=_roc_points(summary.clean),
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
                    kind=KIND_EMBEDDER,
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
        return reload_response(self._slots(), request, context)
