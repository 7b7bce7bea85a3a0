"""The fuzz suite of issue 23 run long: tests/integration/test_fuzz.py with many examples per RPC against
the same real servers (MLflow, the default FR model, a decoder trained by the real CLI), then its case
count, duration and status codes in bench/results/fuzz-cpu.json.

    .venv/bin/python bench/bench_fuzz.py --examples 200            # ~35 RPCs x 200 requests
    .venv/bin/python bench/bench_fuzz.py --examples 50 --seed 7    # other random examples than the suite's

The integration suite runs the same tests with a few derandomized examples per RPC (its budget); here
``--seed`` switches to random examples from that seed, so a long run explores beyond what the suite sees.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import RESULTS, machine  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=200, help="hypothesis examples per RPC (the suite: 10)")
    p.add_argument("--seed", type=int, default=None, help="random examples from this seed (default: derandomized)")
    p.add_argument("-k", default="fuzzed", help="pytest -k expression (default: every RPC's fuzz test)")
    p.add_argument("--out", type=Path, default=RESULTS / "fuzz-cpu.json")
    args = p.parse_args(argv)

    report = args.out.with_suffix(".cases.json")
    env = {**os.environ, "FACEXPLAIN_FUZZ_EXAMPLES": str(args.examples), "FACEXPLAIN_FUZZ_REPORT": str(report)}
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "tests/integration/test_fuzz.py"]
    cmd += ["-k", args.k, "-o", "timeout=0"]
    if args.seed is not None:
        env["FACEXPLAIN_FUZZ_RANDOM"] = "1"
        cmd += [f"--hypothesis-seed={args.seed}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env)
    wall = time.perf_counter() - t0
    cases = json.loads(report.read_text()) if report.is_file() else {}
    report.unlink(missing_ok=True)
    out = {
        "bench": "fuzz",
        "machine": machine(),
        "examples_per_rpc": args.examples,
        "seed": args.seed,
        "pytest_exit": proc.returncode,
        "wall_s_with_server_startup": round(wall, 1),
        "fuzz": cases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"{cases.get('cases', 0)} cases in {cases.get('seconds', 0):.0f} s of fuzzing ({wall:.0f} s in all); "
          f"codes {cases.get('codes')}; wrote {args.out}")  # fmt: skip
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main())
