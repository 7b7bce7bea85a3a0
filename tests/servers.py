"""Server fixtures (a pytest plugin, loaded by ``tests/conftest.py``): one real server per service for the
whole session, shared by the integration and the end-to-end tests.

Also the helpers that put real model versions into a real MLflow registry: the default FR model
(``register_fr_model``) and a decoder trained for it by the real training CLI (``train_decoder_cli``),
and the session's registry holding both (``mlflow``, ``fr_v1``, ``decoder_v1``): training a decoder
takes a minute or more, so the decoding and directions tests share one. A module that moves an alias
moves it back before it ends.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from cli.launcher import REPO, RunningMlflow, RunningService, start_mlflow, start_service
from facexplain.artifacts.decoder import DEFAULT_DECODER_MODEL
from facexplain.artifacts.embedder import DEFAULT_FR_MODEL, SECOND_FR_MODEL, THIRD_FR_MODEL
from registry import CHAMPION, Registry, VersionInfo


def start_side_by_side(names: Iterable[str], start: Callable[[str], RunningService]) -> dict[str, RunningService]:
    """Start one server per name at once (each loads its models on its own); if any fails to start, stop
    those that did and raise the first failure, so a fixture never leaks a half-started fleet."""
    names = list(names)
    running: dict[str, RunningService] = {}
    errors: list[BaseException] = []

    def one(name: str) -> None:
        try:
            running[name] = start(name)
        except BaseException as exc:
            errors.append(exc)

    with ThreadPoolExecutor(max(1, len(names))) as pool:
        list(pool.map(one, names))
    if errors:
        for svc in running.values():
            svc.stop()
        raise errors[0]
    return {name: running[name] for name in names}


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
    from sdk.client import EmbeddingClient, wait_ready

    client = EmbeddingClient(embedding_service.address, timeout=120)
    wait_ready(client.channel, 30)
    yield client
    client.close()


# -- registry content: the FR model and decoders for it ------------------------------------------------


def register_fr_model(registry: Registry, work: Path, alias: str = CHAMPION) -> VersionInfo:
    """The default FR model (face-api weights) as the next version of ``facexplain-fr-dlib128``, at ``alias``.

    What ``facexplain registry register-defaults`` does, in-process (test_registry.py runs the CLI itself).
    """
    from facexplain.artifacts.embedder import save_embedder_bundle

    bundle = work / "fr-bundle"
    if not (bundle / "bundle.json").is_file():
        save_embedder_bundle(bundle, name=DEFAULT_FR_MODEL)
    return registry.register_bundle(bundle, DEFAULT_FR_MODEL, description="default FR model (tests)", alias=alias)


def train_decoder_cli(registry_uri: str, fr_name: str, fr_version: str, out_dir: Path, *extra: str) -> dict:
    """``facexplain train decoder --preset demo`` on data/sample for FR ``fr_name`` v``fr_version``, as a user runs it.

    The real pipeline end to end (face set, split, DFD losses with the white-box perceptual term,
    MLflow tracking, bundle, and registration unless ``--no-register`` is in ``extra``), about a
    minute on 2 cores. Returns the run's ``summary.json``; the bundle is ``out_dir / "bundle"``.
    """
    proc = subprocess.run(
        [
            sys.executable, "-m", "cli.main", "train", "decoder", "--preset", "demo",
            "--registry", registry_uri, "--fr-model", f"{fr_name}@{fr_version}", "--out", str(out_dir),
            "--quiet", *extra,
        ],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads((out_dir / "summary.json").read_text())


def retarget_decoder_bundle(src: Path, dst: Path, fr_version: str) -> Path:
    """A copy of decoder bundle ``src`` that claims to invert FR version ``fr_version`` (same weights).

    How tests get "a decoder trained for another FR version" without training a second one.
    """
    from facexplain.artifacts.bundle import write_metadata

    shutil.copytree(src, dst)
    meta = json.loads((dst / "bundle.json").read_text())
    meta["fr_model"] = {**meta["fr_model"], "version": fr_version}
    write_metadata(dst, meta)
    return dst


# -- the session's registry: the FR model and a decoder trained for it -------------------------------------


@pytest.fixture(scope="session")
def mlflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMlflow]:
    server = start_mlflow(tmp_path_factory.mktemp("mlflow"), timeout=180)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def registry(mlflow: RunningMlflow) -> Registry:
    return Registry(mlflow.uri, timeout_s=10, max_retries=2)


@pytest.fixture(scope="session")
def fr_v1(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> VersionInfo:
    info = register_fr_model(registry, tmp_path_factory.mktemp("fr"))
    assert info.version == "1"
    return info


@pytest.fixture(scope="session")
def second_fr_registered(mlflow: RunningMlflow, registry: Registry, fr_v1: VersionInfo) -> str:
    """The independent second FR model (HSE FaceRes) registered by ``facexplain registry register-defaults``
    (what ``make register-defaults`` runs) on the session registry, at ``champion``; returns its version.

    After ``fr_v1``, so the default FR model's version 1 is already there (the CLI finds it by digest).
    Shared by the second-model and counterfactual tests: the CLI aliases the model only when it has no
    champion yet, so it runs once per session.
    """
    cmd = [sys.executable, "-m", "cli.main", "registry", "register-defaults", "--no-shipped", "--uri", mlflow.uri]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{SECOND_FR_MODEL}@{CHAMPION} -> version" in proc.stdout, proc.stdout
    assert f"{THIRD_FR_MODEL}@{CHAMPION} -> version" in proc.stdout, proc.stdout
    return registry.resolve(SECOND_FR_MODEL, CHAMPION).version


@pytest.fixture(scope="session")
def third_fr_registered(second_fr_registered: str, registry: Registry) -> str:
    """The third FR model (faceplugin's MobileFaceNet, an ONNX program), registered at ``champion`` by the same
    ``register-defaults`` run as the second; returns its version."""
    return registry.resolve(THIRD_FR_MODEL, CHAMPION).version


@pytest.fixture(scope="session")
def training(mlflow: RunningMlflow, fr_v1: VersionInfo, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A decoder for FR v1 trained on data/sample by `facexplain train decoder` and made champion.

    The demo preset's decoder (30 faces, a minute) usually misses its quality gates, so the promotion
    policy registers it under ``candidate``; the fixture then forces it to champion with a recorded
    reason, as a user would (``facexplain registry promote --force --reason``).
    """
    from registry import CANDIDATE, promote

    out = tmp_path_factory.mktemp("train-decoder")
    summary = train_decoder_cli(mlflow.uri, DEFAULT_FR_MODEL, fr_v1.version, out, "--alias", CHAMPION)
    registered = summary["registered"]
    if registered["alias"] == CANDIDATE:
        assert not summary["gates_passed"]
        promote(
            Registry(mlflow.uri, timeout_s=10, max_retries=2),
            registered["name"],
            registered["version"],
            CHAMPION,
            force=True,
            reason="test fixture: the demo preset's decoder serves the integration tests",
            by="tests/servers.py",
        )
    return {"summary": summary, "out": out}


@pytest.fixture(scope="session")
def decoder_dir(training: dict[str, Any]) -> Path:
    return Path(training["out"]) / "bundle"


@pytest.fixture(scope="session")
def decoder_v1(registry: Registry, training: dict[str, Any]) -> VersionInfo:
    info = registry.resolve(DEFAULT_DECODER_MODEL, CHAMPION)
    assert info.version == training["summary"]["registered"]["version"] == "1"
    assert info.tags["fr_model_name"] == DEFAULT_FR_MODEL and info.tags["fr_model_version"] == "1"
    return info
