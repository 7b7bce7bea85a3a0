"""FACEXPLAIN_MAX_CONNECTION_AGE_S on a real in-process server: a client's connection is replaced after the age
(what makes a round_robin client resolve a headless Service again and find replicas the HPA added), a call in
flight when the server says GOAWAY still finishes, and without the setting one connection serves every call."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from sdk.client import ClientSecurity, open_channel
from services.kit.config import ServiceSettings
from services.kit.metrics import ServiceMetrics
from services.kit.server import GrpcServer

SERVICE = "test.Peers"


class _Peers:
    """Answers with nothing, recording the client address (IP:port: one per connection) of every call."""

    def __init__(self) -> None:
        self.metrics = ServiceMetrics("peers")
        self.peers: list[str] = []
        self.lock = threading.Lock()

    def Call(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        with self.lock:
            self.peers.append(context.peer())
        if request == b"slow":
            time.sleep(1.0)
        return b""


def _add(servicer: _Peers, server: grpc.Server) -> None:
    handlers = {"Call": grpc.unary_unary_rpc_method_handler(servicer.Call)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


@pytest.fixture
def serve() -> Iterator[object]:
    started: list[GrpcServer] = []

    def start(**kw: float) -> tuple[GrpcServer, _Peers]:
        settings = ServiceSettings(port=0, metrics_enabled=False, grace_period_s=0, **kw)  # type: ignore[arg-type]
        servicer = _Peers()
        server = GrpcServer(settings, SERVICE, servicer, _add, servicer.metrics).start()
        started.append(server)
        return server, servicer

    yield start
    for server in started:
        server.stop(0)


def _calls_for(seconds: float, address: str, slow_at: float | None = None) -> None:
    """Calls through one SDK channel (round_robin, retries) for ``seconds``; one slow call started at ``slow_at``."""
    channel = open_channel(address, security=ClientSecurity())
    call = channel.unary_unary(f"/{SERVICE}/Call")
    try:
        with ThreadPoolExecutor(1) as pool:
            slow = None
            t0 = time.monotonic()
            while time.monotonic() - t0 < seconds:
                if slow is None and slow_at is not None and time.monotonic() - t0 >= slow_at:
                    slow = pool.submit(call, b"slow", timeout=10, wait_for_ready=True)
                call(b"", timeout=10, wait_for_ready=True)
                time.sleep(0.05)
            if slow is not None:
                slow.result()  # raises if the GOAWAY failed the call in flight
    finally:
        channel.close()


def test_connections_are_replaced_after_the_age(serve) -> None:  # type: ignore[no-untyped-def]
    server, servicer = serve(max_connection_age_s=0.4)
    _calls_for(2.0, server.address, slow_at=0.2)
    assert len(set(servicer.peers)) >= 2, servicer.peers
    assert len(servicer.peers) > 20  # every call answered, none lost to a closing connection


def test_without_an_age_one_connection_serves_every_call(serve) -> None:  # type: ignore[no-untyped-def]
    server, servicer = serve()
    _calls_for(1.0, server.address)
    assert len(set(servicer.peers)) == 1, set(servicer.peers)
