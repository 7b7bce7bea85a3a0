"""Bring-your-own FR model end to end: an auditor's TorchScript program and black-box endpoint, registered
with ``facexplain registry register-embedder`` in the session's MLflow, served by real embedding services
(``FACEXPLAIN_MODEL_NAME``), and refused as an attack surrogate by a real counterfactual service.

The auditor's model is the default one's recognition net (dlib's ResNet) traced to TorchScript, so the
white-box service must reproduce the default pipeline's templates; the black box is the same program
behind the reference endpoint (``scripts/blackbox_fr_server.py``) in a subprocess, with a bearer token
that only the services' environment holds. A few faces only: the unit tests cover the format in depth.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from cli.launcher import REPO, RunningMlflow, RunningService, start_service
from facexplain.data.faces import celeba_records, load_image
from registry import CHAMPION, Registry
from sdk.client import EmbeddingClient, image_from_path, template_array, wait_ready
from services.api.v1 import common_pb2, counterfactual_pb2, counterfactual_pb2_grpc
from tests.byo import blackbox_server, trace_dlib_resnet
from tests.servers import start_side_by_side
from tests.service_env import registry_service_env

pytestmark = pytest.mark.integration

TS_MODEL = "facexplain-fr-byots"
BB_MODEL = "facexplain-fr-byobb"
TOKEN = "integration-token-71c"
# the dlib rule, declared by the "auditor" as a calibrated threshold would be
CONTRACT = ["--dim", "128", "--chip-size", "150", "--alignment", "dlib", "--metric", "l2", "--threshold", "0.6"]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("byo-integration")


@pytest.fixture(scope="module")
def program(work: Path) -> Path:
    return trace_dlib_resnet(work / "auditor-dlib.ts")


@pytest.fixture(scope="module")
def endpoint(program: Path) -> Iterator[str]:
    with blackbox_server(program, "--token", TOKEN) as url:
        yield url


def _register(uri: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    cmd = [sys.executable, "-m", "cli.main", "registry", "register-embedder", "--uri", uri, *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def registered(mlflow: RunningMlflow, program: Path, endpoint: str) -> dict[str, str]:
    ts = _register(mlflow.uri, "--name", TS_MODEL, "--program", str(program), *CONTRACT)
    assert ts.returncode == 0, ts.stderr[-3000:]
    assert f"{TS_MODEL}@{CHAMPION} -> version" in ts.stdout, ts.stdout
    bb = _register(
        mlflow.uri, "--name", BB_MODEL, "--blackbox", "--endpoint", endpoint, *CONTRACT,
        env={"FACEXPLAIN_BLACKBOX_TOKEN": TOKEN},
    )  # fmt: skip
    assert bb.returncode == 0, bb.stderr[-3000:]
    assert f"{BB_MODEL}@{CHAMPION} -> version" in bb.stdout, bb.stdout
    return {"ts": ts.stdout, "bb": bb.stdout}


@pytest.fixture(scope="module")
def services(mlflow: RunningMlflow, registered: dict[str, str], endpoint: str, work: Path) -> Iterator[dict[str, Any]]:
    bb_env = {"FACEXPLAIN_BLACKBOX_ENDPOINT": endpoint, "FACEXPLAIN_BLACKBOX_TOKEN": TOKEN}
    envs = {
        "ts": ("embedding", {"FACEXPLAIN_MODEL_NAME": TS_MODEL}),
        "bb": ("embedding", {"FACEXPLAIN_MODEL_NAME": BB_MODEL, **bb_env}),
        "cf": ("counterfactual", {"FACEXPLAIN_FR_MODEL_NAME": BB_MODEL, **bb_env}),
    }

    def start(key: str) -> RunningService:
        service, extra = envs[key]
        env = registry_service_env(mlflow.uri, work / f"cache-{key}", **extra)
        return start_service(service, work / f"logs-{key}", env=env, timeout=300)

    for key in envs:
        (work / f"logs-{key}").mkdir(exist_ok=True)
    running = start_side_by_side(envs, start)
    yield running
    for svc in running.values():
        assert svc.stop() == 0


@pytest.fixture(scope="module")
def faces(celeba_dir: Path) -> tuple[Path, Path, Path]:
    """Two photos of one CelebA identity and one of another."""
    by_id: dict[str, list[Path]] = {}
    for rec in celeba_records(celeba_dir):
        by_id.setdefault(rec.identity, []).append(rec.path)
    same = next(paths for _, paths in sorted(by_id.items()) if len(paths) >= 2)
    other = next(paths[0] for _, paths in sorted(by_id.items()) if paths[0] not in same)
    return same[0], same[1], other


def _client(svc: RunningService) -> EmbeddingClient:
    client = EmbeddingClient(svc.address, timeout=120)
    wait_ready(client.channel, 60)
    return client


def test_registered_as_embedders_without_an_address(
    registry: Registry, registered: dict[str, str], endpoint: str
) -> None:
    ts = registry.resolve(TS_MODEL, CHAMPION)
    bb = registry.resolve(BB_MODEL, CHAMPION)
    assert ts.tags["kind"] == bb.tags["kind"] == "embedder"
    assert ts.tags["template_dim"] == bb.tags["template_dim"] == "128"
    assert "TorchScript" in ts.tags["source"] and "endpoint" in bb.tags["source"]
    port = endpoint.rsplit(":", 1)[1].strip("/")
    assert not any(port in v for v in bb.tags.values())


def test_torchscript_model_serves_the_default_models_templates(
    services: dict[str, Any], faces: tuple[Path, Path, Path], default_pipeline: Any
) -> None:
    a, b, c = faces
    client = _client(services["ts"])
    try:
        resp = client.embed(image_from_path(a))
        assert resp.model.name == TS_MODEL
        want = default_pipeline.analyze([load_image(a)])[0]
        assert want is not None
        assert np.abs(template_array(resp.template) - want.template.numpy()).max() <= 1e-4
        genuine = client.verify(common_pb2.Probe(image=image_from_path(a)), common_pb2.Probe(image=image_from_path(b)))
        impostor = client.verify(common_pb2.Probe(image=image_from_path(a)), common_pb2.Probe(image=image_from_path(c)))
    finally:
        client.close()
    ref = default_pipeline.analyze([load_image(p) for p in (a, b, c)])
    assert all(r is not None for r in ref)
    l2_ab = float(torch.dist(ref[0].template, ref[1].template))
    l2_ac = float(torch.dist(ref[0].template, ref[2].template))
    assert genuine.l2_distance == pytest.approx(l2_ab, abs=1e-4)
    assert impostor.l2_distance == pytest.approx(l2_ac, abs=1e-4)
    assert genuine.same_person == (l2_ab < 0.6) and impostor.same_person == (l2_ac < 0.6)
    assert genuine.rule.metric == "l2" and genuine.rule.threshold == pytest.approx(0.6)


def test_blackbox_model_serves_templates_from_the_endpoint(
    services: dict[str, Any], faces: tuple[Path, Path, Path]
) -> None:
    a, b, c = faces
    bb, ts = _client(services["bb"]), _client(services["ts"])
    try:
        got = bb.embed_batch([image_from_path(p) for p in (a, b, c)])
        want = ts.embed_batch([image_from_path(p) for p in (a, b, c)])
        genuine = bb.verify(common_pb2.Probe(image=image_from_path(a)), common_pb2.Probe(image=image_from_path(b)))
        impostor = bb.verify(common_pb2.Probe(image=image_from_path(a)), common_pb2.Probe(image=image_from_path(c)))
    finally:
        bb.close()
        ts.close()
    assert got.model.name == BB_MODEL
    g = np.stack([template_array(r.ok.template) for r in got.results])
    w = np.stack([template_array(r.ok.template) for r in want.results])
    # the same network, fed 8-bit chips instead of float ones
    cos = (g * w).sum(1) / np.linalg.norm(g, axis=1) / np.linalg.norm(w, axis=1)
    assert cos.min() > 0.999 and np.abs(g - w).max() > 0  # really through the endpoint, not the program
    assert genuine.l2_distance == pytest.approx(float(np.linalg.norm(g[0] - g[1])), abs=1e-4)
    assert impostor.l2_distance == pytest.approx(float(np.linalg.norm(g[0] - g[2])), abs=1e-4)
    assert genuine.same_person == (genuine.l2_distance < 0.6)


def test_counterfactual_refuses_the_black_box_as_surrogate(
    services: dict[str, Any], faces: tuple[Path, Path, Path]
) -> None:
    a, _, c = faces
    channel = grpc.insecure_channel(services["cf"].address)
    stub = counterfactual_pb2_grpc.CounterfactualServiceStub(channel)
    request = counterfactual_pb2.AttackRequest(probe=image_from_path(a), reference=image_from_path(c))
    with channel, pytest.raises(grpc.RpcError) as info:
        grpc.channel_ready_future(channel).result(timeout=60)
        stub.Attack(request, timeout=120)
    err = info.value
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
    assert f"{BB_MODEL} v1 is a black-box model" in (err.details() or "")  # type: ignore[attr-defined]
