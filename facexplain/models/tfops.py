"""TensorFlow-semantics building blocks the face-api ports need to reproduce tfjs outputs.

tfjs' ``'same'`` padding is asymmetric for even inputs with stride 2 (the extra row/column
goes bottom/right), which PyTorch's symmetric ``padding=`` cannot express; getting it wrong
shifts every feature map by half a pixel and costs accuracy against the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """Pad an NCHW tensor with zeros exactly as tf's ``padding='same'`` would before a conv/pool."""
    h, w = x.shape[-2], x.shape[-1]
    out_h, out_w = -(-h // stride), -(-w // stride)
    pad_h = max((out_h - 1) * stride + kernel - h, 0)
    pad_w = max((out_w - 1) * stride + kernel - w, 0)
    if pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))


def hwio_to_oihw(w: torch.Tensor) -> torch.Tensor:
    """tfjs conv filters [H, W, in, out] -> torch [out, in, H, W]."""
    return w.permute(3, 2, 0, 1).contiguous()


def depthwise_hwcm_to_torch(w: torch.Tensor) -> torch.Tensor:
    """tfjs depthwise filters [H, W, C, multiplier] -> torch grouped conv [C*multiplier, 1, H, W]."""
    h, k, c, m = w.shape
    return w.permute(2, 3, 0, 1).reshape(c * m, 1, h, k).contiguous()
