"""Deep Face Decoder losses (Križaj, Plesh et al.): pixel, gradient-domain and perceptual.

Each loss is a squared L2 (mean squared error) and is applied twice: globally over the whole
image, and locally over the face region (eyes with brows, nose, mouth; see
``facexplain.faces.regions.face_region_mask``). The six terms are balanced by ``DFDLossWeights``
(the paper uses 1 for all). Why three kinds:

* pixel loss anchors colours and layout, but alone it converges to blurry averages;
* the gradient-domain loss compares finite differences, so it rewards sharp edges where the
  target has them and is blind to a constant brightness offset;
* the perceptual loss compares feature maps of a network, which rewards the structure a face
  network responds to. White-box: an internal layer of the FR model being inverted (the decoder
  then learns what that model sees; identity measured with the same model becomes optimistic).
  Black-box: any other network, which keeps the identity evaluation independent.

Local losses are mask-weighted means, ``sum(mask * err) / sum(mask)``: equal to the loss on the
masked images normalised by the region's area, so a small face region weighs as much as the
whole image would rather than in proportion to its size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from facexplain.models.recognition import FaceRecognitionNet

FR_INPUT_SIZE = 150
FR_INPUT_RANGE = 255.0
DEFAULT_WHITE_BOX_LAYER = "conv64_3"


class _FRTrunk(nn.Module):
    """``FaceRecognitionNet`` up to and including residual ``layer``, sharing (not copying) its modules."""

    mean_rgb: torch.Tensor

    def __init__(self, fr_net: FaceRecognitionNet, layer: str) -> None:
        super().__init__()
        names = list(fr_net.residuals.keys())
        if layer not in names:
            raise ValueError(f"unknown FaceRecognitionNet layer {layer!r}; choose from {names}")
        self.input_divisor = fr_net.input_divisor
        self.register_buffer("mean_rgb", fr_net.mean_rgb.clone(), persistent=False)
        self.conv32_down = fr_net.conv32_down
        self.residuals = nn.ModuleList([fr_net.residuals[n] for n in names[: names.index(layer) + 1]])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Mirrors FaceRecognitionNet.forward; a test holds the two equal through a forward hook.
        out = (x - self.mean_rgb) / self.input_divisor
        out = F.max_pool2d(F.relu(self.conv32_down(out)), 3, 2)
        for block in self.residuals:
            out = block(out)
        return out


class PerceptualFeatures(nn.Module):
    """Images (B, 3, H, W) in [0, 1] -> a feature map of a frozen perceptual network.

    ``extractor`` is any module mapping images to a feature map; ``input_size`` (resize target,
    ``None``: keep) and ``input_range`` (multiplier: 255 for nets fed [0, 255]) adapt decoder
    output to the convention the network expects. Build it with ``white_box`` (an internal stage
    of the FR model under study) or ``black_box`` (any other network). The extractor's parameters
    are frozen (``requires_grad_(False)``, in place: the decoder's optimiser must never move
    them) and it stays in eval mode even when this module is put in train mode, so BatchNorm
    statistics or dropout of a black-box network do not change the loss during training.
    """

    def __init__(self, extractor: nn.Module, input_size: int | None = None, input_range: float = 1.0) -> None:
        super().__init__()
        self.extractor = extractor
        self.input_size = input_size
        self.input_range = input_range
        self.extractor.requires_grad_(False)
        self.extractor.eval()

    @classmethod
    def white_box(cls, fr_net: FaceRecognitionNet, layer: str = DEFAULT_WHITE_BOX_LAYER) -> PerceptualFeatures:
        """Features of ``fr_net`` after residual stage ``layer`` (default ``conv64_3``: 64 x 17 x 17 at
        150 px, a mid-level map that still has spatial layout; later stages are 8x8 and smaller)."""
        return cls(_FRTrunk(fr_net, layer), input_size=FR_INPUT_SIZE, input_range=FR_INPUT_RANGE)

    @classmethod
    def black_box(cls, net: nn.Module, input_size: int | None = None, input_range: float = 1.0) -> PerceptualFeatures:
        """Any other network mapping images to a feature map (not the FR model being inverted)."""
        return cls(net, input_size=input_size, input_range=input_range)

    def train(self, mode: bool = True) -> PerceptualFeatures:
        super().train(mode)
        self.extractor.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        if self.input_size is not None and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            shrink = x.shape[-1] > self.input_size
            x = F.interpolate(
                x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False, antialias=shrink
            )
        return self.extractor(x * self.input_range)


@dataclass(frozen=True)
class DFDLossWeights:
    """Balancing weights of the six DFD terms (paper: all 1). A zero weight skips the term's computation."""

    pixel_global: float = 1.0
    pixel_local: float = 1.0
    gradient_global: float = 1.0
    gradient_local: float = 1.0
    perceptual_global: float = 1.0
    perceptual_local: float = 1.0


def _weighted_mse(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean of (a - b)^2, or its ``weight``-weighted mean ((B, 1, H, W) weights, broadcast over channels)."""
    err = (a - b).square()
    if weight is None:
        return err.mean()
    w = weight.expand_as(err)
    return (err * w).sum() / w.sum().clamp_min(1e-8)


def _gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def pixel_loss(recon: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Squared L2 between images (mean over pixels and channels; mask-weighted mean with ``mask``)."""
    return _weighted_mse(recon, target, mask)


def gradient_loss(recon: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Squared L2 between horizontal plus vertical finite differences of the images.

    With a mask, a difference counts with the product of the mask at its two pixels, so an edge
    only counts where both of its pixels are in the region.
    """
    rx, ry = _gradients(recon)
    tx, ty = _gradients(target)
    if mask is None:
        return _weighted_mse(rx, tx, None) + _weighted_mse(ry, ty, None)
    mx = mask[..., :, 1:] * mask[..., :, :-1]
    my = mask[..., 1:, :] * mask[..., :-1, :]
    return _weighted_mse(rx, tx, mx) + _weighted_mse(ry, ty, my)


def _mask_to(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Area-resize a (B, 1, H, W) mask to ``like``'s spatial size (feature-map resolution)."""
    if tuple(mask.shape[-2:]) == tuple(like.shape[-2:]):
        return mask
    return F.interpolate(mask, size=tuple(like.shape[-2:]), mode="area")


def dfd_loss(
    recon: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    perceptual: PerceptualFeatures | None = None,
    weights: DFDLossWeights | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the DFD terms and every term (detached, unweighted) for logging.

    ``recon`` and ``target`` are (B, 3, S, S) in [0, 1]; ``mask`` (B, 1, S, S) is the face region
    (``None`` skips the local terms); ``perceptual`` ``None`` skips the perceptual terms. The
    local perceptual term weights the feature maps by the mask area-resized to their resolution:
    one extractor pass per image instead of two more on masked images. Component keys match the
    ``DFDLossWeights`` field names; ``total`` is also in the dict.
    """
    w = weights if weights is not None else DFDLossWeights()
    if recon.shape != target.shape:
        raise ValueError(f"recon {tuple(recon.shape)} and target {tuple(target.shape)} differ")
    if mask is not None and (mask.shape[0] != recon.shape[0] or mask.shape[-2:] != recon.shape[-2:]):
        raise ValueError(f"mask {tuple(mask.shape)} does not match images {tuple(recon.shape)}")
    target = target.detach()
    terms: dict[str, tuple[float, torch.Tensor]] = {}

    def add(name: str, weight: float, fn: Callable[[], torch.Tensor]) -> None:
        if weight != 0.0:
            terms[name] = (weight, fn())

    add("pixel_global", w.pixel_global, lambda: pixel_loss(recon, target))
    add("gradient_global", w.gradient_global, lambda: gradient_loss(recon, target))
    if mask is not None:
        add("pixel_local", w.pixel_local, lambda: pixel_loss(recon, target, mask))
        add("gradient_local", w.gradient_local, lambda: gradient_loss(recon, target, mask))
    if perceptual is not None and (w.perceptual_global != 0.0 or (mask is not None and w.perceptual_local != 0.0)):
        f_recon = perceptual(recon)
        with torch.no_grad():
            f_target = perceptual(target)
        add("perceptual_global", w.perceptual_global, lambda: _weighted_mse(f_recon, f_target, None))
        if mask is not None:
            add(
                "perceptual_local",
                w.perceptual_local,
                lambda: _weighted_mse(f_recon, f_target, _mask_to(mask, f_recon)),
            )
    if not terms:
        raise ValueError("every DFD loss term is disabled (zero weight or missing mask/perceptual network)")
    total = torch.stack([weight * value for weight, value in terms.values()]).sum()
    components = {name: value.detach() for name, (_, value) in terms.items()}
    components["total"] = total.detach()
    return total, components


def pair_difference_loss(
    recon_face: torch.Tensor, recon_blend: torch.Tensor, face: torch.Tensor, blend: torch.Tensor
) -> torch.Tensor:
    """Squared L2 between the decoded change and the real change of a (face, region blend) pair.

    A blend differs from its face in one region only, so ``blend - face`` is zero outside it; asking
    ``decoder(z_blend) - decoder(z_face)`` to match it teaches the decoder to render the template change
    one region causes *in that region*. The per-image terms alone do not: each reconstruction may be off
    by a different global error (skin tone, background), and their difference then spreads over the
    face, which is what an SSI direction (an average of such changes) looks like when decoded.
    """
    if not (recon_face.shape == recon_blend.shape == face.shape == blend.shape):
        raise ValueError(
            f"pair shapes differ: {tuple(recon_face.shape)}, {tuple(recon_blend.shape)}, "
            f"{tuple(face.shape)}, {tuple(blend.shape)}"
        )
    return ((recon_blend - recon_face) - (blend - face).detach()).square().mean()
