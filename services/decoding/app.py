"""Build and run the decoding server (``facexplain serve decoding``).

The decoder comes from the registry only (``FACEXPLAIN_MODEL_NAME``, default
``facexplain-dfd-dlib128``, at ``FACEXPLAIN_MODEL_ALIAS``): there are no local decoder weights to
fall back on, so without a registry, or before the alias points at a valid version, the server
still starts and answers the decoding RPCs with UNAVAILABLE while its watcher keeps polling. The FR
model (``FACEXPLAIN_FR_MODEL_NAME`` at ``FACEXPLAIN_FR_MODEL_ALIAS``) is loaded exactly as the
embedding service loads it, local face-api weights included.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from facexplain.models.bundle import KIND_DECODER
from facexplain.models.decoder_bundle import LoadedDecoder, load_decoder_bundle, validate_decoder
from facexplain.pipeline import FacePipeline
from services.api.v1 import decoding_pb2_grpc
from services.decoding.service import SERVICE_NAME, DecodingServicer
from services.decoding.settings import DecodingSettings
from services.kit.embedder import serve_embedder
from services.kit.logs import configure_logging
from services.kit.metrics import ServiceMetrics
from services.kit.registry import VersionInfo
from services.kit.reload import serve_from_registry
from services.kit.server import GrpcServer

log = logging.getLogger("facexplain.decoding")


def load_decoder_version(path: Path, info: VersionInfo, device: str) -> LoadedDecoder:
    """Watcher loader: a downloaded decoder bundle, checksums verified."""
    return load_decoder_bundle(path, device)


def validate_decoder_version(model: LoadedDecoder, path: Path, meta: dict[str, Any]) -> dict[str, str]:
    """Watcher validator: re-decode the golden template; the figures go to ModelStatus metadata."""
    report = validate_decoder(model, path)
    return {
        "golden_max_abs_diff": f"{report.max_abs_diff:.6f}",
        "golden_mean_abs_diff": f"{report.mean_abs_diff:.6f}",
        "out_size": str(model.out_size),
    }


def build_server(settings: DecodingSettings, pipeline: FacePipeline | None = None) -> GrpcServer:
    """The decoding server: decoder and FR model each from their alias (see the module docstring);
    ``pipeline`` replaces the FR model with a given one (tests, benchmarks).
    """
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    metrics = ServiceMetrics("decoding")
    fr_slot, _fr_watcher = serve_embedder(
        settings, metrics, name=settings.fr_model_name, alias=settings.fr_model_alias, pipeline=pipeline
    )
    decoder_slot, _decoder_watcher = serve_from_registry(
        settings,
        metrics,
        kind=KIND_DECODER,
        loader=load_decoder_version,
        validator=validate_decoder_version,
        fallback=None,
    )
    servicer = DecodingServicer(decoder_slot, fr_slot, settings, metrics)
    return GrpcServer(
        settings, SERVICE_NAME, servicer, decoding_pb2_grpc.add_DecodingServiceServicer_to_server, metrics
    )


def main(settings: DecodingSettings | None = None) -> None:
    settings = settings or DecodingSettings()
    configure_logging(settings.log_level, settings.log_format)
    server = build_server(settings).start()
    server.install_signal_handlers()
    print(f"decoding service listening on {server.address} (metrics :{server.metrics.port})", flush=True)
    server.wait()
