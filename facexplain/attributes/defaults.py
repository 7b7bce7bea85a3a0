"""The default attribute catalogue: every estimator facexplain ships, in the API's group order.

Groups come in the order of ``AttributeValue.group`` (geometry, pose, colour, age, gender, expression,
accessory, texture); that is the order of every table and response. The landmarks every estimator
reads are found once per batch by face-api's 68-point net run on the aligned pixels themselves
(:func:`facexplain.attributes.pose.image_landmarks`), so an original chip and a decoded face are
measured the same way.

Accessory attributes come from linear probes that exist only as a registered bundle (kind
``attribute_probes``); pass the loaded probe set as ``probes`` (an ``AccessoryEstimator``), or ``None``
for a catalogue without accessories.
"""

from __future__ import annotations

from typing import Any

import torch

from facexplain.attributes.catalog import AttributeCatalog, Estimator
from facexplain.attributes.colour import ColourEstimator
from facexplain.attributes.face_nets import AgeGenderEstimator, ExpressionEstimator, PoseEstimator
from facexplain.attributes.geometry import GeometryEstimator
from facexplain.attributes.pose import image_landmarks
from facexplain.attributes.texture import TextureEstimator
from facexplain.models.landmarks import FaceLandmark68Net


class ChipLandmarker:
    """(N, 3, S, S) aligned faces in [0, 1] -> (N, 68, 2) landmarks in their pixels (the catalogue's landmarker)."""

    def __init__(self, device: str | torch.device = "cpu", net: FaceLandmark68Net | None = None) -> None:
        self.net = (net or FaceLandmark68Net.from_faceapi()).to(torch.device(device)).eval()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return image_landmarks(self.net, images)


def default_estimators(device: str | torch.device = "cpu", probes: Any = None) -> list[Estimator]:
    """The estimators in group order; ``probes`` (an accessory estimator) is left out when ``None``."""
    dev = str(device)
    age_gender = AgeGenderEstimator.default(dev)
    estimators: list[Any] = [
        GeometryEstimator(),
        PoseEstimator.default(dev),
        ColourEstimator(),
        age_gender,
        ExpressionEstimator.default(dev),
    ]
    if probes is not None:
        estimators.append(probes)
    estimators.append(TextureEstimator())
    return estimators


def default_catalog(device: str | torch.device = "cpu", probes: Any = None) -> AttributeCatalog:
    """The full catalogue (see the module docstring), landmarks by face-api's net on ``device``."""
    return AttributeCatalog(default_estimators(device, probes), landmarker=ChipLandmarker(device))
