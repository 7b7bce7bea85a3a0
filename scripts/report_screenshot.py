"""A picture of an audit report, rendered by headless Chromium as the end-to-end test renders it.

    .venv/bin/python scripts/report_screenshot.py                      # var/demo/report -> docs/demo-report.png
    .venv/bin/python scripts/report_screenshot.py REPORT_DIR OUT.png --height 2400

The README shows the demo's report this way; ``tests/e2e/test_audit.py`` calls :func:`render` on its own
reports and checks the console stays silent.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")


def render(page: Path, shot: Path, *, width: int = 1280, height: int = 2000) -> list[str]:
    """Screenshot ``page`` into ``shot``; returns the page's console lines (an error raises)."""
    if not CHROMIUM.exists():
        raise FileNotFoundError(f"{CHROMIUM} not found: install Debian's chromium (scripts/setup_system.sh does)")
    with tempfile.TemporaryDirectory(prefix="fx-chromium-") as profile:
        cmd = [
            str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
            "--enable-logging=stderr", "--v=0", "--hide-scrollbars", f"--screenshot={shot}",
            f"--window-size={width},{height}", page.resolve().as_uri(),
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if proc.returncode != 0:
        raise RuntimeError(f"chromium failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return [line for line in proc.stderr.splitlines() if "CONSOLE" in line]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("report", nargs="?", default=str(REPO / "var" / "demo" / "report"))
    p.add_argument("out", nargs="?", default=str(REPO / "docs" / "demo-report.png"))
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=2400)
    args = p.parse_args()
    page = Path(args.report) / "index.html"
    if not page.is_file():
        sys.exit(f"{page} does not exist: run `make demo` first")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    console = render(page, out, width=args.width, height=args.height)
    from PIL import Image  # only to shrink the PNG for the repository

    with Image.open(out) as im:
        im.convert("RGB").quantize(colors=256).save(out, optimize=True)
    print(f"{out} ({out.stat().st_size / 1e3:.0f} kB){'; console: ' + '; '.join(console) if console else ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
