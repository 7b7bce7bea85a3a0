"""Turning request images into tensors, with every way an image can be wrong mapped to a status.

Decoding happens before any model sees the data, so a hostile or broken image costs a header parse
at most: the format is checked against an allow-list and the pixel count against the per-image limit
from the header, and the request's pixel budget is charged, all before the pixels are decoded.

Resource safety (issue 23): an image that declares a large size in a few KB (a solid PNG compresses
about 1000:1) costs memory in proportion to its pixels, not its bytes, and the FR pipeline holds
several float copies of every image of a batch. So every RPC gets a budget of decoded pixels
(``FACEXPLAIN_MAX_REQUEST_PIXELS``, set per call by :func:`services.kit.rpc.unary`); images are
decoded one at a time and charged before their pixels are decoded; an image beyond the budget is
RESOURCE_EXHAUSTED (an item error in a batch) and is never decoded. Pillow's decompression-bomb check
is on as a second lock behind the header check.

No downscaling on decode (JPEG ``draft`` / ``reduce``), though issue 23 suggested it: the FR pipeline does
not need less than the full image. Only its detector works at 512x512; the landmarks, the shape predictor
and the 150x150 chip are sampled from the full-resolution pixels, so how much resolution a face needs
depends on its size in the image, unknown before detection. bench/bench_draft_decode.py measured it on 8
real CelebA faces as large JPEGs: a face filling a 1368x2048 frame moves by up to L2 0.11 (draft 1/2) and
0.12 (1/4) from its full-decode template, a face at its own size in a 1600x1600 photo by up to 0.38 (1/2)
and 0.74 (1/4), against dlib's same-person threshold of 0.6 and the 0.1 the torch port of dlib's net is held
to. The boxes and landmarks in the responses would also have to be scaled back. The memory the suggestion
was after is bounded by the per-image and per-request pixel limits above instead.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import threading
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image as PILImage
from PIL import UnidentifiedImageError

from services.api.v1 import common_pb2
from services.kit.errors import InvalidArgument, ResourceExhausted

# Pillow's own bomb check, process-wide: a hard ceiling behind FACEXPLAIN_MAX_IMAGE_PIXELS (checked
# first, from the header), so a setting raised by mistake still cannot decode a gigapixel image.
PILLOW_MAX_IMAGE_PIXELS = 64 * 1024 * 1024
PILImage.MAX_IMAGE_PIXELS = PILLOW_MAX_IMAGE_PIXELS

# The formats a face image comes in. Everything else Pillow can parse (TIFF, GIF, EPS, ICO, TGA, PSD,
# ...) is parser surface nobody needs here; EPS would even reach Ghostscript. PGM/PBM are Pillow's PPM.
ALLOWED_FORMATS = ("JPEG", "PNG", "PPM", "BMP", "WEBP")
ALLOWED_TEXT = "JPEG, PNG, PGM/PPM, BMP or WebP"

# Leading bytes -> format name, only to name a refused format in the error message.
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"%!PS", "EPS/PostScript"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"%PDF", "PDF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"\x00\x00\x02\x00", "CUR"),
    (b"8BPS", "PSD"),
    (b"DDS ", "DDS"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"icns", "ICNS"),
    (b"qoif", "QOI"),
    (b"BM", "BMP"),
    (b"P1", "PBM"),
    (b"P4", "PBM"),
    (b"P2", "PGM"),
    (b"P5", "PGM"),
    (b"P3", "PPM"),
    (b"P6", "PPM"),
    (b"P7", "PAM"),
    (b"PF", "PFM"),
    (b"Pf", "PFM"),
)

_DTYPES: dict[int, np.dtype] = {
    common_pb2.DTYPE_UINT8: np.dtype("uint8"),
    common_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
}


def sniff_format(data: bytes) -> str:
    """The format ``data`` claims by its leading bytes (for messages only; Pillow decides what it is)."""
    head = data[:16]
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    if head[4:12] in (b"ftypavif", b"ftypheic", b"ftypheix", b"ftypmif1"):
        return "AVIF/HEIF"
    return "unknown"


class PixelBudget:
    """Decoded pixels one request may still spend; shared by the images of that request."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.spent = 0
        self._lock = threading.Lock()

    def charge(self, pixels: int, what: str = "image") -> None:
        with self._lock:
            if self.spent + pixels > self.limit:
                raise ResourceExhausted(
                    f"{what} of {pixels} pixels would take this request to {self.spent + pixels} decoded pixels, "
                    f"over its budget of {self.limit} (FACEXPLAIN_MAX_REQUEST_PIXELS); send fewer or smaller images"
                )
            self.spent += pixels


_BUDGET: contextvars.ContextVar[PixelBudget | None] = contextvars.ContextVar("facexplain_pixel_budget", default=None)


@contextlib.contextmanager
def request_budget(limit: int | None) -> Iterator[PixelBudget | None]:
    """Give the code run inside (one RPC) a fresh budget of ``limit`` decoded pixels; None = no budget."""
    budget = PixelBudget(limit) if limit else None
    token = _BUDGET.set(budget)
    try:
        yield budget
    finally:
        _BUDGET.reset(token)


def _charge(width: int, height: int, charge: bool) -> None:
    budget = _BUDGET.get()
    if charge and budget is not None:
        budget.charge(width * height, f"image of {width}x{height}")


def _check_size(width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise InvalidArgument(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ResourceExhausted(
            f"image of {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels} pixels "
            "(FACEXPLAIN_MAX_IMAGE_PIXELS)"
        )


def _open(data: bytes, max_pixels: int) -> PILImage.Image:
    """Pillow's image over ``data`` (header parsed, no pixels decoded), restricted to the allowed formats."""
    claimed = sniff_format(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PILImage.DecompressionBombWarning)
            img = PILImage.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning) as exc:
        raise ResourceExhausted(
            f"image exceeds the limit of {max_pixels} pixels (FACEXPLAIN_MAX_IMAGE_PIXELS), and Pillow's "
            f"decompression-bomb check refused it from its header: {exc}"
        ) from None
    except UnidentifiedImageError:
        if claimed in ("unknown", "JPEG", "PNG", "BMP", "WEBP", "PGM", "PPM", "PBM"):
            raise InvalidArgument(f"image bytes are not a decodable image ({ALLOWED_TEXT})") from None
        raise InvalidArgument(f"image format {claimed} is not accepted: send {ALLOWED_TEXT}") from None
    except Exception as exc:
        raise InvalidArgument(f"image header could not be read: {type(exc).__name__}") from None
    fmt = img.format or "unknown"
    if fmt not in ALLOWED_FORMATS and fmt != "MPO":  # MPO: a multi-picture JPEG, opened by the JPEG plugin
        img.close()
        raise InvalidArgument(f"image format {fmt} is not accepted: send {ALLOWED_TEXT}")
    return img


def _to_tensor(rgb: PILImage.Image) -> torch.Tensor:
    """(3, H, W) float32 in [0, 255] with one float allocation (no float HWC copy, no second permute copy)."""
    arr = np.asarray(rgb)  # (H, W, 3) uint8, read-only: only read below
    out = torch.empty((3, arr.shape[0], arr.shape[1]), dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable array": the view is never written
        src = torch.from_numpy(arr)
    out.copy_(src.permute(2, 0, 1))
    return out


def decode_encoded(data: bytes, max_pixels: int, *, charge: bool = True) -> torch.Tensor:
    """JPEG/PNG/PGM/PPM/BMP/WebP bytes -> (3, H, W) float32 RGB in [0, 255].

    ``charge=False`` decodes outside the request's pixel budget (server-side dataset files, decoded
    and dropped in chunks by a job).
    """
    if not data:
        raise InvalidArgument("image.encoded is empty")
    img = _open(data, max_pixels)
    try:
        _check_size(img.width, img.height, max_pixels)
        _charge(img.width, img.height, charge)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img.load()
            rgb = img if img.mode == "RGB" else img.convert("RGB")
        except Exception as exc:
            raise InvalidArgument(f"image data is corrupt or truncated ({type(exc).__name__}: {exc})") from None
        return _to_tensor(rgb)
    finally:
        img.close()


def decode_tensor(t: common_pb2.Tensor, max_pixels: int, *, charge: bool = True) -> torch.Tensor:
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
    _charge(width, height, charge)
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


def decode_image(image: common_pb2.Image, max_pixels: int, *, charge: bool = True) -> torch.Tensor:
    """Any ``Image`` message -> (3, H, W) float32 RGB in [0, 255], or a ServiceError saying what is wrong."""
    kind = image.WhichOneof("data")
    if kind == "encoded":
        return decode_encoded(image.encoded, max_pixels, charge=charge)
    if kind == "tensor":
        return decode_tensor(image.tensor, max_pixels, charge=charge)
    raise InvalidArgument("image is empty: set image.encoded (PNG/JPEG bytes) or image.tensor")


def encode_png(chw: torch.Tensor) -> bytes:
    """(3, H, W) float in [0, 255] -> PNG bytes."""
    arr = chw.detach().clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    buf = io.BytesIO()
    PILImage.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def png_image(chw: torch.Tensor) -> common_pb2.Image:
    return common_pb2.Image(encoded=encode_png(chw))
