"""The served model of a service and its lifecycle status.

A request takes one snapshot of the slot (``slot.current()``) and uses it to the end, so a swap in
the middle of a request can never mix two versions in one response; the swap itself is a single
reference assignment under a lock.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Generic, TypeVar

from google.protobuf.timestamp_pb2 import Timestamp

from services.api.v1 import common_pb2

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

    def ref(self) -> common_pb2.ModelRef:
        return common_pb2.ModelRef(name=self.name, version=self.version, alias=self.alias)

    def to_proto(self, serving: bool = True) -> common_pb2.LoadedModel:
        ts = Timestamp()
        ts.FromDatetime(self.loaded_at)
        return common_pb2.LoadedModel(
            model=self.ref(), kind=self.kind, loaded_at=ts, metadata=self.metadata, serving=serving
        )


class ModelSlot(Generic[T]):
    """Holds the version a service serves, plus what the last reload attempt said."""

    def __init__(self, initial: ServedModel[T], registry_uri: str = "") -> None:
        self._lock = threading.Lock()
        self._current = initial
        self.registry_uri = registry_uri
        self.registry_reachable = bool(registry_uri)
        self.last_reload_error = ""
        self.last_reload_at: datetime | None = None

    def current(self) -> ServedModel[T]:
        with self._lock:
            return self._current

    def swap(self, new: ServedModel[T]) -> ServedModel[T]:
        with self._lock:
            old, self._current = self._current, new
            self.last_reload_error = ""
            self.last_reload_at = datetime.now(UTC)
            return old

    def record_failure(self, error: str) -> None:
        with self._lock:
            self.last_reload_error = error
            self.last_reload_at = datetime.now(UTC)

    def status(self) -> common_pb2.ModelStatusResponse:
        cur = self.current()
        resp = common_pb2.ModelStatusResponse(
            models=[cur.to_proto()],
            last_reload_error=self.last_reload_error,
            registry_reachable=self.registry_reachable,
            registry_uri=self.registry_uri,
        )
        if self.last_reload_at is not None:
            resp.last_reload_at.FromDatetime(self.last_reload_at)
        return resp
