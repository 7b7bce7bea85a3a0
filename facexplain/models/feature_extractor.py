"""face-api's dense-block ``FaceFeatureExtractor``: the 112x112 backbone behind its 68-point landmark
and expression heads.

Kept separate from any head so each face-api model that embeds it (``face_landmark_68_model``,
``face_expression_model``) loads the same module from its own weight file; ``prefix`` covers weight
maps where the backbone's tensors sit under a name space. (In @vladmandic/face-api 1.7.15 the
``age_gender_model`` is an Xception-style net with its own tensors, not this backbone.)

Every stride-2 layer here is a tfjs ``'same'`` conv on an even input, so it goes through
``same_pad``: tf pads such inputs bottom/right only, and PyTorch's symmetric padding would shift
every feature map by half a pixel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from facexplain.models.tfops import depthwise_hwcm_to_torch, hwio_to_oihw, same_pad

MEAN_RGB = (122.782, 117.001, 104.298)
INPUT_SIZE = 112
FEATURE_CHANNELS = 256


class _Conv(nn.Module):
    """tfjs ``conv2d(..., 'same') + bias``."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=0, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(same_pad(x, 3, self.stride))

    @torch.no_grad()
    def load_faceapi(self, weights: dict[str, torch.Tensor], prefix: str) -> None:
        bias = self.conv.bias
        assert bias is not None
        self.conv.weight.copy_(hwio_to_oihw(weights[f"{prefix}/filters"]))
        bias.copy_(weights[f"{prefix}/bias"])


class _SeparableConv(nn.Module):
    """tfjs ``separableConv2d(..., 'same') + bias``: 3x3 depthwise, then 1x1 pointwise."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.depthwise = nn.Conv2d(c_in, c_in, 3, stride=stride, padding=0, groups=c_in, bias=False)
        self.pointwise = nn.Conv2d(c_in, c_out, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(same_pad(x, 3, self.stride)))

    @torch.no_grad()
    def load_faceapi(self, weights: dict[str, torch.Tensor], prefix: str) -> None:
        self.depthwise.weight.copy_(depthwise_hwcm_to_torch(weights[f"{prefix}/depthwise_filter"]))
        bias = self.pointwise.bias
        assert bias is not None
        self.pointwise.weight.copy_(hwio_to_oihw(weights[f"{prefix}/pointwise_filter"]))
        bias.copy_(weights[f"{prefix}/bias"])


class DenseBlock4(nn.Module):
    """face-api's ``denseBlock4``: a stride-2 entry conv and three separable convs, each fed the
    ReLU of the sum of all earlier outputs (DenseNet-style, with sums instead of concatenation)."""

    def __init__(self, c_in: int, c_out: int, first: bool) -> None:
        super().__init__()
        self.conv0: nn.Module = _Conv(c_in, c_out, 2) if first else _SeparableConv(c_in, c_out, 2)
        self.conv1 = _SeparableConv(c_out, c_out, 1)
        self.conv2 = _SeparableConv(c_out, c_out, 1)
        self.conv3 = _SeparableConv(c_out, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out1 = F.relu(self.conv0(x))
        out2 = self.conv1(out1)
        out3 = self.conv2(F.relu(out1 + out2))
        out4 = self.conv3(F.relu(out1 + out2 + out3))
        return F.relu(out1 + out2 + out3 + out4)

    def load_faceapi(self, weights: dict[str, torch.Tensor], prefix: str) -> None:
        for name in ("conv0", "conv1", "conv2", "conv3"):
            layer = getattr(self, name)
            layer.load_faceapi(weights, f"{prefix}/{name}")


class FaceFeatureExtractor(nn.Module):
    """(B, 3, 112, 112) RGB in [0, 255] -> (B, 256) bottleneck features (face-api's ``FaceFeatureExtractor``).

    Normalisation (mean RGB subtraction, /255 as face-api does) happens inside, so heads and
    attribution methods all see raw pixel space.
    """

    mean_rgb: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean_rgb", torch.tensor(MEAN_RGB).view(1, 3, 1, 1), persistent=False)
        self.dense0 = DenseBlock4(3, 32, first=True)
        self.dense1 = DenseBlock4(32, 64, first=False)
        self.dense2 = DenseBlock4(64, 128, first=False)
        self.dense3 = DenseBlock4(128, FEATURE_CHANNELS, first=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != (3, INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"expected (B, 3, {INPUT_SIZE}, {INPUT_SIZE}) RGB input, got {tuple(x.shape)}")
        out = (x - self.mean_rgb) / 255.0
        out = self.dense3(self.dense2(self.dense1(self.dense0(out))))
        # tfjs avgPool(7, stride 2, 'valid') over the final 7x7 map: one value per channel.
        return F.avg_pool2d(out, 7, 2).flatten(1)

    def load_faceapi(self, weights: dict[str, torch.Tensor], prefix: str = "") -> None:
        """Load the ``dense0..dense3`` tensors of a face-api weight map; ``prefix`` is prepended
        (with a ``/``) when the backbone's names are namespaced in that map."""
        base = f"{prefix.rstrip('/')}/" if prefix else ""
        for name in ("dense0", "dense1", "dense2", "dense3"):
            block = getattr(self, name)
            block.load_faceapi(weights, f"{base}{name}")
