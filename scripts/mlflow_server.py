"""Start, stop or check the MLflow tracking server + Model Registry that ``make mlflow`` runs.

    python scripts/mlflow_server.py start    # background; returns once /health answers; prints the URI
    python scripts/mlflow_server.py status   # exit 0 when healthy
    python scripts/mlflow_server.py stop
    python scripts/mlflow_server.py uri      # the tracking URI the settings give (for FACEXPLAIN_REGISTRY_URI)

Settings come from ``mlflow/server.env`` (MLflow's own variable names), each overridable by the
environment: ``MLFLOW_HOST``, ``MLFLOW_PORT``, ``MLFLOW_BACKEND_STORE_URI`` (sqlite by default,
``postgresql+psycopg://...`` for PostgreSQL), ``MLFLOW_ARTIFACTS_DESTINATION`` (a local folder by
default, ``s3://bucket/prefix`` for an S3-compatible store), ``MLFLOW_WORKERS``. Relative paths
are taken from the repository root. The pid file and the server log live in ``var/mlflow/``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cli.launcher import (  # noqa: E402
    MLFLOW_SERVER_ENV,
    RunningMlflow,
    _http_ok,
    read_env_file,
    start_mlflow,
    stop_process_group,
)

STATE_DIR = REPO / "var" / "mlflow"
PIDFILE = STATE_DIR / "server.pid"


_KEYS = ("MLFLOW_HOST", "MLFLOW_PORT", "MLFLOW_WORKERS", "MLFLOW_BACKEND_STORE_URI", "MLFLOW_ARTIFACTS_DESTINATION")


def _settings() -> dict[str, str]:
    """mlflow/server.env, overridden by the environment, with relative paths made absolute."""
    conf = read_env_file(MLFLOW_SERVER_ENV)
    for key in [*conf, *_KEYS]:
        if os.environ.get(key):
            conf[key] = os.environ[key]
    backend = conf.get("MLFLOW_BACKEND_STORE_URI", "sqlite:///var/mlflow/mlflow.db")
    if backend.startswith("sqlite:///") and not backend.startswith("sqlite:////"):
        backend = f"sqlite:///{REPO / backend[len('sqlite:///') :]}"
    conf["MLFLOW_BACKEND_STORE_URI"] = backend
    dest = conf.get("MLFLOW_ARTIFACTS_DESTINATION", "var/mlflow/artifacts")
    if "://" not in dest and not Path(dest).is_absolute():
        dest = str(REPO / dest)
    conf["MLFLOW_ARTIFACTS_DESTINATION"] = dest
    conf.setdefault("MLFLOW_HOST", "127.0.0.1")
    conf.setdefault("MLFLOW_PORT", "5000")
    conf.setdefault("MLFLOW_WORKERS", "1")
    return conf


def _uri(conf: dict[str, str]) -> str:
    return f"http://{conf['MLFLOW_HOST']}:{conf['MLFLOW_PORT']}"


def _our_pid() -> int | None:
    """The pid in the pid file if that process is still an mlflow server (pids get reused)."""
    if not PIDFILE.is_file():
        return None
    pid = int(PIDFILE.read_text().strip() or 0)
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return None
    return pid if b"mlflow" in cmdline else None


def cmd_start(conf: dict[str, str], timeout: float) -> int:
    uri = _uri(conf)
    if _http_ok(f"{uri}/health"):
        print(f"MLflow already answers at {uri}")
        return 0
    server: RunningMlflow = start_mlflow(
        STATE_DIR,
        host=conf["MLFLOW_HOST"],
        port=int(conf["MLFLOW_PORT"]),
        backend_uri=conf["MLFLOW_BACKEND_STORE_URI"],
        artifacts_destination=conf["MLFLOW_ARTIFACTS_DESTINATION"],
        workers=int(conf["MLFLOW_WORKERS"]),
        timeout=timeout,
    )
    print(f"MLflow tracking server + registry at {server.uri} (pid {server.pid}, log {server.log_path})")
    print(f"  export FACEXPLAIN_REGISTRY_URI={server.uri}")
    return 0


def cmd_stop(conf: dict[str, str]) -> int:
    pid = _our_pid()
    if pid is None:
        print("no MLflow server started by this script is running")
        PIDFILE.unlink(missing_ok=True)
        return 0
    stop_process_group(pid)
    PIDFILE.unlink(missing_ok=True)
    print(f"MLflow server (pid {pid}) stopped")
    return 0


def cmd_status(conf: dict[str, str]) -> int:
    uri = _uri(conf)
    ok = _http_ok(f"{uri}/health")
    print(f"MLflow at {uri}: {'healthy' if ok else 'not answering'} (pid file: {_our_pid() or 'none'})")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["start", "stop", "status", "uri"])
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for /health on start")
    args = p.parse_args(argv)
    conf = _settings()
    if args.action == "start":
        return cmd_start(conf, args.timeout)
    if args.action == "stop":
        return cmd_stop(conf)
    if args.action == "uri":
        print(_uri(conf))
        return 0
    return cmd_status(conf)


if __name__ == "__main__":
    raise SystemExit(main())
