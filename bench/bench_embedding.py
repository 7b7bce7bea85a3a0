"""Embedding throughput and latency: gRPC service vs the same pipeline called in-process.

    python bench/bench_embedding.py [--images DIR] [--requests 60] [--batch 16] [--threads 2]

Single-image latency (Embed) and batch throughput (EmbedBatch) over real faces; the in-process
numbers use the identical FacePipeline, so the difference is the cost of serving.
Writes bench/results/embedding-<device>.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import latency_summary, machine, write  # noqa: E402
from cli.launcher import start_service  # noqa: E402
from facexplain.data.faces import list_images, load_image  # noqa: E402
from facexplain.pipeline import FacePipeline  # noqa: E402
from sdk.client import EmbeddingClient, image_from_path, wait_ready  # noqa: E402


def bench_inprocess(paths: list[Path], n: int, batch: int, device: str) -> dict:
    pipe = FacePipeline.default(device)
    images = [load_image(p) for p in paths]
    pipe.analyze(images[:2])  # warm-up
    lat = []
    for k in range(n):
        t = time.perf_counter()
        pipe.analyze([images[k % len(images)]])
        lat.append(time.perf_counter() - t)
    rounds = max(1, n // batch)
    t = time.perf_counter()
    for r in range(rounds):
        pipe.analyze([images[(r * batch + i) % len(images)] for i in range(batch)])
    elapsed = time.perf_counter() - t
    return {"single": latency_summary(lat), "batch": {"batch_size": batch, "images_per_s": rounds * batch / elapsed}}


def bench_grpc(paths: list[Path], n: int, batch: int) -> dict:
    with tempfile.TemporaryDirectory() as logs:
        svc = start_service("embedding", Path(logs))
        try:
            client = EmbeddingClient(svc.address, timeout=300)
            wait_ready(client.channel, 30)
            msgs = [image_from_path(p) for p in paths]
            client.embed(msgs[0])  # warm-up
            lat = []
            for k in range(n):
                t = time.perf_counter()
                client.embed(msgs[k % len(msgs)])
                lat.append(time.perf_counter() - t)
            rounds = max(1, n // batch)
            blat = []
            for r in range(rounds):
                t = time.perf_counter()
                client.embed_batch([msgs[(r * batch + i) % len(msgs)] for i in range(batch)])
                blat.append(time.perf_counter() - t)
            client.close()
        finally:
            svc.stop()
    return {
        "single": latency_summary(lat),
        "batch": {"batch_size": batch, "images_per_s": rounds * batch / sum(blat), **latency_summary(blat)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", default=str(REPO / "data" / "sample"))
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    paths = list_images(Path(args.images))
    result = {
        "machine": machine(),
        "config": {
            "images": len(paths),
            "source": args.images,
            "requests": args.requests,
            "batch": args.batch,
            "device": args.device,
        },
        "in_process": bench_inprocess(paths, args.requests, args.batch, args.device),
        "grpc": bench_grpc(paths, args.requests, args.batch),
    }
    out = write(f"embedding-{args.device}", result)
    ip, g = result["in_process"], result["grpc"]
    print(f"{'':12s} {'Embed p50':>10s} {'p99':>8s} {'batch img/s':>12s}")
    print(
        f"{'in-process':12s} {ip['single']['p50_ms']:9.1f}ms {ip['single']['p99_ms']:7.1f}ms "
        f"{ip['batch']['images_per_s']:12.1f}"
    )
    print(
        f"{'gRPC':12s} {g['single']['p50_ms']:9.1f}ms {g['single']['p99_ms']:7.1f}ms {g['batch']['images_per_s']:12.1f}"
    )
    print(f"-> {out}")


if __name__ == "__main__":
    main()
