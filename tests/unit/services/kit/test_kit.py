"""Service-kit pieces without a server: image decoding limits, log redaction, settings."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from services.api.v1 import common_pb2
from services.kit.config import ServiceSettings
from services.kit.errors import InvalidArgument, ResourceExhausted
from services.kit.images import decode_image, encode_png
from services.kit.logs import JsonFormatter, RedactBiometrics


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_decode_png_to_chw_float() -> None:
    t = decode_image(common_pb2.Image(encoded=_png(7, 5)), max_pixels=100)
    assert t.shape == (3, 5, 7) and t.dtype == torch.float32
    assert t[:, 0, 0].tolist() == [10.0, 20.0, 30.0]


def test_pixel_limit_checked_from_header() -> None:
    with pytest.raises(ResourceExhausted, match="exceeds the limit of 34 pixels"):
        decode_image(common_pb2.Image(encoded=_png(7, 5)), max_pixels=34)


def test_greyscale_tensor_replicated() -> None:
    arr = np.arange(6, dtype=np.uint8).reshape(2, 3)
    t = decode_image(
        common_pb2.Image(tensor=common_pb2.Tensor(dtype=common_pb2.DTYPE_UINT8, shape=[2, 3], data=arr.tobytes())),
        100,
    )
    assert t.shape == (3, 2, 3) and torch.equal(t[0], t[2])


def test_float_tensor_out_of_range() -> None:
    data = np.full((2, 2, 3), 1.5, "<f4").tobytes()
    with pytest.raises(InvalidArgument, match=r"\[0, 1\]"):
        decode_image(
            common_pb2.Image(tensor=common_pb2.Tensor(dtype=common_pb2.DTYPE_FLOAT32, shape=[2, 2, 3], data=data)),
            100,
        )


def test_png_roundtrip() -> None:
    x = torch.rand(3, 9, 11) * 255
    back = decode_image(common_pb2.Image(encoded=encode_png(x)), 1000)
    assert (back - x.round()).abs().max() <= 1


def test_log_redaction_hides_payloads() -> None:
    rec = logging.LogRecord(
        "t",
        logging.INFO,
        __file__,
        1,
        "got %s %s %s %s",
        (b"\xff\xd8jpegbytes", torch.randn(128), list(np.linspace(0, 1, 128)), "ok"),
        None,
    )
    rec.fx_template = np.ones(128)
    assert RedactBiometrics().filter(rec)
    text = JsonFormatter().format(rec)
    assert "jpegbytes" not in text and "0.0078" not in text and "1.0, 1.0" not in text
    assert "<redacted bytes len=11>" in text and "<redacted Tensor shape=(128,)>" in text and "ok" in text


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FACEXPLAIN_PORT", "6000")
    monkeypatch.setenv("FACEXPLAIN_MAX_BATCH_SIZE", "3")
    s = ServiceSettings()
    assert (
        s.port == 6000
        and s.max_batch_size == 3
        and s.max_image_pixels == 2048 * 2048
        and s.max_request_pixels == 2048 * 2048
    )
    monkeypatch.setenv("FACEXPLAIN_PORT", "-1")
    with pytest.raises(ValueError):
        ServiceSettings()
