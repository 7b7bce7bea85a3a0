"""Build and run the counterfactual server (``facexplain serve counterfactual``).

The FR model (``FACEXPLAIN_FR_MODEL_NAME`` at ``FACEXPLAIN_FR_MODEL_ALIAS``) is loaded exactly as the
embedding service loads it, local face-api weights included; it is the white-box surrogate and the
default target, so Attack works as soon as the server is up. The decoder
(``FACEXPLAIN_DECODER_MODEL_NAME`` at ``FACEXPLAIN_DECODER_MODEL_ALIAS``) comes from the registry only:
until one for the served FR version is loaded, Explain and DefenceReport answer FAILED_PRECONDITION.
The accessory probe set (``FACEXPLAIN_PROBES_MODEL_NAME`` at ``FACEXPLAIN_PROBES_MODEL_ALIAS``) is
optional, as in the attributes service: with it Explain also reports s_a for eyeglasses, smiling, ...
All follow their aliases and hot-swap. The attribute catalogue is built on first use by Explain.
"""

from __future__ import annotations

import logging

import torch

from facexplain.artifacts.decoder import LoadedDecoder
from facexplain.pipeline import FacePipeline
from services.api.v1 import counterfactual_pb2_grpc
from services.counterfactual.service import SERVICE_NAME, CounterfactualServicer
from services.counterfactual.settings import CounterfactualSettings
from services.kit.config import ServiceSettings
from services.kit.decoder import serve_decoder
from services.kit.embedder import serve_embedder
from services.kit.logs import configure_logging
from services.kit.metrics import ServiceMetrics
from services.kit.models import ModelSlot
from services.kit.probes import Catalogs, default_catalog_factory, serve_probes
from services.kit.server import GrpcServer

log = logging.getLogger("facexplain.counterfactual")


def build_server(settings: CounterfactualSettings, pipeline: FacePipeline | None = None) -> GrpcServer:
    """The counterfactual server (see the module docstring); ``pipeline`` replaces the FR model (tests, benchmarks)."""
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    metrics = ServiceMetrics("counterfactual")
    fr_slot, _fr_watcher = serve_embedder(
        settings, metrics, name=settings.fr_model_name, alias=settings.fr_model_alias, pipeline=pipeline
    )
    decoder_slot: ModelSlot[LoadedDecoder]
    base: ServiceSettings = settings
    decoder_slot, _decoder_watcher = serve_decoder(
        base, metrics, name=settings.decoder_model_name, alias=settings.decoder_model_alias
    )
    probes_slot, _probes_watcher = serve_probes(
        settings, metrics, name=settings.probes_model_name, alias=settings.probes_model_alias
    )
    catalogs = Catalogs(default_catalog_factory, settings.torch_device(), probes_slot)
    servicer = CounterfactualServicer(fr_slot, decoder_slot, catalogs, settings, metrics)
    return GrpcServer(
        settings,
        SERVICE_NAME,
        servicer,
        counterfactual_pb2_grpc.add_CounterfactualServiceServicer_to_server,
        metrics,
    )


def main(settings: CounterfactualSettings | None = None) -> None:
    settings = settings or CounterfactualSettings()
    configure_logging(settings.log_level, settings.log_format)
    server = build_server(settings).start()
    server.install_signal_handlers()
    print(f"counterfactual service listening on {server.address} (metrics :{server.metrics.port})", flush=True)
    server.wait()
