"""Discovery jobs: long work in a worker thread, its progress streamed to the client, cancellable.

A discovery RPC is server-streaming: Progress events while the job runs, then the results. The
methods in :mod:`facexplain.directions` report progress through callbacks (``progress(done, total)``,
``should_stop()``), and a gRPC generator cannot yield from inside a callback, so the job runs in its
own thread and talks to the handler through a queue. The handler yields what arrives; the job polls
:meth:`JobContext.stop` before every batch, which turns true as soon as the client cancels (or its
deadline passes), and then raises :class:`~services.kit.errors.Cancelled`. Results are only yielded
after the whole job finished, so a cancelled job has registered and stored nothing.

Progress events are thinned to a few per second (the first and the last of every stage always go
out), so a 25,000-blend region does not flood a slow client with 1,600 messages.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from services.api.v1 import common_pb2, directions_pb2
from services.kit.errors import Cancelled

log = logging.getLogger("facexplain.directions")
MIN_INTERVAL_S = 0.2


@dataclass
class _Done:
    events: list[directions_pb2.DiscoveryEvent]


@dataclass
class _Failed:
    error: BaseException


class JobContext:
    """What a job sees: a progress reporter and a stop flag tied to the client's call."""

    def __init__(self, context: grpc.ServicerContext, out: queue.Queue[Any]) -> None:
        self._context = context
        self._out = out
        self._abandoned = threading.Event()
        self._last: dict[str, float] = {}

    def stop(self) -> bool:
        """True once the client cancelled, its deadline passed, or the handler gave up on the job."""
        if self._abandoned.is_set() or not self._context.is_active():
            return True
        remaining = self._context.time_remaining()
        return remaining is not None and remaining <= 0

    def progress(self, done: int, total: int, stage: str, message: str = "", *, force: bool = False) -> None:
        """Queue a Progress event; dropped if the stage reported less than MIN_INTERVAL_S ago (unless
        it is the stage's last, or ``force``: the start of a new part of a stage)."""
        now = time.monotonic()
        last = self._last.get(stage)
        if not force and last is not None and done < total and now - last < MIN_INTERVAL_S:
            return
        self._last[stage] = now
        event = directions_pb2.DiscoveryEvent(
            progress=common_pb2.Progress(done=int(done), total=int(total), stage=stage, message=message)
        )
        self._out.put(event)

    def abandon(self) -> None:
        self._abandoned.set()


Work = Callable[[JobContext], list[directions_pb2.DiscoveryEvent]]


def run_job(context: grpc.ServicerContext, work: Work, name: str) -> Iterator[directions_pb2.DiscoveryEvent]:
    """Run ``work`` in a worker thread; yield its Progress events as they come, then its result events.

    An exception in the job (a ServiceError, or anything else) is re-raised here, in the handler, so
    the RPC wrapper maps it to a status. If the handler is closed early (client gone), the job is
    told to stop and finishes on its own at its next batch.
    """
    out: queue.Queue[Any] = queue.Queue()
    job = JobContext(context, out)

    def target() -> None:
        try:
            out.put(_Done(work(job)))
        except Cancelled as exc:  # the client is gone: nobody reads the status, so say it here
            log.info("job %s cancelled: %s", name, exc.message, extra={"fx_job": name})
            out.put(_Failed(exc))
        except BaseException as exc:  # handed to the handler thread, which raises it
            out.put(_Failed(exc))

    thread = threading.Thread(target=target, name=f"job-{name}", daemon=True)
    thread.start()
    try:
        while True:
            try:
                item = out.get(timeout=0.25)
            except queue.Empty:
                continue
            if isinstance(item, _Done):
                yield from item.events
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        job.abandon()
