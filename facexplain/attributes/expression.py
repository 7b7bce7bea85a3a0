"""Seven-way facial expression from face-api's ``face_expression_model``, ported to PyTorch.

An *independent* estimator for what a template encodes: it looks at pixels only (an aligned chip or a
decoded face), never at a template, so moving a template along a "smile" direction and measuring
``happy`` on the decoded face tests the direction with a model that had no part in finding it.

The network is face-api's ``FaceExpressionNet``: the same dense-block ``FaceFeatureExtractor`` as the
68-point landmark net (:mod:`facexplain.models.feature_extractor`; its own weights, same tensor names)
followed by one dense layer to 7 logits, and a softmax. Classes, in face-api's order
(``FACE_EXPRESSION_LABELS``): neutral, happy, sad, angry, fearful, disgusted, surprised. Its input is
face-api's 112-px crop of the face (see :mod:`facexplain.attributes.crops`); weights come from the npm
package (``face_expression_model-weights_manifest.json``), like every default model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from facexplain.attributes.crops import (
    CHIP_FACE_BOX,
    crop_faces,
    fixed_boxes,
    landmark_boxes,
    to_255,
)
from facexplain.models.feature_extractor import FEATURE_CHANNELS, FaceFeatureExtractor
from facexplain.models.weights import load_faceapi_weights

EXPRESSIONS = ("neutral", "happy", "sad", "angry", "fearful", "disgusted", "surprised")
FACEAPI_MODEL = "face_expression_model"


class FaceExpressionNet(nn.Module):
    """(B, 3, 112, 112) RGB in [0, 255] -> (B, 7) logits; :meth:`probabilities` applies the softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.features = FaceFeatureExtractor()
        self.fc = nn.Linear(FEATURE_CHANNELS, len(EXPRESSIONS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """face-api's ``predictExpressions``: softmax over the 7 logits."""
        return torch.softmax(self(x), dim=-1)

    @torch.no_grad()
    def load_faceapi(self, weights: dict[str, torch.Tensor], prefix: str = "") -> None:
        base = f"{prefix.rstrip('/')}/" if prefix else ""
        self.features.load_faceapi(weights, prefix)
        self.fc.weight.copy_(weights[f"{base}fc/weights"].t())  # tfjs dense: x @ W + b, W is [in, out]
        self.fc.bias.copy_(weights[f"{base}fc/bias"])

    @classmethod
    def from_faceapi(cls, model_dir: Path | None = None) -> FaceExpressionNet:
        """The network with ``face_expression_model`` weights, frozen and in eval mode."""
        net = cls()
        net.load_faceapi(load_faceapi_weights(FACEAPI_MODEL, model_dir))
        net.requires_grad_(False)
        return net.eval()


def expression_inputs(images: torch.Tensor, landmarks: torch.Tensor | None = None) -> torch.Tensor:
    """Aligned chips or decoded faces (N, 3, S, S), [0, 1] or [0, 255] -> the net's (N, 3, 112, 112) input.

    With ``landmarks`` ((N, 68, 2) in the images' pixel coordinates) each face is cropped as face-api
    crops it (68-point box grown by 20 %). Without, the fixed box of the mean aligned face
    (:data:`~facexplain.attributes.crops.CHIP_FACE_BOX`, scaled to S) is used: what a decoded face needs.
    """
    x = to_255(images)
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"expected square images, got {tuple(x.shape)}")
    if landmarks is None:
        boxes = fixed_boxes(x.shape[0], x.shape[-1], CHIP_FACE_BOX)
    else:
        if landmarks.shape != (x.shape[0], 68, 2):
            raise ValueError(f"expected ({x.shape[0]}, 68, 2) landmarks, got {tuple(landmarks.shape)}")
        boxes = landmark_boxes(landmarks.to("cpu", torch.float32))
    return crop_faces(x, boxes.to(x.device))


@torch.no_grad()
def expression_logits(
    net: FaceExpressionNet,
    images: torch.Tensor,
    landmarks: torch.Tensor | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """(N, 3, S, S) chips or decoded faces -> (N, 7) float32 logits on the CPU, columns as :data:`EXPRESSIONS`.

    Runs on the net's device in batches of ``batch_size``; see :func:`expression_inputs` for the crop.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = next(net.parameters()).device
    out = []
    for s in range(0, images.shape[0], batch_size):
        lm = None if landmarks is None else landmarks[s : s + batch_size]
        inp = expression_inputs(images[s : s + batch_size].to(device), lm)
        out.append(net(inp).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, len(EXPRESSIONS))


def expression_probabilities(
    net: FaceExpressionNet,
    images: torch.Tensor,
    landmarks: torch.Tensor | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """(N, 3, S, S) chips or decoded faces -> (N, 7) float32 probabilities (face-api's softmax) on the CPU."""
    return torch.softmax(expression_logits(net, images, landmarks, batch_size), dim=-1)


def happy_probability(
    net: FaceExpressionNet, images: torch.Tensor, landmarks: torch.Tensor | None = None
) -> torch.Tensor:
    """(N,) probability of ``happy``: the smile measure the estimators report."""
    return expression_probabilities(net, images, landmarks)[:, EXPRESSIONS.index("happy")]


def happy_log_odds(net: FaceExpressionNet, images: torch.Tensor, landmarks: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) float64 log-odds of ``happy`` against the six other expressions: ``log P(happy) / (1 - P(happy))``.

    Computed from the logits (``z_happy - logsumexp(z_others)``), not from the probability, because a
    float32 softmax rounds to exactly 0 or 1 well before the net stops getting surer: a face moved along a
    smile direction can go from P = 0.002 to 0.0075 (odds x 3.3) or from 0.9999 to 1.0 and the
    probability scale shows almost nothing. The log-odds is the net's own evidence scale, on which equal
    steps mean the same near 0.5 as near saturation, and it is a strictly increasing function of
    P(happy), so whether a sequence rises or falls is the same on both scales.
    """
    z = expression_logits(net, images, landmarks).double()
    k = EXPRESSIONS.index("happy")
    others = torch.cat([z[:, :k], z[:, k + 1 :]], dim=1)
    return z[:, k] - torch.logsumexp(others, dim=1)
