"""A call that brings its own batch (EmbedBatch) runs as a forward of its own images: queued beside other
calls it never shares their forward pass, while single-image calls still do (services/kit/embedder.own_batch)."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

from facexplain.pipeline import FaceSelection
from services.kit.batching import BatchingConfig, DynamicBatcher
from services.kit.embedder import analyze_batch, own_batch


class Recorder:
    """A pipeline stand-in: ``analyze`` records each forward's items and the selection it was given."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.started = threading.Event()
        self.forwards: list[list[str]] = []

    def analyze(self, images: list[str], selection: FaceSelection) -> list[str]:
        self.started.set()
        self.gate.wait(10)
        self.forwards.append(list(images))
        return [f"{im}:{selection.name}" for im in images]


def test_own_batches_run_alone_and_single_calls_still_merge() -> None:
    pipe = Recorder()
    served: Any = SimpleNamespace(model=pipe)
    batcher: DynamicBatcher[Any, Any, Any] = DynamicBatcher(
        "embedder", analyze_batch, BatchingConfig(max_batch_size=64, wait_s=0.002, max_queue=64)
    )
    try:
        blocker = batcher.submit((served, FaceSelection.LARGEST), ["hold"])
        assert pipe.started.wait(5)  # the inference thread is busy: everything below queues together
        a = batcher.submit(own_batch(served, FaceSelection.LARGEST), ["a1", "a2", "a3"])
        b = batcher.submit(own_batch(served, FaceSelection.LARGEST), ["b1", "b2"])
        s1 = batcher.submit((served, FaceSelection.LARGEST), ["s1"])
        s2 = batcher.submit((served, FaceSelection.LARGEST), ["s2"])
        pipe.gate.set()
        assert a.result() == ["a1:LARGEST", "a2:LARGEST", "a3:LARGEST"] and b.result() == ["b1:LARGEST", "b2:LARGEST"]
        assert s1.result() == ["s1:LARGEST"] and s2.result() == ["s2:LARGEST"]
        blocker.result()
    finally:
        batcher.stop()
    assert pipe.forwards == [["hold"], ["a1", "a2", "a3"], ["b1", "b2"], ["s1", "s2"]]
