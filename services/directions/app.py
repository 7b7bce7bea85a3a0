"""Build and run the directions server (``facexplain serve directions``).

The FR model (``FACEXPLAIN_FR_MODEL_NAME`` at ``FACEXPLAIN_FR_MODEL_ALIAS``) is loaded exactly as the
embedding service loads it, local face-api weights included. The decoder
(``FACEXPLAIN_DECODER_MODEL_NAME`` at ``FACEXPLAIN_DECODER_MODEL_ALIAS``) comes from the registry only
and is optional: until one is loaded (or when the name is empty) everything but ``decode=true``
works. Direction sets are registered in, and read back from, the same registry
(``FACEXPLAIN_REGISTRY_URI``); ServerDatasets are read under ``FACEXPLAIN_DATA_ROOT``.
"""

from __future__ import annotations

import logging

from facexplain.artifacts import decoder
from facexplain.artifacts.decoder import LoadedDecoder
from facexplain.pipeline import FacePipeline
from registry import Registry
from services.api.v1 import directions_pb2_grpc
from services.directions.service import SERVICE_NAME, DirectionsServicer
from services.directions.settings import DirectionsSettings
from services.directions.store import DirectionStore
from services.kit.embedder import serve_embedder
from services.kit.models import ModelSlot
from services.kit.reload import serve_from_registry
from services.kit.server import GrpcServer, run_service, service_metrics

log = logging.getLogger("facexplain.directions")


def build_server(settings: DirectionsSettings, pipeline: FacePipeline | None = None) -> GrpcServer:
    """The directions server (see the module docstring); ``pipeline`` replaces the FR model (tests, benchmarks)."""
    metrics = service_metrics(settings, "directions")
    fr_slot, _fr_watcher = serve_embedder(
        settings, metrics, name=settings.fr_model_name, alias=settings.fr_model_alias, pipeline=pipeline
    )
    decoder_slot: ModelSlot[LoadedDecoder] | None = None
    if settings.decoder_model_name:
        decoder_slot, _decoder_watcher = serve_from_registry(
            settings, metrics, kind=decoder.KIND, name=settings.decoder_model_name, alias=settings.decoder_model_alias
        )
    else:
        log.info("no decoder configured (FACEXPLAIN_DECODER_MODEL_NAME is empty): decode requests are refused")
    registry = Registry(settings.registry_uri, timeout_s=settings.registry_timeout_s) if settings.registry_uri else None
    store = DirectionStore(settings, registry)
    servicer = DirectionsServicer(fr_slot, decoder_slot, store, settings, metrics)
    return GrpcServer(
        settings,
        SERVICE_NAME,
        servicer,
        directions_pb2_grpc.add_DirectionsServiceServicer_to_server,
        metrics,
        required_models=[fr_slot],  # the decoder is optional: only decoding traversals need it
    )


def main(settings: DirectionsSettings | None = None) -> None:
    run_service("directions", settings or DirectionsSettings(), build_server)
