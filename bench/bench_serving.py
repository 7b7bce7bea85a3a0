"""Serving throughput under client concurrency: our gRPC Embed with dynamic batching on and off, and TorchServe
(gRPC and REST, its batching on) serving the same pipeline, against the in-process batched limit of the same
pipeline on the same photos, in one interleaved run on one machine.

    python bench/bench_serving.py [--images DIR] [--n-images 16] [--requests 64] [--concurrency 1,4,16,64]
                                  [--threads 2] [--device cpu] [--no-torchserve] [--ts-batch-size 16]
                                  [--ts-max-batch-delay-ms 50] [--out serving-cpu]

Why these paths: the in-process batched ``FacePipeline.analyze`` over ``max(concurrency)`` images is the
most the model itself can do (the limit), the in-process single call is what a caller of one image
could at best see, and the service with ``FACEXPLAIN_DYNAMIC_BATCHING=false`` is the service as it was
before batching (each call's forward on its own gRPC handler thread), so on/off isolates what the
batcher buys. Each client thread sends whole Embed calls one after the other; the servers get enough
handler threads (``FACEXPLAIN_MAX_WORKERS``) that no request waits for a handler, and the same torch
thread count as the in-process runs. The server's CPU (user+system seconds per wall second) and peak
RSS come from /proc.

TorchServe serves a ``.mar`` packed from a freshly written default bundle by ``services.torchserve.export``
(the archive ``facexplain export torchserve`` writes, minus the registry), so its handler runs the same
``FacePipeline.analyze`` over TorchServe's batches with the same torch thread count; its CPU and RSS are the
whole process group's (launcher, Java frontend, Python worker). Both transports hit one server. TorchServe
is an optional install: without it (or with ``--no-torchserve``) the run records why and measures the rest.

All servers start first; then each concurrency level is one round: the in-process limit, then every served
path in turn, so slow drift in the machine's load (it is shared) hits all paths of a level alike. Ratios to
the limit use the limit of the same round. The load average at start and end is recorded.

On a shared, oversubscribed machine run it with ``OMP_WAIT_POLICY=PASSIVE`` (recorded in the result; every
server inherits it). Measured here at load average ~10 on 2 cores: one ``analyze`` of one photo took
1.9-4.1 s on a process's main thread against 0.35-0.45 s on another thread of the same process, and
0.3-0.7 s on the main thread with ``PASSIVE``: OpenMP's spin-waiting team of the main thread collapses when
its threads are not scheduled together. The in-process limit and TorchServe (whose worker runs the handler
on its main thread) fall 5-10x under load while our service (inference thread) does not, which would make
every ratio to them meaningless. On an idle machine spinning helps the main thread instead (issue 24).

Writes bench/results/<out>.json (default ``serving-<device>``).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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


def batched_limit(pipe: FacePipeline, images: list[torch.Tensor], requests: int, batch: int) -> dict[str, Any]:
    """The in-process batched forward over ``batch`` images at a time: the most the model itself can do."""
    rounds = max(1, requests // batch)
    pipe.analyze(images[:batch])  # warm the batch shape too
    t = time.perf_counter()
    for r in range(rounds):
        pipe.analyze([images[(r * batch + i) % len(images)] for i in range(batch)])
    elapsed = time.perf_counter() - t
    return {"batch_size": batch, "images_per_s": rounds * batch / elapsed, "seconds": elapsed}


def bench_inprocess(pipe: FacePipeline, images: list[torch.Tensor], requests: int, batch: int) -> dict[str, Any]:
    """Single-image calls (the best a lone caller could see) and the batched limit, on this main thread."""
    pipe.analyze(images[:2])  # warm-up
    lat = []
    for k in range(requests):
        t = time.perf_counter()
        pipe.analyze([images[k % len(images)]])
        lat.append(time.perf_counter() - t)
    return {"single": latency_summary(lat), "batched_limit": batched_limit(pipe, images, requests, batch)}


Call = Callable[[int], Any]


def _drive(call: Call, requests: int, concurrency: int) -> tuple[float, list[float]]:
    """``requests`` whole calls (``call(k)`` sends request ``k``) from ``concurrency`` client threads, each
    sending its next call when the last one returned; (wall seconds, per-call latencies)."""
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
                call(k)
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


class GroupStats(ProcStats):
    """CPU and RSS of a whole process group (TorchServe: launcher, Java frontend and the Python worker)."""

    def _members(self) -> list[ProcStats]:
        out = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == self.pid:  # pgrp
                out.append(ProcStats(int(d.name)))
        return out

    def _sum(self, fn: Callable[[ProcStats], float]) -> float:
        total = 0.0
        for p in self._members():
            with contextlib.suppress(OSError):  # a process that ended meanwhile
                total += fn(p)
        return total

    def cpu_s(self) -> float:
        return self._sum(ProcStats.cpu_s)

    def rss_mb(self) -> float:
        return self._sum(ProcStats.rss_mb)

    def peak_rss_mb(self) -> float:
        return self._sum(ProcStats.peak_rss_mb)


@dataclass
class ServedPath:
    """One way of serving the pipeline that the run measures: how to call it, whose CPU to count."""

    key: str
    label: str
    call: Call
    stats: ProcStats
    info: dict[str, Any] = field(default_factory=dict)
    levels: dict[str, Any] = field(default_factory=dict)

    def measure(self, requests: int, concurrency: int) -> dict[str, Any]:
        cpu0 = self.stats.cpu_s()
        wall, lat = _drive(self.call, requests, concurrency)
        cpu = self.stats.cpu_s() - cpu0
        row = {
            "requests": requests,
            "images_per_s": requests / wall,
            **latency_summary(lat),
            "server_cpu_cores": cpu / wall,
            "server_rss_mb": self.stats.rss_mb(),
        }
        self.levels[str(concurrency)] = row
        print(
            f"  {self.label:22s} c={concurrency:<3d} {row['images_per_s']:6.1f} img/s  p50 {row['p50_ms']:7.1f} ms  "
            f"p99 {row['p99_ms']:7.1f} ms  cpu {row['server_cpu_cores']:.2f}",
            flush=True,
        )
        return row

    def result(self) -> dict[str, Any]:
        return {**self.info, "concurrency": self.levels, "server_peak_rss_mb": self.stats.peak_rss_mb()}


def start_ours(
    stack: contextlib.ExitStack, paths: list[Path], levels: list[int], threads: int, batching: bool, device: str
) -> ServedPath:
    """Our embedding service (dynamic batching on or off) and an Embed-calling client."""
    env = {
        "FACEXPLAIN_DYNAMIC_BATCHING": "true" if batching else "false",
        "FACEXPLAIN_TORCH_THREADS": str(threads),
        "FACEXPLAIN_MAX_WORKERS": str(max(16, 2 * max(levels))),
        "FACEXPLAIN_MAX_QUEUE": str(max(256, 4 * max(levels))),
        "FACEXPLAIN_DEVICE": device,
        "FACEXPLAIN_LOG_LEVEL": "WARNING",  # one log line per call would be part of what we measure
    }
    logs = Path(stack.enter_context(tempfile.TemporaryDirectory()))
    svc: RunningService = start_service("embedding", logs, env=env, timeout=600)
    stack.callback(svc.stop)
    client = EmbeddingClient(svc.address, timeout=600)
    stack.callback(client.close)
    wait_ready(client.channel, 60)
    msgs = [image_from_path(p) for p in paths]
    key = f"grpc_batching_{'on' if batching else 'off'}"
    return ServedPath(
        key, f"ours gRPC batching {'on' if batching else 'off'}",
        lambda k: client.embed(msgs[k % len(msgs)]), ProcStats(svc.proc.pid), {"env": env},
    )  # fmt: skip


def start_torchserve_paths(
    stack: contextlib.ExitStack, paths: list[Path], threads: int, device: str, batch: int, delay_ms: int
) -> list[ServedPath]:
    """The same pipeline exported as a .mar (facexplain's handler) behind one TorchServe; its gRPC and REST."""
    from cli.torchserve import start_torchserve
    from facexplain.artifacts.embedder import DEFAULT_FR_MODEL, save_embedder_bundle
    from registry import VersionInfo
    from services.torchserve.client import TorchServeGrpc
    from services.torchserve.export import BatchingSettings, pack_bundle

    work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fx-bench-ts-")))
    save_embedder_bundle(work / "bundle", name=DEFAULT_FR_MODEL)
    batching = BatchingSettings(batch_size=batch, max_batch_delay_ms=delay_ms)
    done = pack_bundle(work / "bundle", VersionInfo(DEFAULT_FR_MODEL, "bench"), work / "store", batching=batching)
    env = {"FACEXPLAIN_TORCH_THREADS": str(threads), "FACEXPLAIN_DEVICE": device}
    server = start_torchserve(work / "server", work / "store", {done.model_name: done.mar.name}, env=env)
    stack.callback(server.stop)
    raw = [p.read_bytes() for p in paths]
    grpc_client = TorchServeGrpc(server.grpc_target, timeout=600)
    stack.callback(grpc_client.close)
    local = threading.local()

    def rest(k: int) -> None:
        conn = getattr(local, "conn", None)
        if conn is None:  # one keep-alive connection per client thread, as a pooled HTTP client would hold
            conn = local.conn = http.client.HTTPConnection(server.host, server.ports.inference, timeout=600)
        conn.request("POST", f"/predictions/{done.model_name}", body=raw[k % len(raw)],
                     headers={"Content-Type": "image/jpeg"})  # fmt: skip
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"TorchServe REST answered {resp.status}: {body[:200]!r}")

    info = {"env": env, "batch_size": batch, "max_batch_delay_ms": delay_ms, "workers": batching.workers}
    stats = GroupStats(server.proc.pid)

    def grpc_call(k: int) -> None:
        grpc_client.predict(done.model_name, raw[k % len(raw)])

    return [
        ServedPath("torchserve_grpc", "TorchServe gRPC", grpc_call, stats, dict(info)),
        ServedPath("torchserve_rest", "TorchServe REST", rest, stats, dict(info)),
    ]


def ratios(result: dict[str, Any], levels: list[int]) -> dict[str, Any]:
    """The figures issue 24 asks for, as ratios of this one run. Throughput ratios to the limit use the limit
    measured in the same round as that concurrency level (the machine's load drifts between rounds)."""
    limits = result["in_process"]["batched_limit_by_level"]
    on, off = result["grpc_batching_on"]["concurrency"], result["grpc_batching_off"]["concurrency"]
    ts = {k: result[k]["concurrency"] for k in ("torchserve_grpc", "torchserve_rest") if k in result}
    r: dict[str, Any] = {}
    for c in map(str, levels):
        limit = limits[c]["images_per_s"]
        r[f"on_vs_limit_c{c}"] = on[c]["images_per_s"] / limit
        r[f"on_vs_off_c{c}"] = on[c]["images_per_s"] / off[c]["images_per_s"]
        for k, rows in ts.items():
            short = k.removeprefix("torchserve_")
            r[f"on_vs_torchserve_{short}_c{c}"] = on[c]["images_per_s"] / rows[c]["images_per_s"]
            r[f"torchserve_{short}_vs_limit_c{c}"] = rows[c]["images_per_s"] / limit
    if "1" in on:
        single = result["in_process"]["single"]["p50_ms"]
        r["p50_c1_on_vs_inprocess"] = on["1"]["p50_ms"] / single
        r["p50_c1_off_vs_inprocess"] = off["1"]["p50_ms"] / single
        for k, rows in ts.items():
            r[f"p50_c1_{k}_vs_inprocess"] = rows["1"]["p50_ms"] / single
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default=str(DEFAULT_IMAGES))
    ap.add_argument("--n-images", type=int, default=16, help="the first N photos (sorted) are the workload")
    ap.add_argument("--requests", type=int, default=64, help="Embed calls per concurrency level and path")
    ap.add_argument("--concurrency", default="1,4,16,64", help="client threads, comma-separated")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads, in-process and in the servers")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-torchserve", action="store_true", help="leave TorchServe out (it is an optional install)")
    ap.add_argument("--ts-batch-size", type=int, default=16, help="TorchServe batchSize")
    ap.add_argument("--ts-max-batch-delay-ms", type=int, default=50, help="TorchServe maxBatchDelay")
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
            "order": "interleaved: per concurrency level, the in-process limit then every served path in turn",
            # read by libgomp when torch loads, in this process and every server (they inherit the environment)
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        },
        "load_average_start": list(os.getloadavg()),
    }
    pipe = FacePipeline.default(args.device)
    result["in_process"] = bench_inprocess(pipe, images, args.requests, max(levels))
    print(f"  limit {result['in_process']['batched_limit']['images_per_s']:.1f} img/s", flush=True)
    with contextlib.ExitStack() as stack:
        served = [start_ours(stack, paths, levels, args.threads, on, args.device) for on in (True, False)]
        missing = "" if not args.no_torchserve else "left out (--no-torchserve)"
        if not missing:
            from cli.torchserve import torchserve_missing

            missing = torchserve_missing()
        if missing:
            result["torchserve"] = f"not measured: {missing}"
            print(f"  TorchServe {result['torchserve']}", flush=True)
        else:
            served += start_torchserve_paths(
                stack, paths, args.threads, args.device, args.ts_batch_size, args.ts_max_batch_delay_ms
            )
        for path in served:  # warm-up: every batch shape up to the largest
            _drive(path.call, max(4, max(levels)), max(levels))
        by_level: dict[str, Any] = {}
        for c in levels:
            by_level[str(c)] = batched_limit(pipe, images, args.requests, max(levels))
            print(f"round c={c}: limit {by_level[str(c)]['images_per_s']:.1f} img/s", flush=True)
            for path in served:
                path.measure(args.requests, c)
        result["in_process"]["batched_limit_by_level"] = by_level
        for path in served:
            result[path.key] = path.result()
    result["load_average_end"] = list(os.getloadavg())
    result["ratios"] = ratios(result, levels)
    out = write(args.out or f"serving-{args.device}", result)
    for k, v in result["ratios"].items():
        print(f"{k:36s} {v:6.2f}")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
