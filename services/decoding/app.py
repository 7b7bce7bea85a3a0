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

from facexplain.artifacts import decoder
from facexplain.artifacts.decoder import LoadedDecoder
from facexplain.pipeline import FacePipeline
from services.api.v1 import decoding_pb2_grpc
from services.decoding.service import SERVICE_NAME, DecodingServicer
from services.decoding.settings import DecodingSettings
from services.kit.embedder import serve_embedder
from services.kit.models import ModelSlot
from services.kit.reload import serve_from_registry
from services.kit.server import GrpcServer, run_service, service_metrics

log = logging.getLogger("facexplain.decoding")


def build_server(settings: DecodingSettings, pipeline: FacePipeline | None = None) -> GrpcServer:
    """The decoding server: decoder and FR model each from their alias (see the module docstring);
    ``pipeline`` replaces the FR model with a given one (tests, benchmarks).
    """
    metrics = service_metrics(settings, "decoding")
    fr_slot, _fr_watcher = serve_embedder(
        settings, metrics, name=settings.fr_model_name, alias=settings.fr_model_alias, pipeline=pipeline
    )
    decoder_slot: ModelSlot[LoadedDecoder]
    decoder_slot, _decoder_watcher = serve_from_registry(settings, metrics, kind=decoder.KIND)
    servicer = DecodingServicer(decoder_slot, fr_slot, settings, metrics)
    return GrpcServer(
        settings,
        SERVICE_NAME,
        servicer,
        decoding_pb2_grpc.add_DecodingServiceServicer_to_server,
        metrics,
        required_models=[fr_slot, decoder_slot],
    )


def main(settings: DecodingSettings | None = None) -> None:
    run_service("decoding", settings or DecodingSettings(), build_server)
