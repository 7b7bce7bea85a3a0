"""PyTorch port of face-api's ``ssd_mobilenetv1_model`` face detector (SSD on a MobileNetV1 trunk).

The port follows the tfjs graph in ``src/ssdMobilenetv1`` of @vladmandic/face-api 1.7.15 layer by
layer so that the published weights can be used unchanged:

* every convolution uses tf ``'same'`` padding, which is asymmetric for stride 2 (extra row/column
  bottom/right): stride-2 convolutions pad with :func:`facexplain.models.tfops.same_pad`, since
  PyTorch's ``padding=`` cannot; for stride 1 and odd kernels it is symmetric and ``padding=k // 2``
  is identical and avoids a copy;
* the depthwise convolutions are followed by ``tf.batchNorm(x, mean, variance, offset, scale, eps)``
  with ``eps = 1e-3``; we fold it into the depthwise filter and a bias at load time, which is the same
  affine map and saves one pass over every feature map;
* the pointwise convolutions carry only a ``convolution_bn_offset`` (batch norm already folded into the
  filters by the exporter), followed like everything else in the trunk by ``clip(0, 6)`` (ReLU6);
* box predictors emit NHWC-ordered anchors, so we permute NCHW maps to NHWC before flattening: the
  anchor table (``Output/extra_dim``) is laid out row-major over (y, x, anchor) per feature map;
* boxes decode with the SSD variances (10, 10, 5, 5) hard-coded in ``outputLayer.ts``; anchors and
  boxes are ``[ymin, xmin, ymax, xmax]`` normalised to the padded square network input.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from facexplain.models.tfops import depthwise_hwcm_to_torch, hwio_to_oihw, same_pad
from facexplain.models.weights import load_faceapi_weights

INPUT_SIZE = 512
NUM_ANCHORS = 5118
_BN_EPSILON = 0.0010000000474974513  # the float32 literal in mobileNetV1.ts
# Centre/size variances of the TF object-detection API box coder, as divisors (outputLayer.ts).
_Y_SCALE, _X_SCALE, _H_SCALE, _W_SCALE = 10.0, 10.0, 5.0, 5.0
# Depthwise layers that downsample (mobileNetV1.ts getStridesForLayerIdx).
_STRIDE2_LAYERS = frozenset({2, 4, 6, 12})
# (in, out) channels of MobilenetV1/Conv2d_{0..13}_pointwise.
_TRUNK_CHANNELS = [
    (3, 32),
    (32, 64),
    (64, 128),
    (128, 128),
    (128, 256),
    (256, 256),
    (256, 512),
    (512, 512),
    (512, 512),
    (512, 512),
    (512, 512),
    (512, 512),
    (512, 1024),
    (1024, 1024),
]
# (in, out, kernel, stride) of Prediction/Conv2d_{0..7}_pointwise (predictionLayer.ts).
_EXTRA_LAYERS = [
    (1024, 256, 1, 1),
    (256, 512, 3, 2),
    (512, 128, 1, 1),
    (128, 256, 3, 2),
    (256, 128, 1, 1),
    (128, 256, 3, 2),
    (256, 64, 1, 1),
    (64, 128, 3, 2),
]
# (in channels, anchors per cell) of BoxPredictor_{0..5}, fed by conv11, trunk out, extra conv 1/3/5/7.
_PREDICTORS = [(512, 3), (1024, 6), (512, 6), (256, 6), (256, 6), (128, 6)]
_NUM_CLASSES = 3  # background, face, and an unused third logit the exported graph keeps


class _TfConv(nn.Module):
    """Convolution with tf 'same' padding, a bias, and optional ReLU6 (tf.clipByValue(x, 0, 6))."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, *, groups: int = 1, relu6: bool = True) -> None:
        super().__init__()
        self.kernel = kernel
        self.stride = stride
        self.relu6 = relu6
        # For stride 1 and an odd kernel tf's 'same' padding is symmetric, so the conv pads itself
        # (no extra copy); stride 2 needs tf's bottom/right-heavy padding from same_pad.
        self.pad_outside = kernel > 1 and stride > 1
        padding = 0 if self.pad_outside else kernel // 2
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, groups=groups, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad_outside:
            x = same_pad(x, self.kernel, self.stride)
        x = self.conv(x)
        return F.hardtanh(x, 0.0, 6.0, inplace=not x.requires_grad) if self.relu6 else x

    @torch.no_grad()
    def set_weights(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        conv_bias = self.conv.bias
        assert conv_bias is not None
        if weight.shape != self.conv.weight.shape or bias.shape != conv_bias.shape:
            raise ValueError(
                f"shape mismatch: got {tuple(weight.shape)}/{tuple(bias.shape)}, "
                f"expected {tuple(self.conv.weight.shape)}/{tuple(conv_bias.shape)}"
            )
        self.conv.weight.copy_(weight)
        conv_bias.copy_(bias)


class SsdMobilenetV1(nn.Module):
    """face-api's SSD face detector; weights come from :meth:`from_faceapi` (or :meth:`load_tf_weights`).

    ``forward`` is the network only (no padding to square, no NMS): it expects a batch already shaped
    as face-api's ``toBatchTensor(512, false)`` makes it, i.e. RGB in [0, 255] at 512x512. The
    detector front end in :mod:`facexplain.faces.detect` does the image handling and post-processing,
    so that this module stays a pure, differentiable function of its input (useful for attributions).
    """

    anchors: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        trunk: list[nn.Module] = [_TfConv(3, 32, 3, 2)]
        for idx in range(1, 14):
            cin, cout = _TRUNK_CHANNELS[idx]
            stride = 2 if idx in _STRIDE2_LAYERS else 1
            trunk.append(_TfConv(cin, cin, 3, stride, groups=cin))  # depthwise + folded batch norm
            trunk.append(_TfConv(cin, cout, 1, 1))
        self.trunk = nn.ModuleList(trunk)
        self.extra = nn.ModuleList([_TfConv(i, o, k, s) for i, o, k, s in _EXTRA_LAYERS])
        self.box_heads = nn.ModuleList([_TfConv(c, a * 4, 1, 1, relu6=False) for c, a in _PREDICTORS])
        self.cls_heads = nn.ModuleList([_TfConv(c, a * _NUM_CLASSES, 1, 1, relu6=False) for c, a in _PREDICTORS])
        self.register_buffer("anchors", torch.zeros(NUM_ANCHORS, 4))

    @classmethod
    def from_faceapi(cls, model_dir: Path | None = None) -> SsdMobilenetV1:
        """Build the network with face-api's published ``ssd_mobilenetv1_model`` weights, in eval mode."""
        net = cls()
        net.load_tf_weights(load_faceapi_weights("ssd_mobilenetv1_model", model_dir))
        return net.eval()

    @torch.no_grad()
    def load_tf_weights(self, w: Mapping[str, torch.Tensor]) -> None:
        """Copy tfjs-named weights in, converting layouts and folding the depthwise batch norms."""

        def pointwise(module: nn.Module, prefix: str) -> None:
            assert isinstance(module, _TfConv)
            module.set_weights(hwio_to_oihw(w[f"{prefix}/weights"]), w[f"{prefix}/convolution_bn_offset"])

        pointwise(self.trunk[0], "MobilenetV1/Conv2d_0_pointwise")
        for idx in range(1, 14):
            p = f"MobilenetV1/Conv2d_{idx}_depthwise"
            filters = depthwise_hwcm_to_torch(w[f"{p}/depthwise_weights"]).double()
            gamma, beta = w[f"{p}/BatchNorm/gamma"].double(), w[f"{p}/BatchNorm/beta"].double()
            mean, var = w[f"{p}/BatchNorm/moving_mean"].double(), w[f"{p}/BatchNorm/moving_variance"].double()
            # tf.batchNorm: (x - mean) * scale / sqrt(var + eps) + offset, with scale = gamma, offset = beta.
            k = gamma / torch.sqrt(var + _BN_EPSILON)
            dw = self.trunk[2 * idx - 1]
            assert isinstance(dw, _TfConv)
            dw.set_weights((filters * k[:, None, None, None]).float(), (beta - mean * k).float())
            pointwise(self.trunk[2 * idx], f"MobilenetV1/Conv2d_{idx}_pointwise")
        for idx, module in enumerate(self.extra):
            pointwise(module, f"Prediction/Conv2d_{idx}_pointwise")
        for idx, (box, cls_) in enumerate(zip(self.box_heads, self.cls_heads, strict=True)):
            for module, name in ((box, "BoxEncodingPredictor"), (cls_, "ClassPredictor")):
                p = f"Prediction/BoxPredictor_{idx}/{name}"
                assert isinstance(module, _TfConv)
                module.set_weights(hwio_to_oihw(w[f"{p}/weights"]), w[f"{p}/biases"])
        anchors = w["Output/extra_dim"].reshape(-1, 4)
        if anchors.shape != self.anchors.shape:
            raise ValueError(f"anchor table has shape {tuple(anchors.shape)}, expected {(NUM_ANCHORS, 4)}")
        self.anchors.copy_(anchors)

    def raw_predictions(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Box encodings (B, A, 4) and class logits (B, A, 3) before decoding, in anchor order."""
        x = x / 127.5 - 1.0  # SsdMobilenetv1.ts: input normalised to [-1, 1]
        conv11 = x
        for i, layer in enumerate(self.trunk):
            x = layer(x)
            if i == 22:  # pointwise conv of pair 11 (trunk = [conv0, dw1, pw1, ..., dw13, pw13])
                conv11 = x
        feats = [conv11, x]
        y = x
        for i, layer in enumerate(self.extra):
            y = layer(y)
            if i % 2 == 1:
                feats.append(y)
        b = x.shape[0]
        # NHWC flattening matches the tfjs reshape, hence the anchor order of Output/extra_dim.
        enc = [h(f).permute(0, 2, 3, 1).reshape(b, -1, 4) for h, f in zip(self.box_heads, feats, strict=True)]
        cls = [
            h(f).permute(0, 2, 3, 1).reshape(b, -1, _NUM_CLASSES) for h, f in zip(self.cls_heads, feats, strict=True)
        ]
        return torch.cat(enc, dim=1), torch.cat(cls, dim=1)

    def decode(self, enc: torch.Tensor) -> torch.Tensor:
        """SSD box decoding against the stored anchors -> (B, A, 4) ``[ymin, xmin, ymax, xmax]``."""
        a = self.anchors
        ah, aw = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
        acy, acx = a[:, 0] + ah / 2, a[:, 1] + aw / 2
        cy = enc[..., 0] / _Y_SCALE * ah + acy
        cx = enc[..., 1] / _X_SCALE * aw + acx
        half_h = torch.exp(enc[..., 2] / _H_SCALE) * ah / 2
        half_w = torch.exp(enc[..., 3] / _W_SCALE) * aw / 2
        return torch.stack([cy - half_h, cx - half_w, cy + half_h, cx + half_w], dim=-1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Detect faces in a padded-to-square batch.

        Args:
            x: (B, 3, 512, 512) RGB in [0, 255] (face-api's ``toBatchTensor(512, false)``).

        Returns:
            boxes: (B, 5118, 4) ``[ymin, xmin, ymax, xmax]`` normalised to the 512x512 input (not
                clamped: anchors near the border decode slightly outside [0, 1], as in face-api).
            scores: (B, 5118) sigmoid face probability per anchor.
        """
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) batch, got {tuple(x.shape)}")
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            # The anchor table is fixed for a 32x32 ... 1x1 pyramid, i.e. exactly 512x512 input.
            raise ValueError(f"expected {INPUT_SIZE}x{INPUT_SIZE} input, got {tuple(x.shape[-2:])}")
        enc, logits = self.raw_predictions(x)
        return self.decode(enc), torch.sigmoid(logits[..., 1])


__all__ = ["INPUT_SIZE", "NUM_ANCHORS", "SsdMobilenetV1"]
