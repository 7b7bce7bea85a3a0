"""The ``facexplain`` command line: run services and call them.

facexplain serve embedding --port 50051
facexplain embed DIR --target 127.0.0.1:50051 --out templates.npz
facexplain registry register-defaults | promote NAME VERSION [--alias champion] | list | check NAME
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc
import numpy as np


def _cmd_serve(args: argparse.Namespace) -> int:
    # Flags override the FACEXPLAIN_* environment; everything else comes from the environment.
    for flag, env in (
        ("port", "FACEXPLAIN_PORT"),
        ("host", "FACEXPLAIN_HOST"),
        ("metrics_port", "FACEXPLAIN_METRICS_PORT"),
    ):
        value = getattr(args, flag)
        if value is not None:
            os.environ[env] = str(value)
    if args.service == "embedding":
        from services.embedding.app import main

        main()
        return 0
    print(f"unknown service {args.service!r}", file=sys.stderr)
    return 2


def _cmd_embed(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from facexplain.data.faces import list_images
    from services.client.sdk import EmbeddingClient, image_from_path, template_array, wait_ready

    root = Path(args.dir)
    if not root.is_dir():
        print(f"error: {root} is not a folder", file=sys.stderr)
        return 2
    paths = list_images(root)
    if not paths:
        print(f"error: no images (jpg, png, pgm, bmp, ...) under {root}", file=sys.stderr)
        return 2
    client = EmbeddingClient(args.target, timeout=args.timeout)
    try:
        wait_ready(client.channel, args.connect_timeout)
    except ConnectionError:
        print(
            f"error: embedding service at {args.target} is not reachable (is `facexplain serve embedding` running?)",
            file=sys.stderr,
        )
        return 3
    kept: list[str] = []
    templates: list[np.ndarray] = []
    failed: list[tuple[str, str]] = []
    model = version = ""
    with tqdm(total=len(paths), unit="img", desc="embedding", disable=args.quiet) as bar:
        for start in range(0, len(paths), args.batch_size):
            chunk = paths[start : start + args.batch_size]
            try:
                resp = client.embed_batch([image_from_path(p) for p in chunk], normalize=args.normalize)
            except grpc.RpcError as err:
                print(f"error: EmbedBatch failed: {err.code().name}: {err.details()}", file=sys.stderr)
                return 4
            model, version = resp.model.name, resp.model.version
            for res in resp.results:
                rel = chunk[res.index].relative_to(root).as_posix()
                if res.WhichOneof("outcome") == "ok":
                    kept.append(rel)
                    templates.append(template_array(res.ok.template))
                else:
                    failed.append((rel, f"{_CODE_NAMES.get(res.error.code, 'UNKNOWN')}: {res.error.message}"))
            bar.update(len(chunk))
    client.close()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    dim = templates[0].shape[0] if templates else 0
    np.savez(
        out,
        paths=np.asarray(kept, dtype=str),
        templates=np.stack(templates).astype(np.float32) if templates else np.zeros((0, dim), np.float32),
        normalized=np.asarray(bool(args.normalize)),
        model=np.asarray(model),
        version=np.asarray(version),
        failed=np.asarray(failed, dtype=str).reshape(-1, 2),
    )
    kind = "L2-normalised" if args.normalize else "raw (not normalised)"
    print(f"{len(kept)} templates ({kind}, model {model} version {version}), {len(failed)} failed -> {out}")
    return 0


_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="facexplain", description="Explainability for face-recognition models.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run a gRPC service in the foreground (config from FACEXPLAIN_* env vars)")
    s.add_argument("service", choices=["embedding"])
    s.add_argument("--port", type=int, help="gRPC port (FACEXPLAIN_PORT, default 50051)")
    s.add_argument("--host", help="bind address (FACEXPLAIN_HOST, default 127.0.0.1)")
    s.add_argument("--metrics-port", type=int, help="Prometheus port (FACEXPLAIN_METRICS_PORT, default: any free)")
    s.set_defaults(func=_cmd_serve)

    e = sub.add_parser("embed", help="embed every image under DIR through a running embedding service")
    e.add_argument("dir")
    e.add_argument("--target", default="127.0.0.1:50051", help="HOST:PORT of the embedding service")
    e.add_argument("--out", required=True, help="output .npz (paths, templates, normalized, model, version, failed)")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--normalize", action="store_true", help="store L2-normalised templates (default: raw)")
    e.add_argument("--timeout", type=float, default=120.0, help="seconds per batch request")
    e.add_argument("--connect-timeout", type=float, default=30.0)
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=_cmd_embed)

    from services.client.registry_cli import add_registry_parser

    add_registry_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
