"""Calling TorchServe: its REST and gRPC inference APIs, as the parity test and the serving benchmark do.

TorchServe ships its gRPC API only as ``.proto`` files inside its Java frontend (``ts/frontend/model-server.jar``);
:func:`inference_stubs` compiles ``inference.proto`` (and the ``google/rpc/status.proto`` it imports) from the
installed jar with grpcio-tools once per TorchServe version into a cache folder, so the client always speaks
the installed server's API and no generated copy lives in the repository.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import threading
import urllib.request
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc

from facexplain.paths import REPO_ROOT

_PROTOS = ("inference.proto", "google/rpc/status.proto")
_lock = threading.Lock()


def _jar() -> tuple[Path, str]:
    spec = importlib.util.find_spec("ts")
    if spec is None or spec.origin is None:
        raise RuntimeError("torchserve is not installed (run `make setup-torchserve`)")
    root = Path(spec.origin).parent
    version = (root / "version.txt").read_text().strip()
    return root / "frontend" / "model-server.jar", version


def inference_stubs(cache_dir: Path | None = None) -> tuple[ModuleType, ModuleType]:
    """(``inference_pb2``, ``inference_pb2_grpc``) of the installed TorchServe, generated on first use."""
    from grpc_tools import protoc

    jar, version = _jar()
    out = (cache_dir or REPO_ROOT / "var" / "cache" / "torchserve-protos") / version
    with _lock:
        if not (out / "inference_pb2_grpc.py").is_file():
            src = out / "proto"
            with zipfile.ZipFile(jar) as zf:
                for name in _PROTOS:
                    (src / name).parent.mkdir(parents=True, exist_ok=True)
                    (src / name).write_bytes(zf.read(name))
            include = Path(protoc.__file__).parent / "_proto"  # google/protobuf/empty.proto
            args = ["protoc", f"-I{src}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}", *_PROTOS]
            if protoc.main(args) != 0:
                raise RuntimeError(f"could not compile TorchServe's protos from {jar}")
        if str(out) not in sys.path:
            sys.path.insert(0, str(out))
        return importlib.import_module("inference_pb2"), importlib.import_module("inference_pb2_grpc")


class TorchServeGrpc:
    """``Predictions`` over TorchServe's gRPC inference API (one channel, thread-safe like any grpc stub)."""

    def __init__(self, target: str, timeout: float = 120.0) -> None:
        self.pb2, pb2_grpc = inference_stubs()
        self.channel = grpc.insecure_channel(
            target, options=[("grpc.max_send_message_length", 16 << 20), ("grpc.max_receive_message_length", 16 << 20)]
        )
        self.stub = pb2_grpc.InferenceAPIsServiceStub(self.channel)
        self.timeout = timeout

    def predict(self, model: str, data: bytes) -> bytes:
        req = self.pb2.PredictionsRequest(model_name=model, input={"data": data})
        return bytes(self.stub.Predictions(req, timeout=self.timeout).prediction)

    def close(self) -> None:
        self.channel.close()


def rest_predict(base_url: str, model: str, data: bytes, content_type: str, timeout: float = 120.0) -> bytes:
    """POST ``data`` to ``/predictions/<model>``; an HTTP error raises ``urllib.error.HTTPError``."""
    req = urllib.request.Request(f"{base_url}/predictions/{model}", data=data, headers={"Content-Type": content_type})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return bytes(resp.read())


def template_of(prediction: bytes) -> list[float]:
    """The template in an embedder archive's JSON answer."""
    out: dict[str, Any] = json.loads(prediction)
    return [float(v) for v in out["template"]]
