"""Start facexplain servers as subprocesses and stop them with SIGTERM (the demo and the tests use it).

A server prints one readiness line (``... listening on HOST:PORT (metrics :PORT)``) once it serves;
asking for port 0 and reading that line back is what lets many servers share one machine.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
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
        [sys.executable, "-m", "services.client.cli", "serve", service],
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
    deadline = time.monotonic() + timeout
    while not ready.wait(0.2):
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{service} did not start within {timeout} s; log:\n{log_path.read_text()[-3000:]}")
    if not found:
        proc.wait(5)
        raise RuntimeError(f"{service} exited before serving; log:\n{log_path.read_text()[-3000:]}")
    return RunningService(service, found["addr"], int(found["metrics"]), proc, log_path, lines)
