"""The dynamic batcher with a tiny torch model: limits answer at once, deadlines and cancellation empty the
queue, and batching changes no result."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from services.kit.batching import BatchingConfig, DynamicBatcher
from services.kit.config import ServiceSettings
from services.kit.errors import Cancelled, DeadlineExceeded, InvalidArgument, ResourceExhausted
from services.kit.metrics import ServiceMetrics
from services.kit.models import ModelSlot, ServedModel


class TinyModel:
    """A linear layer behind a gate, recording every batch it ran (which thread, which inputs)."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8)).eval()
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.batches: list[list[int]] = []  # item ids per batch
        self.threads: set[str] = set()

    def __call__(self, key: str, xs: list[tuple[int, torch.Tensor]]) -> list[torch.Tensor]:
        self.started.set()
        self.gate.wait(10)
        self.batches.append([i for i, _x in xs])
        self.threads.add(threading.current_thread().name)
        if any(i < 0 for i, _x in xs):
            raise InvalidArgument("negative id")
        with torch.no_grad():
            return list(self.net(torch.stack([x for _i, x in xs])))

    def single(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.net(x[None])[0]


def _batcher(
    model: TinyModel, **cfg: float | int | bool
) -> tuple[DynamicBatcher[str, tuple[int, torch.Tensor], torch.Tensor], ServiceMetrics]:
    metrics = ServiceMetrics("test")
    config = BatchingConfig(**{"max_batch_size": 8, "wait_s": 0.002, "max_queue": 16, **cfg})  # type: ignore[arg-type]
    return DynamicBatcher("tiny", model, config, metrics), metrics


@pytest.fixture
def model() -> TinyModel:
    return TinyModel()


@pytest.fixture
def inputs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, generator=g) for _ in range(24)]


def _hold(model: TinyModel, batcher: DynamicBatcher[str, tuple[int, torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Occupy the inference thread with one gated item so later submissions stay queued."""
    model.gate.clear()
    model.started.clear()
    blocker = batcher.submit("k", [(999, torch.zeros(16))])
    assert model.started.wait(5)
    yield
    model.gate.set()
    blocker.result()


def test_concurrent_calls_batch_and_match_unbatched(model: TinyModel, inputs: list[torch.Tensor]) -> None:
    batcher, metrics = _batcher(model)
    try:
        hold = _hold(model, batcher)
        next(hold)
        with ThreadPoolExecutor(16) as pool:
            futs = [pool.submit(batcher.run, "k", [(i, x)]) for i, x in enumerate(inputs[:16])]
            deadline = time.monotonic() + 5
            while batcher.depth() < 16 and time.monotonic() < deadline:
                time.sleep(0.005)
            assert batcher.depth() == 16
            next(hold, None)
            outs = [f.result(10)[0] for f in futs]
    finally:
        batcher.stop()
    for x, out in zip(inputs, outs, strict=False):
        ref = model.single(x)
        assert torch.allclose(out, ref, atol=1e-6)
        assert float(torch.nn.functional.cosine_similarity(out, ref, dim=0)) >= 0.99999
    sizes = [len(b) for b in model.batches if 999 not in b]
    assert sizes == [8, 8], sizes  # 16 queued items, max batch 8
    assert model.threads == {"infer-tiny"}  # never on a caller's thread
    assert metrics.registry.get_sample_value("facexplain_batch_size_count", {"service": "test", "batcher": "tiny"}) == 3
    assert metrics.registry.get_sample_value("facexplain_batch_size_sum", {"service": "test", "batcher": "tiny"}) == 17
    assert (
        metrics.registry.get_sample_value("facexplain_batch_queue_depth", {"service": "test", "batcher": "tiny"}) == 0
    )
    waits = metrics.registry.get_sample_value(
        "facexplain_batch_queue_wait_seconds_count", {"service": "test", "batcher": "tiny"}
    )
    assert waits == 17


def test_multi_item_call_keeps_order_and_splits_over_batches(model: TinyModel, inputs: list[torch.Tensor]) -> None:
    batcher, _metrics = _batcher(model, max_batch_size=5)
    try:
        outs = batcher.run("k", list(enumerate(inputs[:12])))
    finally:
        batcher.stop()
    assert [len(b) for b in model.batches] == [5, 5, 2]
    ref = model.net(torch.stack(inputs[:12])).detach()
    assert torch.allclose(torch.stack(outs), ref, atol=1e-6)


def test_queue_full_answers_resource_exhausted_at_once(model: TinyModel) -> None:
    batcher, metrics = _batcher(model, max_queue=4)
    try:
        hold = _hold(model, batcher)
        next(hold)
        batcher.submit("k", [(i, torch.zeros(16)) for i in range(4)])
        start = time.perf_counter()
        with pytest.raises(ResourceExhausted, match=r"queue is full \(4 of 4 items waiting, FACEXPLAIN_MAX_QUEUE\)"):
            batcher.run("k", [(5, torch.zeros(16))])
        assert time.perf_counter() - start < 0.05
        with pytest.raises(ResourceExhausted, match="5 items exceed"):
            batcher.submit("k", [(i, torch.zeros(16)) for i in range(5)])
        assert batcher.depth() == 4  # the refused items were never queued
        next(hold, None)
    finally:
        batcher.stop()
    labels = {"service": "test", "batcher": "tiny", "reason": "queue_full"}
    assert metrics.registry.get_sample_value("facexplain_batch_dropped_total", labels) == 6


def test_deadline_passing_in_queue_is_deadline_exceeded_and_item_never_runs(model: TinyModel) -> None:
    batcher, metrics = _batcher(model)
    try:
        hold = _hold(model, batcher)
        next(hold)
        call = batcher.submit("k", [(7, torch.zeros(16))], deadline=time.monotonic() + 0.05)
        start = time.perf_counter()
        with pytest.raises(DeadlineExceeded, match="while queued for inference"):
            call.result()
        assert time.perf_counter() - start < 1.0
        assert batcher.depth() == 0
        next(hold, None)
        assert batcher.run("k", [(8, torch.zeros(16))])  # the thread goes on serving
    finally:
        batcher.stop()
    assert all(7 not in b for b in model.batches)
    labels = {"service": "test", "batcher": "tiny", "reason": "deadline"}
    assert metrics.registry.get_sample_value("facexplain_batch_dropped_total", labels) == 1


def test_inference_thread_drops_expired_items_itself(model: TinyModel) -> None:
    """No handler waiting (it gave up or is slow to wake): the thread still never runs an expired item."""
    batcher, _metrics = _batcher(model)
    try:
        hold = _hold(model, batcher)
        next(hold)
        call = batcher.submit("k", [(7, torch.zeros(16))], deadline=time.monotonic() + 0.02)
        time.sleep(0.05)
        next(hold, None)
        with pytest.raises(DeadlineExceeded):
            call.result()
        batcher.run("k", [(8, torch.zeros(16))])
    finally:
        batcher.stop()
    assert all(7 not in b for b in model.batches)


def test_cancel_removes_queued_items(model: TinyModel) -> None:
    batcher, metrics = _batcher(model)
    try:
        hold = _hold(model, batcher)
        next(hold)
        cancelled = batcher.submit("k", [(1, torch.zeros(16)), (2, torch.zeros(16))])
        kept = batcher.submit("k", [(3, torch.zeros(16))])
        assert batcher.depth() == 3
        cancelled.cancel()
        assert batcher.depth() == 1
        with pytest.raises(Cancelled):
            cancelled.result()
        next(hold, None)
        assert len(kept.result()) == 1
    finally:
        batcher.stop()
    ran = {i for b in model.batches for i in b}
    assert 3 in ran and not ran & {1, 2}
    labels = {"service": "test", "batcher": "tiny", "reason": "cancelled"}
    assert metrics.registry.get_sample_value("facexplain_batch_dropped_total", labels) == 2


class _Context:
    """The two things the batcher asks of a grpc.ServicerContext."""

    def __init__(self, remaining: float | None) -> None:
        self.remaining = remaining
        self.callbacks: list = []  # type: ignore[type-arg]

    def time_remaining(self) -> float | None:
        return self.remaining

    def add_callback(self, fn) -> bool:  # type: ignore[no-untyped-def]
        self.callbacks.append(fn)
        return True


def test_run_takes_deadline_and_cancellation_from_the_rpc_context(model: TinyModel) -> None:
    batcher, _metrics = _batcher(model)
    try:
        hold = _hold(model, batcher)
        next(hold)
        with pytest.raises(DeadlineExceeded):
            batcher.run("k", [(1, torch.zeros(16))], _Context(0.03))  # type: ignore[arg-type]
        ctx = _Context(None)
        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(batcher.run, "k", [(2, torch.zeros(16))], ctx)
            while not ctx.callbacks:
                time.sleep(0.002)
            ctx.callbacks[0]()  # what gRPC does when the client cancels
            with pytest.raises(Cancelled):
                fut.result(5)
        assert batcher.depth() == 0
        next(hold, None)
    finally:
        batcher.stop()
    assert all(not {1, 2} & set(b) for b in model.batches)


def test_a_failing_item_fails_only_its_own_call(model: TinyModel, inputs: list[torch.Tensor]) -> None:
    batcher, _metrics = _batcher(model)
    try:
        hold = _hold(model, batcher)
        next(hold)
        bad = batcher.submit("k", [(-1, inputs[0])])
        good = batcher.submit("k", [(1, inputs[1]), (2, inputs[2])])
        next(hold, None)
        with pytest.raises(InvalidArgument, match="negative id"):
            bad.result()
        outs = good.result()
    finally:
        batcher.stop()
    assert torch.allclose(outs[0], model.single(inputs[1]), atol=1e-6)


def test_different_keys_never_share_a_batch(model: TinyModel) -> None:
    batcher, _metrics = _batcher(model)
    try:
        hold = _hold(model, batcher)
        next(hold)
        calls = [batcher.submit(k, [(i, torch.zeros(16))]) for i, k in enumerate(["a", "b", "a", "b", "a"])]
        next(hold, None)
        for c in calls:
            c.result()
    finally:
        batcher.stop()
    assert [b for b in model.batches if 999 not in b] == [[0, 2, 4], [1, 3]]


def test_a_swap_mid_queue_never_mixes_versions(inputs: list[torch.Tensor]) -> None:
    """Keys hold the served snapshot: calls made before a swap run on the old version, later ones on the new,
    and each result can name the version that produced it."""
    v1, v2 = TinyModel(), TinyModel()
    first = v2.net[0]
    assert isinstance(first, torch.nn.Linear)
    torch.nn.init.normal_(first.weight)  # another version: other weights
    slot = ModelSlot(ServedModel("tiny", "1", "test", v1))
    gate = threading.Event()

    def run(key: ServedModel[TinyModel], xs: list[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
        gate.wait(10)
        return [(key.version, y) for y in key.model.net(torch.stack(xs)).detach()]

    batcher = DynamicBatcher("swap", run, BatchingConfig(max_batch_size=8, wait_s=0.002, max_queue=16))
    try:
        blocker = batcher.submit(slot.current(), [inputs[0]])
        old = [batcher.submit(slot.current(), [x]) for x in inputs[1:4]]
        slot.swap(ServedModel("tiny", "2", "test", v2))
        new = [batcher.submit(slot.current(), [x]) for x in inputs[4:7]]
        gate.set()
        blocker.result()
        got = [c.result()[0] for c in old + new]
    finally:
        batcher.stop()
    for (version, y), x, model in zip(got, inputs[1:7], [v1] * 3 + [v2] * 3, strict=True):
        assert version == ("1" if model is v1 else "2")
        assert torch.allclose(y, model.single(x), atol=1e-6)


def test_disabled_runs_inline_on_the_calling_thread(model: TinyModel, inputs: list[torch.Tensor]) -> None:
    batcher, _metrics = _batcher(model, enabled=False)
    out = batcher.run("k", [(0, inputs[0])])[0]
    assert model.threads == {threading.current_thread().name}
    assert torch.allclose(out, model.single(inputs[0]), atol=1e-6)
    batcher.stop()


def test_settings_defaults_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = BatchingConfig.from_settings(ServiceSettings())
    assert cfg.enabled and cfg.wait_s == pytest.approx(0.002) and cfg.max_queue == 256 and cfg.max_batch_size == 64
    monkeypatch.setenv("FACEXPLAIN_DYNAMIC_BATCHING", "false")
    monkeypatch.setenv("FACEXPLAIN_BATCH_WAIT_MS", "5")
    monkeypatch.setenv("FACEXPLAIN_MAX_QUEUE", "32")
    cfg = BatchingConfig.from_settings(ServiceSettings())
    assert not cfg.enabled and cfg.wait_s == pytest.approx(0.005) and cfg.max_queue == 32
