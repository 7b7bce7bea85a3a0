"""Catalogue estimators backed by face-api's own nets: age and gender, expression, and head pose.

Attribute recovery compares an attribute measured on an original aligned chip with the same
attribute measured on the face decoded from its template, so these estimators read pixels and
landmarks only (a :class:`~facexplain.attributes.catalog.FaceBatch`), never a template, and they
treat a 150-px chip and a 64-px decoded face the same way: the crop is taken from the face's own
landmarks (face-api's 68-point box grown by 20 %), which follows the face wherever the decoder put it
and at whatever resolution, where a fixed box in the aligned frame would not.

The nets run on the device they were moved to; arrays come back on the CPU as float64. A face whose
landmarks are not finite, or whose landmark box misses the image, gets NaN rather than a number
computed on a crop that holds no face.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from facexplain.attributes.catalog import AttributeSpec, FaceBatch, UnknownAttributeError
from facexplain.attributes.crops import landmark_boxes
from facexplain.attributes.expression import (
    EXPRESSIONS,
    FaceExpressionNet,
    expression_inputs,
    expression_probabilities,
)
from facexplain.attributes.expression import FACEAPI_MODEL as EXPRESSION_MODEL
from facexplain.attributes.pose import head_pose
from facexplain.models.age_gender import FACEAPI_MODEL as AGE_GENDER_MODEL
from facexplain.models.age_gender import GENDERS, AgeGenderNet

AGE_GENDER_KEY = f"face-api/{AGE_GENDER_MODEL}"
EXPRESSION_KEY = f"face-api/{EXPRESSION_MODEL}"
POSE_ANGLES = ("yaw", "pitch", "roll")


def _check_names(specs: Sequence[AttributeSpec], names: Sequence[str]) -> list[str]:
    """Reject names this estimator does not produce, so a mis-routed request fails instead of going missing."""
    known = [s.name for s in specs]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UnknownAttributeError(
            f"unknown attribute(s) {', '.join(map(repr, unknown))} for this estimator; known: {', '.join(known)}"
        )
    return [n for n in known if n in set(names)]


def croppable(landmarks: torch.Tensor, size: int) -> torch.Tensor:
    """(N,) bool: the face's landmarks are finite and their grown box leaves at least a pixel of the image.

    face-api's crop clips the box to the image and floors its size; a box that clips to nothing has no
    face to read (and the crop would raise), so those faces are reported as not estimable instead.
    """
    lm = landmarks.detach().to("cpu", torch.float32)
    ok = torch.isfinite(lm).flatten(1).all(dim=1)
    boxes = landmark_boxes(torch.where(torch.isfinite(lm), lm, torch.zeros_like(lm)))
    start = boxes[:, :2].clamp(min=0.0)
    extent = torch.minimum(boxes[:, 2:] - start, size - start)
    return ok & (extent.floor() > 0).all(dim=1)


def _net_device(net: torch.nn.Module) -> torch.device:
    return next(net.parameters()).device


@torch.no_grad()
def age_gender(
    net: AgeGenderNet, images: torch.Tensor, landmarks: torch.Tensor | None = None, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, S, S) chips or decoded faces -> (age in years (N,), gender probabilities (N, 2)), float32 CPU.

    The crop is the expression net's (:func:`~facexplain.attributes.expression.expression_inputs`):
    face-api runs both nets on the same aligned face box, so they share it here too. Gender columns
    are face-api's: male, female.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = _net_device(net)
    ages, genders = [], []
    for s in range(0, images.shape[0], batch_size):
        lm = None if landmarks is None else landmarks[s : s + batch_size]
        age, gender = net(expression_inputs(images[s : s + batch_size].to(device), lm))
        ages.append(age.float().cpu())
        genders.append(gender.float().cpu())
    if not ages:
        return torch.zeros(0), torch.zeros(0, len(GENDERS))
    return torch.cat(ages), torch.cat(genders)


def _take(faces: FaceBatch, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The faces at ``idx`` (a CPU index), wherever the batch's tensors live."""
    return faces.images[idx.to(faces.images.device)], faces.landmarks[idx.to(faces.landmarks.device)]


def _nan_rows(n: int, dim: int) -> np.ndarray:
    return np.full((n, dim), math.nan, dtype=np.float64)


class AgeGenderEstimator:
    """Apparent age (years) and the probability of "male" from face-api's ``age_gender_model``.

    Gender is one component, ``p_male``: the two softmax columns sum to 1, so the second carries no
    information and would only double-count gender in a mutual-information table.
    """

    def __init__(self, net: AgeGenderNet, batch_size: int = 64) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.net = net
        self.batch_size = batch_size
        self._specs = (
            AttributeSpec(
                name="age",
                group="age",
                unit="years",
                components=("age",),
                description="Apparent age regressed by face-api's AgeGenderNet on the landmark-box face crop.",
                estimator=AGE_GENDER_KEY,
            ),
            AttributeSpec(
                name="gender",
                group="gender",
                unit="probability",
                components=("p_male",),
                description="Probability that face-api's AgeGenderNet calls the face male (1 - p_female).",
                estimator=AGE_GENDER_KEY,
            ),
        )

    @classmethod
    def default(cls, device: str | torch.device = "cpu", model_dir: Path | None = None) -> AgeGenderEstimator:
        """With the npm package's ``age_gender_model`` weights, frozen, on ``device``."""
        return cls(AgeGenderNet.from_faceapi(model_dir).to(torch.device(device)))

    @property
    def specs(self) -> tuple[AttributeSpec, ...]:
        return self._specs

    def estimate(self, faces: FaceBatch, names: Sequence[str]) -> dict[str, np.ndarray]:
        wanted = _check_names(self._specs, names)
        n = len(faces)
        age_out, male_out = _nan_rows(n, 1), _nan_rows(n, 1)
        ok = croppable(faces.landmarks, faces.size)
        if bool(ok.any()):
            idx = ok.nonzero().flatten()
            age, gender = age_gender(self.net, *_take(faces, idx), self.batch_size)
            age_out[idx.numpy(), 0] = age.double().numpy()
            male_out[idx.numpy(), 0] = gender[:, GENDERS.index("male")].double().numpy()
        values = {"age": age_out, "gender": male_out}
        return {name: values[name] for name in wanted}


class ExpressionEstimator:
    """Seven-way expression probabilities from face-api's ``face_expression_model`` (columns :data:`EXPRESSIONS`).

    All seven are kept: unlike gender's two columns they are not one number, and the importance table
    reads the whole distribution as one attribute.
    """

    def __init__(self, net: FaceExpressionNet, batch_size: int = 64) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.net = net
        self.batch_size = batch_size
        self._specs = (
            AttributeSpec(
                name="expression",
                group="expression",
                unit="probability",
                components=EXPRESSIONS,
                description="Softmax of face-api's FaceExpressionNet over its seven expressions, landmark-box crop.",
                estimator=EXPRESSION_KEY,
            ),
        )

    @classmethod
    def default(cls, device: str | torch.device = "cpu", model_dir: Path | None = None) -> ExpressionEstimator:
        """With the npm package's ``face_expression_model`` weights, frozen, on ``device``."""
        return cls(FaceExpressionNet.from_faceapi(model_dir).to(torch.device(device)))

    @property
    def specs(self) -> tuple[AttributeSpec, ...]:
        return self._specs

    def estimate(self, faces: FaceBatch, names: Sequence[str]) -> dict[str, np.ndarray]:
        wanted = _check_names(self._specs, names)
        out = _nan_rows(len(faces), len(EXPRESSIONS))
        ok = croppable(faces.landmarks, faces.size)
        if bool(ok.any()):
            idx = ok.nonzero().flatten()
            probs = expression_probabilities(self.net, *_take(faces, idx), self.batch_size)
            out[idx.numpy()] = probs.double().numpy()
        return {name: out for name in wanted}


class PoseEstimator:
    """Yaw, pitch and roll (degrees) of a perspective fit of the landmarks to a generic 3-D head.

    No net of its own: it reads the batch's landmarks (found by the catalogue's landmark net), so its
    specs name no estimator model. The camera is set from the image side, which makes the angles the
    same for a face at 150 px and its 64-px version. Sign conventions are
    :func:`~facexplain.attributes.pose.head_pose`'s: positive yaw turns the face towards the image's
    right, so a mirrored face has the opposite yaw and roll.
    """

    def __init__(self) -> None:
        descriptions = {
            "yaw": "Left-right head turn; positive towards the image's right (the subject's left).",
            "pitch": "Up-down head tilt; positive chin up. Carries a face-shape-dependent offset.",
            "roll": "In-plane head tilt; positive clockwise as displayed.",
        }
        self._specs = tuple(
            AttributeSpec(name=a, group="pose", unit="deg", components=(a,), description=descriptions[a])
            for a in POSE_ANGLES
        )

    @classmethod
    def default(cls, device: str | torch.device = "cpu", model_dir: Path | None = None) -> PoseEstimator:
        """Same signature as the other estimators' so a catalogue builds them alike; both are unused."""
        del device, model_dir
        return cls()

    @property
    def specs(self) -> tuple[AttributeSpec, ...]:
        return self._specs

    def estimate(self, faces: FaceBatch, names: Sequence[str]) -> dict[str, np.ndarray]:
        wanted = _check_names(self._specs, names)
        angles = head_pose(faces.landmarks, faces.size).numpy().astype(np.float64).reshape(len(faces), 3)
        return {name: angles[:, [POSE_ANGLES.index(name)]].copy() for name in wanted}
