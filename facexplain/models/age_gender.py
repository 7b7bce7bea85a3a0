"""face-api's ``age_gender_model`` (``AgeGenderNet``) in PyTorch: apparent age and gender of a face.

Attribute recovery (issue 6) needs age and gender measured by a model that never saw a template, on
original chips and decoded faces alike; face-api ships one with the rest of its weights, so the
project's default models stay one npm package.

Architecture (face-api ``src/ageGenderNet`` and ``src/xception``, @vladmandic/face-api 1.7.15):
a *TinyXception* backbone with two middle blocks,

* entry flow: 3x3 stride-2 conv (3 -> 32) + ReLU, then reduction blocks 32 -> 64 (its input not
  ReLU'd) and 64 -> 128;
* middle flow: two residual blocks of three ReLU + separable convs (128 channels);
* exit flow: a reduction block 128 -> 256 and a separable conv 256 -> 512 + ReLU;

where a *reduction block* is ``[ReLU] -> sepconv -> ReLU -> sepconv -> maxpool 3x3/2 'same'`` plus a
1x1 stride-2 "expansion" conv of the block's input. The 7x7x512 map is average-pooled (7x7, 'valid')
to 512 features, which feed two dense layers: ``fc/age`` (one value, the age in years, no
activation) and ``fc/gender`` (two logits, softmaxed). Class order is face-api's: column 0 is
**male**, column 1 **female** (``predictAgeAndGender`` reads ``probMale = gender[0]``).

Input: (N, 3, 112, 112) RGB in [0, 255], the 112-px crop face-api makes of a face box (the same crop
as the expression net, see :mod:`facexplain.attributes.crops`); the net subtracts face-api's mean RGB
(122.782, 117.001, 104.298) and divides by 255 itself, so attributions see raw pixels. Every weight
name in ``age_gender_model-weights_manifest.json`` is used, and no other.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from facexplain.models.feature_extractor import INPUT_SIZE, MEAN_RGB
from facexplain.models.tfops import depthwise_hwcm_to_torch, hwio_to_oihw, same_pad
from facexplain.models.weights import load_faceapi_weights

FACEAPI_MODEL = "age_gender_model"
GENDERS = ("male", "female")  # face-api's column order of the gender softmax
NUM_MAIN_BLOCKS = 2  # face-api builds AgeGenderNet with TinyXception(2)
FEATURE_CHANNELS = 512


def _tf_max_pool_same(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """tf ``maxPool(..., 'same')``: padded cells never win, and even inputs pad bottom/right only."""
    h, w = x.shape[-2:]
    pad_h = max((-(-h // stride) - 1) * stride + kernel - h, 0)
    pad_w = max((-(-w // stride) - 1) * stride + kernel - w, 0)
    if pad_h or pad_w:
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=float("-inf"))
    return F.max_pool2d(x, kernel, stride)


class _Conv(nn.Module):
    """tfjs ``conv2d(..., 'same') + bias`` with a square ``kernel``."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=0, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(same_pad(x, self.kernel, self.stride))

    @torch.no_grad()
    def load_faceapi(self, weights: dict[str, torch.Tensor], prefix: str, used: set[str]) -> None:
        bias = self.conv.bias
        assert bias is not None
        self.conv.weight.copy_(hwio_to_oihw(_take(weights, f"{prefix}/filters", used)))
        bias.copy_(_take(weights, f"{prefix}/bias", used))


class _SeparableConv(nn.Module):
    """tfjs ``separableConv2d(..., stride 1, 'same') + bias``: 3x3 depthwise then 1x1 pointwise."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in, bias=False)
        self.pointwise = nn.Conv2d(c_in, c_out, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))

    @torch.no_grad()
    def load_faceapi(self, weights: dict[str, torch.Tensor], prefix: str, used: set[str]) -> None:
        bias = self.pointwise.bias
        assert bias is not None
        self.depthwise.weight.copy_(depthwise_hwcm_to_torch(_take(weights, f"{prefix}/depthwise_filter", used)))
        self.pointwise.weight.copy_(hwio_to_oihw(_take(weights, f"{prefix}/pointwise_filter", used)))
        bias.copy_(_take(weights, f"{prefix}/bias", used))


class ReductionBlock(nn.Module):
    """Halves the resolution: two separable convs and a max pool, plus a strided 1x1 shortcut."""

    def __init__(self, c_in: int, c_out: int, activate_input: bool = True) -> None:
        super().__init__()
        self.activate_input = activate_input
        self.separable_conv0 = _SeparableConv(c_in, c_out)
        self.separable_conv1 = _SeparableConv(c_out, c_out)
        self.expansion_conv = _Conv(c_in, c_out, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(x) if self.activate_input else x
        out = self.separable_conv1(F.relu(self.separable_conv0(out)))
        return _tf_max_pool_same(out, 3, 2) + self.expansion_conv(x)

    def load_faceapi(self, weights: dict[str, torch.Tensor], prefix: str, used: set[str]) -> None:
        for name in ("separable_conv0", "separable_conv1", "expansion_conv"):
            getattr(self, name).load_faceapi(weights, f"{prefix}/{name}", used)


class MainBlock(nn.Module):
    """Residual block: three ReLU + separable conv steps added back to the input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.separable_conv0 = _SeparableConv(channels, channels)
        self.separable_conv1 = _SeparableConv(channels, channels)
        self.separable_conv2 = _SeparableConv(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.separable_conv0(F.relu(x))
        out = self.separable_conv1(F.relu(out))
        out = self.separable_conv2(F.relu(out))
        return out + x

    def load_faceapi(self, weights: dict[str, torch.Tensor], prefix: str, used: set[str]) -> None:
        for name in ("separable_conv0", "separable_conv1", "separable_conv2"):
            getattr(self, name).load_faceapi(weights, f"{prefix}/{name}", used)


class TinyXception(nn.Module):
    """(B, 3, 112, 112) RGB in [0, 255] -> (B, 512, 7, 7) features (face-api's ``TinyXception``)."""

    mean_rgb: torch.Tensor

    def __init__(self, num_main_blocks: int = NUM_MAIN_BLOCKS) -> None:
        super().__init__()
        self.register_buffer("mean_rgb", torch.tensor(MEAN_RGB).view(1, 3, 1, 1), persistent=False)
        self.conv_in = _Conv(3, 32, 3, 2)
        self.reduction_block_0 = ReductionBlock(32, 64, activate_input=False)
        self.reduction_block_1 = ReductionBlock(64, 128)
        self.main_blocks = nn.ModuleList(MainBlock(128) for _ in range(num_main_blocks))
        self.exit_reduction_block = ReductionBlock(128, 256)
        self.exit_separable_conv = _SeparableConv(256, FEATURE_CHANNELS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != (3, INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"expected (B, 3, {INPUT_SIZE}, {INPUT_SIZE}) RGB input, got {tuple(x.shape)}")
        out = F.relu(self.conv_in((x - self.mean_rgb) / 255.0))
        out = self.reduction_block_1(self.reduction_block_0(out))
        for block in self.main_blocks:
            out = block(out)
        out = self.exit_reduction_block(out)
        return F.relu(self.exit_separable_conv(out))

    def load_faceapi(self, weights: dict[str, torch.Tensor], used: set[str]) -> None:
        self.conv_in.load_faceapi(weights, "entry_flow/conv_in", used)
        self.reduction_block_0.load_faceapi(weights, "entry_flow/reduction_block_0", used)
        self.reduction_block_1.load_faceapi(weights, "entry_flow/reduction_block_1", used)
        for i, block in enumerate(self.main_blocks):
            assert isinstance(block, MainBlock)
            block.load_faceapi(weights, f"middle_flow/main_block_{i}", used)
        self.exit_reduction_block.load_faceapi(weights, "exit_flow/reduction_block", used)
        self.exit_separable_conv.load_faceapi(weights, "exit_flow/separable_conv", used)


def _take(weights: dict[str, torch.Tensor], name: str, used: set[str]) -> torch.Tensor:
    if name not in weights:
        raise KeyError(f"face-api weight {name!r} missing from the {FACEAPI_MODEL} weight map")
    used.add(name)
    return weights[name]


class AgeGenderNet(nn.Module):
    """(B, 3, 112, 112) RGB in [0, 255] -> (age in years (B,), gender probabilities (B, 2): male, female)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = TinyXception()
        self.fc_age = nn.Linear(FEATURE_CHANNELS, 1)
        self.fc_gender = nn.Linear(FEATURE_CHANNELS, len(GENDERS))

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The 512 features both heads read (tfjs avgPool 7x7, stride 2, 'valid' over the 7x7 map)."""
        return F.avg_pool2d(self.features(x), 7, 2).flatten(1)

    def logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(age (B,), gender logits (B, 2)): face-api's ``runNet``, for attributions that want logits."""
        feats = self.pooled(x)
        return self.fc_age(feats)[:, 0], self.fc_gender(feats)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        age, gender = self.logits(x)
        return age, torch.softmax(gender, dim=-1)

    @torch.no_grad()
    def load_faceapi(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy a face-api weight map in; every tensor must be used, so a changed manifest fails loudly."""
        used: set[str] = set()
        self.features.load_faceapi(weights, used)
        for layer, name in ((self.fc_age, "fc/age"), (self.fc_gender, "fc/gender")):
            layer.weight.copy_(_take(weights, f"{name}/weights", used).t())  # tfjs dense W is [in, out]
            layer.bias.copy_(_take(weights, f"{name}/bias", used))
        unused = sorted(set(weights) - used)
        if unused:
            raise ValueError(f"{FACEAPI_MODEL}: weights not used by AgeGenderNet: {', '.join(unused)}")

    @classmethod
    def from_faceapi(cls, model_dir: Path | None = None) -> AgeGenderNet:
        """The network with ``age_gender_model`` weights, frozen and in eval mode."""
        net = cls()
        net.load_faceapi(load_faceapi_weights(FACEAPI_MODEL, model_dir))
        net.requires_grad_(False)
        return net.eval()

    @classmethod
    def default(cls, model_dir: Path | None = None) -> AgeGenderNet:
        """Alias of :meth:`from_faceapi`: the project's default age/gender model."""
        return cls.from_faceapi(model_dir)
