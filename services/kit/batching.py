"""Dynamic batching: concurrent calls share one forward pass, run on one warm inference thread per model.

Why a dedicated thread and not the gRPC handler threads: torch's intra-op pool (OpenMP) belongs to
the thread that starts a parallel region. Eight handler threads each wake their own team, which has
stopped spin-waiting by the time the next call lands on that thread; on the 2-core machine of issue 24
the same forward pass took 101 ms on a process's main thread and 136-147 ms on a pool thread. One
long-lived inference thread per model keeps one team hot, and it is also the only place where calls
can meet: handler threads decode the request, enqueue its items and wait; the inference thread takes
up to ``FACEXPLAIN_MAX_BATCH_SIZE`` items that share a *key* and runs them as one batch.

The key is what must be equal for items to share a forward pass: the served model snapshot (so a batch
runs against one consistent version and each response names the version that produced it, even while
an alias moves) plus any per-call option the forward depends on (face selection, ...). Items of other
keys keep their place in the queue.

The wait (``FACEXPLAIN_BATCH_WAIT_MS``, default 2 ms) is how long the first queued item may wait for
others when the inference thread is idle. Under load it hardly matters: while one forward runs, the
next batch fills by itself. When idle it is pure added latency, so it only has to cover the spread in
arrival of calls fired together (gRPC hand-off and image decoding on the handler threads: a few
milliseconds apart). 2 ms is about 2-3 % of a CPU forward of the default pipeline (60-100 ms here) and
comparable to a small GPU forward, so it costs a single caller little on either device and still lets
a burst of concurrent calls land in one batch; a larger wait would buy GPU batches only under light,
bursty load, at a fixed latency cost for every idle call.

Limits, so waiting is never unbounded: the queue holds at most ``FACEXPLAIN_MAX_QUEUE`` items and a call
that would overflow it gets RESOURCE_EXHAUSTED at once; a call's deadline is honoured while it waits
(its items are dropped and it gets DEADLINE_EXCEEDED); a cancelled call's queued items are removed.
A batch that raises is retried item by item, so one bad input fails only its own call.

``FACEXPLAIN_DYNAMIC_BATCHING=false`` runs every call's forward inline on its handler thread, as before
batching existed, so a benchmark can compare both in the same build.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import grpc

from services.kit.errors import Cancelled, DeadlineExceeded, ResourceExhausted, ServiceError, Unavailable
from services.kit.metrics import ServiceMetrics

log = logging.getLogger("facexplain.batching")

K = TypeVar("K")  # items share a batch when their keys are equal (==); never hashed
ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")

# (key, items) -> one result per item, in order. Runs on the inference thread (or inline when disabled).
RunBatch = Callable[[K, list[ItemT]], Sequence[ResultT]]


@dataclass(frozen=True)
class BatchingConfig:
    """The batcher's knobs, read from :class:`~services.kit.config.ServiceSettings` by :meth:`from_settings`."""

    enabled: bool = True
    max_batch_size: int = 64
    wait_s: float = 0.002
    max_queue: int = 256
    torch_threads: int = 0

    @classmethod
    def from_settings(cls, settings: Any) -> BatchingConfig:
        return cls(
            enabled=bool(settings.dynamic_batching),
            max_batch_size=int(settings.max_batch_size),
            wait_s=float(settings.batch_wait_ms) / 1000.0,
            max_queue=int(settings.max_queue),
            torch_threads=int(settings.torch_threads),
        )


class Call(Generic[ResultT]):
    """One submitted call: its items' results once all have run, or the one error that ended it."""

    def __init__(self, batcher: DynamicBatcher[Any, Any, ResultT], n: int, deadline: float | None) -> None:
        self._batcher = batcher
        self.deadline = deadline
        self._results: list[ResultT | None] = [None] * n
        self._remaining = n
        self._error: ServiceError | BaseException | None = None
        self._done = threading.Event()
        if n == 0:
            self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    # -- called by the batcher, under its lock ------------------------------------------------------------
    def _deliver(self, index: int, result: ResultT) -> None:
        if self._done.is_set():
            return  # cancelled or timed out while its batch ran: nobody reads this any more
        self._results[index] = result
        self._remaining -= 1
        if self._remaining == 0:
            self._done.set()

    def _fail(self, error: BaseException) -> None:
        if self._done.is_set():
            return
        self._error = error
        self._done.set()

    # -- public -------------------------------------------------------------------------------------------
    def cancel(self) -> None:
        """Withdraw the call: its queued items leave the queue; a batch already running finishes unread."""
        self._batcher._abandon(self, Cancelled("call cancelled while queued for inference"), "cancelled")

    def result(self) -> list[ResultT]:
        """Wait for every item (until the call's deadline, if it has one); raise the call's error."""
        timeout = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
        if not self._done.wait(timeout):
            waited = "" if self.deadline is None else " while queued for inference"
            self._batcher._abandon(self, DeadlineExceeded(f"deadline exceeded{waited}"), "deadline")
        if self._error is not None:
            raise self._error
        return list(self._results)  # type: ignore[arg-type]  # all delivered: no None left


@dataclass
class _Item(Generic[K, ItemT]):
    key: K
    value: ItemT
    call: Call[Any]
    index: int
    enqueued: float = field(default_factory=time.monotonic)


class DynamicBatcher(Generic[K, ItemT, ResultT]):
    """A bounded queue in front of ``run_batch`` and the one daemon thread that drains it.

    ``name`` labels the thread and the metrics (one batcher per model slot: "embedder", "decoder").
    """

    def __init__(
        self,
        name: str,
        run_batch: RunBatch[K, ItemT, ResultT],
        config: BatchingConfig,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self._run_batch = run_batch
        self._metrics = metrics
        self._cond = threading.Condition()
        self._queue: deque[_Item[K, ItemT]] = deque()
        self._stopped = False
        self._thread: threading.Thread | None = None
        if config.enabled:
            self._thread = threading.Thread(target=self._loop, name=f"infer-{name}", daemon=True)
            self._thread.start()

    # -- handler side -------------------------------------------------------------------------------------
    def run(self, key: K, values: Sequence[ItemT], context: grpc.ServicerContext | None = None) -> list[ResultT]:
        """Run ``values`` under ``key`` and return their results, honouring the RPC's deadline and cancellation.

        Disabled, it runs them inline on the calling thread (one call, one forward).
        """
        deadline = None
        if context is not None:
            remaining = context.time_remaining()
            if remaining is not None:
                deadline = time.monotonic() + remaining
        if not self.config.enabled:
            if deadline is not None and deadline <= time.monotonic():
                raise DeadlineExceeded("deadline exceeded before inference")
            self._observe_batch(len(values))
            return list(self._checked(key, list(values)))
        call = self.submit(key, values, deadline=deadline)
        if context is not None and not context.add_callback(call.cancel):  # runs when the RPC ends, cancelled or not
            call.cancel()  # the RPC already ended (cancelled before we queued): nobody waits for these items
        return call.result()

    def submit(self, key: K, values: Sequence[ItemT], *, deadline: float | None = None) -> Call[ResultT]:
        """Queue ``values`` (``deadline`` on :func:`time.monotonic`'s clock); RESOURCE_EXHAUSTED when full."""
        n = len(values)
        call: Call[ResultT] = Call(self, n, deadline)
        if n == 0:
            return call
        limit = self.config.max_queue
        with self._cond:
            if self._stopped or self._thread is None:
                raise Unavailable(f"the {self.name} inference queue is shut down")
            if len(self._queue) + n > limit:
                self._count_dropped("queue_full", n)
                if n > limit:
                    raise ResourceExhausted(
                        f"{n} items exceed the {self.name} inference queue of {limit} items (FACEXPLAIN_MAX_QUEUE)"
                    )
                raise ResourceExhausted(
                    f"the {self.name} inference queue is full ({len(self._queue)} of {limit} items waiting, "
                    f"FACEXPLAIN_MAX_QUEUE); retry later"
                )
            now = time.monotonic()
            self._queue.extend(_Item(key, v, call, i, now) for i, v in enumerate(values))
            self._set_depth()
            self._cond.notify_all()
        return call

    def depth(self) -> int:
        """Items waiting now (not counting a batch that is running)."""
        with self._cond:
            return len(self._queue)

    def stop(self, timeout: float = 5.0) -> None:
        """Fail what is still queued with UNAVAILABLE and end the thread (after the server drained)."""
        with self._cond:
            self._stopped = True
            for item in self._queue:
                item.call._fail(Unavailable(f"the {self.name} inference queue shut down"))
            self._queue.clear()
            self._set_depth()
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # -- internals ----------------------------------------------------------------------------------------
    def _abandon(self, call: Call[Any], error: ServiceError, reason: str) -> None:
        with self._cond:
            if call.done:
                return
            before = len(self._queue)
            self._queue = deque(it for it in self._queue if it.call is not call)
            removed = before - len(self._queue)
            if removed:
                self._count_dropped(reason, removed)
                self._set_depth()
            call._fail(error)

    def _drop_expired(self, now: float) -> None:
        """Fail queued calls whose deadline passed (their handlers may already have given up)."""
        expired = {
            id(it.call): it.call for it in self._queue if it.call.deadline is not None and it.call.deadline <= now
        }
        if not expired:
            return
        before = len(self._queue)
        self._queue = deque(it for it in self._queue if id(it.call) not in expired)
        self._count_dropped("deadline", before - len(self._queue))
        for call in expired.values():
            call._fail(DeadlineExceeded("deadline exceeded while queued for inference"))
        self._set_depth()

    def _next_batch(self) -> list[_Item[K, ItemT]] | None:
        """Block until a batch is due (full, or its head waited ``wait_s``); ``None`` once stopped."""
        cfg = self.config
        with self._cond:
            while True:
                now = time.monotonic()
                self._drop_expired(now)
                if self._stopped:
                    return None
                if not self._queue:
                    self._cond.wait()
                    continue
                head = self._queue[0]
                same = 0
                for it in self._queue:
                    if it.key == head.key:
                        same += 1
                        if same >= cfg.max_batch_size:
                            break
                flush_at = head.enqueued + cfg.wait_s
                if same < cfg.max_batch_size and now < flush_at:
                    deadlines = [it.call.deadline for it in self._queue if it.call.deadline is not None]
                    self._cond.wait(min([flush_at, *deadlines]) - now)
                    continue
                batch: list[_Item[K, ItemT]] = []
                rest: deque[_Item[K, ItemT]] = deque()
                for it in self._queue:
                    if len(batch) < cfg.max_batch_size and it.key == head.key:
                        batch.append(it)
                    else:
                        rest.append(it)
                self._queue = rest
                self._set_depth()
                if self._metrics is not None:
                    hist = self._metrics.queue_wait.labels(self._metrics.service, self.name)
                    for it in batch:
                        hist.observe(now - it.enqueued)
                return batch

    def _loop(self) -> None:
        if self.config.torch_threads:
            import torch  # the kit's plumbing needs no torch; the thread that runs the forwards does

            torch.set_num_threads(self.config.torch_threads)
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._execute(batch)
            except BaseException:  # never let the only inference thread die: fail the batch instead
                log.exception("batch on %s failed outside the model", self.name)
                with self._cond:
                    for it in batch:
                        it.call._fail(Unavailable(f"internal error in the {self.name} inference thread"))

    def _execute(self, batch: list[_Item[K, ItemT]]) -> None:
        key = batch[0].key
        self._observe_batch(len(batch))
        try:
            results = self._checked(key, [it.value for it in batch])
        except Exception as exc:
            if len(batch) == 1:
                with self._cond:
                    batch[0].call._fail(exc)
                return
            # Isolate the item that broke the batch: the others' calls must not fail with it.
            for it in batch:
                try:
                    (one,) = self._checked(key, [it.value])
                except Exception as item_exc:
                    with self._cond:
                        it.call._fail(item_exc)
                else:
                    with self._cond:
                        it.call._deliver(it.index, one)
            return
        with self._cond:
            for it, res in zip(batch, results, strict=True):
                it.call._deliver(it.index, res)

    def _checked(self, key: K, values: list[ItemT]) -> Sequence[ResultT]:
        results = self._run_batch(key, values)
        if len(results) != len(values):
            raise RuntimeError(f"{self.name}: batch of {len(values)} returned {len(results)} results")
        return results

    def _observe_batch(self, n: int) -> None:
        if self._metrics is not None:
            self._metrics.batch_size.labels(self._metrics.service, self.name).observe(n)

    def _set_depth(self) -> None:
        if self._metrics is not None:
            self._metrics.queue_depth.labels(self._metrics.service, self.name).set(len(self._queue))

    def _count_dropped(self, reason: str, n: int) -> None:
        if self._metrics is not None and n:
            self._metrics.queue_dropped.labels(self._metrics.service, self.name, reason).inc(n)
