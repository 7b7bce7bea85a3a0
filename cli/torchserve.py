"""``facexplain export torchserve NAME@ALIAS --out DIR`` and running TorchServe on loopback.

facexplain export torchserve facexplain-fr-dlib128@champion --out var/torchserve/model-store
facexplain export torchserve facexplain-dfd-dlib128@3 --out DIR --batch-size 8 --max-batch-delay-ms 20

The archive logic lives in ``services.torchserve.export``; this module parses, prints, and starts the
``torchserve`` process that ``make torchserve``, the parity test and the serving benchmark share
(:func:`start_torchserve`). TorchServe is optional (``make setup-torchserve``: the pinned wheels and Java 17).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cli.launcher import REPO, free_port, stop_process_group
from cli.registry import _fail, _registry


def torchserve_missing() -> str:
    """Why TorchServe cannot run here ('' when it can): Java 17 and the pinned wheels are both needed."""
    if not (shutil.which("java") or os.environ.get("JAVA_HOME")):
        return "java is not installed (make setup-torchserve installs Debian's openjdk-17-jre-headless)"
    if not Path(sys.executable).with_name("torchserve").exists():
        return f"torchserve is not installed in {Path(sys.executable).parent.parent} (run `make setup-torchserve`)"
    return ""


@dataclass
class RunningTorchServe:
    """A ``torchserve --foreground`` process group (launcher, Java frontend, Python workers) on loopback."""

    host: str
    ports: Any  # services.torchserve.export.Ports
    workdir: Path
    proc: subprocess.Popen[bytes]
    models: dict[str, str] = field(default_factory=dict)  # TorchServe model name -> archive

    @property
    def rest(self) -> str:
        return f"http://{self.host}:{self.ports.inference}"

    @property
    def grpc_target(self) -> str:
        return f"{self.host}:{self.ports.grpc_inference}"

    def log_text(self) -> str:
        parts = []
        for name in ("torchserve.log", "logs/ts_log.log", "logs/model_log.log"):
            p = self.workdir / name
            if p.is_file():
                parts.append(f"== {name}\n{p.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)

    def workers_ready(self, name: str) -> bool:
        url = f"http://{self.host}:{self.ports.management}/models/{name}"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                desc = json.loads(resp.read())
        except (urllib.error.URLError, OSError, ValueError):
            return False
        workers = [w for d in desc for w in d.get("workers", [])]
        return bool(workers) and all(w.get("status") == "READY" for w in workers)

    def stop(self, timeout: float = 30.0) -> None:
        stop_process_group(self.proc.pid, timeout)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)


def start_torchserve(
    workdir: Path,
    model_store: Path,
    models: dict[str, str],
    *,
    host: str = "127.0.0.1",
    ports: Any = None,
    env: dict[str, str] | None = None,
    timeout: float = 300.0,
) -> RunningTorchServe:
    """Start TorchServe in its own session serving ``models`` (name -> archive file in ``model_store``) and
    wait until every model's worker is READY. ``ports=None`` picks free ports.

    The workers run this interpreter (TorchServe starts them with the ``sys.executable`` of its launcher)
    with this checkout first on ``PYTHONPATH``, so the handler imports the same ``facexplain`` as the
    services. The temp dir is the work dir's: TorchServe keeps a machine-wide pid file there (and refuses to
    start beside a server it finds in it) and its worker sockets (``.ts.sock.9000``: a second server on the
    machine would take over the first one's).
    """
    from services.torchserve.export import Ports, write_config

    missing = torchserve_missing()
    if missing:
        raise RuntimeError(f"cannot start TorchServe: {missing}")
    workdir = Path(workdir).resolve()
    (workdir / "tmp").mkdir(parents=True, exist_ok=True)
    if ports is None:
        ports = Ports(*(free_port(host) for _ in range(5)))
    config = write_config(workdir / "config.properties", Path(model_store).resolve(), ports, host=host)
    full_env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH", "")])]),
        "TMPDIR": str(workdir / "tmp"),
        "TEMP": str(workdir / "tmp"),  # the frontend's java.io.tmpdir: where the worker sockets live
        "LOG_LOCATION": str(workdir / "logs"),
        "METRICS_LOCATION": str(workdir / "logs"),
        **(env or {}),
    }
    cmd = [
        str(Path(sys.executable).with_name("torchserve")), "--start", "--foreground", "--ncs",
        "--disable-token-auth", "--ts-config", str(config), "--model-store", str(Path(model_store).resolve()),
        "--models", *(f"{name}={mar}" for name, mar in models.items()),
    ]  # fmt: skip
    with open(workdir / "torchserve.log", "ab") as log_fh:
        proc = subprocess.Popen(
            cmd, cwd=workdir, env=full_env, stdout=log_fh, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = RunningTorchServe(host, ports, workdir, proc, dict(models))
    deadline = time.monotonic() + timeout
    while not all(server.workers_ready(name) for name in models):
        if proc.poll() is not None:
            raise RuntimeError(f"torchserve exited with {proc.returncode}:\n{server.log_text()}")
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"torchserve models not READY within {timeout:.0f} s:\n{server.log_text()}")
        time.sleep(0.5)
    return server


# -- facexplain export torchserve ----------------------------------------------------------------------------


def _cmd_export_torchserve(args: argparse.Namespace) -> int:
    from facexplain.artifacts.bundle import BundleError
    from registry import RegistryError, RegistryUnreachable
    from services.kit.config import ServiceSettings
    from services.kit.trust import TrustPolicy
    from services.torchserve.export import BatchingSettings, ExportError, export_version

    settings = ServiceSettings()
    trust = TrustPolicy(settings.trusted_digests_file, settings.trusted_keys_file)
    batching = BatchingSettings(args.batch_size, args.max_batch_delay_ms, args.workers, args.response_timeout)
    try:
        done = export_version(
            _registry(args), args.ref, Path(args.out), batching=batching, trust=trust, model_name=args.model_name
        )
    except RegistryUnreachable as exc:
        return _fail(f"{exc} (is it running? `make mlflow`)", 3)
    except (RegistryError, BundleError, ExportError, OSError) as exc:
        return _fail(f"{args.ref} not exported: {exc}", 4)
    print(
        f"{done.name} v{done.version} ({done.kind}, digest {done.bundle_sha256[:12]}..., trust: {done.trusted_by}) "
        f"-> {done.mar} (TorchServe model {done.model_name!r}, batch {batching.batch_size} / "
        f"{batching.max_batch_delay_ms} ms)"
    )
    return 0


def add_export_parser(sub: Any) -> None:
    """Attach ``export`` and its targets (``torchserve``) to the top-level ``facexplain`` parser."""
    from services.torchserve import DEFAULT_BATCH_SIZE, DEFAULT_MAX_BATCH_DELAY_MS, DEFAULT_RESPONSE_TIMEOUT_S

    e = sub.add_parser("export", help="export a registered model version for another serving stack")
    esub = e.add_subparsers(dest="export_target", required=True)
    t = esub.add_parser(
        "torchserve",
        help="write a TorchServe .mar of an embedder or decoder version from the registry",
        description="Resolve NAME@ALIAS (or NAME@VERSION) in the registry, verify the bundle as a service would "
        "(metadata, checksums, FACEXPLAIN_TRUSTED_* trust policy), and pack it with facexplain's handler and "
        "TorchServe's batching settings into OUT/<model>.mar.",
    )
    t.add_argument("ref", metavar="NAME@ALIAS", help="e.g. facexplain-fr-dlib128@champion, or NAME@3 for a version")
    t.add_argument("--out", required=True, help="folder to write the .mar into (TorchServe's model store)")
    t.add_argument("--uri", help="MLflow tracking URI (FACEXPLAIN_REGISTRY_URI, default http://127.0.0.1:5000)")
    t.add_argument("--timeout", type=float, default=30.0, help="seconds per registry call")
    t.add_argument("--model-name", help="TorchServe model name (default: the registered name)")
    t.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="TorchServe batchSize")
    t.add_argument(
        "--max-batch-delay-ms", type=int, default=DEFAULT_MAX_BATCH_DELAY_MS, help="TorchServe maxBatchDelay (ms)"
    )
    t.add_argument("--workers", type=int, default=1, help="TorchServe min/max workers for the model")
    t.add_argument(
        "--response-timeout", type=int, default=DEFAULT_RESPONSE_TIMEOUT_S, help="TorchServe responseTimeout (s)"
    )
    t.set_defaults(func=_cmd_export_torchserve)
