"""Integration fixtures: one real server per service for the whole session, shared by all tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from services.client.launcher import RunningService, start_service


@pytest.fixture(scope="session")
def server_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("server-logs")


@pytest.fixture(scope="session")
def embedding_service(server_logs: Path) -> Iterator[RunningService]:
    svc = start_service("embedding", server_logs, env={"FACEXPLAIN_MAX_BATCH_SIZE": "32"})
    yield svc
    code = svc.stop()
    assert code == 0, f"embedding service did not shut down cleanly on SIGTERM (exit {code})"


@pytest.fixture(scope="session")
def embedding_client(embedding_service: RunningService):  # type: ignore[no-untyped-def]
    from services.client.sdk import EmbeddingClient, wait_ready

    client = EmbeddingClient(embedding_service.address, timeout=120)
    wait_ready(client.channel, 30)
    yield client
    client.close()
