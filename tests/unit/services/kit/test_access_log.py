"""The access log interceptor on a real in-process gRPC server: one line per call, however the call ends."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from services.kit.access_log import AccessLogInterceptor, request_id
from services.kit.errors import InvalidArgument
from services.kit.logs import JsonFormatter
from services.kit.metrics import ServiceMetrics
from services.kit.rpc import streaming, unary


class _Echo:
    """Handlers wrapped exactly as the services' are (services/kit/rpc.py)."""

    def __init__(self) -> None:
        self.metrics = ServiceMetrics("echo")

    @unary
    def Unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        if request == b"bad":
            raise InvalidArgument("bad request")
        if request == b"boom":
            raise RuntimeError("boom")
        return b"ok:" + request

    @streaming
    def Stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        for i in range(int(request or b"100")):
            yield str(i).encode()
            time.sleep(0.05)


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[dict[str, Any]] = []
        self.setFormatter(JsonFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


@pytest.fixture
def server() -> Iterator[tuple[str, _Echo, _Lines]]:
    echo = _Echo()
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(echo.Unary),
        "Stream": grpc.unary_stream_rpc_method_handler(echo.Stream),
    }
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[AccessLogInterceptor()])
    srv.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", handlers),))
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    lines = _Lines()
    logger = logging.getLogger("facexplain.access")
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    yield f"127.0.0.1:{port}", echo, lines
    logger.removeHandler(lines)
    srv.stop(None)


def _wait(cond: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_one_line_per_call_with_its_code(server: tuple[str, _Echo, _Lines]) -> None:
    address, _, lines = server
    with grpc.insecure_channel(address) as ch:
        call = ch.unary_unary("/test.Echo/Unary")
        assert call(b"secret-payload", metadata=(("x-request-id", "req-1"),)) == b"ok:secret-payload"
        for body, code in ((b"bad", grpc.StatusCode.INVALID_ARGUMENT), (b"boom", grpc.StatusCode.INTERNAL)):
            with pytest.raises(grpc.RpcError) as err:
                call(body)
            assert err.value.code() == code
        _, rpc_call = call.with_call(b"x", metadata=(("x-request-id", "req-2"),))
        assert ("x-request-id", "req-2") in rpc_call.trailing_metadata()
    _wait(lambda: len(lines.lines) == 4)
    assert [(x["method"], x["code"]) for x in lines.lines] == [
        ("Unary", "OK"),
        ("Unary", "INVALID_ARGUMENT"),
        ("Unary", "INTERNAL"),
        ("Unary", "OK"),
    ]
    first = lines.lines[0]
    assert first["msg"] == "rpc Unary OK" and first["service"] == "test.Echo" and first["principal"] == "-"
    assert first["request_id"] == "req-1" and first["peer"].startswith("ipv4:127.0.0.1:") and first["ms"] >= 0
    assert lines.lines[1]["level"] == "WARNING"
    assert not any("secret-payload" in json.dumps(x) for x in lines.lines)


def test_streams_log_ok_and_cancelled(server: tuple[str, _Echo, _Lines]) -> None:
    address, _, lines = server
    with grpc.insecure_channel(address) as ch:
        stream = ch.unary_stream("/test.Echo/Stream")
        assert list(stream(b"3")) == [b"0", b"1", b"2"]
        call = stream(b"")
        next(call)
        call.cancel()
        _wait(lambda: any(x["code"] == "CANCELLED" for x in lines.lines))
    assert [x["msg"] for x in lines.lines] == ["rpc Stream OK", "rpc Stream CANCELLED"]


def test_request_id_only_when_plain() -> None:
    assert request_id((("x-request-id", "abc-123_x.y:z"),)) == "abc-123_x.y:z"
    generated = request_id((("x-request-id", "a b\n{json}"),))
    assert generated != "a b\n{json}" and len(generated) == 32
    assert len(request_id((("x-request-id", "a" * 65),))) == 32
