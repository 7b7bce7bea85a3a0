"""The third FR model: the 512-d MobileFaceNet of ``faceplugin-face-recognition-js@0.0.1`` (npm, MIT).

Why a third model: HSE FaceRes (:mod:`facexplain.models.hse_faceres`) is not independent enough of the
default dlib ResNet to judge it (their impostor scores correlate 0.55: they agree on which *people* look
alike). This network, an ArcFace-style MobileFaceNet (50 convolutions, PReLU, a global depthwise 7x7
and a linear 512-d layer, batch norms folded; 1.19 M weights), comes from another family, training set
and loss, and its impostor scores correlate about 0.3 with the default model's (``bench/bench_second_model.py
--model faceplugin``).

The package ships it as ``model/fr_feature.onnx`` and runs it with onnxruntime-web; facexplain replays the
ONNX graph in torch (:class:`facexplain.models.onnx_graph.OnnxGraphNet`, differentiable, held to
onnxruntime's own outputs by ``tests/unit/facexplain/models/test_faceplugin.py``) and registers it through
the bring-your-own-model path an auditor would use (``register-embedder --program model.onnx``): the
published file byte for byte with its input contract (:data:`CONTRACT`), on the default front end with
InsightFace's five-point alignment (``facexplain.artifacts.embedder.third_fr_pipeline``). The package's own
pipeline (its ``lib/fr_feature.js``): chips warped onto InsightFace's 112x112 reference points, RGB,
``(x - 127) / 128``, raw cosine between templates; the same here, except that the warp is a five-point
similarity rather than the package's three-point affine.

The publisher does not say what data trained it; the weights are used as published, under the package's
MIT licence (``LICENSE.faceplugin`` beside the file).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from facexplain.models.onnx_graph import OnnxGraphNet
from facexplain.models.program import InputContract
from facexplain.paths import FACEPLUGIN_VERSION, faceplugin_dir

MODEL_FILE = "fr_feature.onnx"
MODEL_SHA256 = "87aacdfe57510db2af90c0251df680e8eec88f122ee94712121d09bcaaaf3581"
SOURCE = f"npm faceplugin-face-recognition-js@{FACEPLUGIN_VERSION}, model/{MODEL_FILE}"
CHIP_SIZE = 112
TEMPLATE_DIM = 512
CROP_SCALE = 1.0  # InsightFace's reference points as they are, as the package aligns
# The output of the 28x28 stage's last residual block (64 channels at 112 px): a mid-level map with spatial
# layout, the depth HSE's 28x28 stage and the dlib ResNet's conv64_3 play for the perceptual loss.
PERCEPTUAL_NODE = "395"
# facexplain.models.program.InputContract fields: chips RGB in [0, 255] -> (x - 127) / 128
CONTRACT: dict[str, Any] = {
    "chip_size": CHIP_SIZE,
    "channels": "RGB",
    "value_range": (0.0, 255.0),
    "mean": (127.0, 127.0, 127.0),
    "std": (128.0, 128.0, 128.0),
}


def normalise(chips: torch.Tensor) -> torch.Tensor:
    """Chips RGB in [0, 255] -> the graph's input, by :data:`CONTRACT` (what the registered program applies)."""
    return InputContract(**CONTRACT).apply(chips)


def model_path(model_dir: Path | None = None) -> Path:
    """The installed ONNX file, its sha256 checked (a different file would silently be another model)."""
    path = (model_dir or faceplugin_dir()) / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: run `make setup` (scripts/fetch_faceplugin.sh unpacks it from npm) "
            "or point FACEXPLAIN_FACEPLUGIN_DIR at a folder holding fr_feature.onnx"
        )
    digest = _sha256(path)
    if digest != MODEL_SHA256:
        raise ValueError(f"{path} has sha256 {digest}, not the pinned {MODEL_SHA256} of {SOURCE}")
    return path


def onnx_net(model_dir: Path | None = None) -> OnnxGraphNet:
    """The graph replayed in torch; input ``(N, 3, 112, 112)`` already normalised, output ``(N, 512)``."""
    net = OnnxGraphNet.from_file(model_path(model_dir))
    return net.eval().requires_grad_(False)


class FacepluginFeatures(nn.Module):
    """(N, 3, H, W) RGB in [0, 255] -> one inner feature map of the MobileFaceNet (default
    :data:`PERCEPTUAL_NODE`: (N, 64, 28, 28) at 112 px), normalised as the template is; differentiable.

    The black-box perceptual network of decoder training (``--perceptual faceplugin``): the replay stops at
    ``node``, so the rest of the network never runs."""

    def __init__(self, graph: OnnxGraphNet) -> None:
        super().__init__()
        self.graph = graph

    @classmethod
    def from_package(cls, node: str = PERCEPTUAL_NODE, model_dir: Path | None = None) -> FacepluginFeatures:
        graph = OnnxGraphNet.from_file(model_path(model_dir), output=node)
        return cls(graph.eval().requires_grad_(False)).eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.graph(normalise(images))  # type: ignore[no-any-return]


def is_this_model(net: Any) -> bool:
    """Whether a recognition net runs this very file (a perceptual loss on it is then no black box)."""
    source = getattr(net, "source", None)
    return source is not None and Path(source).is_file() and _sha256(Path(source)) == MODEL_SHA256


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
