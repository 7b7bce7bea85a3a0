"""A bounded load generator on loopback (issue 23, load limits): many concurrent Embed calls of real faces
against one server, each outcome classified, the server's memory read before and after.

accepted = OK, rejected = RESOURCE_EXHAUSTED (the concurrency cap, FACEXPLAIN_MAX_CONCURRENT_RPCS, or a
budget), failed = anything else (must stay 0). Shared by tests/integration/test_load_limits.py (seconds),
bench/bench_load.py (the soak, minutes) and tests/e2e/test_services.py (any RPC, over TLS with a token,
while an alias moves: :func:`run_calls`).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from services.api.v1 import common_pb2, embedding_pb2, embedding_pb2_grpc


def proc_memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) of a process, in KiB, from /proc/<pid>/status."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(rest.split()[0])
    return out


@dataclass
class LoadResult:
    calls: int = 0
    accepted: int = 0
    rejected: int = 0
    failed: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    answers: Counter[str] = field(default_factory=Counter)  # what run_calls' call returned, per accepted call

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies_ms)

        def pct(q: float) -> float:
            return round(lat[min(len(lat) - 1, int(q * len(lat)))], 1) if lat else 0.0

        return {
            "calls": self.calls,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "failed": self.failed,
            "failures": dict(self.failures),
            "seconds": round(self.seconds, 2),
            "accepted_per_s": round(self.accepted / self.seconds, 2) if self.seconds else 0.0,
            "accepted_latency_ms": {"p50": pct(0.5), "p95": pct(0.95), "max": pct(1.0)},
            **({"answers": dict(self.answers)} if self.answers else {}),
        }


def run_load(
    address: str,
    faces: list[bytes],
    *,
    clients: int,
    max_calls: int | None = None,
    duration_s: float | None = None,
    timeout_s: float = 120.0,
    backoff_s: float = 0.05,
) -> LoadResult:
    """``clients`` threads call Embed back to back until ``max_calls`` calls are made or ``duration_s`` passes
    (whichever comes first; at least one must be given). One channel per client, like separate callers; a
    refused caller waits ``backoff_s`` before its next call, as a client honouring RESOURCE_EXHAUSTED would."""
    requests = [embedding_pb2.EmbedRequest(image=common_pb2.Image(encoded=f)) for f in faces]

    def embed(channel: grpc.Channel, n: int) -> str:
        embedding_pb2_grpc.EmbeddingServiceStub(channel).Embed(requests[n % len(requests)], timeout=timeout_s)
        return ""

    return run_calls(
        lambda: grpc.insecure_channel(address),
        embed,
        clients=clients,
        max_calls=max_calls,
        duration_s=duration_s,
        backoff_s=backoff_s,
    )


def run_calls(
    open_channel: Callable[[], grpc.Channel],
    call: Callable[[grpc.Channel, int], str],
    *,
    clients: int,
    max_calls: int | None = None,
    duration_s: float | None = None,
    until: Callable[[], bool] | None = None,
    backoff_s: float = 0.05,
) -> LoadResult:
    """The load loop of :func:`run_load` for any RPC: ``call(channel, n)`` makes call number ``n`` and returns a
    label counted in ``answers`` (e.g. the model version that answered). It stops at ``max_calls``, after
    ``duration_s``, or once ``until()`` is true (checked between calls), whichever comes first."""
    if max_calls is None and duration_s is None and until is None:
        raise ValueError("a bounded load needs max_calls, duration_s or until")
    result = LoadResult()
    lock = threading.Lock()
    issued = 0
    t0 = time.perf_counter()
    end = t0 + duration_s if duration_s is not None else float("inf")

    def take() -> int | None:
        nonlocal issued
        with lock:
            if (max_calls is not None and issued >= max_calls) or time.perf_counter() >= end:
                return None
            if until is not None and until():
                return None
            issued += 1
            return issued

    def client() -> None:
        with open_channel() as ch:
            while (n := take()) is not None:
                start = time.perf_counter()
                answer = ""
                try:
                    answer = call(ch, n)
                    code = grpc.StatusCode.OK
                except grpc.RpcError as err:
                    code = err.code()
                ms = (time.perf_counter() - start) * 1000
                with lock:
                    result.calls += 1
                    if code == grpc.StatusCode.OK:
                        result.accepted += 1
                        result.latencies_ms.append(ms)
                        if answer:
                            result.answers[answer] += 1
                    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        result.rejected += 1
                    else:
                        result.failed += 1
                        result.failures[code.name] += 1
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    time.sleep(backoff_s)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.seconds = time.perf_counter() - t0
    return result


def health_latency_ms(address: str, service: str = "", timeout_s: float = 5.0) -> tuple[str, float]:
    """One grpc.health.v1 Check on a fresh plaintext channel: (status name, milliseconds incl. connect)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as ch:
        grpc.channel_ready_future(ch).result(timeout=timeout_s)
        stub = health_pb2_grpc.HealthStub(ch)
        t0 = time.perf_counter()
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        ms = (time.perf_counter() - t0) * 1000
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status), ms
