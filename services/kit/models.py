"""The served model of a service and its lifecycle status.

A request takes one snapshot of the slot (``slot.current()``) and uses it to the end, so a swap in
the middle of a request can never mix two versions in one response; the swap itself is a single
reference assignment under a lock. After a swap the old version stays referenced by the requests
that snapshotted it and is freed when the last of them returns; the slot keeps only a weak reference
so ModelStatus can list it as loaded-but-draining while that lasts.

A slot may start *empty*: a model that only exists in the registry (a decoder has no local weights to
fall back on) leaves the service up but without it until the watcher loads a valid version. Requests
that need it then get UNAVAILABLE saying why (``current()``), instead of the server refusing to start;
``peek()`` is the non-raising view the watcher and ModelStatus use.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, Protocol, TypeVar

from google.protobuf.timestamp_pb2 import Timestamp

from services.api.v1 import common_pb2
from services.kit.errors import Unavailable

T = TypeVar("T")


@dataclass(frozen=True)
class ServedModel(Generic[T]):
    name: str
    version: str
    kind: str
    model: T
    alias: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    loaded_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    device: str = ""

    def ref(self) -> common_pb2.ModelRef:
        return common_pb2.ModelRef(name=self.name, version=self.version, alias=self.alias)

    def to_proto(self, serving: bool = True) -> common_pb2.LoadedModel:
        ts = Timestamp()
        ts.FromDatetime(self.loaded_at)
        return common_pb2.LoadedModel(
            model=self.ref(),
            kind=self.kind,
            loaded_at=ts,
            metadata=self.metadata,
            serving=serving,
            device=self.device,
        )


class Reloader(Protocol):
    """What a slot's Reload RPC calls (``services.kit.reload.ModelWatcher`` implements it)."""

    model_name: str

    def reload_now(self, timeout_s: float | None = None) -> Any: ...

    def stop(self) -> None: ...


class ModelSlot(Generic[T]):
    """Holds the version a service serves (or nothing yet), plus what the last reload attempt said.

    ``label`` names the slot's role in messages ("decoder", "embedder"), which matters once a service
    holds several slots.
    """

    def __init__(self, initial: ServedModel[T] | None, registry_uri: str = "", *, label: str = "model") -> None:
        self._lock = threading.Lock()
        self._current = initial
        self.label = label
        self.registry_uri = registry_uri
        self.registry_reachable = bool(registry_uri)
        self.last_reload_error = ""
        self.last_reload_at: datetime | None = None
        self.reloader: Reloader | None = None
        self._candidate: ServedModel[T] | None = None
        self._retired: list[weakref.ref[ServedModel[T]]] = []

    def current(self) -> ServedModel[T]:
        """The served version, snapshotted for one request; UNAVAILABLE while the slot is empty."""
        with self._lock:
            cur, why = self._current, self.last_reload_error
        if cur is None:
            detail = f": {why}" if why else ""
            raise Unavailable(
                f"no {self.label} loaded yet{detail}; the service keeps polling the registry and serves a valid "
                "version as soon as the alias points at one"
                if self.reloader is not None
                else f"no {self.label} loaded{detail}; set FACEXPLAIN_REGISTRY_URI so the service can load one"
            )
        return cur

    def peek(self) -> ServedModel[T] | None:
        """The served version or ``None`` when empty (never raises; for the watcher and status)."""
        with self._lock:
            return self._current

    def swap(self, new: ServedModel[T]) -> ServedModel[T] | None:
        with self._lock:
            old, self._current = self._current, new
            self.last_reload_error = ""
            self.last_reload_at = datetime.now(UTC)
            if self._candidate is new:
                self._candidate = None
            self._retired = [r for r in self._retired if r() is not None]
            if old is not None:
                self._retired.append(weakref.ref(old))
            return old

    def set_candidate(self, candidate: ServedModel[T] | None) -> None:
        """A version loaded beside the served one while it is validated (ModelStatus shows it, not serving)."""
        with self._lock:
            self._candidate = candidate

    def set_registry_reachable(self, reachable: bool) -> None:
        """Record the outcome of a registry call and when it happened (ModelStatus.last_reload_at)."""
        with self._lock:
            self.registry_reachable = reachable
            self.last_reload_at = datetime.now(UTC)

    def record_failure(self, error: str) -> None:
        with self._lock:
            self.last_reload_error = error
            self.last_reload_at = datetime.now(UTC)

    def loaded(self) -> list[common_pb2.LoadedModel]:
        """The served version first, then a candidate under validation, then old versions still draining."""
        with self._lock:
            cur, cand = self._current, self._candidate
            retired = [m for m in (r() for r in self._retired) if m is not None and m is not cur]
        out = [cur.to_proto()] if cur is not None else []
        if cand is not None and cand is not cur:
            out.append(cand.to_proto(serving=False))
        out += [m.to_proto(serving=False) for m in retired]
        return out

    def status(self) -> common_pb2.ModelStatusResponse:
        resp = common_pb2.ModelStatusResponse(
            models=self.loaded(),
            last_reload_error=self.last_reload_error,
            registry_reachable=self.registry_reachable,
            registry_uri=self.registry_uri,
        )
        if self.last_reload_at is not None:
            resp.last_reload_at.FromDatetime(self.last_reload_at)
        return resp


def combined_status(slots: list[ModelSlot[Any]]) -> common_pb2.ModelStatusResponse:
    """ModelStatus of a service holding several models: every slot's models, in slot order.

    ``last_reload_error`` joins the slots' errors, each prefixed with its slot's label; the registry
    counts as reachable only if every slot that uses one last reached it; ``last_reload_at`` is the
    latest of the slots'.
    """
    statuses = [(slot, slot.status()) for slot in slots]
    resp = common_pb2.ModelStatusResponse(
        models=[m for _slot, st in statuses for m in st.models],
        last_reload_error="; ".join(
            f"{slot.label}: {st.last_reload_error}" for slot, st in statuses if st.last_reload_error
        ),
        registry_uri=next((st.registry_uri for _slot, st in statuses if st.registry_uri), ""),
    )
    with_registry = [st for _slot, st in statuses if st.registry_uri]
    resp.registry_reachable = bool(with_registry) and all(st.registry_reachable for st in with_registry)
    stamps = [slot.last_reload_at for slot, _st in statuses if slot.last_reload_at is not None]
    if stamps:
        resp.last_reload_at.FromDatetime(max(stamps))
    return resp
