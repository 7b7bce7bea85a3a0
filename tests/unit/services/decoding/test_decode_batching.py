"""The decoding service's batched decoder forward: concurrent Decode items share one forward on the decoder's
inference thread and get the images single-template decodes give."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from facexplain.artifacts.decoder import LoadedDecoder
from facexplain.models.decoder import DeepFaceDecoder
from services.decoding.service import decode_batch
from services.kit.batching import BatchingConfig, DynamicBatcher
from services.kit.metrics import ServiceMetrics
from services.kit.models import ServedModel


def test_concurrent_decodes_batch_and_equal_single_decodes() -> None:
    torch.manual_seed(0)
    net = DeepFaceDecoder().eval()
    loaded = LoadedDecoder(net, "fr", "1", 0, 128, 0.25, {})
    served = ServedModel("dec", "1", "decoder", loaded)
    templates = [torch.randn(128) * 0.15 for _ in range(8)]
    singles = [loaded.decode(t[None])[0] for t in templates]
    metrics = ServiceMetrics("decoding")
    batcher = DynamicBatcher("decoder", decode_batch, BatchingConfig(wait_s=0.05, max_queue=16), metrics)
    try:
        with ThreadPoolExecutor(8) as pool:
            outs = list(pool.map(lambda t: batcher.run(served, [t])[0], templates))
    finally:
        batcher.stop()
    for single, out in zip(singles, outs, strict=True):
        assert out.shape == single.shape
        assert float((out - single).abs().max()) < 1e-5
    labels = {"service": "decoding", "batcher": "decoder"}
    batches = metrics.registry.get_sample_value("facexplain_batch_size_count", labels)
    assert batches is not None and batches < 8  # a 50 ms wait lets eight threads' items meet
