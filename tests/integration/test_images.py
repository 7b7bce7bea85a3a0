"""The images `make images` builds: they run, as Kubernetes will run them, and carry what they claim.

Skipped where podman or the images are absent (build them with `make images`); each test starts real
containers on the host network, bound to loopback, and talks to them from here.
"""

from __future__ import annotations

import functools
import json
import shutil
import socket
import subprocess
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cli.launcher import REPO
from cli.podman_staging import SOURCE_LABEL, source_digest

pytestmark = pytest.mark.integration

VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
SERVICE_IMAGE = f"localhost/facexplain/service:{VERSION}"
MLFLOW_IMAGE = f"localhost/facexplain/mlflow:{VERSION}"
MLFLOW_PIN = next(
    line.split("==")[1] for line in (REPO / "requirements.lock").read_text().splitlines() if line.startswith("mlflow==")
)


def _k8s_like(state: Path) -> list[str]:
    """What Kubernetes gives the containers (k8s/base): read-only root, writable /tmp and state emptyDirs.

    The state volume is a host folder: podman 4.3 mounts a --tmpfs over an image folder with that folder's
    root ownership whatever mode= says, so uid 10001 could not write there (an emptyDir has fsGroup).
    """
    state.mkdir(parents=True, exist_ok=True)
    state.chmod(0o777)
    return ["--read-only", "--tmpfs", "/tmp:rw,mode=1777", "-v", f"{state}:/var/lib/facexplain:rw"]


def _image_exists(image: str) -> bool:
    if shutil.which("podman") is None:
        return False
    return subprocess.run(["podman", "image", "exists", image], capture_output=True).returncode == 0


def _need(image: str) -> None:
    if not _image_exists(image):
        pytest.skip(f"{image} not built (make images)")
    if image == SERVICE_IMAGE and not _service_image_is_current():
        pytest.skip(f"{image} was built from other sources than this checkout's (make images rebuilds it)")


@functools.cache
def _service_image_is_current() -> bool:
    """An image of older sources would be judged against today's models and code; asked once per session
    (the digest hashes every file the image copies)."""
    built = _podman("image", "inspect", "--format", f'{{{{ index .Labels "{SOURCE_LABEL}" }}}}', SERVICE_IMAGE)
    return built.stdout.strip() == source_digest(REPO)


def _podman(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def _container(name: str, image: str, options: list[str], command: list[str]) -> Iterator[str]:
    """Run a detached container on the host network; stop it (SIGTERM first) and remove it afterwards."""
    _podman("rm", "-f", name)
    proc = _podman("run", "-d", "--name", name, "--network=host", *options, image, *command)
    assert proc.returncode == 0, proc.stderr
    try:
        yield name
    finally:
        _podman("stop", "-t", "15", name)
        _podman("rm", "-f", name)


def test_service_image_runs_the_cli() -> None:
    _need(SERVICE_IMAGE)
    proc = _podman("run", "--rm", SERVICE_IMAGE, "facexplain", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "serve" in proc.stdout and "registry" in proc.stdout


def test_service_image_is_nonroot_compiler_free_and_probe_free() -> None:
    _need(SERVICE_IMAGE)
    (info,) = json.loads(_podman("image", "inspect", SERVICE_IMAGE).stdout)
    config = info["Config"]
    assert config.get("User") == "10001:10001"
    assert "Healthcheck" not in config, "Kubernetes probes check health; the image must not"
    assert not any(tag.endswith(":latest") for tag in info["RepoTags"])
    script = "id -u; for c in gcc cc c++ g++ clang make; do command -v $c; done; true"
    proc = _podman("run", "--rm", SERVICE_IMAGE, "sh", "-c", script)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["10001"], f"not uid 10001, or compilers present: {proc.stdout!r}"


def test_service_image_carries_the_pinned_models_and_weights() -> None:
    _need(SERVICE_IMAGE)
    script = (
        "cd /app/models && sha256sum --quiet --strict -c SHA256SUMS && cat SHA256SUMS && "
        'cd "$FACEXPLAIN_FACEAPI_DIR" && sha256sum --quiet --strict -c /app/.weights/SHA256SUMS && '
        "python -c 'import torch; print(torch.__version__)'"
    )
    proc = _podman("run", "--rm", SERVICE_IMAGE, "sh", "-c", script)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:-1] == (REPO / "models" / "SHA256SUMS").read_text().splitlines()
    assert lines[-1].endswith("+cpu"), f"the CPU image must carry the CPU torch, not {lines[-1]}"
    faceapi = _podman("run", "--rm", SERVICE_IMAGE, "cat", "/app/.weights/SHA256SUMS").stdout
    assert "face_recognition_model-weights_manifest.json" in faceapi


def test_embedding_service_in_the_image_answers_health(tmp_path: Path) -> None:
    _need(SERVICE_IMAGE)
    port = _free_port()
    env = ["-e", f"FACEXPLAIN_PORT={port}", "-e", "FACEXPLAIN_HOST=127.0.0.1", "-e", "FACEXPLAIN_TORCH_THREADS=1"]
    options = _k8s_like(tmp_path / "state") + env
    with _container("facexplain-test-embedding", SERVICE_IMAGE, options, ["facexplain", "serve", "embedding"]) as name:
        _check_health_then_stop(f"127.0.0.1:{port}", name)


def _check_health_then_stop(address: str, name: str) -> None:
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
    deadline = time.monotonic() + 240
    status = None
    while time.monotonic() < deadline:
        try:
            status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                break
        except grpc.RpcError:
            pass
        running = _podman("inspect", "--format", "{{.State.Running}}", name).stdout.strip()
        assert running == "true", _podman("logs", name).stderr[-4000:]
        time.sleep(2)
    assert status == health_pb2.HealthCheckResponse.SERVING, _podman("logs", name).stderr[-4000:]
    # SIGTERM (what Kubernetes sends) ends it cleanly within the grace period.
    proc = _podman("stop", "-t", "30", name, timeout=60)
    assert proc.returncode == 0, proc.stderr
    code = _podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
    assert code == "0", _podman("logs", name).stderr[-4000:]


def test_mlflow_image_serves_the_pinned_mlflow(tmp_path: Path) -> None:
    _need(MLFLOW_IMAGE)
    proc = _podman("run", "--rm", MLFLOW_IMAGE, "python", "-c", "import mlflow, psycopg; print(mlflow.__version__)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == MLFLOW_PIN
    port = _free_port()
    command = f"mlflow server --host 127.0.0.1 --port {port} --backend-store-uri sqlite:////tmp/mlflow.db"
    command += " --serve-artifacts --artifacts-destination /tmp/artifacts"
    options = ["--read-only", "--tmpfs", "/tmp:rw,mode=1777"]
    with _container("facexplain-test-mlflow", MLFLOW_IMAGE, options, command.split()) as name:
        deadline = time.monotonic() + 180
        body = b""
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
                    body = resp.read()
                    break
            except OSError:
                running = _podman("inspect", "--format", "{{.State.Running}}", name).stdout.strip()
                assert running == "true", _podman("logs", name).stderr[-4000:]
                time.sleep(2)
        assert body.strip() == b"OK", _podman("logs", name).stderr[-4000:]
