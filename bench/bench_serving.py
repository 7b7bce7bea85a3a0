"""Serving throughput under client concurrency: our gRPC Embed with dynamic batching on and off, against the
in-process batched limit of the same pipeline on the same photos, in one run on one machine.

    python bench/bench_serving.py [--images DIR] [--n-images 16] [--requests 64] [--concurrency 1,4,16,64]
                                  [--threads 2] [--device cpu] [--out serving-cpu]

Why these three: the in-process batched ``FacePipeline.analyze`` over ``max(concurrency)`` images is the
most the model itself can do (the limit), the in-process single call is what a caller of one image
could at best see, and the service with ``FACEXPLAIN_DYNAMIC_BATCHING=false`` is the service as it was
before batching (each call's forward on its own gRPC handler thread), so on/off isolates what the
batcher buys. Each client thread sends whole Embed calls one after the other; the servers get enough
handler threads (``FACEXPLAIN_MAX_WORKERS``) that no request waits for a handler, and the same torch
thread count as the in-process runs. The server's CPU (user+system seconds per wall second) and peak
RSS come from /proc. TorchServe and Decode (issue 24, build 3-4) slot in as further ``paths``.

Writes bench/results/<out>.json (default ``serving-<device>``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import latency_summary, machine, write  # noqa: E402
from cli.launcher import RunningService, start_service  # noqa: E402
from facexplain.data.faces import list_images, load_image  # noqa: E402
from facexplain.pipeline import FacePipeline  # noqa: E402
from sdk.client import EmbeddingClient, image_from_path, wait_ready  # noqa: E402

DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "celeba_subset" / "images"
CLK_TCK = os.sysconf("SC_CLK_TCK")


class ProcStats:
    """CPU seconds and RSS of one process, read from /proc (no psutil here)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")


def bench_inprocess(images: list[torch.Tensor], requests: int, batch: int, device: str) -> dict[str, Any]:
    """Single-image calls (the best a lone caller could see) and the batched limit, on this main thread."""
    pipe = FacePipeline.default(device)
    pipe.analyze(images[:2])  # warm-up
    lat = []
    for k in range(requests):
        t = time.perf_counter()
        pipe.analyze([images[k % len(images)]])
        lat.append(time.perf_counter() - t)
    rounds = max(1, requests // batch)
    pipe.analyze(images[:batch])  # warm the batch shape too
    t = time.perf_counter()
    for r in range(rounds):
        pipe.analyze([images[(r * batch + i) % len(images)] for i in range(batch)])
    elapsed = time.perf_counter() - t
    return {
        "single": latency_summary(lat),
        "batched_limit": {"batch_size": batch, "images_per_s": rounds * batch / elapsed, "seconds": elapsed},
    }


def _drive(client: EmbeddingClient, msgs: list[Any], requests: int, concurrency: int) -> tuple[float, list[float]]:
    """``requests`` Embed calls from ``concurrency`` client threads; (wall seconds, per-call latencies)."""
    lat: list[float] = []
    errors: list[BaseException] = []
    counter = iter(range(requests))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                k = next(counter, None)
            if k is None:
                return
            t = time.perf_counter()
            try:
                client.embed(msgs[k % len(msgs)])
            except BaseException as exc:  # report after the run; a benchmark with errors is no benchmark
                errors.append(exc)
                return
            with lock:
                lat.append(time.perf_counter() - t)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} calls failed at concurrency {concurrency}: {errors[0]!r}")
    return wall, lat


def bench_service(
    paths: list[Path], requests: int, levels: list[int], threads: int, batching: bool, device: str
) -> dict[str, Any]:
    env = {
        "FACEXPLAIN_DYNAMIC_BATCHING": "true" if batching else "false",
        "FACEXPLAIN_TORCH_THREADS": str(threads),
        "FACEXPLAIN_MAX_WORKERS": str(max(16, 2 * max(levels))),
        "FACEXPLAIN_MAX_QUEUE": str(max(256, 4 * max(levels))),
        "FACEXPLAIN_DEVICE": device,
        "FACEXPLAIN_LOG_LEVEL": "WARNING",  # one log line per call would be part of what we measure
    }
    out: dict[str, Any] = {"env": env, "concurrency": {}}
    with tempfile.TemporaryDirectory() as logs:
        svc: RunningService = start_service("embedding", Path(logs), env=env, timeout=600)
        stats = ProcStats(svc.proc.pid)
        try:
            client = EmbeddingClient(svc.address, timeout=600)
            wait_ready(client.channel, 60)
            msgs = [image_from_path(p) for p in paths]
            _drive(client, msgs, max(4, max(levels)), max(levels))  # warm-up, every batch shape up to the largest
            for c in levels:
                cpu0 = stats.cpu_s()
                wall, lat = _drive(client, msgs, requests, c)
                cpu = stats.cpu_s() - cpu0
                out["concurrency"][str(c)] = {
                    "requests": requests,
                    "images_per_s": requests / wall,
                    **latency_summary(lat),
                    "server_cpu_cores": cpu / wall,
                    "server_rss_mb": stats.rss_mb(),
                }
                print(
                    f"  batching {'on ' if batching else 'off'} c={c:<3d} {requests / wall:6.1f} img/s "
                    f"p50 {out['concurrency'][str(c)]['p50_ms']:7.1f} ms  cpu {cpu / wall:.2f}",
                    flush=True,
                )
            out["server_peak_rss_mb"] = stats.peak_rss_mb()
            client.close()
        finally:
            svc.stop()
    return out


def ratios(result: dict[str, Any], levels: list[int]) -> dict[str, Any]:
    """The figures issue 24 asks for, as ratios of this one run."""
    limit = result["in_process"]["batched_limit"]["images_per_s"]
    on, off = result["grpc_batching_on"]["concurrency"], result["grpc_batching_off"]["concurrency"]
    r: dict[str, Any] = {}
    for c in map(str, levels):
        r[f"on_vs_limit_c{c}"] = on[c]["images_per_s"] / limit
        r[f"on_vs_off_c{c}"] = on[c]["images_per_s"] / off[c]["images_per_s"]
    if "1" in on:
        single = result["in_process"]["single"]["p50_ms"]
        r["p50_c1_on_vs_inprocess"] = on["1"]["p50_ms"] / single
        r["p50_c1_off_vs_inprocess"] = off["1"]["p50_ms"] / single
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default=str(DEFAULT_IMAGES))
    ap.add_argument("--n-images", type=int, default=16, help="the first N photos (sorted) are the workload")
    ap.add_argument("--requests", type=int, default=64, help="Embed calls per concurrency level and path")
    ap.add_argument("--concurrency", default="1,4,16,64", help="client threads, comma-separated")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads, in-process and in the servers")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="", help="result name under bench/results (default serving-<device>)")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    torch.set_num_threads(args.threads)
    paths = list_images(Path(args.images))[: args.n_images]
    if not paths:
        raise SystemExit(f"no images under {args.images}")
    images = [load_image(p) for p in paths]

    print(f"in-process ({len(paths)} photos, {args.threads} torch threads, {args.device})", flush=True)
    result: dict[str, Any] = {
        "machine": machine(),
        "config": {
            "images": len(paths),
            "source": str(args.images),
            "requests": args.requests,
            "concurrency": levels,
            "threads": args.threads,
            "device": args.device,
        },
        "in_process": bench_inprocess(images, args.requests, max(levels), args.device),
    }
    print(f"  limit {result['in_process']['batched_limit']['images_per_s']:.1f} img/s", flush=True)
    for batching in (True, False):
        key = f"grpc_batching_{'on' if batching else 'off'}"
        result[key] = bench_service(paths, args.requests, levels, args.threads, batching, args.device)
    result["ratios"] = ratios(result, levels)
    out = write(args.out or f"serving-{args.device}", result)
    for k, v in result["ratios"].items():
        print(f"{k:28s} {v:6.2f}")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
