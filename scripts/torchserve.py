"""``make torchserve``: export the registry's champion FR model and decoder, serve them with TorchServe on loopback.

    python scripts/torchserve.py [--uri URI] [--models facexplain-fr-dlib128@champion,facexplain-dfd-dlib128@champion]
                                 [--rest-port 8080] [--grpc-port 7070] [--workdir var/torchserve]

Writes ``<workdir>/model-store/*.mar`` (via ``facexplain export torchserve``'s code) and
``<workdir>/server/config.properties``, then runs TorchServe in the foreground until Ctrl-C or SIGTERM. A
version that cannot be exported (e.g. no decoder registered) is reported and left out; none at all is an error.
Ports are TorchServe's defaults, on 127.0.0.1 only: REST inference 8080, management 8081, metrics 8082,
gRPC inference 7070, gRPC management 7071.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cli.registry import DEFAULT_URI  # noqa: E402
from cli.torchserve import start_torchserve, torchserve_missing  # noqa: E402
from facexplain.artifacts.decoder import DEFAULT_DECODER_MODEL  # noqa: E402
from facexplain.artifacts.embedder import DEFAULT_FR_MODEL  # noqa: E402

DEFAULT_MODELS = f"{DEFAULT_FR_MODEL}@champion,{DEFAULT_DECODER_MODEL}@champion"


def main() -> int:
    import os

    from facexplain.artifacts.bundle import BundleError
    from registry import Registry, RegistryError
    from services.kit.config import ServiceSettings
    from services.kit.trust import TrustPolicy
    from services.torchserve.export import ExportError, Ports, export_version

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--uri", default=os.environ.get("FACEXPLAIN_REGISTRY_URI") or DEFAULT_URI)
    ap.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated NAME@ALIAS to export and serve")
    ap.add_argument("--workdir", default=str(REPO / "var" / "torchserve"))
    ap.add_argument("--rest-port", type=int, default=8080, help="REST inference (management +1, metrics +2)")
    ap.add_argument("--grpc-port", type=int, default=7070, help="gRPC inference (management +1)")
    args = ap.parse_args()
    missing = torchserve_missing()
    if missing:
        print(f"error: {missing}", file=sys.stderr)
        return 2
    workdir = Path(args.workdir)
    store = workdir / "model-store"
    registry = Registry(args.uri, timeout_s=30, max_retries=2)
    settings = ServiceSettings()
    trust = TrustPolicy(settings.trusted_digests_file, settings.trusted_keys_file)
    served: dict[str, str] = {}
    for ref in filter(None, (r.strip() for r in args.models.split(","))):
        try:
            done = export_version(registry, ref, store, trust=trust)
        except (RegistryError, BundleError, ExportError, OSError) as exc:
            print(f"skipped {ref}: {exc}", file=sys.stderr)
            continue
        served[done.model_name] = done.mar.name
        print(f"exported {done.name} v{done.version} ({done.kind}) -> {done.mar}", flush=True)
    if not served:
        print("error: nothing to serve (is the registry up with the defaults? make register-defaults)", file=sys.stderr)
        return 1
    ports = Ports(args.rest_port, args.rest_port + 1, args.rest_port + 2, args.grpc_port, args.grpc_port + 1)
    server = start_torchserve(workdir / "server", store, served, ports=ports)
    print(
        f"TorchServe serving {', '.join(served)} on 127.0.0.1: REST {server.rest}/predictions/<model>, gRPC "
        f"{server.grpc_target} (management :{ports.management}, metrics :{ports.metrics}); "
        f"config {workdir / 'server' / 'config.properties'}; Ctrl-C stops",
        flush=True,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        if server.proc.poll() is not None:
            print(f"error: torchserve exited with {server.proc.returncode}:\n{server.log_text()}", file=sys.stderr)
            return 1
    server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
