"""Soak of the concurrency cap (issue 23, load limits): one embedding server on loopback, more callers than
``FACEXPLAIN_MAX_CONCURRENT_RPCS``, real faces, for ``--minutes``; accepted / rejected / failed calls, the
server's memory over time and health-port latency under load. Writes bench/results/load-<device>.json.

    .venv/bin/python bench/bench_load.py --minutes 10          # the soak the README quotes
    .venv/bin/python bench/bench_load.py --minutes 0.5         # a quick check
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, machine
from cli.launcher import free_port, start_service
from tests.conftest import shared_data_dir
from tests.loadgen import LoadResult, health_latency_ms, proc_memory_kib, run_load


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0, help="soak duration (default 10)")
    p.add_argument("--clients", type=int, default=8, help="concurrent callers, one channel each")
    p.add_argument("--cap", type=int, default=2, help="FACEXPLAIN_MAX_CONCURRENT_RPCS of the server")
    p.add_argument("--workers", type=int, default=2, help="FACEXPLAIN_MAX_WORKERS of the server")
    p.add_argument("--faces", type=int, default=8, help="distinct real faces the callers cycle through")
    p.add_argument("--out", type=Path, default=None, help="result file (default bench/results/load-cpu.json)")
    args = p.parse_args(argv)

    images = sorted((shared_data_dir() / "celeba_subset" / "images").glob("*.jpg"))[: args.faces]
    faces = [f.read_bytes() for f in images]
    health_port = free_port()
    env = {
        "FACEXPLAIN_REGISTRY_URI": "",
        "FACEXPLAIN_TORCH_THREADS": "1",
        "FACEXPLAIN_MAX_WORKERS": str(args.workers),
        "FACEXPLAIN_MAX_CONCURRENT_RPCS": str(args.cap),
        "FACEXPLAIN_HEALTH_PORT": str(health_port),
        "FACEXPLAIN_LOG_LEVEL": "WARNING",  # rejected calls would otherwise log a line each
    }
    with tempfile.TemporaryDirectory() as logs:
        svc = start_service("embedding", Path(logs), env=env, timeout=300)
        try:
            run_load(svc.address, faces, clients=1, max_calls=2)  # warm-up
            pid = svc.proc.pid
            before = proc_memory_kib(pid)
            memory: list[dict[str, float]] = []
            health: list[float] = []
            box: dict[str, LoadResult] = {}
            duration = args.minutes * 60
            t0 = time.perf_counter()
            load = threading.Thread(
                target=lambda: box.setdefault(
                    "r", run_load(svc.address, faces, clients=args.clients, duration_s=duration)
                )
            )
            load.start()
            while load.is_alive():
                time.sleep(min(5.0, max(duration / 20, 0.5)))
                mem = proc_memory_kib(pid)
                memory.append({"t_s": round(time.perf_counter() - t0, 1), "rss_mib": round(mem["VmRSS"] / 1024, 1)})
                status, ms = health_latency_ms(f"127.0.0.1:{health_port}")
                if status != "SERVING":
                    raise SystemExit(f"health said {status} under load")
                health.append(ms)
            load.join()
            after = proc_memory_kib(pid)
            alive = svc.alive()
        finally:
            code = svc.stop()
    result = box["r"]
    hs = sorted(health)
    out = {
        "bench": "load",
        "machine": machine(),
        "settings": vars(args) | {"out": None},
        "load": result.summary(),
        "memory_mib": {
            "rss_before": round(before["VmRSS"] / 1024, 1),
            "rss_after": round(after["VmRSS"] / 1024, 1),
            "growth": round((after["VmRSS"] - before["VmRSS"]) / 1024, 1),
            "peak": round(after["VmHWM"] / 1024, 1),
            "samples": memory,
        },
        "health_port_ms": {"checks": len(hs), "median": round(hs[len(hs) // 2], 2), "max": round(hs[-1], 2)}
        if hs
        else {},
        "server_alive_after": alive,
        "server_exit_code": code,
    }
    path = args.out or RESULTS / "load-cpu.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    memory_mib = {k: v for k, v in out["memory_mib"].items() if k != "samples"}  # type: ignore[attr-defined]
    brief = {"load": out["load"], "health_port_ms": out["health_port_ms"], "memory_mib": memory_mib}
    print(json.dumps(brief, indent=1))
    print(f"wrote {path}")
    return 0 if result.failed == 0 and alive and code == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
