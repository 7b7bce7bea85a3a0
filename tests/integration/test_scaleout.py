"""Scale-out on loopback: the audit's embedding work, through ONE SDK client whose target names two real
embedding servers (``ipv4:127.0.0.1:P1,127.0.0.1:P2``, what a headless Service's DNS name resolves to in a
cluster), lands on both; each replica's own Prometheus metrics say how many calls it served. The templates
are bit for bit those of one chunk after another on one replica: spreading changes where, not what.

Both replicas follow the session's registry (the default FR model as ``facexplain-fr-dlib128`` v1 at
champion), as the pods of one Deployment do.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cli.launcher import REPO, RunningMlflow, RunningService, start_service
from facexplain.artifacts.embedder import DEFAULT_FR_MODEL
from registry import VersionInfo
from sdk.audit import Audit, AuditConfig, load_faces
from sdk.client import EmbeddingClient, wait_ready
from tests.servers import start_side_by_side
from tests.service_env import registry_service_env

pytestmark = pytest.mark.integration

DATA = REPO / "data" / "sample"  # 36 faces: CelebA and ORL
REPLICAS = ("replica-a", "replica-b")
CHUNK = 3  # 12 EmbedBatch calls for the 36 faces: enough to see how they spread
CONCURRENCY = 4


def _served(svc: RunningService) -> tuple[float, float]:
    """(EmbedBatch calls answered OK, images embedded by them) so far, from the replica's own /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{svc.metrics_port}/metrics", timeout=10).read().decode()
    calls = items = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("service") != "embedding" or s.labels.get("method") != "EmbedBatch":
                continue
            if s.name == "facexplain_requests_total" and s.labels.get("code") == "OK":
                calls += s.value
            elif s.name == "facexplain_items_total" and s.labels.get("outcome") == "ok":
                items += s.value
    return calls, items


@pytest.fixture(scope="module")
def replicas(
    mlflow: RunningMlflow, fr_v1: VersionInfo, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, RunningService]]:
    logs = tmp_path_factory.mktemp("scaleout-svc")

    def start(name: str) -> RunningService:
        (logs / name).mkdir()
        env = registry_service_env(mlflow.uri, logs / name / "cache", FACEXPLAIN_REGISTRY_TIMEOUT_S="30")
        return start_service("embedding", logs / name, env=env, timeout=600)

    running = start_side_by_side(REPLICAS, start)
    for svc in running.values():  # serving the registry's FR model, not local weights
        with EmbeddingClient(svc.address, timeout=60) as client:
            wait_ready(client.channel, 60)
            deadline = time.monotonic() + 120
            while not any(m.model.name == DEFAULT_FR_MODEL and m.serving for m in client.model_status().models):
                assert time.monotonic() < deadline, f"{svc.address}: {DEFAULT_FR_MODEL} not served after 120 s"
                time.sleep(0.5)
    yield running
    for name, svc in running.items():
        code = svc.stop()
        assert code == 0, f"{name} exit {code}; log tail:\n{svc.log_text()[-2000:]}"


def _embed_all(target: str, concurrency: int, out: Path) -> dict[str, list[float] | None]:
    """The audit's embedding of every face of DATA (what its aggregation step sends) through one client."""
    cfg = AuditConfig(
        f"{DEFAULT_FR_MODEL}@champion",
        data=DATA,
        out=out,
        quiet=True,
        embed_chunk=CHUNK,
        embed_concurrency=concurrency,
    )
    audit = Audit(cfg)
    faces, _, _ = load_faces(DATA)
    with EmbeddingClient(target, timeout=300) as client:
        wait_ready(client.channel, 60)
        audit.clients["embedding"] = client
        audit.prefetch_templates(faces)
    assert list(audit.templates) == [f.rel for f in faces]  # every face, in DATA's order
    return {rel: (list(t.values) if t is not None else None) for rel, t in audit.templates.items()}


def test_one_audit_client_spreads_embedding_over_both_replicas(
    replicas: dict[str, RunningService], tmp_path: Path
) -> None:
    a, b = replicas.values()
    faces = len(load_faces(DATA)[0])
    calls = -(-faces // CHUNK)
    # the reference: one chunk after another on one replica
    before = {name: _served(svc) for name, svc in replicas.items()}
    t0 = time.perf_counter()
    sequential = _embed_all(a.address, 1, tmp_path / "sequential")
    one_by_one = time.perf_counter() - t0
    after_seq = {name: _served(svc) for name, svc in replicas.items()}
    assert after_seq["replica-a"][0] - before["replica-a"][0] == calls
    assert after_seq["replica-b"] == before["replica-b"]

    t0 = time.perf_counter()
    spread = _embed_all(f"ipv4:{a.address},{b.address}", CONCURRENCY, tmp_path / "spread")
    elapsed = time.perf_counter() - t0
    after = {name: _served(svc) for name, svc in replicas.items()}
    share = {name: after[name][0] - after_seq[name][0] for name in replicas}
    images = {name: after[name][1] - after_seq[name][1] for name in replicas}
    print(
        f"\n{calls} EmbedBatch calls of {CHUNK} faces: {one_by_one:.1f} s one after another on one replica, "
        f"{elapsed:.1f} s {CONCURRENCY} at a time over two: calls {share}, images embedded {images}"
    )
    assert sum(share.values()) == calls, share
    for name, n in share.items():
        # round_robin over two connected replicas: about half each; pick_first would leave one at 0
        assert n >= 0.25 * calls, f"{name} served {n} of {calls} calls: {share}"
    assert sum(images.values()) == sum(t is not None for t in spread.values())
    # the same templates, bit for bit, in the same order: each EmbedBatch is a forward of its own images
    assert spread == sequential
    assert sum(t is not None for t in spread.values()) >= 30
