"""Reference template endpoint for a black-box FR model (protocol ``facexplain-blackbox-1``): the auditor's side.

Serves a TorchScript program over HTTP the way facexplain's black-box adapter
(``facexplain/models/program.py``) calls it: ``POST /`` with a ``.npy`` body, uint8 chips of shape
(N, S, S, 3) already aligned (in the channel order the bundle declares), answered with the (N, d)
float32 templates as ``.npy`` (or JSON ``{"templates": [...]}`` with ``--json``). Stands alone (numpy,
torch, the standard library): any language or framework that speaks this protocol serves as well.

    python scripts/blackbox_fr_server.py --program model.ts --port 8600 [--token SECRET]
    # then, in the service's environment: FACEXPLAIN_BLACKBOX_ENDPOINT=http://127.0.0.1:8600/

The program receives the chips as float (N, 3, S, S) in [0, 255]; ``--scale`` and ``--offset`` map them
(x * scale + offset) to what it expects. Prints ``listening on http://HOST:PORT/`` once ready. Never
logs chips or templates.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import torch

MAX_BODY = 64 << 20  # bytes: 64 MiB, about 950 chips of 150 x 150
PROTOCOL = "facexplain-blackbox-1"


def make_handler(program: Any, args: argparse.Namespace) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *a: Any) -> None:
            pass  # no per-request logs: the requests are faces

        def _error(self, code: int, msg: str) -> None:
            body = msg.encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            if args.token and self.headers.get("Authorization", "") != f"Bearer {args.token}":
                return self._error(401, "missing or wrong bearer token")
            if self.headers.get("X-Facexplain-Protocol", PROTOCOL) != PROTOCOL:
                return self._error(400, f"this endpoint speaks {PROTOCOL}")
            if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/x-npy":
                return self._error(415, "expected Content-Type application/x-npy")
            length = int(self.headers.get("Content-Length", "0") or 0)
            if not 0 < length <= MAX_BODY:
                return self._error(413, f"body must be 1..{MAX_BODY} bytes")
            try:
                chips = np.load(io.BytesIO(self.rfile.read(length)), allow_pickle=False)
            except ValueError:
                return self._error(400, "body is not a .npy array")
            if chips.dtype != np.uint8 or chips.ndim != 4 or chips.shape[3] != 3 or chips.shape[1] != chips.shape[2]:
                return self._error(400, f"expected uint8 (N, S, S, 3) chips, got {chips.dtype} {chips.shape}")
            if args.chip_size and chips.shape[1] != args.chip_size:
                return self._error(400, f"expected {args.chip_size}-pixel chips, got {chips.shape[1]}")
            x = torch.from_numpy(chips).permute(0, 3, 1, 2).float() * args.scale + args.offset
            with torch.no_grad():
                templates = program(x).float().numpy()
            if args.json:
                body = json.dumps({"templates": templates.tolist()}).encode()
                ctype = "application/json"
            else:
                buf = io.BytesIO()
                np.save(buf, templates, allow_pickle=False)
                body, ctype = buf.getvalue(), "application/x-npy"
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return None

    return Handler


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--program", required=True, help="TorchScript file (torch.jit.save) mapping chips to templates")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    p.add_argument("--token", default="", help="require Authorization: Bearer TOKEN")
    p.add_argument("--chip-size", type=int, default=0, help="refuse chips of another size (0: any)")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--offset", type=float, default=0.0)
    p.add_argument("--json", action="store_true", help="answer JSON instead of .npy")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    program = torch.jit.load(args.program, map_location="cpu").eval()
    server = ThreadingHTTPServer((args.host, args.port), make_handler(program, args))
    print(f"listening on http://{args.host}:{server.server_address[1]}/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
