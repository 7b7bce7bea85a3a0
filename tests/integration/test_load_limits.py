"""Load limits and health that means ready, on real servers on loopback (issue 23, build items 6 and 7).

One embedding server (local weights, no registry) runs with two request workers, a cap of two calls in
progress (``FACEXPLAIN_MAX_CONCURRENT_RPCS``) and a plaintext health port (``FACEXPLAIN_HEALTH_PORT``):
eight callers embedding real faces back to back keep both workers busy, so calls over the cap answer
RESOURCE_EXHAUSTED at once (nothing else fails), the server's memory stays bounded, and a health check
on the health port still answers within 100 ms. A decoding server following the session's registry at
an alias that resolves to nothing reports NOT_SERVING.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cli.launcher import RunningMlflow, RunningService, free_port, start_service
from registry import VersionInfo
from services.api.v1 import common_pb2, decoding_pb2_grpc
from tests.loadgen import LoadResult, health_latency_ms, proc_memory_kib, run_load
from tests.service_env import registry_service_env

pytestmark = pytest.mark.integration

CAP = 2
CLIENTS = 8
HEALTH_BUDGET_MS = 100.0
MEMORY_BUDGET_MIB = 1024
LOAD_S = 20.0  # the bounded load: at most 400 calls in 20 s


@pytest.fixture(scope="module")
def faces(celeba_dir: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted((celeba_dir / "images").glob("*.jpg"))[:4]]


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningService, int]]:
    logs = tmp_path_factory.mktemp("capped")
    health_port = free_port()
    env = {
        "FACEXPLAIN_REGISTRY_URI": "",
        "FACEXPLAIN_TORCH_THREADS": "1",
        "FACEXPLAIN_MAX_WORKERS": str(CAP),
        "FACEXPLAIN_MAX_CONCURRENT_RPCS": str(CAP),
        "FACEXPLAIN_HEALTH_PORT": str(health_port),
    }
    svc = start_service("embedding", logs, env=env, timeout=300)
    yield svc, health_port
    code = svc.stop()
    assert code == 0, f"exit {code}; log tail:\n{svc.log_text()[-2000:]}"


def test_load_over_the_cap_is_rejected_not_queued_and_memory_stays_bounded(
    capped: tuple[RunningService, int], faces: list[bytes]
) -> None:
    svc, _ = capped
    run_load(svc.address, faces, clients=1, max_calls=1)  # warm: the first call pays for lazy set-up
    before = proc_memory_kib(svc.proc.pid)
    result = run_load(svc.address, faces, clients=CLIENTS, max_calls=400, duration_s=LOAD_S)
    after = proc_memory_kib(svc.proc.pid)
    figures = {**result.summary(), "rss_before_mib": before["VmRSS"] // 1024, "rss_after_mib": after["VmRSS"] // 1024}
    figures["peak_rss_mib"] = after["VmHWM"] // 1024
    print(f"\nload over the cap ({CLIENTS} callers, cap {CAP}): {figures}")
    assert result.failed == 0, result.failures
    assert result.rejected > 0, "more callers than the cap: some calls must be refused"
    assert result.accepted > 0
    assert (after["VmRSS"] - before["VmRSS"]) / 1024 < MEMORY_BUDGET_MIB, figures
    assert svc.alive()


def test_health_answers_within_100_ms_while_every_worker_is_busy(
    capped: tuple[RunningService, int], faces: list[bytes]
) -> None:
    svc, health_port = capped
    box: dict[str, LoadResult] = {}
    load = threading.Thread(
        target=lambda: box.setdefault("r", run_load(svc.address, faces, clients=CLIENTS, duration_s=10)), daemon=True
    )
    load.start()
    time.sleep(2.0)  # both workers busy, callers queued behind the cap
    samples: list[tuple[str, float]] = []
    main_port: list[str] = []
    while load.is_alive() and len(samples) < 20:
        samples.append(health_latency_ms(f"127.0.0.1:{health_port}", "facexplain.v1.EmbeddingService"))
        try:  # the main port shares the cap: its health check is refused or waits there
            with grpc.insecure_channel(svc.address) as ch:
                health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=0.1)
            main_port.append("OK")
        except grpc.RpcError as err:
            main_port.append(err.code().name)
        time.sleep(0.2)
    load.join()
    result = box["r"]
    ms = sorted(m for _, m in samples)
    print(f"\nhealth port under load: {len(ms)} checks, median {ms[len(ms) // 2]:.1f} ms, max {ms[-1]:.1f} ms; "
          f"main port: {dict((c, main_port.count(c)) for c in set(main_port))}; load {result.summary()}")  # fmt: skip
    assert len(samples) >= 5
    assert all(status == "SERVING" for status, _ in samples)
    assert result.rejected > 0 and result.failed == 0, "the pool was saturated during the checks"
    # The CPU is shared with whatever else runs (2 cores here): the probe's 100-ms budget holds for 9 checks in
    # 10 and the median; none may come near a probe's 1-s timeout (it took 5.19 s when health shared the pool).
    assert ms[len(ms) // 2] < HEALTH_BUDGET_MS and ms[int(0.9 * (len(ms) - 1))] < HEALTH_BUDGET_MS, ms
    assert ms[-1] < 1000.0, ms


def test_a_service_whose_alias_resolves_to_nothing_reports_not_serving(
    mlflow: RunningMlflow, fr_v1: VersionInfo, tmp_path_factory: pytest.TempPathFactory
) -> None:
    logs = tmp_path_factory.mktemp("not-serving")
    health_port = free_port()
    env = registry_service_env(
        mlflow.uri, logs / "cache", FACEXPLAIN_MODEL_ALIAS="no-such-alias", FACEXPLAIN_HEALTH_PORT=str(health_port)
    )
    svc = start_service("decoding", logs, env=env, timeout=300)
    try:
        full = "facexplain.v1.DecodingService"
        for name in ("", full):
            said, _ = health_latency_ms(f"127.0.0.1:{health_port}", name)
            assert said == "NOT_SERVING", (name, said)
        with grpc.insecure_channel(svc.address) as ch:
            check = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=full), timeout=10)
            assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
            status: Any = decoding_pb2_grpc.DecodingServiceStub(ch).ModelStatus(
                common_pb2.ModelStatusRequest(), timeout=30
            )
        # the FR model is served (champion resolves); the decoder's alias does not, and that is reported
        assert [m.kind for m in status.models] == ["embedder"]
        assert "no-such-alias" in status.last_reload_error, status.last_reload_error
        assert svc.alive()
    finally:
        code = svc.stop()
    assert code == 0, f"exit {code}; log tail:\n{svc.log_text()[-2000:]}"
