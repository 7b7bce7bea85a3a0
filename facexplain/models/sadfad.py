"""The interpretable face-recognition network of Yin, Tran, Li, Shen, Liu, "Towards Interpretable Face
Recognition" (ICCV 2019), trained with the spatial / feature activation diversity losses (SAD / FAD,
``facexplain.losses.sadfad``).

Architecture (the paper's Table 1, widths as multiples of ``base_width`` = 32 in the paper):

====================  =========  ===========  ==========================================
layer                 stride     output       note
====================  =========  ===========  ==========================================
conv11, conv12        1, 1       96² x b, 2b  3x3 conv + BatchNorm + ELU (every conv below)
conv21, conv22, 23    2, 1, 1    48² x 2b..4b
conv31, conv32, 33    2, 1, 1    24² x 4b, 3b, 6b
conv41, conv42, 43    2, 1, 1    12² x 6b, 4b, 8b
conv51, conv52, 53    2, 1, 1    6² x 8b, 5b, 10b   conv53: BatchNorm, no activation
Φ (hypercolumn)       -          24² x 18b    [conv33, 1x1(up(conv43)), 1x1(up(conv53))],
                                              each part L2-normalised over channels
Ψ (filter bank)       1          24² x N_f    3x3 conv + BatchNorm: the response maps
LMF                   -          24² x N_f    zero the d% smallest-magnitude elements per map
average pooling       -          N_f          the representation (the template)
identity head         -          classes      dropout + linear, training only
====================  =========  ===========  ==========================================

Why this shape: each of the N_f filters of Ψ sees, at every 24x24 location, the hypercolumn of a
mid-level (conv33) and two upsampled high-level (conv43, conv53) layers, so one filter can respond
to one face part with both local detail and context. The SAD loss pushes different filters to
respond at different places; Large Magnitude Filtering keeps only each map's strongest responses,
so the pooled feature of a filter is the strength of its (local) peak, and an occlusion changes
only the features of the filters that look at the occluded part, which FAD exploits. The
representation is the average pooled LMF map: ``N_f`` numbers, one per filter.

Widths follow the authors' released TensorFlow code (github.com/yubangji123/Interpret_FR:
``gf_dim = df_dim = 32``, ``dfc_dim = 320``, ELU, BatchNorm, the branch 1x1 convs to 6b channels,
bilinear upsampling, LMF keeping the 24 largest of the 576 elements, i.e. d = 23/24). Every width is
configurable (``SADFADConfig``) so a tiny network trains in seconds on a CPU.

Input: RGB images in [0, 255] at ``input_size`` (96), normalised inside the net as ``x / 127.5 - 1``.
The face chips facexplain caches are dlib-style 150 px chips with padding 0.25 (the face square is
the central 2/3); the network sees them resized to ``resize_size`` (110, as the authors' 110-px
CASIA crops) and cropped to 96: centred at test time (``chip_to_input``), at a random offset of up
to ±7 px in training. The face square then spans ~73 of the 96 pixels.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ARCHITECTURE = "sadfad_casia"


@dataclass(frozen=True)
class SADFADConfig:
    """Architecture of a :class:`SADFADNet`; JSON-friendly scalars (round-trips through ``to_dict``).

    ``base_width`` is the paper's b (32); ``n_filters`` the number of filters N_f of the filter bank
    Ψ and so the template dimension (320); ``trunk_width`` the width of conv53 (0: 10·b, as the
    paper); ``branch_width`` the width of the two upsampled hypercolumn branches and of conv33's part
    (0: 6·b). ``lmf_drop`` is d, the fraction of each response map's elements that Large Magnitude
    Filtering zeroes (the smallest in magnitude). ``n_classes`` > 0 adds the identity head (training
    only; an exported embedder drops it). ``resize_size`` is the size a 150-px aligned chip is resized
    to before the ``input_size`` crop (0: ``round(input_size · 110 / 96)``).
    """

    input_size: int = 96
    base_width: int = 32
    n_filters: int = 320
    trunk_width: int = 0
    branch_width: int = 0
    lmf_drop: float = 23 / 24
    dropout: float = 0.4
    n_classes: int = 0
    resize_size: int = 0

    def __post_init__(self) -> None:
        if self.input_size % 16 != 0 or self.input_size <= 0:
            raise ValueError(f"input_size must be a positive multiple of 16, got {self.input_size}")
        if self.base_width <= 0 or self.n_filters <= 0:
            raise ValueError("base_width and n_filters must be positive")
        if not 0.0 <= self.lmf_drop < 1.0:
            raise ValueError(f"lmf_drop (d) must be in [0, 1), got {self.lmf_drop}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.resize_size and self.resize_size < self.input_size:
            raise ValueError("resize_size must be at least input_size")

    @property
    def resize(self) -> int:
        """Side a 150-px chip is resized to before the crop (0 in the config: 110/96 of the input, 110 for 96)."""
        return self.resize_size or round(self.input_size * 110 / 96)

    @property
    def map_size(self) -> int:
        """Side of the response maps (input / 4: 24 for 96)."""
        return self.input_size // 4

    @property
    def conv53_width(self) -> int:
        return self.trunk_width or 10 * self.base_width

    @property
    def part_width(self) -> int:
        return self.branch_width or 6 * self.base_width

    @property
    def lmf_keep(self) -> int:
        """Elements each response map keeps after LMF (24 of 576 for the paper's d)."""
        return lmf_keep_count(self.map_size * self.map_size, self.lmf_drop)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SADFADConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SADFADConfig fields: {unknown}")
        return cls(**data)

    def replace(self, **changes: Any) -> SADFADConfig:
        return dataclasses.replace(self, **changes)


def lmf_keep_count(n_elements: int, drop: float) -> int:
    """How many of ``n_elements`` LMF keeps: ``n - floor(d · n)`` (at least 1).

    A tolerance of 1e-9 absorbs binary rounding, so d = 23/24 of 576 drops exactly 552.
    """
    n_drop = math.floor(drop * n_elements + 1e-9)
    return max(1, n_elements - n_drop)


def large_magnitude_filter(maps: torch.Tensor, drop: float) -> torch.Tensor:
    """Large Magnitude Filtering: zero the ``drop`` fraction of smallest-magnitude elements of each map.

    ``maps`` is (B, C, H, W); every (b, c) map independently keeps its ``lmf_keep_count(H·W, drop)``
    largest |values| with their sign (ties broken by position, so the count is exact) and zeroes the
    rest. Gradients flow through the kept elements only.
    """
    if drop <= 0.0:
        return maps
    b, c, h, w = maps.shape
    flat = maps.reshape(b, c, h * w)
    keep = lmf_keep_count(h * w, drop)
    idx = flat.detach().abs().topk(keep, dim=-1).indices
    mask = torch.zeros_like(flat).scatter_(-1, idx, 1.0)
    return (flat * mask).reshape(b, c, h, w)


def _conv_bn(cin: int, cout: int, stride: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding=k // 2, bias=False), nn.BatchNorm2d(cout))


@dataclass
class SADFADOutput:
    """What one forward pass yields: the template and the maps the losses and metrics need."""

    features: torch.Tensor  # (B, N_f): average-pooled LMF maps, the representation
    maps: torch.Tensor  # (B, N_f, 24, 24): LMF-filtered response maps of the filter bank Ψ
    raw_maps: torch.Tensor  # (B, N_f, 24, 24): the same before LMF


class SADFADNet(nn.Module):
    """CASIA-Net-style trunk -> hypercolumn Φ -> filter bank Ψ -> LMF -> average pool (see module docstring)."""

    def __init__(self, config: SADFADConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or SADFADConfig()
        b = cfg.base_width
        # (name, out channels, stride); the names follow the paper's Table 1.
        plan = [
            ("conv11", b, 1), ("conv12", 2 * b, 1),
            ("conv21", 2 * b, 2), ("conv22", 2 * b, 1), ("conv23", 4 * b, 1),
            ("conv31", 4 * b, 2), ("conv32", 3 * b, 1), ("conv33", cfg.part_width, 1),
            ("conv41", cfg.part_width, 2), ("conv42", 4 * b, 1), ("conv43", 8 * b, 1),
            ("conv51", 8 * b, 2), ("conv52", 5 * b, 1), ("conv53", cfg.conv53_width, 1),
        ]  # fmt: skip
        layers: dict[str, nn.Module] = {}
        cin = 3
        for name, cout, stride in plan:
            layers[name] = _conv_bn(cin, cout, stride)
            cin = cout
        self.trunk = nn.ModuleDict(layers)
        # 1x1 projections of the upsampled conv43 / conv53 maps into the hypercolumn
        self.branch4 = _conv_bn(8 * b, cfg.part_width, 1, k=1)
        self.branch5 = _conv_bn(cfg.conv53_width, cfg.part_width, 1, k=1)
        self.filters = nn.Conv2d(3 * cfg.part_width, cfg.n_filters, 3, 1, padding=1, bias=False)  # Ψ
        self.filters_bn = nn.BatchNorm2d(cfg.n_filters)
        self.head: nn.Module | None = None
        if cfg.n_classes > 0:
            self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(cfg.n_filters, cfg.n_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    @property
    def filter_bank(self) -> torch.Tensor:
        """The weights of Ψ, (N_f, |Φ|, 3, 3): what the filter-orthogonality loss constrains."""
        return self.filters.weight

    def hypercolumn(self, x: torch.Tensor) -> torch.Tensor:
        """Φ: (B, 3, 96, 96) normalised images -> (B, 3·part_width, 24, 24)."""
        feats: dict[str, torch.Tensor] = {}
        for name, layer in self.trunk.items():
            x = layer(x)
            if name != "conv53":
                x = F.elu(x)
            feats[name] = x
        size = feats["conv33"].shape[-2:]
        up4 = F.interpolate(feats["conv43"], size=size, mode="bilinear", align_corners=False)
        up5 = F.interpolate(feats["conv53"], size=size, mode="bilinear", align_corners=False)
        parts = [feats["conv33"], F.elu(self.branch4(up4)), F.elu(self.branch5(up5))]
        return torch.cat([F.normalize(p, dim=1) for p in parts], dim=1)

    def forward(self, images: torch.Tensor) -> SADFADOutput:
        """(B, 3, S, S) RGB in [0, 255], S = ``input_size`` -> representation and response maps."""
        s = self.config.input_size
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (s, s):
            raise ValueError(f"expected (B, 3, {s}, {s}) images, got {tuple(images.shape)}")
        x = images / 127.5 - 1.0
        raw = self.filters_bn(self.filters(self.hypercolumn(x)))
        maps = large_magnitude_filter(raw, self.config.lmf_drop)
        return SADFADOutput(features=maps.mean(dim=(-2, -1)), maps=maps, raw_maps=raw)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Identity logits from (possibly masked) features; only a training net has a head."""
        if self.head is None:
            raise RuntimeError("this SADFADNet has no identity head (n_classes = 0)")
        return self.head(features)  # type: ignore[no-any-return]

    def _load_embedder(self, other: SADFADNet) -> SADFADNet:
        """Copy ``other``'s weights but its identity head into this head-less net; returns it in eval mode."""
        self.load_state_dict(other.embedder_state_dict(), strict=True)
        return self.eval()

    def embedder_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights an embedder needs: everything but the identity head, on the CPU."""
        return {k: v.detach().cpu() for k, v in self.state_dict().items() if not k.startswith("head.")}


# -- from the cached face chips to the network's input -------------------------------------------------


def chip_to_input(
    chips: torch.Tensor,
    config: SADFADConfig,
    offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, 3, C, C) aligned chips in [0, 255] -> (B, 3, S, S) network input (see the module docstring).

    The chip is resized to ``resize_size`` (antialiased when shrinking) and cropped to ``input_size``
    at ``offsets`` (B, 2) integer (x, y) top-left corners, centred when ``None``.
    """
    r, s = config.resize, config.input_size
    x = chips.float()
    if x.shape[-1] != r or x.shape[-2] != r:
        shrink = x.shape[-1] > r
        x = F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False, antialias=shrink)
    if offsets is None:
        c = (r - s) // 2
        return x[:, :, c : c + s, c : c + s]
    return torch.stack(
        [x[i, :, int(oy) : int(oy) + s, int(ox) : int(ox) + s] for i, (ox, oy) in enumerate(offsets.tolist())]
    )


def chip_landmarks_to_input(
    landmarks: torch.Tensor, chip_size: int, config: SADFADConfig, offsets: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, 68, 2) landmarks in chip pixel coordinates -> the same points in the network input's pixels.

    Pixel-centre convention: resize by ``(p + 0.5) · r / C - 0.5``, then subtract the crop corner.
    """
    r, s = config.resize, config.input_size
    pts = (landmarks.float() + 0.5) * (r / chip_size) - 0.5
    if offsets is None:
        c = float((r - s) // 2)
        return pts - c
    return pts - offsets.to(pts.dtype).view(-1, 1, 2)


class SADFADEmbedder(nn.Module):
    """A trained :class:`SADFADNet` behind the recognition-net interface of ``FacePipeline``.

    ``forward`` takes the pipeline's (N, 3, 150, 150) aligned chips in [0, 255] and returns the
    (N, N_f) representation of the centred 96-px crop (``chip_to_input``), so a bundle loader can put
    it where ``FaceRecognitionNet`` sits. ``mean_rgb`` / ``input_divisor`` describe the normalisation
    (``x / 127.5 - 1`` = ``(x - 127.5) / 127.5``) for the bundle metadata. A net with an identity
    head is copied without it: an embedder's state dict is the ``net.*`` weights and ``mean_rgb``.
    """

    arch = ARCHITECTURE  # the ``arch`` a bundle's recognition component names

    def __init__(self, net: SADFADNet) -> None:
        super().__init__()
        if net.head is not None:
            net = SADFADNet(net.config.replace(n_classes=0))._load_embedder(net)
        self.net: SADFADNet = net
        self.register_buffer("mean_rgb", torch.full((1, 3, 1, 1), 127.5))
        self.input_divisor = 127.5

    @classmethod
    def from_state(cls, config: SADFADConfig | dict[str, Any], state: dict[str, torch.Tensor]) -> SADFADEmbedder:
        cfg = config if isinstance(config, SADFADConfig) else SADFADConfig.from_dict(config)
        net = SADFADNet(cfg.replace(n_classes=0))
        net.load_state_dict(state, strict=True)
        return cls(net.eval())

    def bundle_config(self) -> dict[str, Any]:
        """What a bundle stores to rebuild the architecture (``SADFADConfig.from_dict``)."""
        return self.net.config.to_dict()

    def forward(self, chips: torch.Tensor) -> torch.Tensor:
        return self.net(chip_to_input(chips, self.net.config)).features
