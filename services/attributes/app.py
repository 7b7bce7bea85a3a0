"""Build and run the attributes server (``facexplain serve attributes``).

The FR model (``FACEXPLAIN_FR_MODEL_NAME`` at ``FACEXPLAIN_FR_MODEL_ALIAS``) is loaded exactly as the
embedding service loads it, local face-api weights included. The decoder
(``FACEXPLAIN_DECODER_MODEL_NAME`` at ``FACEXPLAIN_DECODER_MODEL_ALIAS``) comes from the registry only:
until one is loaded the recovery RPCs answer UNAVAILABLE while ListAttributes, ModelStatus and Reload
work. The accessory probe set (``FACEXPLAIN_PROBES_MODEL_NAME`` at ``FACEXPLAIN_PROBES_MODEL_ALIAS``,
kind ``attribute_probes``) is optional: empty name, or no valid version yet = no accessory attributes.
All three follow their aliases and hot-swap. At start-up a background thread measures the reference
faces (``FACEXPLAIN_REFERENCE_DIR``) once the models are there, so the first DiffAttributes is fast.
"""

from __future__ import annotations

import logging
import threading

from facexplain.artifacts import decoder
from facexplain.artifacts.decoder import LoadedDecoder
from facexplain.pipeline import FacePipeline
from services.api.v1 import attributes_pb2_grpc
from services.attributes.service import SERVICE_NAME, AttributesServicer, ReferenceStats
from services.attributes.settings import AttributesSettings
from services.kit.embedder import serve_embedder
from services.kit.models import ModelSlot
from services.kit.probes import Catalogs, default_catalog_factory, serve_probes
from services.kit.reload import serve_from_registry
from services.kit.server import GrpcServer, run_service, service_metrics

log = logging.getLogger("facexplain.attributes")


def _warm_up(servicer: AttributesServicer) -> None:
    """Build the catalogue and measure the reference faces once the models are there (best effort)."""
    try:
        catalog, _probes, key = servicer.catalogs.current()
        fr, decoder = servicer.fr_slot.peek(), servicer.decoder_slot.peek()
        if fr is None or decoder is None:
            return
        if (decoder.model.fr_name, decoder.model.fr_version) == (fr.name, fr.version):
            servicer.reference.stds(fr, decoder, catalog, key)
    except Exception:  # never fatal: the first request computes it again and reports what fails
        log.warning("warm-up failed; the first request builds the catalogue / reference spread", exc_info=True)


def build_server(
    settings: AttributesSettings, pipeline: FacePipeline | None = None, *, warm_up: bool = True
) -> GrpcServer:
    """The attributes server (see the module docstring); ``pipeline`` replaces the FR model (tests, benchmarks)."""
    metrics = service_metrics(settings, "attributes")
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
    reference = ReferenceStats(settings.reference_dir, settings)
    servicer = AttributesServicer(fr_slot, decoder_slot, probes_slot, catalogs, reference, settings, metrics)
    if warm_up:
        # Not a daemon: a SIGTERM during the warm-up must let it finish (seconds) before the interpreter
        # exits; a daemon thread inside torch at exit aborts the process (std::terminate, exit -6).
        threading.Thread(target=_warm_up, args=(servicer,), name="attributes-warm-up", daemon=False).start()
    return GrpcServer(
        settings,
        SERVICE_NAME,
        servicer,
        attributes_pb2_grpc.add_AttributesServiceServicer_to_server,
        metrics,
        required_models=[fr_slot, decoder_slot],  # recovery decodes before it estimates
    )


def main(settings: AttributesSettings | None = None) -> None:
    run_service("attributes", settings or AttributesSettings(), build_server)
