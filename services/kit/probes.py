"""The accessory probe set (a registered ``attribute_probes`` bundle) and the attribute catalogue built on it.

Shared by the services that measure attributes on faces: the attributes service (recovery, importance)
and the counterfactual service (Explain's s_a per attribute). The probe set is optional: with no name
configured, or before a valid version is loaded, the catalogue simply has no accessory attributes; when
the alias moves, the next request gets a catalogue rebuilt around the new version.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from facexplain.artifacts.probes import KIND
from facexplain.attributes.catalog import AttributeCatalog
from services.kit.config import ServiceSettings
from services.kit.metrics import ServiceMetrics
from services.kit.models import ModelSlot, ServedModel
from services.kit.reload import ModelWatcher, serve_from_registry

log = logging.getLogger("facexplain.probes")

# (device, probe estimator or None) -> catalogue; facexplain.attributes.defaults.default_catalog in production.
CatalogFactory = Callable[[str, Any], AttributeCatalog]


def default_catalog_factory(device: str, probes: Any) -> AttributeCatalog:
    from facexplain.attributes.defaults import default_catalog

    return default_catalog(device, probes)


def serve_probes(
    settings: ServiceSettings, metrics: ServiceMetrics, *, name: str, alias: str
) -> tuple[ModelSlot[Any] | None, ModelWatcher[Any] | None]:
    """The probe set's slot following ``name@alias``, or (None, None) when ``name`` is empty."""
    if not name:
        log.info("no accessory probe set configured (FACEXPLAIN_PROBES_MODEL_NAME is empty): no accessory attributes")
        return None, None
    return serve_from_registry(
        settings,
        metrics,
        kind=KIND,
        fallback=None,
        name=name,
        alias=alias,
    )


class Catalogs:
    """The catalogue for the served accessory probe set (rebuilt when that version changes; the rest is fixed)."""

    def __init__(self, factory: CatalogFactory, device: str, probes_slot: ModelSlot[Any] | None) -> None:
        self._factory = factory
        self._device = device
        self.probes_slot = probes_slot
        self._lock = threading.Lock()
        self._key: tuple[str, str] | None = None
        self._catalog: AttributeCatalog | None = None

    def current(self) -> tuple[AttributeCatalog, ServedModel[Any] | None, tuple[str, str]]:
        """(catalogue, the probe set it holds or None, its (name, version) key)."""
        probes = self.probes_slot.peek() if self.probes_slot is not None else None
        key = (probes.name, probes.version) if probes is not None else ("", "")
        with self._lock:
            if self._catalog is None or self._key != key:
                self._catalog = self._factory(self._device, probes.model if probes is not None else None)
                self._key = key
            return self._catalog, probes, key
