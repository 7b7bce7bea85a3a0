"""Resource safety of request inputs (issue 23): image formats, the bomb check, the per-call pixel budget,
template magnitude."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
import torch
from PIL import Image

from services.api.v1 import common_pb2
from services.kit.errors import InvalidArgument, ResourceExhausted
from services.kit.images import PILLOW_MAX_IMAGE_PIXELS, decode_image, request_budget
from services.kit.templates import template_from_proto


def _encoded(fmt: str, size: tuple[int, int] = (6, 4), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 128 if mode == "L" else (128, 128, 128)).save(buf, format=fmt)
    return buf.getvalue()


def _png_header(w: int, h: int) -> bytes:
    """A PNG that declares ``w`` x ``h`` and holds no pixel data (a few dozen bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("fmt", "mode"), [("JPEG", "RGB"), ("PNG", "RGB"), ("PPM", "RGB"), ("PPM", "L"), ("BMP", "RGB"), ("WEBP", "RGB")]
)
def test_allowed_formats_decode(fmt: str, mode: str) -> None:
    t = decode_image(common_pb2.Image(encoded=_encoded(fmt, mode=mode)), 100)
    assert t.shape == (3, 4, 6) and t.dtype == torch.float32 and t.is_contiguous()
    assert abs(float(t.mean()) - 128) < 3


@pytest.mark.parametrize("fmt", ["GIF", "TIFF", "ICO"])
def test_other_formats_are_refused_by_name(fmt: str) -> None:
    with pytest.raises(
        InvalidArgument, match=f"image format {fmt} is not accepted: send JPEG, PNG, PGM/PPM, BMP or WebP"
    ):
        decode_image(common_pb2.Image(encoded=_encoded(fmt, (16, 16))), 10_000)


def test_eps_never_reaches_a_parser() -> None:
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n"
    with pytest.raises(InvalidArgument, match="image format EPS/PostScript is not accepted"):
        decode_image(common_pb2.Image(encoded=eps), 10_000)


def test_unknown_bytes_are_not_an_image() -> None:
    with pytest.raises(InvalidArgument, match="not a decodable image"):
        decode_image(common_pb2.Image(encoded=b"hello" * 20), 10_000)


def test_pillow_bomb_check_is_on_behind_the_header_limit() -> None:
    assert Image.MAX_IMAGE_PIXELS == PILLOW_MAX_IMAGE_PIXELS
    with pytest.raises(ResourceExhausted, match="decompression-bomb check refused it"):
        decode_image(common_pb2.Image(encoded=_png_header(20000, 20000)), 10**12)


def test_request_budget_is_charged_before_decoding() -> None:
    img = common_pb2.Image(encoded=_encoded("PNG", (10, 10)))
    with request_budget(250) as budget:
        decode_image(img, 1000)
        decode_image(img, 1000)
        with pytest.raises(ResourceExhausted, match=r"300 decoded pixels, over its budget of 250"):
            decode_image(img, 1000)
        # an image declaring more than what is left is refused from its header (it holds no pixels at all)
        with pytest.raises(ResourceExhausted, match="FACEXPLAIN_MAX_REQUEST_PIXELS"):
            decode_image(common_pb2.Image(encoded=_png_header(60, 60)), 10_000)
        assert budget is not None and budget.spent == 200
        decode_image(img, 1000, charge=False)  # server-side dataset files are not charged
        assert budget.spent == 200
    for _ in range(5):  # outside a call there is no budget
        decode_image(img, 1000)


@pytest.mark.parametrize("value", [3e38, -2e4, 1e5])
def test_huge_template_values_are_refused(value: float) -> None:
    with pytest.raises(InvalidArgument, match="beyond the sane range"):
        template_from_proto(common_pb2.Template(values=[0.1] * 127 + [value], dim=128), 128, "m")


def test_ordinary_template_values_pass() -> None:
    ok = template_from_proto(common_pb2.Template(values=[0.1] * 127 + [-5.0], dim=128), 128, "m")
    assert float(ok.abs().max()) == 5.0
