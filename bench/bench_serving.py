"""Serving throughput under client concurrency: our gRPC Embed with dynamic batching on and off, and TorchServe
(gRPC and REST, its batching on) serving the same pipeline, against the in-process batched limit of the same
pipeline on the same photos, in one interleaved run on one machine; the same for Decode (template -> image);
and what the aligned input mode saves per image.

    python bench/bench_serving.py [--sections embed,decode,aligned] [--quick] [--images DIR] [--n-images 16]
                                  [--requests 64] [--decode-requests 256] [--concurrency 1,4,16,64]
                                  [--threads 2] [--device cpu] [--no-torchserve] [--ts-batch-size 16]
                                  [--ts-max-batch-delay-ms 50] [--ts-decode-batch-size 16]
                                  [--ts-decode-max-batch-delay-ms 5] [--out serving-cpu]

Sections (each starts its servers and stops them before the next, so they never compete):

- ``embed``: image -> template, the paths below (top-level keys of the result, as before Decode joined).
- ``decode``: template -> PNG face (``result["decode"]``), the same paths for the shipped decoder
  (models/facexplain-dfd-dlib128) inverting the default FR model: the in-process batched decoder forward (the
  limit) and a single-template forward, our decoding service's Decode with batching on and off (it follows a
  throw-away MLflow registry holding the FR model and the shipped decoder, as a deployment does), and TorchServe
  serving the decoder's ``.mar`` (JSON template in, PNG out). The templates are the default model's templates of
  the photos. A decoder forward is a few milliseconds, so per-call costs (gRPC, the template checks, the PNG
  encoding every served path does and the in-process limit does not; ``png_encode_ms`` records it) weigh far
  more than for Embed, and the run sends ``--decode-requests`` calls per level. TorchServe's decoder batching
  waits ``--ts-decode-max-batch-delay-ms`` (default 5 ms: its Embed setting of 50 ms would be ten decoder
  forwards of pure waiting).
- ``aligned``: in process, the time per image of the photo path (``FacePipeline.analyze``: detection,
  landmarks, alignment, FR net) against the aligned input mode (``embed_aligned`` on the chips the photo path
  produced: the FR net alone), in batches of 1 and 16, with the largest template difference between the two.

``--quick`` is a smoke run (fewer calls, concurrency 1,4,16): it checks every path works; its figures are
not the benchmark's.

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

Writes bench/results/<out>.json (default ``serving-<device>``, ``serving-<device>-quick`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import statistics
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


# A batched forward of one workload in process: the embedder's ``analyze`` over photos, the decoder over templates.
Forward = Callable[[list[Any]], Any]


def batched_limit(forward: Forward, items: list[Any], requests: int, batch: int) -> dict[str, Any]:
    """The in-process batched forward over ``batch`` items at a time: the most the model itself can do."""
    rounds = max(1, requests // batch)
    forward([items[i % len(items)] for i in range(batch)])  # warm the batch shape too
    t = time.perf_counter()
    for r in range(rounds):
        forward([items[(r * batch + i) % len(items)] for i in range(batch)])
    elapsed = time.perf_counter() - t
    return {"batch_size": batch, "images_per_s": rounds * batch / elapsed, "seconds": elapsed}


def bench_inprocess(forward: Forward, items: list[Any], requests: int, batch: int) -> dict[str, Any]:
    """Single-item calls (the best a lone caller could see) and the batched limit, on this main thread."""
    forward(items[:2])  # warm-up
    lat = []
    for k in range(requests):
        t = time.perf_counter()
        forward([items[k % len(items)]])
        lat.append(time.perf_counter() - t)
    return {"single": latency_summary(lat), "batched_limit": batched_limit(forward, items, requests, batch)}


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
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # every round's row, by level

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
        self.samples.setdefault(str(concurrency), []).append(row)
        self.levels[str(concurrency)] = median_row(self.samples[str(concurrency)])
        print(
            f"  {self.label:22s} c={concurrency:<3d} {row['images_per_s']:6.1f} img/s  p50 {row['p50_ms']:7.1f} ms  "
            f"p99 {row['p99_ms']:7.1f} ms  cpu {row['server_cpu_cores']:.2f}",
            flush=True,
        )
        return row

    def result(self) -> dict[str, Any]:
        return {
            **self.info,
            "concurrency": self.levels,
            "rounds": self.samples,
            "server_peak_rss_mb": self.stats.peak_rss_mb(),
        }


def median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The row of median throughput among rounds (the lower middle of an even count), with how many there were."""
    ordered = sorted(rows, key=lambda r: r["images_per_s"])
    return {**ordered[(len(ordered) - 1) // 2], "rounds": len(rows)}


def _server_env(levels: list[int], threads: int, batching: bool, device: str) -> dict[str, str]:
    """What every served path of ours gets: enough handler threads and queue that no call waits for either."""
    return {
        "FACEXPLAIN_DYNAMIC_BATCHING": "true" if batching else "false",
        "FACEXPLAIN_TORCH_THREADS": str(threads),
        "FACEXPLAIN_MAX_WORKERS": str(max(16, 2 * max(levels))),
        "FACEXPLAIN_MAX_QUEUE": str(max(256, 4 * max(levels))),
        "FACEXPLAIN_DEVICE": device,
        "FACEXPLAIN_LOG_LEVEL": "WARNING",  # one log line per call would be part of what we measure
    }


def start_ours(
    stack: contextlib.ExitStack, paths: list[Path], levels: list[int], threads: int, batching: bool, device: str
) -> ServedPath:
    """Our embedding service (dynamic batching on or off) and an Embed-calling client."""
    env = _server_env(levels, threads, batching, device)
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


def shipped_decoder_bundle() -> Path:
    """The decoder the repository ships for the default FR model (pins checked by ``list_shipped``)."""
    from facexplain.artifacts.decoder import DEFAULT_DECODER_MODEL
    from registry.shipped import list_shipped

    for m in list_shipped(REPO / "models"):
        if m.name == DEFAULT_DECODER_MODEL:
            return m.bundle
    raise SystemExit(f"no shipped {DEFAULT_DECODER_MODEL} under {REPO / 'models'}")


def start_decode_registry(stack: contextlib.ExitStack) -> tuple[str, Path]:
    """A throw-away MLflow registry holding the default FR model and the shipped decoder, both ``champion``
    (the decoding service loads its decoder from a registry only); (its URI, a model cache folder)."""
    from cli.launcher import start_mlflow
    from facexplain.artifacts.decoder import DEFAULT_DECODER_MODEL
    from facexplain.artifacts.embedder import DEFAULT_FR_MODEL, save_embedder_bundle
    from registry import CHAMPION, Registry
    from registry.shipped import list_shipped, register_shipped

    work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fx-bench-reg-")))
    server = start_mlflow(work / "mlflow", timeout=300)
    stack.callback(server.stop)
    reg = Registry(server.uri, timeout_s=60, max_retries=2)
    save_embedder_bundle(work / "fr", name=DEFAULT_FR_MODEL)
    reg.register_bundle(work / "fr", DEFAULT_FR_MODEL, description="bench_serving", alias=CHAMPION)
    shipped = next(m for m in list_shipped(REPO / "models") if m.name == DEFAULT_DECODER_MODEL)
    done = register_shipped(reg, shipped)
    # the shipped decoder missed its recorded gates (candidate); the benchmark serves it regardless
    reg.set_alias(DEFAULT_DECODER_MODEL, CHAMPION, done.info.version)
    return server.uri, work / "cache"


def start_ours_decode(
    stack: contextlib.ExitStack,
    registry: tuple[str, Path],
    templates: list[Any],
    levels: list[int],
    threads: int,
    batching: bool,
    device: str,
) -> ServedPath:
    """Our decoding service (dynamic batching on or off) following ``registry``, and a Decode-calling client."""
    from sdk.client import DecodingClient

    uri, cache = registry
    env = {
        **_server_env(levels, threads, batching, device),
        "FACEXPLAIN_REGISTRY_URI": uri,
        "FACEXPLAIN_MODEL_CACHE_DIR": str(cache),
        "FACEXPLAIN_POLL_INTERVAL_S": "3600",  # no alias polls inside the measured rounds
        "FACEXPLAIN_REGISTRY_TIMEOUT_S": "60",
    }
    logs = Path(stack.enter_context(tempfile.TemporaryDirectory()))
    svc: RunningService = start_service("decoding", logs, env=env, timeout=600)
    stack.callback(svc.stop)
    client = DecodingClient(svc.address, timeout=600)
    stack.callback(client.close)
    wait_ready(client.channel, 60)
    client.decode(templates[0])  # the decoder is loaded (UNAVAILABLE until the registry's version is in)
    key = f"grpc_batching_{'on' if batching else 'off'}"
    return ServedPath(
        key, f"ours Decode batching {'on' if batching else 'off'}",
        lambda k: client.decode(templates[k % len(templates)]), ProcStats(svc.proc.pid), {"env": env},
    )  # fmt: skip


def start_torchserve_decode(
    stack: contextlib.ExitStack, templates: list[Any], threads: int, device: str, batch: int, delay_ms: int
) -> list[ServedPath]:
    """The shipped decoder exported as a .mar behind one TorchServe; JSON templates over its gRPC and REST."""
    from google.protobuf import json_format

    from cli.torchserve import start_torchserve
    from facexplain.artifacts.decoder import DEFAULT_DECODER_MODEL
    from registry import VersionInfo
    from services.torchserve.client import TorchServeGrpc
    from services.torchserve.export import BatchingSettings, pack_bundle

    work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fx-bench-ts-dec-")))
    batching = BatchingSettings(batch_size=batch, max_batch_delay_ms=delay_ms)
    done = pack_bundle(
        shipped_decoder_bundle(), VersionInfo(DEFAULT_DECODER_MODEL, "bench"), work / "store", batching=batching
    )
    env = {"FACEXPLAIN_TORCH_THREADS": str(threads), "FACEXPLAIN_DEVICE": device}
    server = start_torchserve(work / "server", work / "store", {done.model_name: done.mar.name}, env=env)
    stack.callback(server.stop)
    bodies = [json_format.MessageToJson(t).encode() for t in templates]
    grpc_client = TorchServeGrpc(server.grpc_target, timeout=600)
    stack.callback(grpc_client.close)
    local = threading.local()

    def rest(k: int) -> None:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = http.client.HTTPConnection(server.host, server.ports.inference, timeout=600)
        conn.request("POST", f"/predictions/{done.model_name}", body=bodies[k % len(bodies)],
                     headers={"Content-Type": "application/json"})  # fmt: skip
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200 or not body.startswith(b"\x89PNG"):
            raise RuntimeError(f"TorchServe REST answered {resp.status}: {body[:200]!r}")

    def grpc_call(k: int) -> None:
        out = grpc_client.predict(done.model_name, bodies[k % len(bodies)])
        if not out.startswith(b"\x89PNG"):
            raise RuntimeError(f"TorchServe gRPC answered {out[:200]!r}")

    info = {"env": env, "batch_size": batch, "max_batch_delay_ms": delay_ms, "workers": batching.workers}
    stats = GroupStats(server.proc.pid)
    return [
        ServedPath("torchserve_grpc", "TorchServe gRPC", grpc_call, stats, dict(info)),
        ServedPath("torchserve_rest", "TorchServe REST", rest, stats, dict(info)),
    ]


def ratios(result: dict[str, Any], levels: list[int]) -> dict[str, Any]:
    """The figures issue 24 asks for, as ratios of this one run. Throughput ratios to the limit use the limit
    measured in the same round as that concurrency level (the machine's load drifts between rounds)."""
    limits = result["in_process"]["batched_limit_rounds"]
    on, off = result["grpc_batching_on"]["rounds"], result["grpc_batching_off"]["rounds"]
    ts = {k: result[k]["rounds"] for k in ("torchserve_grpc", "torchserve_rest") if k in result}
    r: dict[str, Any] = {}
    per_round: dict[str, list[float]] = {}

    def put(name: str, num: list[dict[str, Any]], den: list[dict[str, Any]]) -> None:
        # a ratio within each round (both measured minutes apart at most), then the median over rounds
        values = [a["images_per_s"] / b["images_per_s"] for a, b in zip(num, den, strict=True)]
        per_round[name] = values
        r[name] = float(statistics.median(values))

    for c in map(str, levels):
        put(f"on_vs_limit_c{c}", on[c], limits[c])
        put(f"on_vs_off_c{c}", on[c], off[c])
        for k, rows in ts.items():
            short = k.removeprefix("torchserve_")
            put(f"on_vs_torchserve_{short}_c{c}", on[c], rows[c])
            put(f"torchserve_{short}_vs_limit_c{c}", rows[c], limits[c])
    if max(len(v) for v in per_round.values()) > 1:
        r["per_round"] = per_round
    if "1" in on:  # the median round's p50 of each path
        single = result["in_process"]["single"]["p50_ms"]
        for k in ("grpc_batching_on", "grpc_batching_off", *ts):
            name = {"grpc_batching_on": "on", "grpc_batching_off": "off"}.get(k, k)
            r[f"p50_c1_{name}_vs_inprocess"] = result[k]["concurrency"]["1"]["p50_ms"] / single
    return r


def torchserve_missing_reason(no_torchserve: bool) -> str:
    if no_torchserve:
        return "left out (--no-torchserve)"
    from cli.torchserve import torchserve_missing

    return torchserve_missing()


def run_rounds(
    result: dict[str, Any],
    served: list[ServedPath],
    forward: Forward,
    items: list[Any],
    requests: int,
    levels: list[int],
    repeats: int = 1,
) -> None:
    """Warm every path, then per concurrency level the in-process limit and every served path in turn; all
    levels ``repeats`` times over (each level's figure is its median round, each ratio the median of the
    ratios within a round: the machine is shared and one round of a minute can land on a busy stretch)."""
    for path in served:  # warm-up: every batch shape up to the largest
        _drive(path.call, max(4, max(levels)), max(levels))
    limit_rounds: dict[str, list[dict[str, Any]]] = {}
    for k in range(repeats):
        for c in levels:
            row = batched_limit(forward, items, requests, max(levels))
            limit_rounds.setdefault(str(c), []).append(row)
            print(f"round {k + 1}/{repeats} c={c}: limit {row['images_per_s']:.1f} /s", flush=True)
            for path in served:
                path.measure(requests, c)
    result["in_process"]["batched_limit_by_level"] = {c: median_row(rows) for c, rows in limit_rounds.items()}
    result["in_process"]["batched_limit_rounds"] = limit_rounds
    for path in served:
        result[path.key] = path.result()


def section_embed(args: argparse.Namespace, pipe: FacePipeline, paths: list[Path], images: list[torch.Tensor],
                  levels: list[int]) -> dict[str, Any]:  # fmt: skip
    """Embed: image -> template (the keys the result held before Decode joined it)."""
    print(f"embed: in-process ({len(paths)} photos, {args.threads} torch threads, {args.device})", flush=True)
    result: dict[str, Any] = {"in_process": bench_inprocess(pipe.analyze, images, args.requests, max(levels))}
    print(f"  limit {result['in_process']['batched_limit']['images_per_s']:.1f} img/s", flush=True)
    with contextlib.ExitStack() as stack:
        served = [start_ours(stack, paths, levels, args.threads, on, args.device) for on in (True, False)]
        missing = torchserve_missing_reason(args.no_torchserve)
        if missing:
            result["torchserve"] = f"not measured: {missing}"
            print(f"  TorchServe {result['torchserve']}", flush=True)
        else:
            served += start_torchserve_paths(
                stack, paths, args.threads, args.device, args.ts_batch_size, args.ts_max_batch_delay_ms
            )
        run_rounds(result, served, pipe.analyze, images, args.requests, levels, args.repeats)
    result["ratios"] = ratios(result, levels)
    return result


def section_decode(args: argparse.Namespace, pipe: FacePipeline, images: list[torch.Tensor],
                   levels: list[int]) -> dict[str, Any]:  # fmt: skip
    """Decode: template -> image, for the shipped decoder of the default FR model."""
    from facexplain.artifacts.decoder import load_decoder_bundle
    from services.api.v1 import common_pb2
    from services.kit.images import encode_png

    found = [r for r in pipe.analyze(images) if r is not None]
    vectors = [r.template.float() for r in found]
    templates = [common_pb2.Template(values=v.tolist(), dim=int(v.numel())) for v in vectors]
    decoder = load_decoder_bundle(shipped_decoder_bundle(), args.device)

    def forward(batch: list[torch.Tensor]) -> torch.Tensor:
        return decoder.decode(torch.stack(batch))

    requests = args.decode_requests
    print(f"decode: in-process ({len(vectors)} templates, out {decoder.out_size} px)", flush=True)
    result: dict[str, Any] = {
        "decoder": {"bundle": str(shipped_decoder_bundle().relative_to(REPO)), "out_size": decoder.out_size},
        "requests": requests,
        "in_process": bench_inprocess(forward, vectors, requests, max(levels)),
    }
    png = forward(vectors[:1])[0].clamp(0, 1) * 255.0
    t = time.perf_counter()
    for _ in range(50):
        encode_png(png)
    result["in_process"]["png_encode_ms"] = (time.perf_counter() - t) / 50 * 1000
    print(f"  limit {result['in_process']['batched_limit']['images_per_s']:.1f} templates/s", flush=True)
    with contextlib.ExitStack() as stack:
        registry = start_decode_registry(stack)
        served = [
            start_ours_decode(stack, registry, templates, levels, args.threads, on, args.device) for on in (True, False)
        ]
        missing = torchserve_missing_reason(args.no_torchserve)
        if missing:
            result["torchserve"] = f"not measured: {missing}"
            print(f"  TorchServe {result['torchserve']}", flush=True)
        else:
            ts = (args.ts_decode_batch_size, args.ts_decode_max_batch_delay_ms)
            served += start_torchserve_decode(stack, templates, args.threads, args.device, *ts)
        run_rounds(result, served, forward, vectors, requests, levels, args.repeats)
    result["ratios"] = ratios(result, levels)
    return result


def section_aligned(pipe: FacePipeline, images: list[torch.Tensor], repeats: int) -> dict[str, Any]:
    """Per-image time of the photo path against the aligned input mode on the chips the photo path produced."""
    found = [(im, r) for im, r in zip(images, pipe.analyze(images), strict=True) if r is not None]
    photos, results = [im for im, _ in found], [r for _, r in found]
    chips = [r.chip for r in results]
    diff = float((pipe.embed_aligned(chips) - torch.stack([r.template for r in results])).abs().max())
    out: dict[str, Any] = {"images": len(chips), "repeats": repeats, "max_abs_template_diff": diff}
    for batch in (1, 16):
        row: dict[str, float] = {}
        for name, fn, items in (("photo", pipe.analyze, photos), ("aligned", pipe.embed_aligned, chips)):
            fn(items[:batch])  # warm the shape
            n = 0
            t = time.perf_counter()
            for _ in range(repeats):
                for s in range(0, len(items), batch):
                    part = items[s : s + batch]
                    fn(part)
                    n += len(part)
            row[f"{name}_ms_per_image"] = (time.perf_counter() - t) / n * 1000
        row["speedup"] = row["photo_ms_per_image"] / row["aligned_ms_per_image"]
        out[f"batch_{batch}"] = row
        print(
            f"aligned batch {batch:2d}: photo {row['photo_ms_per_image']:.1f} ms/image, aligned "
            f"{row['aligned_ms_per_image']:.1f} ms/image, {row['speedup']:.1f}x (max |diff| {diff:.1e})",
            flush=True,
        )
    return out


SECTIONS = ("embed", "decode", "aligned")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    ap.add_argument("--quick", action="store_true", help="smoke run: 16 Embed / 64 Decode calls, concurrency 1,4,16")
    ap.add_argument("--images", default=str(DEFAULT_IMAGES))
    ap.add_argument("--n-images", type=int, default=16, help="the first N photos (sorted) are the workload")
    ap.add_argument("--requests", type=int, default=64, help="Embed calls per concurrency level and path")
    ap.add_argument("--decode-requests", type=int, default=256, help="Decode calls per concurrency level and path")
    ap.add_argument("--concurrency", default="1,4,16,64", help="client threads, comma-separated")
    ap.add_argument("--repeats", type=int, default=1, help="rounds over all levels; figures are medians of rounds")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads, in-process and in the servers")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-torchserve", action="store_true", help="leave TorchServe out (it is an optional install)")
    ap.add_argument("--ts-batch-size", type=int, default=16, help="TorchServe batchSize (Embed)")
    ap.add_argument("--ts-max-batch-delay-ms", type=int, default=50, help="TorchServe maxBatchDelay (Embed)")
    ap.add_argument("--ts-decode-batch-size", type=int, default=16, help="TorchServe batchSize (Decode)")
    ap.add_argument("--ts-decode-max-batch-delay-ms", type=int, default=5, help="TorchServe maxBatchDelay (Decode)")
    ap.add_argument("--aligned-repeats", type=int, default=3, help="passes over the photos per aligned timing")
    ap.add_argument("--out", default="", help="result name under bench/results (default serving-<device>)")
    args = ap.parse_args()
    sections = [x.strip() for x in args.sections.split(",") if x.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"unknown sections {unknown}; of {SECTIONS}")
    if args.quick:
        args.requests, args.decode_requests, args.aligned_repeats = 16, 64, 1
        if args.concurrency == ap.get_default("concurrency"):
            args.concurrency = "1,4,16"
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    torch.set_num_threads(args.threads)
    paths = list_images(Path(args.images))[: args.n_images]
    if not paths:
        raise SystemExit(f"no images under {args.images}")
    images = [load_image(p) for p in paths]

    result: dict[str, Any] = {
        "machine": machine(),
        "config": {
            "sections": sections,
            "quick": args.quick,
            "images": len(paths),
            "source": str(args.images),
            "requests": args.requests,
            "decode_requests": args.decode_requests,
            "concurrency": levels,
            "repeats": args.repeats,
            "threads": args.threads,
            "device": args.device,
            "order": "interleaved: per concurrency level, the in-process limit then every served path in turn",
            # read by libgomp when torch loads, in this process and every server (they inherit the environment)
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        },
        "load_average_start": list(os.getloadavg()),
    }
    pipe = FacePipeline.default(args.device)
    if "embed" in sections:
        result.update(section_embed(args, pipe, paths, images, levels))
    if "decode" in sections:
        result["decode"] = section_decode(args, pipe, images, levels)
    if "aligned" in sections:
        result["aligned_input"] = section_aligned(pipe, images, args.aligned_repeats)
    result["load_average_end"] = list(os.getloadavg())
    out = write(args.out or f"serving-{args.device}" + ("-quick" if args.quick else ""), result)
    for name, part in (("embed", result), ("decode", result.get("decode", {}))):
        for k, v in part.get("ratios", {}).items():
            if isinstance(v, float):  # "per_round" holds the lists the medians come from
                print(f"{name:6s} {k:36s} {v:6.2f}")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
