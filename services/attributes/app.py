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
from pathlib import Path
from typing import Any

import torch

from facexplain.attributes.catalog import AttributeCatalog
from facexplain.models.bundle import KIND_ATTRIBUTE_PROBES
from facexplain.models.decoder_bundle import LoadedDecoder
from facexplain.pipeline import FacePipeline
from services.api.v1 import attributes_pb2_grpc
from services.attributes.service import SERVICE_NAME, AttributesServicer, Catalogs, ReferenceStats
from services.attributes.settings import AttributesSettings
from services.kit.config import ServiceSettings
from services.kit.decoder import serve_decoder
from services.kit.embedder import serve_embedder
from services.kit.logs import configure_logging
from services.kit.metrics import ServiceMetrics
from services.kit.models import ModelSlot
from services.kit.registry import VersionInfo
from services.kit.reload import ModelWatcher, serve_from_registry
from services.kit.server import GrpcServer

log = logging.getLogger("facexplain.attributes")


def _catalog(device: str, probes: Any) -> AttributeCatalog:
    from facexplain.attributes.defaults import default_catalog

    return default_catalog(device, probes)


def load_probes_version(path: Path, info: VersionInfo, device: str) -> Any:
    """Watcher loader: a downloaded probe-set bundle as an accessory estimator (checksums verified, and its
    golden probabilities re-computed and compared: a version that fails is never served)."""
    from facexplain.attributes.accessory import load_probe_bundle

    return load_probe_bundle(path, device)


def validate_probes_version(model: Any, path: Path, meta: dict[str, Any]) -> dict[str, str]:
    """Watcher validator: the golden check already ran in the loader; report what the set estimates."""
    return {"attributes": ",".join(s.name for s in model.specs)}


def serve_probes(
    settings: AttributesSettings, metrics: ServiceMetrics
) -> tuple[ModelSlot[Any] | None, ModelWatcher[Any] | None]:
    if not settings.probes_model_name:
        log.info("no accessory probe set configured (FACEXPLAIN_PROBES_MODEL_NAME is empty): no accessory attributes")
        return None, None
    return serve_from_registry(
        settings,
        metrics,
        kind=KIND_ATTRIBUTE_PROBES,
        loader=load_probes_version,
        validator=validate_probes_version,
        fallback=None,
        name=settings.probes_model_name,
        alias=settings.probes_model_alias,
    )


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
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    metrics = ServiceMetrics("attributes")
    fr_slot, _fr_watcher = serve_embedder(
        settings, metrics, name=settings.fr_model_name, alias=settings.fr_model_alias, pipeline=pipeline
    )
    decoder_slot: ModelSlot[LoadedDecoder]
    base: ServiceSettings = settings
    decoder_slot, _decoder_watcher = serve_decoder(
        base, metrics, name=settings.decoder_model_name, alias=settings.decoder_model_alias
    )
    probes_slot, _probes_watcher = serve_probes(settings, metrics)
    catalogs = Catalogs(_catalog, settings.torch_device(), probes_slot)
    reference = ReferenceStats(settings.reference_dir, settings)
    servicer = AttributesServicer(fr_slot, decoder_slot, probes_slot, catalogs, reference, settings, metrics)
    if warm_up:
        # Not a daemon: a SIGTERM during the warm-up must let it finish (seconds) before the interpreter
        # exits; a daemon thread inside torch at exit aborts the process (std::terminate, exit -6).
        threading.Thread(target=_warm_up, args=(servicer,), name="attributes-warm-up", daemon=False).start()
    return GrpcServer(
        settings, SERVICE_NAME, servicer, attributes_pb2_grpc.add_AttributesServiceServicer_to_server, metrics
    )


def main(settings: AttributesSettings | None = None) -> None:
    settings = settings or AttributesSettings()
    configure_logging(settings.log_level, settings.log_format)
    server = build_server(settings).start()
    server.install_signal_handlers()
    print(f"attributes service listening on {server.address} (metrics :{server.metrics.port})", flush=True)
    server.wait()
