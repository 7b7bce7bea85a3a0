"""Where direction sets live: the server's memory, and the MLflow registry when a job asks for it.

Memory holds every set a job computed, by id, until the server restarts (bounded by
``FACEXPLAIN_MAX_STORED_SETS``: beyond it the oldest is dropped, with a log line). ``register`` writes
a set as a self-contained bundle of kind ``direction_set`` (:mod:`facexplain.artifacts.direction_set`)
and registers it through :meth:`registry.client.Registry.register_bundle`, tagged with its id,
method, target and data manifest so the registry UI shows what it is and an id outlives the server:
``get`` looks an id it does not hold up in the registry by that tag. Registered versions never change,
so a version read once is kept (by name and version) and an alias costs one resolve call.

Registry outcomes map to the proto's codes: no such model/version/alias -> NOT_FOUND, no answer ->
UNAVAILABLE, no registry configured -> FAILED_PRECONDITION (retrying cannot help).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

from facexplain.artifacts.bundle import BundleError
from facexplain.artifacts.direction_set import (
    KIND_DIRECTION_SET,
    DirectionSetData,
    EquivarianceSetData,
    bundle_tags,
    load_direction_bundle,
    save_direction_set,
    save_equivariance_set,
)
from registry import Registry, RegistryError, RegistryNotFound, RegistryUnreachable, VersionInfo, check_model_name
from services.api.v1 import common_pb2
from services.directions.sets import StoredSet
from services.directions.settings import DirectionsSettings
from services.kit.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable

log = logging.getLogger("facexplain.directions")


def check_registered_name(name: str) -> None:
    """INVALID_ARGUMENT for a name the registry would refuse, checked before a job spends any time."""
    try:
        check_model_name(name)
    except RegistryError as exc:
        raise InvalidArgument(f"registered_name: {exc}") from None


class DirectionStore:
    """In-memory sets by id plus the registry (optional) behind them; thread-safe."""

    def __init__(self, settings: DirectionsSettings, registry: Registry | None) -> None:
        self.settings = settings
        self.registry = registry
        self._lock = threading.Lock()
        self._sets: OrderedDict[str, StoredSet] = OrderedDict()
        self._registered: dict[tuple[str, str], StoredSet] = {}

    # -- memory ----------------------------------------------------------------------------------------------
    def add(self, entry: StoredSet) -> None:
        with self._lock:
            self._sets[entry.set_id] = entry
            while len(self._sets) > self.settings.max_stored_sets:
                old_id, old = self._sets.popitem(last=False)
                log.warning(
                    "dropped direction set %s from memory (more than %d held)%s",
                    old_id,
                    self.settings.max_stored_sets,
                    "; it stays in the registry" if old.registered_name else "",
                )

    def in_memory(self) -> list[StoredSet]:
        with self._lock:
            return list(self._sets.values())

    def registered_loaded(self) -> list[StoredSet]:
        with self._lock:
            return list(self._registered.values())

    # -- registry --------------------------------------------------------------------------------------------
    def require_registry(self) -> Registry:
        if self.registry is None:
            raise FailedPrecondition(
                "this server has no model registry (FACEXPLAIN_REGISTRY_URI): sets cannot be registered or read from it"
            )
        return self.registry

    def register(self, entry: StoredSet, name: str, description: str = "") -> VersionInfo:
        """Write ``entry`` as a bundle and register it as the next version of ``name``; records the version."""
        registry = self.require_registry()
        tmp = Path(tempfile.mkdtemp(prefix="direction-set-"))
        try:
            data = entry.data
            if isinstance(data, EquivarianceSetData):
                meta = save_equivariance_set(tmp / "bundle", data, name=name, description=description)
            else:
                meta = save_direction_set(tmp / "bundle", data, name=name, description=description)
            info = registry.register_bundle(
                tmp / "bundle", name, description=str(meta.get("description", "")), extra_tags=bundle_tags(meta)
            )
        except RegistryUnreachable as exc:
            raise Unavailable(f"registry unavailable, set {entry.set_id} not registered: {exc}") from None
        except (RegistryError, BundleError) as exc:
            raise FailedPrecondition(f"set {entry.set_id} not registered: {exc}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        entry.registered_name, entry.registered_version = info.name, info.version
        log.info("registered direction set %s as %s v%s", entry.set_id, info.name, info.version)
        return info

    def _load_version(self, info: VersionInfo) -> StoredSet:
        key = (info.name, info.version)
        with self._lock:
            cached = self._registered.get(key)
        if cached is not None:
            return StoredSet(cached.data, info.name, info.version, info.alias)
        kind = info.tags.get("kind", "")
        if kind and kind != KIND_DIRECTION_SET:
            raise InvalidArgument(f"{info.name} v{info.version} is a registered {kind}, not a direction set")
        registry = self.require_registry()
        try:
            path = registry.download(info, self.settings.model_cache_dir)
            data = load_direction_bundle(path)
        except RegistryUnreachable as exc:
            raise Unavailable(f"registry unavailable: {exc}") from None
        except RegistryNotFound as exc:
            raise NotFound(str(exc)) from None
        except (RegistryError, BundleError) as exc:
            registry.evict(info.name, info.version, self.settings.model_cache_dir)
            raise FailedPrecondition(f"{info.name} v{info.version} cannot be used as a direction set: {exc}") from None
        entry = StoredSet(data, info.name, info.version, "")
        with self._lock:
            self._registered[key] = entry
        return StoredSet(data, info.name, info.version, info.alias)

    def get_registered(self, ref: common_pb2.ModelRef) -> StoredSet:
        registry = self.require_registry()
        if not ref.name:
            raise InvalidArgument("set.registered needs the registered model name")
        if not ref.version and not ref.alias:
            raise InvalidArgument(f"set.registered {ref.name!r} needs a version or an alias")
        try:
            info = registry.get_version(ref.name, ref.version) if ref.version else registry.resolve(ref.name, ref.alias)
        except RegistryNotFound:
            what = f"v{ref.version}" if ref.version else f"@{ref.alias}"
            raise NotFound(f"no registered direction set {ref.name} {what}") from None
        except RegistryUnreachable as exc:
            raise Unavailable(f"registry unavailable: {exc}") from None
        except RegistryError as exc:
            raise FailedPrecondition(str(exc)) from None
        return self._load_version(info)

    def _find_registered_id(self, set_id: str) -> StoredSet | None:
        if self.registry is None:
            return None
        try:
            found = self.registry.find_by_tag("direction_set_id", set_id, max_results=1)
        except RegistryUnreachable as exc:
            raise Unavailable(f"set {set_id!r} is not in memory and the registry does not answer: {exc}") from None
        except (RegistryError, ValueError):
            return None  # refused, or an id that cannot be a tag value: reported as NOT_FOUND
        return self._load_version(found[0]) if found else None

    # -- lookup ----------------------------------------------------------------------------------------------
    def get(self, ref: common_pb2.DirectionSetRef, which: str = "set") -> StoredSet:
        """The set a ref names: an id in memory (or registered under that id), or a registered version."""
        kind = ref.WhichOneof("ref")
        if kind == "id":
            if not ref.id:
                raise InvalidArgument(f"{which}.id is empty")
            with self._lock:
                entry = self._sets.get(ref.id)
            if entry is None:
                entry = self._find_registered_id(ref.id)
            if entry is None:
                raise NotFound(
                    f"no direction set with id {ref.id!r} on this server (ids live until a restart unless the set "
                    "was registered)"
                )
            return entry
        if kind == "registered":
            return self.get_registered(ref.registered)
        raise InvalidArgument(f"{which} is empty: set an id or a registered model version")

    def list_registered(self) -> list[StoredSet]:
        """Every registered direction-set version (newest first), up to FACEXPLAIN_MAX_REGISTERED_LISTED."""
        registry = self.require_registry()
        try:
            models = [m for m in registry.list_models() if m["tags"].get("kind") == KIND_DIRECTION_SET]
            versions = [v for m in models for v in m["versions"]]
        except RegistryUnreachable as exc:
            raise Unavailable(f"registry unavailable: {exc}") from None
        except RegistryError as exc:
            raise FailedPrecondition(str(exc)) from None
        versions.sort(key=lambda v: -v.created_ms)
        out = []
        for info in versions[: self.settings.max_registered_listed]:
            try:
                out.append(self._load_version(info))
            except (NotFound, FailedPrecondition, InvalidArgument) as exc:
                log.warning("registered version %s v%s skipped in listing: %s", info.name, info.version, exc.message)
        return out


def is_direction_set(entry: StoredSet) -> bool:
    return isinstance(entry.data, DirectionSetData)
