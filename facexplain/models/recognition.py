"""PyTorch port of face-api's ``face_recognition_model``: dlib's 128-d ResNet face descriptor.

face-api ships dlib's ``dlib_face_recognition_resnet_model_v1`` converted to tfjs with its batch
norms already folded into per-channel ``scale`` layers (dlib's ``affine``) and uint8-quantised
weights. We rebuild the network in PyTorch so explainability methods can take gradients of the
template with respect to the input pixels; face-api itself is only a weight source.

Two details decide whether the port agrees with dlib rather than merely running:

* every stride-2 convolution and pool is ``'valid'`` (dlib pads only stride-1 layers), so no
  tf-style asymmetric ``'same'`` padding is involved here;
* in a down-sampling residual the 3x3 stride-2 branch yields one row/column fewer than the 2x2
  average-pooled shortcut at 8x8 and 4x4 inputs; dlib's ``add_prev`` then adds the two tensors
  over their overlap and keeps the larger size (zero fill), i.e. pads bottom/right.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from facexplain.models.tfops import hwio_to_oihw
from facexplain.models.weights import load_faceapi_weights

MEAN_RGB = (122.782, 117.001, 104.298)

# dlib's ``input_rgb_image`` divides by 256, face-api by 255. Fed the same dlib chips, /255 agrees
# with dlib's own descriptors (marginally) better, so it is the default; see ``FaceRecognitionNet``.
DLIB_INPUT_DIVISOR = 256.0
FACEAPI_INPUT_DIVISOR = 255.0

# (tfjs name, in channels, out channels, down-sampling?) in network order.
_RESIDUALS: tuple[tuple[str, int, int, bool], ...] = (
    ("conv32_1", 32, 32, False),
    ("conv32_2", 32, 32, False),
    ("conv32_3", 32, 32, False),
    ("conv64_down", 32, 64, True),
    ("conv64_1", 64, 64, False),
    ("conv64_2", 64, 64, False),
    ("conv64_3", 64, 64, False),
    ("conv128_down", 64, 128, True),
    ("conv128_1", 128, 128, False),
    ("conv128_2", 128, 128, False),
    ("conv256_down", 128, 256, True),
    ("conv256_1", 256, 256, False),
    ("conv256_2", 256, 256, False),
    ("conv256_down_out", 256, 256, True),
)


class _ConvAffine(nn.Module):
    """dlib ``affine<con<...>>``: conv + bias followed by a per-channel scale/shift, folded into one conv.

    Folding at load time keeps the forward pass a single conv per layer (fast, and the gradient
    path is what a plain conv gives) without changing the function computed.
    """

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)

    @torch.no_grad()
    def load_faceapi(self, weights: dict[str, torch.Tensor], prefix: str) -> None:
        scale = weights[f"{prefix}/scale/weights"]
        shift = weights[f"{prefix}/scale/biases"]
        filters = hwio_to_oihw(weights[f"{prefix}/conv/filters"])
        bias = self.conv.bias
        assert bias is not None
        self.conv.weight.copy_(filters * scale.view(-1, 1, 1, 1))
        bias.copy_(weights[f"{prefix}/conv/bias"] * scale + shift)


class _Residual(nn.Module):
    """dlib's ``residual`` / ``residual_down`` block (two 3x3 conv+affine layers and a shortcut)."""

    def __init__(self, c_in: int, c_out: int, down: bool) -> None:
        super().__init__()
        self.down = down
        self.c_out = c_out
        self.conv1 = _ConvAffine(c_in, c_out, 3, stride=2 if down else 1, padding=0 if down else 1)
        self.conv2 = _ConvAffine(c_out, c_out, 3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(F.relu(self.conv1(x)))
        shortcut = F.avg_pool2d(x, 2, 2) if self.down else x
        return F.relu(_add_prev(out, shortcut))

    def load_faceapi(self, weights: dict[str, torch.Tensor], prefix: str) -> None:
        self.conv1.load_faceapi(weights, f"{prefix}/conv1")
        self.conv2.load_faceapi(weights, f"{prefix}/conv2")


def _add_prev(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's ``add_prev``: sum over the overlap, output as large as the larger input (zero fill)."""
    c = max(a.shape[1], b.shape[1])
    h = max(a.shape[2], b.shape[2])
    w = max(a.shape[3], b.shape[3])

    def grow(t: torch.Tensor) -> torch.Tensor:
        pads = (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1])
        return F.pad(t, pads) if any(pads) else t

    return grow(a) + grow(b)


class FaceRecognitionNet(nn.Module):
    """dlib's ResNet-29 face descriptor: (B, 3, 150, 150) RGB in [0, 255] -> (B, 128) raw templates.

    Input must be a chip aligned the way ``dlib.get_face_chip(..., size=150, padding=0.25)`` aligns
    it (``facexplain.faces.align.align_faces`` reproduces that differentiably). Templates are not
    normalised, as dlib's are not; compare them with euclidean distance (dlib's 0.6 threshold) or
    cosine similarity.

    Input scaling: dlib subtracts the mean RGB and divides by 256, face-api divides by 255. Measured
    on dlib's own chips of 40 ORL + 60 CelebA faces against dlib's descriptors (mean cosine / mean
    euclidean distance): /255 gives ORL 0.999654 / 0.03734 and CelebA 0.999671 / 0.03834, /256 gives
    ORL 0.999653 / 0.03738 and CelebA 0.999671 / 0.03837. /255 wins by a hair, so it is the default
    (``FACEAPI_INPUT_DIVISOR``), but the gap is noise-level: distances keep shrinking slowly below
    255 (254: 0.03733), i.e. it reflects the bias of face-api's uint8 weight quantisation (which
    also caps agreement at ~0.9997 cosine), not evidence for either convention. Against face-api
    itself (tfjs cpu backend under node, same chips) templates agree to 4e-6 per component.

    Weights are frozen (``requires_grad=False``) by ``from_faceapi``; gradients still flow to the input.
    """

    mean_rgb: torch.Tensor

    def __init__(self, input_divisor: float = FACEAPI_INPUT_DIVISOR) -> None:
        super().__init__()
        self.input_divisor = input_divisor
        self.register_buffer("mean_rgb", torch.tensor(MEAN_RGB).view(1, 3, 1, 1), persistent=False)
        self.conv32_down = _ConvAffine(3, 32, 7, stride=2, padding=0)
        self.residuals = nn.ModuleDict({name: _Residual(ci, co, down) for name, ci, co, down in _RESIDUALS})
        self.fc = nn.Linear(256, 128, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected (B, 3, 150, 150) RGB chips, got {tuple(x.shape)}")
        out = (x - self.mean_rgb) / self.input_divisor
        out = F.relu(self.conv32_down(out))
        out = F.max_pool2d(out, 3, 2)
        for block in self.residuals.values():
            out = block(out)
        return self.fc(out.mean(dim=(2, 3)))

    @torch.no_grad()
    def load_faceapi(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy face-api's tfjs tensors (as ``load_faceapi_weights`` returns them) into this module."""
        self.conv32_down.load_faceapi(weights, "conv32_down")
        for name, block in self.residuals.items():
            if isinstance(block, _Residual):
                block.load_faceapi(weights, name)
        self.fc.weight.copy_(weights["fc"].t())

    @classmethod
    def from_faceapi(
        cls, model_dir: Path | None = None, input_divisor: float = FACEAPI_INPUT_DIVISOR
    ) -> FaceRecognitionNet:
        """Build the network from ``face_recognition_model`` weights, frozen and in eval mode."""
        net = cls(input_divisor=input_divisor)
        net.load_faceapi(load_faceapi_weights("face_recognition_model", model_dir))
        net.requires_grad_(False)
        return net.eval()
