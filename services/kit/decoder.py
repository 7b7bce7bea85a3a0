"""The decoder (a registered Deep Face Decoder) as a served model: what every service that decodes shares.

The decoding service serves it; the directions service decodes traversals with it. A decoder exists
in the registry only (there are no local weights to fall back on), so its slot may start empty and
the watcher fills it once the alias points at a valid version.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from facexplain.artifacts.bundle import KIND_DECODER
from facexplain.artifacts.decoder import LoadedDecoder, load_decoder_bundle, validate_decoder
from registry.client import VersionInfo
from services.kit.config import ServiceSettings
from services.kit.metrics import ServiceMetrics
from services.kit.models import ModelSlot
from services.kit.reload import ModelWatcher, serve_from_registry


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


def serve_decoder(
    settings: ServiceSettings, metrics: ServiceMetrics, *, name: str | None = None, alias: str | None = None
) -> tuple[ModelSlot[LoadedDecoder], ModelWatcher[LoadedDecoder] | None]:
    """The decoder's slot, following ``name@alias`` (default FACEXPLAIN_MODEL_NAME / _ALIAS); empty until loaded."""
    return serve_from_registry(
        settings,
        metrics,
        kind=KIND_DECODER,
        loader=load_decoder_version,
        validator=validate_decoder_version,
        fallback=None,
        name=name,
        alias=alias,
    )
