"""Hot reloading: follow a registry alias, load the new version beside the old one, validate it, swap.

The watcher is one daemon thread per service. Every ``poll_interval_s`` it resolves alias -> version
(one REST call). When the version differs from the served one it downloads the bundle (cached by
registry, version and digest: ``registry.cache``), loads it *beside* the served model (requests keep
using the old one meanwhile), validates it on the bundle's golden input, and only then swaps it into
the :class:`~services.kit.models.ModelSlot` with one reference assignment. Requests that snapshotted
the old version finish on it; the old model is freed when the last of them returns.

One version loads at a time per watcher, and no lock is held while it does: a poll or Reload that finds
the same version loading waits for that load's outcome (a Reload up to its deadline) instead of
downloading it again; one that finds another version loading returns at once, saying which
(``ReloadResponse.loading``). A Reload therefore never queues behind a poll's slow download.

A version that fails to download, load or validate is never served: the old version keeps serving,
the reason goes to the log, to ``ModelStatus.last_reload_error`` and to
``facexplain_model_reloads_total{result="failed"}``. The watcher remembers rejected versions and
does not retry them on every poll (a manual Reload does retry, from the download it already has:
registry tags or the trust files may have changed since, the bytes have not; only a corrupt or
refused download is dropped and fetched afresh). A registry that does not answer
flips ``facexplain_registry_reachable`` to 0 and ``ModelStatus.registry_reachable`` to false; the
service keeps serving and the next successful poll flips them back.

A service may hold several slots, each followed by its own watcher (the decoding service serves a
decoder and the FR model it inverts); a slot may also start empty when its model has no local
fallback, and the watcher fills it once the registry offers a valid version.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import grpc

from facexplain.artifacts import ArtifactKind, kind_named
from facexplain.artifacts.bundle import BundleError, bundle_digest, flat_metadata, read_metadata
from registry import (
    Registry,
    RegistryError,
    RegistryUnreachable,
    VersionInfo,
    missing_tags,
    public_uri,
    served_tags,
)
from registry.signing import SIGNATURE_TAG
from services.api.v1 import common_pb2
from services.kit.config import ServiceSettings
from services.kit.errors import NotFound
from services.kit.metrics import ServiceMetrics
from services.kit.models import ModelSlot, ServedModel
from services.kit.trust import TrustPolicy

log = logging.getLogger("facexplain.reload")
# A rejection caused by the downloaded bytes themselves: the copy is dropped, a retry downloads afresh.
_BYTES_PROBLEMS = ("corrupt artifact", "refused:")
T = TypeVar("T")

# (bundle dir, version info, device) -> the loaded model, not yet validated.
Loader = Callable[[Path, VersionInfo, str], T]
# (loaded model, bundle dir, bundle metadata) -> extra metadata to show in ModelStatus; raises BundleError.
Validator = Callable[[T, Path, dict[str, Any]], dict[str, str]]


@dataclass(frozen=True)
class ReloadOutcome:
    """What one check did; ``error`` is empty when nothing went wrong (whether or not it swapped).

    ``loading`` names a version another check is still loading when this one returned: not an error,
    that check swaps it in (or records why not) when it finishes.
    """

    changed: bool
    version: str
    error: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    loading: str = ""


# How long a Reload without a deadline waits for a load of the same version that a poll or another
# Reload started (a Reload with a deadline waits at most until it).
RELOAD_WAIT_S = 120.0


class _Flight:
    """The one load in flight for a watcher: later checks of its version wait for its outcome instead of
    downloading again; checks of another version are told it is loading."""

    def __init__(self, version: str) -> None:
        self.version = version
        self.path: Path | None = None  # the bundle on disk once downloaded (kept if rejected, served if swapped)
        self.done = threading.Event()
        self.outcome: ReloadOutcome | None = None


class ModelWatcher(Generic[T]):
    """Follows ``model_name@alias`` in the registry and hot-swaps the slot's model when the alias moves.

    ``_lock`` guards only the watcher's bookkeeping (rejected and kept versions, the flight, the swap),
    never a registry call or a load: a Reload never queues behind a poll's slow download. At most one
    load runs at a time (``_flight``).
    """

    def __init__(
        self,
        registry: Registry,
        *,
        service: str,
        model_name: str,
        alias: str,
        kind: str,
        loader: Loader[T],
        validator: Validator[T],
        metrics: ServiceMetrics,
        poll_interval_s: float,
        cache_dir: Path | str,
        device: str = "cpu",
        require: dict[str, str] | None = None,
        trust: TrustPolicy | None = None,
    ) -> None:
        self.registry = registry
        self.service = service
        self.model_name = model_name
        self.alias = alias
        self.kind = kind
        self.loader = loader
        self.validator = validator
        self.metrics = metrics
        self.poll_interval_s = poll_interval_s
        self.cache_dir = Path(cache_dir)
        self.device = device
        self.require = dict(require or {})
        self.trust = trust or TrustPolicy()
        self.slot: ModelSlot[T] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rejected: dict[str, str] = {}  # version -> why; not retried by polls
        self._last_error = ""
        self._served_path: Path | None = None  # the cache entry of the served version: never pruned
        # rejected version -> (its download, its bundle_sha256 tag): a retry (manual Reload) reuses it
        # instead of downloading again; dropped when the bytes themselves were the problem.
        self._kept: dict[str, tuple[Path, str]] = {}
        self._untrusted: dict[str, tuple[Any, ...]] = {}  # version rejected as untrusted -> trust files' stamp
        self._flight: _Flight | None = None

    # -- lifecycle -----------------------------------------------------------------------------------
    def attach(self, slot: ModelSlot[T]) -> None:
        self.slot = slot
        slot.reloader = self

    def start(self) -> ModelWatcher[T]:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"{self.service}-{self.kind}-watcher", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                self.check(force=False)
            except Exception:  # the watcher must outlive any surprise; the service keeps serving
                log.exception("model watcher: unexpected error while polling")

    # -- the reload path -----------------------------------------------------------------------------
    def reload_now(self, timeout_s: float | None = None) -> ReloadOutcome:
        """The manual Reload RPC: the same path as a poll, at once, retrying a rejected version too.

        ``timeout_s`` (the RPC's remaining deadline) bounds only the wait for a load of the same version
        that is already in flight; a load this call starts itself runs to its end.
        """
        return self.check(force=True, wait_s=RELOAD_WAIT_S if timeout_s is None else max(0.0, timeout_s))

    def initial(self) -> ServedModel[T]:
        """Resolve, load and validate the alias's version for start-up (raises instead of recording)."""
        info = self.registry.resolve(self.model_name, self.alias)
        self._reachable(True)
        flight = _Flight(info.version)
        try:
            served, _ = self._load(info, flight, kept=None, protect=())
        except RegistryUnreachable:
            raise
        except Exception as exc:
            msg = f"{info.name} v{info.version} (@{self.alias}) rejected: {exc}"
            with self._lock:
                self._reject(info.version, msg, info.tags.get("bundle_sha256", ""), flight.path)
            raise
        self._served_path = flight.path
        return served

    def check(self, force: bool = False, wait_s: float = 0.0) -> ReloadOutcome:
        """Resolve the alias; load, validate and swap in its version if it is not the one served.

        A load of the same version already in flight is waited for (up to ``wait_s``) and its outcome
        returned; a load of another version in flight makes this check return at once, naming it.
        """
        slot = self.slot
        assert slot is not None, "attach() a slot first"
        before = slot.peek()
        try:
            info = self.registry.resolve(self.model_name, self.alias)
        except RegistryUnreachable as exc:
            if slot.registry_reachable:
                log.warning("registry unreachable; %s: %s", _serving(before), exc)
            self._reachable(False)
            return ReloadOutcome(False, _version(slot.peek()), f"registry unreachable: {exc}")
        except RegistryError as exc:  # answered: alias or model missing, or refused
            self._reachable(True)
            with self._lock:
                return self._fail(str(exc), count=force or str(exc) != self._last_error, version="")
        if not slot.registry_reachable:
            log.info("registry reachable again at %s", public_uri(self.registry.uri))
        self._reachable(True)
        mine = False
        kept: tuple[Path, str] | None = None
        protect: tuple[Path, ...] = ()
        with self._lock:
            current = slot.peek()
            if current is not None and current.name == info.name and current.version == info.version:
                return ReloadOutcome(current is not before, current.version)
            flight = self._flight
            if flight is not None:
                if flight.version != info.version:
                    return ReloadOutcome(False, _version(current), loading=f"{info.name} v{flight.version}")
            elif not force and info.version in self._rejected and not self._trust_changed(info.version):
                return ReloadOutcome(False, _version(current), self._rejected[info.version])
            else:
                flight = self._flight = _Flight(info.version)
                kept = self._kept.get(info.version)
                protect = tuple(p for p in (self._served_path, *(k[0] for k in self._kept.values())) if p is not None)
                mine = True
        if mine:
            return self._fly(flight, info, current, kept, protect)
        # The same version is loading: its outcome is this check's, once it comes.
        if flight.done.wait(wait_s) and flight.outcome is not None:
            return flight.outcome
        return ReloadOutcome(False, _version(slot.peek()), loading=f"{info.name} v{flight.version}")

    def _fly(
        self,
        flight: _Flight,
        info: VersionInfo,
        current: ServedModel[T] | None,
        kept: tuple[Path, str] | None,
        protect: tuple[Path, ...],
    ) -> ReloadOutcome:
        """Run ``flight``'s load (without the lock), then record its outcome and end the flight (with it)."""
        outcome: ReloadOutcome | None = None
        try:
            try:
                served, timings = self._load(info, flight, kept, protect)
            except RegistryUnreachable as exc:  # lost the registry mid-download: not the version's fault
                self._reachable(False)
                outcome = ReloadOutcome(False, _version(current), f"registry unreachable: {exc}")
                return outcome
            except Exception as exc:  # whatever breaks in a new version, the old one keeps serving
                still = f"still serving v{current.version}" if current is not None else f"no {self.kind} served"
                msg = f"{info.name} v{info.version} (@{self.alias}) rejected, {still}: {exc}"
                with self._lock:
                    outcome = self._fail(
                        msg,
                        count=True,
                        version=info.version,
                        tag_digest=info.tags.get("bundle_sha256", ""),
                        path=flight.path,
                    )
                return outcome
            with self._lock:
                outcome = self._swap(info, served, flight.path, timings)
            return outcome
        finally:
            with self._lock:
                flight.outcome = outcome  # None only if something unexpected escaped: waiters say it is loading
                self._flight = None
            flight.done.set()

    def _swap(
        self, info: VersionInfo, served: ServedModel[T], path: Path | None, timings: dict[str, float]
    ) -> ReloadOutcome:
        assert self.slot is not None
        old = self.slot.swap(served)
        self._served_path = path
        self._rejected.pop(info.version, None)
        self._kept.pop(info.version, None)
        self._untrusted.pop(info.version, None)
        self._last_error = ""
        self.metrics.set_served(served.name, served.version, self.kind)
        self.metrics.reloads.labels(self.service, "success").inc()
        log.info(
            "swapped %s v%s -> v%s (@%s)",
            old.name if old is not None else f"(no {self.kind})",
            old.version if old is not None else "-",
            served.version,
            self.alias,
            extra={
                "fx_model": served.name,
                "fx_version": served.version,
                "fx_previous_version": _version(old),
                **{f"fx_{k}_ms": round(v * 1000, 1) for k, v in timings.items()},
            },
        )
        del old  # the slot keeps only a weak reference; in-flight requests hold the rest
        return ReloadOutcome(True, served.version, "", timings)

    def _load(
        self, info: VersionInfo, flight: _Flight, kept: tuple[Path, str] | None, protect: tuple[Path, ...]
    ) -> tuple[ServedModel[T], dict[str, float]]:
        """Download, load beside the served model, check metadata, validate on the golden input.

        Runs without the lock: what it needs of the watcher's state (``kept``, ``protect``) was read under
        it, and what it produces (``flight.path``) is recorded under it by the caller.
        """
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        if kept is not None and kept[1] == info.tags.get("bundle_sha256", "") and (kept[0] / "bundle.json").is_file():
            path = flight.path = kept[0]  # a rejected version retried: its download is reused
        else:
            path = flight.path = self.registry.download(info, self.cache_dir, protect=protect)
        timings["download"] = time.perf_counter() - t0
        meta = read_metadata(path)
        problems = metadata_problems(self.kind, info, meta, self.require)
        if problems:
            raise BundleError("metadata incompatible: " + "; ".join(problems))
        # Trust rests on the digest of what was downloaded (bundle.json lists every file's sha256, which
        # the loader verifies before parsing), checked before any weight file is opened.
        digest = bundle_digest(meta)
        trusted_by = self.trust.check(digest, info.tags.get(SIGNATURE_TAG, ""))
        t1 = time.perf_counter()
        model = self.loader(path, info, self.device)
        timings["load"] = time.perf_counter() - t1
        metadata = {
            **flat_metadata(meta),
            **served_tags(info.tags),
            "bundle_sha256": digest,
            "trusted_by": trusted_by,
            "registry_run_id": info.run_id,
            "registry_source": info.source,
        }
        candidate = ServedModel(
            name=info.name,
            version=info.version,
            kind=self.kind,
            model=model,
            alias=self.alias,
            metadata=metadata,
            device=self.device,
        )
        if self.slot is not None:
            self.slot.set_candidate(candidate)
        try:
            t2 = time.perf_counter()
            extra = self.validator(model, path, meta)
            timings["validate"] = time.perf_counter() - t2
        finally:
            if self.slot is not None:
                self.slot.set_candidate(None)
        timings["total"] = time.perf_counter() - t0
        metadata.update(extra)
        metadata.update({f"reload_{k}_s": f"{v:.3f}" for k, v in timings.items()})
        log.info(
            "loaded and validated %s v%s",
            info.name,
            info.version,
            extra={
                "fx_model": info.name,
                "fx_version": info.version,
                **{f"fx_{k}_ms": round(v * 1000, 1) for k, v in timings.items()},
            },
        )
        return candidate, timings

    def _trust_changed(self, version: str) -> bool:
        """A version rejected as untrusted is retried once the trust files change (a digest added, a key rotated)."""
        return version in self._untrusted and self._untrusted[version] != self.trust.stamp()

    def _reject(self, version: str, msg: str, tag_digest: str = "", path: Path | None = None) -> None:
        """Remember a bad version (polls skip it). Its download (``path``) is kept for a manual retry unless
        its bytes were the problem (corrupt, or refused content), in which case a retry fetches it afresh."""
        self._rejected[version] = msg
        if "untrusted: " in msg:
            self._untrusted[version] = self.trust.stamp()
        else:
            self._untrusted.pop(version, None)
        if path is not None and not any(m in msg for m in _BYTES_PROBLEMS):
            self._kept[version] = (path, tag_digest)
            return
        self._kept.pop(version, None)
        self.registry.evict(self.model_name, version, self.cache_dir)

    def _fail(
        self, msg: str, *, count: bool, version: str, tag_digest: str = "", path: Path | None = None
    ) -> ReloadOutcome:
        assert self.slot is not None
        if version:
            self._reject(version, msg, tag_digest, path)
        if count:
            self.metrics.reloads.labels(self.service, "failed").inc()
            log.error("reload failed: %s", msg, extra={"fx_model": self.model_name, "fx_version": version})
        self._last_error = msg
        self.slot.record_failure(msg)
        return ReloadOutcome(False, _version(self.slot.peek()), msg)

    def _reachable(self, ok: bool) -> None:
        self.metrics.registry_up.labels(self.service).set(1 if ok else 0)
        if self.slot is not None:
            self.slot.set_registry_reachable(ok)


def _version(served: ServedModel[Any] | None) -> str:
    return served.version if served is not None else ""


def _serving(served: ServedModel[Any] | None) -> str:
    return f"still serving {served.name} v{served.version}" if served is not None else "nothing served yet"


def metadata_problems(
    kind: str, info: VersionInfo, meta: dict[str, Any], require: dict[str, str] | None = None
) -> list[str]:
    """Registry tags and bundle metadata must agree with each other and with what the service serves.

    ``require`` pins metadata values the service depends on, compared with the bundle's flattened
    metadata: a decoding service passes its FR model (``{"fr_model_name": ..., "fr_model_version": ...}``)
    so a decoder trained for another FR model is never swapped in.
    """
    problems = []
    if meta.get("kind") != kind:
        problems.append(f"bundle kind is {meta.get('kind')!r}, this service serves {kind!r}")
    tag_kind = info.tags.get("kind")
    if tag_kind and tag_kind != kind:
        problems.append(f"version tag kind is {tag_kind!r}, this service serves {kind!r}")
    missing = missing_tags(kind, info.tags)
    if missing:
        problems.append(f"version lacks required tags: {', '.join(missing)}")
    dim_tag = info.tags.get("template_dim")
    if dim_tag and "template_dim" in meta and dim_tag != str(meta["template_dim"]):
        problems.append(f"tag template_dim={dim_tag} but the bundle says {meta['template_dim']}")
    if require:
        try:
            flat = flat_metadata(meta)
        except (KeyError, TypeError, ValueError):
            flat = {}
        for key, want in require.items():
            if flat.get(key) != want:
                problems.append(f"{key} is {flat.get(key)!r}, this service needs {want!r}")
    return problems


# -- wiring for a service --------------------------------------------------------------------------------


def kind_loader(kind: ArtifactKind) -> Loader[Any]:
    """The watcher's loader for ``kind``: its bundle loader, labelled with the registered name and version."""

    def load(path: Path, info: VersionInfo, device: str) -> Any:
        return kind.load(path, device, name=info.name, version=info.version)

    return load


def serve_from_registry(
    settings: ServiceSettings,
    metrics: ServiceMetrics,
    *,
    kind: str | ArtifactKind,
    fallback: Callable[[], ServedModel[T]] | None = None,
    name: str | None = None,
    alias: str | None = None,
    loader: Loader[T] | None = None,
    validator: Validator[T] | None = None,
) -> tuple[ModelSlot[T], ModelWatcher[T] | None]:
    """The slot a service serves ``kind`` from, and its watcher (``None`` without a registry).

    Any artifact kind is loaded and validated through its :class:`~facexplain.artifacts.ArtifactKind`
    (``kind`` is the kind or its name); ``loader`` / ``validator`` replace the kind's (tests).

    ``name`` / ``alias`` default to ``FACEXPLAIN_MODEL_NAME`` (else the default model of ``kind``) and
    ``FACEXPLAIN_MODEL_ALIAS``; a service with a second model passes that model's own settings.

    Without ``FACEXPLAIN_REGISTRY_URI`` the slot holds ``fallback()`` (local default weights) and
    nothing polls. With it, the alias's version is loaded and validated before the server starts;
    if the registry is unreachable or that version is invalid, the service starts on ``fallback()``
    when ``FACEXPLAIN_REGISTRY_FALLBACK_LOCAL`` allows it (the watcher swaps the registry version
    in once it can) and refuses to start otherwise.

    ``fallback=None`` is a model with no local weights (a decoder exists only as a registered
    version): the slot then starts *empty* instead, requests needing it get UNAVAILABLE, and the
    watcher keeps polling until a valid version appears. ``FACEXPLAIN_REGISTRY_FALLBACK_LOCAL=false``
    still means "refuse to start" for such a model when the registry is configured, so a strict
    deployment crash-loops visibly instead of running half a service.
    """
    artifact = kind_named(kind) if isinstance(kind, str) else kind
    kind = label = artifact.name
    if not settings.registry_uri:
        return _local_slot(metrics, kind, fallback), None
    name = name or settings.model_name or artifact.default_model
    alias = alias or settings.model_alias
    if not name:
        raise ValueError(f"FACEXPLAIN_MODEL_NAME is required: there is no default {kind} model")
    registry = Registry(settings.registry_uri, timeout_s=settings.registry_timeout_s)
    trust = TrustPolicy(settings.trusted_digests_file, settings.trusted_keys_file)
    trust.load()  # a configured trust file that cannot be read stops the service here, by name
    if trust.enabled:
        log.info("%s@%s: versions are served only when trusted by %s", name, alias, trust.describe())
    else:
        log.warning(
            "%s@%s: no FACEXPLAIN_TRUSTED_DIGESTS_FILE / FACEXPLAIN_TRUSTED_KEYS_FILE: any version that passes the "
            "bundle's own checks is served, so whoever can write to the registry decides what is served",
            name,
            alias,
        )
    watcher: ModelWatcher[T] = ModelWatcher(
        registry,
        service=metrics.service,
        model_name=name,
        alias=alias,
        kind=kind,
        loader=loader or kind_loader(artifact),
        validator=validator or artifact.validate,
        metrics=metrics,
        poll_interval_s=settings.poll_interval_s,
        cache_dir=settings.model_cache_dir,
        device=settings.torch_device(),
        trust=trust,
    )
    initial, error, reachable = _start_up_model(watcher, settings, metrics, f"{name}@{alias}", kind, fallback)
    slot = ModelSlot(initial, registry_uri=public_uri(settings.registry_uri), label=label)
    if initial is not None:
        metrics.set_served(initial.name, initial.version, kind)
    watcher.attach(slot)
    watcher._reachable(reachable)
    if error:
        slot.record_failure(error)
    else:
        metrics.reloads.labels(metrics.service, "success").inc()
    return slot, watcher.start()


def _local_slot(metrics: ServiceMetrics, kind: str, fallback: Callable[[], ServedModel[T]] | None) -> ModelSlot[T]:
    """No registry: the local weights, or an empty slot for a kind that only the registry provides."""
    if fallback is None:
        slot: ModelSlot[T] = ModelSlot(None, label=kind)
        slot.record_failure(
            f"no registry configured (FACEXPLAIN_REGISTRY_URI): a {kind} is served from the registry only"
        )
        return slot
    served = fallback()
    metrics.set_served(served.name, served.version, kind)
    return ModelSlot(served, label=kind)


def _start_up_model(
    watcher: ModelWatcher[T],
    settings: ServiceSettings,
    metrics: ServiceMetrics,
    ref: str,
    kind: str,
    fallback: Callable[[], ServedModel[T]] | None,
) -> tuple[ServedModel[T] | None, str, bool]:
    """(model to start on, start-up error or "", registry reachable): the alias's version when it loads;
    otherwise the local fallback (or nothing) when FACEXPLAIN_REGISTRY_FALLBACK_LOCAL allows, else raise."""
    try:
        return watcher.initial(), "", True
    except Exception as exc:  # unreachable, no such alias, or an invalid version: all leave the service up
        reachable = not isinstance(exc, RegistryUnreachable)
        error = f"start-up: {ref} not loaded: {exc}"
        if not settings.registry_fallback_local:
            raise RuntimeError(f"{error} (FACEXPLAIN_REGISTRY_FALLBACK_LOCAL is off)") from None
        initial: ServedModel[T] | None
        if fallback is None:
            log.error("%s; no %s is served until the registry provides a valid version", error, kind)
            initial = None
        else:
            log.error("%s; serving local weights until the registry provides a valid version", error)
            initial = fallback()
        metrics.reloads.labels(metrics.service, "failed").inc()
        return initial, error, reachable


def _slot_names(slot: ModelSlot[Any]) -> set[str]:
    served = slot.peek()
    names = {served.name} if served is not None else set()
    if slot.reloader is not None:
        names.add(slot.reloader.model_name)
    return names


def reload_response(
    slots: ModelSlot[Any] | Sequence[ModelSlot[Any]],
    request: common_pb2.ReloadRequest,
    context: grpc.ServicerContext | None = None,
) -> common_pb2.ReloadResponse:
    """The Reload RPC of any service: re-resolve the aliases now and hot-swap whatever moved.

    ``slots`` is the service's one slot or all of them; ``request.model_name`` picks the slot serving
    (or following) that model, empty = every slot. With several slots each error is prefixed with
    its slot's label; ``changed`` is true if any slot swapped. ``models`` lists every slot's models;
    ``loading`` the versions another poll or Reload was still loading. ``context`` (the RPC's) bounds
    how long a slot waits for such a load of the very version it would load: its remaining deadline.
    """
    group = [slots] if isinstance(slots, ModelSlot) else list(slots)
    names = [_slot_names(slot) for slot in group]
    if request.model_name and not any(request.model_name in n for n in names):
        served = ", ".join(repr(n) for n in sorted(set().union(*names))) or "no model"
        raise NotFound(f"this service serves {served}, not {request.model_name!r}")
    errors: list[tuple[ModelSlot[Any], str]] = []
    loading: list[str] = []
    changed = False
    for slot, slot_names in zip(group, names, strict=True):
        if request.model_name and request.model_name not in slot_names:
            continue
        watcher = slot.reloader
        if watcher is None:
            local = "serving local weights" if slot.peek() is not None else f"no {slot.label} to load"
            errors.append((slot, f"no registry configured: {local}"))
            continue
        remaining = context.time_remaining() if context is not None else None
        outcome: ReloadOutcome = watcher.reload_now(remaining)
        changed = changed or outcome.changed
        if outcome.error:
            errors.append((slot, outcome.error))
        if outcome.loading:
            loading.append(outcome.loading)
    if len(group) == 1:
        error = "; ".join(e for _slot, e in errors)
    else:
        error = "; ".join(f"{slot.label}: {e}" for slot, e in errors)
    models = [m for slot in group for m in slot.loaded()]
    return common_pb2.ReloadResponse(models=models, changed=changed, error=error, loading=loading)
