"""Turning request images into tensors, with every way an image can be wrong mapped to a status.

Decoding happens before any model sees the data, so a hostile or broken image costs a header parse
at most: the pixel count is checked from the header before the pixels are decoded.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image as PILImage
from PIL import UnidentifiedImageError

from services.api.v1 import common_pb2
from services.kit.errors import InvalidArgument, ResourceExhausted

# We enforce our own pixel limit from the header; PIL's bomb check would raise a different error.
PILImage.MAX_IMAGE_PIXELS = None

_DTYPES: dict[int, np.dtype] = {
    common_pb2.DTYPE_UINT8: np.dtype("uint8"),
    common_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
}


def _check_size(width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise InvalidArgument(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ResourceExhausted(
            f"image of {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels} pixels "
            "(FACEXPLAIN_MAX_IMAGE_PIXELS)"
        )


def decode_encoded(data: bytes, max_pixels: int) -> torch.Tensor:
    """PNG/JPEG/PGM/... bytes -> (3, H, W) float32 RGB in [0, 255]."""
    if not data:
        raise InvalidArgument("image.encoded is empty")
    try:
        img = PILImage.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise InvalidArgument("image bytes are not a decodable image (PNG, JPEG, PGM, BMP, ...)") from None
    except Exception as exc:
        raise InvalidArgument(f"image header could not be read: {type(exc).__name__}") from None
    _check_size(img.width, img.height, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
        rgb = img.convert("RGB")
    except Exception as exc:
        raise InvalidArgument(f"image data is corrupt or truncated ({type(exc).__name__}: {exc})") from None
    arr = np.asarray(rgb, dtype=np.float32)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def decode_tensor(t: common_pb2.Tensor, max_pixels: int) -> torch.Tensor:
    """Raw HWC tensor (uint8 in [0,255] or float32 in [0,1], C in {1,3}) -> (3, H, W) float32 in [0, 255]."""
    if t.dtype not in _DTYPES:
        raise InvalidArgument(
            f"image tensor dtype {common_pb2.DType.Name(t.dtype) if t.dtype in common_pb2.DType.values() else t.dtype}"
            " is not supported: use DTYPE_UINT8 (0..255) or DTYPE_FLOAT32 (0..1)"
        )
    shape = list(t.shape)
    if len(shape) == 2:
        shape = [*shape, 1]
    if len(shape) != 3 or shape[2] not in (1, 3):
        raise InvalidArgument(f"image tensor shape {list(t.shape)} must be [H, W], [H, W, 1] or [H, W, 3]")
    height, width, channels = (int(s) for s in shape)
    _check_size(width, height, max_pixels)
    dtype = _DTYPES[t.dtype]
    expected = height * width * channels * dtype.itemsize
    if len(t.data) != expected:
        raise InvalidArgument(
            f"image tensor data has {len(t.data)} bytes but shape {list(t.shape)} of {dtype.name} needs {expected}"
        )
    arr = np.frombuffer(t.data, dtype=dtype).reshape(height, width, channels).astype(np.float32)
    if dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise InvalidArgument("image tensor contains NaN or infinite values")
        if arr.min() < 0.0 or arr.max() > 1.0:
            raise InvalidArgument("float32 image tensor values must lie in [0, 1]")
        arr = arr * 255.0
    if channels == 1:
        arr = np.repeat(arr, 3, axis=2)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def decode_image(image: common_pb2.Image, max_pixels: int) -> torch.Tensor:
    """Any ``Image`` message -> (3, H, W) float32 RGB in [0, 255], or a ServiceError saying what is wrong."""
    kind = image.WhichOneof("data")
    if kind == "encoded":
        return decode_encoded(image.encoded, max_pixels)
    if kind == "tensor":
        return decode_tensor(image.tensor, max_pixels)
    raise InvalidArgument("image is empty: set image.encoded (PNG/JPEG bytes) or image.tensor")


def encode_png(chw: torch.Tensor) -> bytes:
    """(3, H, W) float in [0, 255] -> PNG bytes."""
    arr = chw.detach().clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    buf = io.BytesIO()
    PILImage.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def png_image(chw: torch.Tensor) -> common_pb2.Image:
    return common_pb2.Image(encoded=encode_png(chw))
