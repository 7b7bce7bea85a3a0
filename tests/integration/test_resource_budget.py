"""The memory probe of issue 23 against a real embedding server: small images declaring large sizes.

Before the limits, a 58 KB image declaring 4096x4096 raised the server's memory by about 1.9 GB and
four in one ``EmbedBatch`` by 5.7 GB. Here 64 crafted images go in one ``EmbedBatch`` (a few KB each)
and the server's peak RSS growth is measured from ``/proc/<pid>/status``: the peak (VmHWM) is reset
through ``/proc/<pid>/clear_refs`` before each probe, so the figure is that probe's own high-water
mark above the resident size it started from. Every probe must stay under :data:`MEMORY_BUDGET`,
refuse what is over the limits with RESOURCE_EXHAUSTED naming the limit, and leave the server
answering a good call.

The server runs with the default limits (``FACEXPLAIN_MAX_IMAGE_PIXELS`` and
``FACEXPLAIN_MAX_REQUEST_PIXELS``, both 2048*2048): what a deployment gets without tuning.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from PIL import Image

from cli.launcher import REPO, RunningService, start_service
from services.api.v1 import common_pb2, embedding_pb2, embedding_pb2_grpc
from services.kit.config import ServiceSettings

pytestmark = pytest.mark.integration

MEMORY_BUDGET = 1024**3  # bytes of peak RSS growth one call may cause
N = 64
FACE = REPO / "data" / "sample" / "celeba" / "id7201" / "001085.jpg"


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG declaring ``w`` x ``h`` padded to a few KB of (empty) data: the attacker's cheapest probe."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    idat = zlib.compress(b"\0" * 200_000)  # decompresses to a few rows, far short of the declared size
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", idat)
        + chunk(b"IEND", b"")
    )


def _solid_png(side: int) -> bytes:
    """A real, fully decodable ``side`` x ``side`` PNG: one colour, so a few KB carry millions of pixels."""
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (120, 90, 60)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _vm(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    service = start_service(
        "embedding", tmp_path_factory.mktemp("budget"), env={"FACEXPLAIN_TORCH_THREADS": "1"}, timeout=240
    )
    yield service
    assert service.stop() == 0


@pytest.fixture(scope="module")
def figures() -> Iterator[dict[str, dict[str, float]]]:
    out: dict[str, dict[str, float]] = {}
    yield out
    print("\nmemory probe figures:", json.dumps(out, indent=1))


def _embed_batch(svc: RunningService, images: list[bytes]) -> embedding_pb2.EmbedBatchResponse:
    with grpc.insecure_channel(svc.address, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        stub = embedding_pb2_grpc.EmbeddingServiceStub(ch)
        req = embedding_pb2.EmbedBatchRequest(images=[common_pb2.Image(encoded=b) for b in images])
        return stub.EmbedBatch(req, timeout=600)


def _probe(svc: RunningService, images: list[bytes]) -> tuple[embedding_pb2.EmbedBatchResponse, dict[str, float]]:
    pid = svc.proc.pid
    _embed_batch(svc, [FACE.read_bytes()])  # warm: lazily allocated buffers are not the probe's
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _vm(pid)
    resp = _embed_batch(svc, images)
    after = _vm(pid)
    growth = after["VmHWM"] - before["VmRSS"]
    fig = {
        "request_bytes": sum(len(b) for b in images),
        "rss_before_mb": round(before["VmRSS"] / 2**20, 1),
        "peak_growth_mb": round(growth / 2**20, 1),
        "budget_mb": MEMORY_BUDGET / 2**20,
    }
    assert growth < MEMORY_BUDGET, f"peak RSS grew by {growth / 2**20:.0f} MB, over the budget: {fig}"
    # the server still serves a good call afterwards
    ok = _embed_batch(svc, [FACE.read_bytes()])
    assert ok.results[0].WhichOneof("outcome") == "ok"
    return resp, fig


def test_defaults_are_the_stated_ones() -> None:
    s = ServiceSettings()
    assert s.max_image_pixels == 2048 * 2048 and s.max_request_pixels == 2048 * 2048


def test_images_declaring_huge_sizes_are_refused_from_their_headers(
    svc: RunningService, figures: dict[str, dict[str, float]]
) -> None:
    images = [_png_header_only(30000, 30000) for _ in range(N)]
    assert max(len(b) for b in images) < 4096
    resp, fig = _probe(svc, images)
    assert len(resp.results) == N
    for r in resp.results:
        assert r.WhichOneof("outcome") == "error"
        assert r.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert "exceeds the limit of 4194304 pixels (FACEXPLAIN_MAX_IMAGE_PIXELS)" in r.error.message, r.error
    figures["64 x PNG declaring 30000x30000"] = fig


def test_the_issue_probe_4096_squared_is_refused(svc: RunningService, figures: dict[str, dict[str, float]]) -> None:
    images = [_png_header_only(4096, 4096) for _ in range(N)]
    resp, fig = _probe(svc, images)
    assert all("FACEXPLAIN_MAX_IMAGE_PIXELS" in r.error.message for r in resp.results)
    figures["64 x PNG declaring 4096x4096"] = fig


def test_decodable_images_at_the_limit_stay_within_the_request_budget(
    svc: RunningService, figures: dict[str, dict[str, float]]
) -> None:
    one = _solid_png(2048)  # 4.2 Mpx, exactly the per-image limit, a few KB
    assert len(one) < 64 * 1024
    resp, fig = _probe(svc, [one] * N)
    decoded = [r for r in resp.results if "FACEXPLAIN_MAX_REQUEST_PIXELS" not in r.error.message]
    refused = [r for r in resp.results if "FACEXPLAIN_MAX_REQUEST_PIXELS" in r.error.message]
    # the budget holds exactly one such image: it is decoded and searched (no face in one colour), the rest refused
    assert len(decoded) == 1 and len(refused) == N - 1, [r.error.message for r in resp.results[:3]]
    assert "no face" in decoded[0].error.message.lower()
    assert all(r.error.message.startswith("image of 2048x2048") for r in refused)
    figures["64 x decodable 2048x2048 PNG"] = fig
