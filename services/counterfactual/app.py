"""Build and run the counterfactual server (``facexplain serve counterfactual``).

The FR model (``FACEXPLAIN_FR_MODEL_NAME`` at ``FACEXPLAIN_FR_MODEL_ALIAS``) is loaded exactly as the
embedding service loads it, local face-api weights included; it is the white-box surrogate and the
default target, so Attack works as soon as the server is up. The decoder
(``FACEXPLAIN_DECODER_MODEL_NAME`` at ``FACEXPLAIN_DECODER_MODEL_ALIAS``) comes from the registry only:
until one for the served FR version is loaded, Explain and DefenceReport answer FAILED_PRECONDITION.
The accessory probe set (``FACEXPLAIN_PROBES_MODEL_NAME`` at ``FACEXPLAIN_PROBES_MODEL_ALIAS``) is
optional, as in the attributes service: with it Explain also reports s_a for eyeglasses, smiling, ...
So is an independent FR model offered as a black-box target (``FACEXPLAIN_TARGET_MODEL_NAME`` at
``FACEXPLAIN_TARGET_MODEL_ALIAS``, registry only; until it loads, requests naming it get UNAVAILABLE).
All follow their aliases and hot-swap. The attribute catalogue is built on first use by Explain.
"""

from __future__ import annotations

import logging

from facexplain.artifacts import decoder
from facexplain.artifacts.decoder import LoadedDecoder
from facexplain.artifacts.embedder import KIND
from facexplain.pipeline import FacePipeline
from services.api.v1 import counterfactual_pb2_grpc
from services.counterfactual.service import SERVICE_NAME, CounterfactualServicer
from services.counterfactual.settings import CounterfactualSettings
from services.kit.embedder import serve_embedder
from services.kit.models import ModelSlot
from services.kit.probes import Catalogs, default_catalog_factory, serve_probes
from services.kit.reload import serve_from_registry
from services.kit.server import GrpcServer, run_service, service_metrics

log = logging.getLogger("facexplain.counterfactual")


def build_server(settings: CounterfactualSettings, pipeline: FacePipeline | None = None) -> GrpcServer:
    """The counterfactual server (see the module docstring); ``pipeline`` replaces the FR model (tests, benchmarks)."""
    metrics = service_metrics(settings, "counterfactual")
    fr_slot, _fr_watcher = serve_embedder(
        settings, metrics, name=settings.fr_model_name, alias=settings.fr_model_alias, pipeline=pipeline
    )
    decoder_slot: ModelSlot[LoadedDecoder]
    decoder_slot, _decoder_watcher = serve_from_registry(
        settings, metrics, kind=decoder.KIND, name=settings.decoder_model_name, alias=settings.decoder_model_alias
    )
    probes_slot, _probes_watcher = serve_probes(
        settings, metrics, name=settings.probes_model_name, alias=settings.probes_model_alias
    )
    catalogs = Catalogs(default_catalog_factory, settings.torch_device(), probes_slot)
    target_slot: ModelSlot[FacePipeline] | None = None
    if settings.target_model_name:
        target_slot, _target_watcher = serve_from_registry(
            settings, metrics, kind=KIND, name=settings.target_model_name, alias=settings.target_model_alias
        )
        target_slot.label = "black-box target"
    servicer = CounterfactualServicer(fr_slot, decoder_slot, catalogs, settings, metrics, target_slot=target_slot)
    return GrpcServer(
        settings,
        SERVICE_NAME,
        servicer,
        counterfactual_pb2_grpc.add_CounterfactualServiceServicer_to_server,
        metrics,
        required_models=[fr_slot],  # Attack needs no decoder; Explain and DefenceReport say UNAVAILABLE without one
    )


def main(settings: CounterfactualSettings | None = None) -> None:
    run_service("counterfactual", settings or CounterfactualSettings(), build_server)
