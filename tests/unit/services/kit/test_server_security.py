"""GrpcServer's operational guards on a real in-process server: the concurrency cap, readiness health, auth wiring."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.kit.config import ServiceSettings
from services.kit.metrics import ServiceMetrics
from services.kit.models import ModelSlot, ServedModel
from services.kit.rpc import unary
from services.kit.server import GrpcServer

SERVICE = "test.Slow"


class _Slow:
    def __init__(self) -> None:
        self.metrics = ServiceMetrics("slow")
        self.release = threading.Event()
        self.running = 0

    @unary
    def Wait(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.running += 1
        self.release.wait(10)
        return b"done"


def _add(servicer: _Slow, server: grpc.Server) -> None:
    handlers = {"Wait": grpc.unary_unary_rpc_method_handler(servicer.Wait)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


def _server(slots: list[ModelSlot[Any]] | None = None, **kw: Any) -> tuple[GrpcServer, _Slow]:
    settings = ServiceSettings(port=0, metrics_enabled=False, max_workers=8, grace_period_s=0, **kw)
    servicer = _Slow()
    server = GrpcServer(settings, SERVICE, servicer, _add, servicer.metrics, required_models=slots or ())
    return server.start(), servicer


@pytest.fixture
def capped() -> Iterator[tuple[GrpcServer, _Slow]]:
    server, servicer = _server(max_concurrent_rpcs=2)
    yield server, servicer
    servicer.release.set()
    server.stop(0)


def test_calls_over_the_cap_are_refused_not_queued(capped: tuple[GrpcServer, _Slow]) -> None:
    server, servicer = capped
    results: list[Any] = []
    with grpc.insecure_channel(server.address) as ch:
        call = ch.unary_unary(f"/{SERVICE}/Wait")
        futures = [call.future(b"", timeout=15) for _ in range(2)]
        deadline = time.monotonic() + 5
        while servicer.running < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            call(b"", timeout=5)
        refused_in = time.monotonic() - t0
        servicer.release.set()
        results = [f.result() for f in futures]
        assert call(b"", timeout=5) == b"done"  # capacity is back once the calls finish
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "Concurrent RPC limit exceeded" in (err.value.details() or "")
    assert refused_in < 1.0  # refused at once, not queued behind the running calls
    assert results == [b"done", b"done"]


def test_health_not_serving_until_the_required_model_is_loaded() -> None:
    slot: ModelSlot[str] = ModelSlot(None, label="decoder")
    server, _ = _server([slot])
    try:
        with grpc.insecure_channel(server.address) as ch:
            health = health_pb2_grpc.HealthStub(ch)

            def status(name: str = "") -> int:
                return health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status  # type: ignore[no-any-return]

            assert status() == status(SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
            assert server.missing_models() == ["decoder"]
            slot.swap(ServedModel("dec", "1", "decoder", "weights"))
            deadline = time.monotonic() + 5
            while status(SERVICE) != health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() < deadline, "health did not follow the loaded model"
                time.sleep(0.1)
            assert status() == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(0)


def test_tokens_file_turns_auth_on(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.json"
    digest = hashlib.sha256(b"tok").hexdigest()
    tokens.write_text(json.dumps({"tokens": [{"principal": "p", "sha256": digest, "scopes": ["embed"]}]}))
    server, servicer = _server(auth_tokens_file=str(tokens))
    servicer.release.set()
    try:
        with grpc.insecure_channel(server.address) as ch:
            call = ch.unary_unary(f"/{SERVICE}/Wait")
            with pytest.raises(grpc.RpcError) as err:
                call(b"", timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as err:  # valid, but no rule gives any scope this method
                call(b"", timeout=5, metadata=(("authorization", "Bearer tok"),))
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            ok = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert ok.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(0)


def test_bad_security_settings_stop_the_start_before_models_load(tmp_path: Path) -> None:
    """`facexplain serve` checks the TLS and credentials files first: a typo fails in a second, not after model
    loading."""
    import subprocess
    import sys

    from cryptography.hazmat.primitives.asymmetric import ec
    from jwt.algorithms import ECAlgorithm

    from cli.launcher import REPO

    (tmp_path / "tokens.json").write_text('{"tokens": [{"principal": "p", "token": "plain", "scopes": ["embed"]}]}')
    jwk = ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()).public_key(), as_dict=True)
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    cases = {
        "FACEXPLAIN_TLS_CERT_FILE": (str(tmp_path / "missing.crt"), "FACEXPLAIN_TLS_KEY_FILE is not set"),
        "FACEXPLAIN_AUTH_TOKENS_FILE": (str(tmp_path / "tokens.json"), "holds the token itself"),
        # a JWKS without issuer and audience would accept tokens minted for anything by anyone with a key in it
        "FACEXPLAIN_AUTH_JWKS_FILE": (str(tmp_path / "jwks.json"), "FACEXPLAIN_AUTH_JWT_ISSUER and"),
    }
    for var, (value, message) in cases.items():
        env = {"PATH": "/usr/bin:/bin", var: value, "FACEXPLAIN_PORT": "0"}
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "cli.main", "serve", "embedding"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
        assert time.monotonic() - t0 < 60


def test_health_port_answers_while_every_worker_is_busy() -> None:
    """Every request worker blocked and the concurrency cap reached: the health port still answers in < 100 ms."""
    settings = ServiceSettings(
        port=0, health_port=0, metrics_enabled=False, max_workers=2, max_concurrent_rpcs=3, grace_period_s=0
    )
    servicer = _Slow()
    server = GrpcServer(settings, SERVICE, servicer, _add, servicer.metrics).start()
    try:
        with (
            grpc.insecure_channel(server.address) as ch,
            grpc.insecure_channel(f"127.0.0.1:{server.health_port}") as hc,
        ):
            call = ch.unary_unary(f"/{SERVICE}/Wait")
            pending = [call.future(b"", timeout=15) for _ in range(3)]  # 2 running, 1 queued: the cap
            deadline = time.monotonic() + 5
            while servicer.running < 2:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            main_health = health_pb2_grpc.HealthStub(ch)
            with pytest.raises(grpc.RpcError) as err:  # the request port's own health is refused at the cap
                main_health.Check(health_pb2.HealthCheckRequest(), timeout=2)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            probe = health_pb2_grpc.HealthStub(hc)
            probe.Check(health_pb2.HealthCheckRequest(), timeout=5)  # connect once, as a prober's channel does
            times = []
            for _ in range(20):
                t0 = time.perf_counter()
                resp = probe.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=1)
                times.append(time.perf_counter() - t0)
                assert resp.status == health_pb2.HealthCheckResponse.SERVING
            servicer.release.set()
            assert [f.result() for f in pending] == [b"done"] * 3
        assert max(times) < 0.1, f"health under load took up to {max(times) * 1000:.0f} ms"
        # the health port serves health only
        with grpc.insecure_channel(f"127.0.0.1:{server.health_port}") as hc:
            with pytest.raises(grpc.RpcError) as err:
                hc.unary_unary(f"/{SERVICE}/Wait")(b"", timeout=5)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        servicer.release.set()
        server.stop(0)
