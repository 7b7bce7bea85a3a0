"""Start facexplain servers as subprocesses and stop them with SIGTERM.

The demo (``scripts/demo.py``), ``scripts/mlflow_server.py``, the tests and the benchmarks share it, so
it sits in the top layer. A service runs as ``python -m cli.main serve NAME`` with the repository root
as its working directory, whatever the caller's.

A server prints one readiness line (``... listening on HOST:PORT (metrics :PORT)``) once it serves;
asking for port 0 and reading that line back is what lets many servers share one machine. The line is
the same with TLS and authentication on (``FACEXPLAIN_TLS_*`` / ``FACEXPLAIN_AUTH_TOKENS_FILE`` in ``env``
or the caller's environment, which ``start_service`` passes through), so readiness needs no credentials.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_READY = re.compile(r"listening on (?P<addr>\S+:\d+) \(metrics :(?P<metrics>\d+)\)")


@dataclass
class RunningService:
    name: str
    address: str
    metrics_port: int
    proc: subprocess.Popen[str]
    log_path: Path
    stdout_lines: list[str] = field(default_factory=list)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)


def start_service(
    service: str, log_dir: Path, env: dict[str, str] | None = None, timeout: float = 120.0
) -> RunningService:
    """``facexplain serve <service>`` on a free port; waits for its readiness line."""
    return spawn_service(service, log_dir, env, timeout).wait()


@dataclass
class StartingService:
    """A service process that has been started but may still be loading its models.

    Several can load at once (the demo starts all five while the first steps run): each spends most
    of its start importing torch and fetching bundles, and two cores overlap that better than a queue.
    """

    name: str
    proc: subprocess.Popen[str]
    log_path: Path
    lines: list[str]
    found: dict[str, str]
    ready: threading.Event
    deadline: float
    timeout: float

    def wait(self) -> RunningService:
        """Block until the readiness line; the process is killed if it does not come in time."""
        while not self.ready.wait(0.2):
            if time.monotonic() > self.deadline:
                self.proc.kill()
                raise RuntimeError(
                    f"{self.name} did not start within {self.timeout} s; log:\n{self.log_path.read_text()[-3000:]}"
                )
        if not self.found:
            self.proc.wait(5)
            raise RuntimeError(f"{self.name} exited before serving; log:\n{self.log_path.read_text()[-3000:]}")
        return RunningService(
            self.name, self.found["addr"], int(self.found["metrics"]), self.proc, self.log_path, self.lines
        )

    def stop(self) -> None:
        """Stop a service that never became ready (the caller gave up on it)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def spawn_service(
    service: str, log_dir: Path, env: dict[str, str] | None = None, timeout: float = 120.0
) -> StartingService:
    """``facexplain serve <service>`` on a free port, without waiting: ``.wait()`` gives the running service."""
    log_path = log_dir / f"{service}.log"
    full_env = {
        **os.environ,
        "FACEXPLAIN_PORT": "0",
        "FACEXPLAIN_METRICS_PORT": "0",
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    log_fh = open(log_path, "w")  # noqa: SIM115 - closed when the process ends
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "serve", service],
        cwd=REPO,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=log_fh,
        text=True,
    )
    lines: list[str] = []
    found: dict[str, str] = {}
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            m = _READY.search(line)
            if m and not ready.is_set():
                found.update(m.groupdict())
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    return StartingService(service, proc, log_path, lines, found, ready, time.monotonic() + timeout, timeout)


# -- MLflow tracking server + Model Registry (``make mlflow``, the registry tests, the demo) ---------------

MLFLOW_SERVER_ENV = REPO / "mlflow" / "server.env"


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (MLflow's server cannot report the one it bound to port 0)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status) == 200
    except (urllib.error.URLError, OSError):
        return False


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines (``#`` comments, blank lines ignored); the format of ``mlflow/server.env``."""
    out: dict[str, str] = {}
    if not path.is_file():
        return out
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        out[key.strip()] = value.strip().strip('"').strip("'")
    return out


@dataclass
class RunningMlflow:
    """An ``mlflow server`` process group on loopback: its URI, where it keeps data, how to stop it."""

    host: str
    port: int
    root: Path
    backend_uri: str
    artifacts_destination: str
    pid: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    workers: int = 1

    @property
    def uri(self) -> str:
        return f"http://{self.host}:{self.port}"

    def healthy(self) -> bool:
        return _http_ok(f"{self.uri}/health")

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the whole process group (the CLI wrapper and its uvicorn worker), SIGKILL if it lingers."""
        stop_process_group(self.pid, timeout)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
        pidfile = self.root / "server.pid"
        if pidfile.is_file() and pidfile.read_text().strip() == str(self.pid):
            pidfile.unlink()

    def restart(self, timeout: float = 120.0) -> RunningMlflow:
        """Start again on the same port, backend store and artifact store (the data survives)."""
        self.stop()
        return start_mlflow(
            self.root,
            port=self.port,
            host=self.host,
            backend_uri=self.backend_uri,
            artifacts_destination=self.artifacts_destination,
            workers=self.workers,
            timeout=timeout,
        )


def stop_process_group(pid: int, timeout: float = 30.0) -> bool:
    """Terminate the process group led by ``pid`` (one we started with its own session); True if it was running."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return True
        with contextlib.suppress(ChildProcessError):  # reap it if it is our child: no lingering zombie
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    return True


def start_mlflow(
    root: Path,
    *,
    port: int = 0,
    host: str = "127.0.0.1",
    backend_uri: str | None = None,
    artifacts_destination: str | None = None,
    workers: int = 1,
    timeout: float = 120.0,
) -> RunningMlflow:
    """Start ``mlflow server`` in its own session and wait for ``/health``.

    Defaults: a sqlite backend ``root/mlflow.db`` and a local artifact store ``root/artifacts``,
    served through the tracking server (clients need no access to the store). Job execution is
    off and one worker runs: the server answers in 10-20 s on a small machine. ``port=0`` picks a
    free port. The process outlives the caller until :meth:`RunningMlflow.stop` (or
    ``scripts/mlflow_server.py stop``, via ``root/server.pid``).
    """
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port(host)
    backend_uri = backend_uri or f"sqlite:///{root / 'mlflow.db'}"
    artifacts_destination = artifacts_destination or str(root / "artifacts")
    if _http_ok(f"http://{host}:{port}/health", timeout=1):
        raise RuntimeError(f"something already answers on http://{host}:{port}; stop it or pick another port")
    log_path = root / "server.log"
    env = {
        **os.environ,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "PYTHONUNBUFFERED": "1",
    }
    cmd = [
        str(Path(sys.executable).with_name("mlflow")),
        "server",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--backend-store-uri",
        backend_uri,
        "--artifacts-destination",
        artifacts_destination,
    ]
    if not Path(cmd[0]).exists():  # a venv without the console script: run the module
        cmd[:1] = [sys.executable, "-m", "mlflow"]
    with open(log_path, "ab") as log_fh:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log_fh, stderr=subprocess.STDOUT, start_new_session=True)
    (root / "server.pid").write_text(f"{proc.pid}\n")
    server = RunningMlflow(host, port, root, backend_uri, artifacts_destination, proc.pid, log_path, proc, workers)
    deadline = time.monotonic() + timeout
    while not server.healthy():
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}; log:\n{log_path.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(
                f"mlflow server not healthy within {timeout:.0f} s; log:\n{log_path.read_text()[-3000:]}"
            )
        time.sleep(0.25)
    return server
