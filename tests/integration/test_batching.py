"""Dynamic batching over real gRPC on loopback with real faces: concurrent Embed calls share forwards and
get the templates sequential calls get; a full queue and a deadline in the queue answer at once."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from cli.launcher import RunningService, start_service
from facexplain.metrics.verification import VerificationRule
from sdk.client import EmbeddingClient, image_from_path, wait_ready
from services.api.v1 import common_pb2

pytestmark = pytest.mark.integration

N_FACES = 16


def _metric(svc: RunningService, name: str, **labels: str) -> float:
    """One sample of the server's /metrics (0 when absent)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{svc.metrics_port}/metrics", timeout=10).read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def _batches(svc: RunningService) -> tuple[float, float, float]:
    """(batches run, items run, batches of exactly one item) by the embedder's batcher so far."""
    lab = {"service": "embedding", "batcher": "embedder"}
    return (
        _metric(svc, "facexplain_batch_size_count", **lab),
        _metric(svc, "facexplain_batch_size_sum", **lab),
        _metric(svc, "facexplain_batch_size_bucket", le="1.0", **lab),
    )


@pytest.fixture(scope="module")
def faces(celeba_dir: Path) -> list[common_pb2.Image]:
    return [image_from_path(p) for p in sorted((celeba_dir / "images").glob("*.jpg"))[:N_FACES]]


def _templates(responses: list) -> torch.Tensor:  # type: ignore[type-arg]
    return torch.tensor([list(r.template.values) for r in responses], dtype=torch.float64)


def test_concurrent_embeds_are_batched_and_equal_sequential_ones(
    embedding_service: RunningService, embedding_client: EmbeddingClient, faces: list[common_pb2.Image]
) -> None:
    before = _batches(embedding_service)
    sequential = [embedding_client.embed(img) for img in faces]
    after_seq = _batches(embedding_service)
    # Nothing else calls the server meanwhile: each sequential call was a forward of its own.
    assert after_seq[0] - before[0] == N_FACES and after_seq[2] - before[2] == N_FACES

    with ThreadPoolExecutor(N_FACES) as pool:
        concurrent = list(pool.map(embedding_client.embed, faces))
    after = _batches(embedding_service)
    batches, items = after[0] - after_seq[0], after[1] - after_seq[1]
    assert items == N_FACES
    assert batches < N_FACES, f"{N_FACES} concurrent calls ran as {batches} forwards: never batched"
    assert after[0] - after[2] > after_seq[0] - after_seq[2], "no batch of more than one item was seen"

    seq, con = _templates(sequential), _templates(concurrent)
    cos = torch.nn.functional.cosine_similarity(seq, con, dim=1)
    assert float(cos.min()) >= 0.99999, cos.tolist()
    for s, c in zip(sequential, concurrent, strict=True):
        assert c.model == s.model and c.template.model == s.template.model  # the version that produced it
        assert np.allclose([c.face.x1, c.face.y1, c.face.x2, c.face.y2], [s.face.x1, s.face.y1, s.face.x2, s.face.y2])

    # Same verification decisions on every pair, under the served model's own rule.
    proto = embedding_client.verify(
        common_pb2.Probe(template=sequential[0].template), common_pb2.Probe(template=sequential[1].template)
    ).rule
    rule = VerificationRule(proto.metric, proto.threshold, proto.accept_below, proto.source)  # type: ignore[arg-type]
    i, j = torch.triu_indices(N_FACES, N_FACES, offset=1)
    assert torch.equal(rule.accepts(seq[i], seq[j]), rule.accepts(con[i], con[j]))


@pytest.fixture(scope="module")
def tight_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    """An embedding server whose queue holds one EmbedBatch of 32 images at most."""
    svc = start_service(
        "embedding",
        tmp_path_factory.mktemp("tight-queue"),
        env={"FACEXPLAIN_MAX_QUEUE": "32", "FACEXPLAIN_MAX_BATCH_SIZE": "32", "FACEXPLAIN_MAX_WORKERS": "8"},
    )
    yield svc
    assert svc.stop() == 0


def _wait_for(check, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, "timed out waiting for the server"
        time.sleep(0.02)


def test_full_queue_and_deadline_in_queue_answer_at_once(
    tight_service: RunningService, faces: list[common_pb2.Image]
) -> None:
    client = EmbeddingClient(tight_service.address, timeout=300)
    wait_ready(client.channel, 30)
    try:
        client.embed(faces[0])  # warm up
        lab = {"service": "embedding", "batcher": "embedder"}
        start_batches, start_items, _ = _batches(tight_service)
        batch32 = faces + faces
        with ThreadPoolExecutor(2) as pool:
            # A: 32 images run as one forward (seconds on this CPU) while the rest of the test happens.
            running = pool.submit(client.embed_batch, batch32)
            _wait_for(lambda: _batches(tight_service)[0] > start_batches)

            # D: queued behind A with a short deadline -> DEADLINE_EXCEEDED, and it never runs.
            t0 = time.perf_counter()
            with pytest.raises(grpc.RpcError) as err:
                client.embed(faces[1], timeout=0.3)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.perf_counter() - t0 < 2.0

            # B fills the queue (32 of 32 items); E is then refused at once.
            queued = pool.submit(client.embed_batch, batch32)
            _wait_for(lambda: _metric(tight_service, "facexplain_batch_queue_depth", **lab) == 32)
            t0 = time.perf_counter()
            with pytest.raises(grpc.RpcError) as err:
                client.embed(faces[2])
            refused_after = time.perf_counter() - t0
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "FACEXPLAIN_MAX_QUEUE" in (err.value.details() or "")
            assert refused_after < 1.0, (
                refused_after
            )  # gRPC and image decoding under load; the batcher: < 50 ms (unit test)
            assert not running.done(), "the 32-image batch finished before the test could fill the queue"
            a, b = running.result(300), queued.result(300)
    finally:
        client.close()
    assert all(r.WhichOneof("outcome") == "ok" for r in [*a.results, *b.results])
    _batches_run, items_run, _ = _batches(tight_service)
    assert items_run - start_items == 64  # A and B only: the expired and the refused call never ran
    dropped = {
        reason: _metric(tight_service, "facexplain_batch_dropped_total", reason=reason, **lab)
        for reason in ("deadline", "cancelled", "queue_full")
    }
    assert dropped["deadline"] + dropped["cancelled"] >= 1 and dropped["queue_full"] >= 1, dropped
