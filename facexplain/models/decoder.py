"""Deep Face Decoder (DFD, Križaj, Plesh et al.): template -> face image.

The decoder inverts a face-recognition template through an inverted VGG-style stack: one linear
layer lifts the template to a small spatial map (``max_channels x start x start``), then
``log2(render / start)`` upsampling blocks double the resolution while halving the channels, and a
final 3x3 convolution with a sigmoid yields RGB in [0, 1].

Design choices and why:

* **Resize-convolution, not transposed convolution.** Each block upsamples (nearest by default,
  or bilinear) and then applies a 3x3 convolution. Transposed convolutions with stride 2 overlap
  unevenly and print checkerboard patterns; at equal training time a 112-px decoder built that
  way scored worse on every identity measure and showed the pattern, which resize-conv avoids by
  construction (every output pixel sees the same number of kernel taps).
* **Sigmoid output in [0, 1].** Reconstructions are compared with chips scaled to [0, 1]; a
  bounded output keeps the pixel loss well scaled from the first step and makes the result a
  valid image without clipping (multiply by 255 for the recognition net's [0, 255] convention).
* **Output sizes.** ``start_size`` (auto by default) is chosen in 4..7 so that ``start * 2**k``
  equals ``out_size`` when possible: 64 = 4*16, 112 = 7*16, 128 = 4*32, 224 = 7*32. Otherwise
  (e.g. 150) the smallest ``start * 2**k >= out_size`` is rendered (150 -> 160 = 5*32) and resized
  down bilinearly with antialiasing: the final resize only shrinks slightly, so it blurs little
  and adds no upsampling artefacts.
* **Dropout** as in the paper regularises the decoder: after the linear layer (``dropout``) and,
  optionally, after each block (``block_dropout``). It is active in ``train()`` mode only.
* **Input normalisation.** See ``DeepFaceDecoder.forward``.

``DecoderConfig`` round-trips through a plain dict (``to_dict`` / ``from_dict``) so a registered
model bundle can rebuild the architecture from its metadata without importing training code.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

_START_SIZES = (4, 5, 6, 7)
_UPSAMPLE_MODES = ("nearest", "bilinear")
_ACTIVATIONS = ("leaky_relu", "relu")


@dataclass(frozen=True)
class DecoderConfig:
    """Architecture of a ``DeepFaceDecoder``; every field is a JSON-friendly scalar.

    ``base_channels`` is the width of the last (full-resolution) block; widths double towards the
    start map and are capped at ``max_channels``. ``input_scale`` multiplies the L2-normalised
    template (``None``: ``sqrt(template_dim)``, i.e. unit variance per component, the scale the
    default linear initialisation expects). ``start_size`` ``None`` picks it automatically (see
    module docstring).
    """

    template_dim: int = 128
    out_size: int = 64
    base_channels: int = 32
    max_channels: int = 512
    start_size: int | None = None
    convs_per_block: int = 1
    dropout: float = 0.2
    block_dropout: float = 0.0
    upsample: Literal["nearest", "bilinear"] = "nearest"
    activation: Literal["leaky_relu", "relu"] = "leaky_relu"
    negative_slope: float = 0.2
    normalize_input: bool = True
    input_scale: float | None = None

    def __post_init__(self) -> None:
        if self.template_dim < 1:
            raise ValueError(f"template_dim must be positive, got {self.template_dim}")
        if self.out_size < _START_SIZES[0]:
            raise ValueError(f"out_size must be >= {_START_SIZES[0]}, got {self.out_size}")
        if self.start_size is not None and self.start_size < 1:
            raise ValueError(f"start_size must be positive, got {self.start_size}")
        if self.base_channels < 1 or self.max_channels < self.base_channels:
            raise ValueError("need 1 <= base_channels <= max_channels")
        if self.convs_per_block < 1:
            raise ValueError(f"convs_per_block must be >= 1, got {self.convs_per_block}")
        for name in ("dropout", "block_dropout"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p}")
        if self.upsample not in _UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {_UPSAMPLE_MODES}, got {self.upsample!r}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {self.activation!r}")

    def geometry(self) -> tuple[int, int, int]:
        """(start size, number of upsampling blocks, rendered size before the optional final resize)."""
        if self.start_size is not None:
            blocks = max(0, math.ceil(math.log2(self.out_size / self.start_size) - 1e-9))
            return self.start_size, blocks, self.start_size * 2**blocks
        best: tuple[int, int, int] | None = None
        for start in _START_SIZES:
            blocks = max(0, math.ceil(math.log2(self.out_size / start) - 1e-9))
            render = start * 2**blocks
            if best is None or render < best[2]:
                best = (start, blocks, render)
        assert best is not None
        return best

    @property
    def effective_input_scale(self) -> float:
        return math.sqrt(self.template_dim) if self.input_scale is None else float(self.input_scale)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DecoderConfig:
        """Rebuild from ``to_dict`` output; unknown keys are an error (a silently ignored field would
        rebuild a different architecture than the one whose weights are being loaded)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown DecoderConfig fields: {sorted(unknown)}")
        return cls(**data)


def _activation(config: DecoderConfig) -> nn.Module:
    if config.activation == "relu":
        return nn.ReLU(inplace=True)
    return nn.LeakyReLU(config.negative_slope, inplace=True)


class _UpBlock(nn.Module):
    """Resize-conv block: upsample x2, then ``convs_per_block`` x (3x3 conv, BatchNorm, activation)."""

    def __init__(self, c_in: int, c_out: int, config: DecoderConfig) -> None:
        super().__init__()
        self.mode = config.upsample
        layers: list[nn.Module] = []
        for i in range(config.convs_per_block):
            layers += [
                nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                _activation(config),
            ]
        if config.block_dropout > 0:
            layers.append(nn.Dropout2d(config.block_dropout))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "nearest":
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        return self.body(x)


class DeepFaceDecoder(nn.Module):
    """Template (B, template_dim) -> image (B, 3, out_size, out_size) in [0, 1]."""

    def __init__(self, config: DecoderConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else DecoderConfig()
        cfg = self.config
        start, blocks, render = cfg.geometry()
        self.start_size = start
        self.render_size = render
        widths = [min(cfg.max_channels, cfg.base_channels * 2 ** (blocks - i)) for i in range(blocks + 1)]
        self.fc = nn.Linear(cfg.template_dim, widths[0] * start * start, bias=False)
        self.fc_norm = nn.BatchNorm1d(widths[0] * start * start)
        self.fc_act = _activation(cfg)
        self.fc_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.Sequential(*[_UpBlock(widths[i], widths[i + 1], cfg) for i in range(blocks)])
        self.to_rgb = nn.Conv2d(widths[-1], 3, 3, padding=1)
        self._widths = widths

    @classmethod
    def from_config(cls, config: DecoderConfig | dict[str, Any]) -> DeepFaceDecoder:
        return cls(config if isinstance(config, DecoderConfig) else DecoderConfig.from_dict(config))

    def normalize(self, templates: torch.Tensor) -> torch.Tensor:
        """L2-normalise (then scale) the templates, as ``forward`` does first.

        Why: FR models compare templates by angle (cosine, or euclidean distance between nearly
        constant-norm vectors), so identity lives in the direction; the raw norm (about 1.49 for
        the default model) drifts with image quality and differs between FR models. Normalising
        makes the decoder see only what the FR model uses, keeps one architecture usable for
        any FR model's scale, and keeps edited templates (interpolations, direction shifts, which
        change the norm) in the distribution the decoder was trained on. The scale
        ``sqrt(template_dim)`` gives unit-variance components, what the linear layer's default
        initialisation assumes. A zero vector stays zero (``F.normalize`` clamps the norm);
        services reject it before decoding.
        """
        if not self.config.normalize_input:
            return templates
        return F.normalize(templates, dim=1) * self.config.effective_input_scale

    def forward(self, templates: torch.Tensor) -> torch.Tensor:
        if templates.dim() != 2 or templates.shape[1] != self.config.template_dim:
            raise ValueError(f"expected (B, {self.config.template_dim}) templates, got {tuple(templates.shape)}")
        x = self.fc_dropout(self.fc_act(self.fc_norm(self.fc(self.normalize(templates)))))
        x = x.view(x.shape[0], self._widths[0], self.start_size, self.start_size)
        x = torch.sigmoid(self.to_rgb(self.blocks(x)))
        if self.render_size != self.config.out_size:
            x = F.interpolate(
                x,
                size=(self.config.out_size, self.config.out_size),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
        return x
