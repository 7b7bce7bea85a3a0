"""``facexplain audit``: what an FR model encodes and why it decided a pair, from the running services.

facexplain audit --fr-model facexplain-fr-dlib128@champion --data data/sample --out report/ --seed 0

The flags fill an :class:`sdk.audit.AuditConfig` and :func:`sdk.audit.run_audit` does the work (what
the audit collects and how it stays reproducible is told there).

Exit status: 0 done, 2 bad input, 3 a service or the registry is not reachable (or serves another FR
model than ``--fr-model``), 4 a service failed a step.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from sdk.audit import DEFAULT_TARGETS, SERVICES, AuditConfig, AuditError, parse_model_ref, run_audit
from sdk.client import DEFAULT_PORTS, TARGET_SYNTAX


def parse_targets(values: list[str] | None) -> dict[str, str]:
    """``SERVICE=TARGET`` items, or one ``HOST`` that all five default ports use.

    Items are separated by spaces or commas; a comma inside an ``ipv4:``/``ipv6:`` address list
    (``embedding=ipv4:10.0.0.5:50051,10.0.0.6:50051``) continues that list.
    """
    targets = dict(DEFAULT_TARGETS)
    for v in values or []:
        last = ""  # the service whose target the previous item set
        for item in v.split(","):
            item = item.strip()
            if not item:
                continue
            if "=" in item:
                svc, _, addr = item.partition("=")
                if svc not in SERVICES:
                    raise AuditError(f"--targets: unknown service {svc!r} (one of {', '.join(SERVICES)})", 2)
                targets[svc] = addr
                last = svc
            elif last and targets[last].lower().startswith(("ipv4:", "ipv6:")):
                targets[last] += f",{item}"
            else:
                targets = {s: f"{item}:{DEFAULT_PORTS[s]}" for s in SERVICES}
                last = ""
    return targets


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def config_from_args(args: argparse.Namespace) -> AuditConfig:
    """The audit's settings from the command line (AuditError 2 on a bad --fr-model or --targets)."""
    parse_model_ref(args.fr_model)
    return AuditConfig(
        fr_model=args.fr_model,
        data=Path(args.data),
        out=Path(args.out),
        pairs=Path(args.pairs) if args.pairs else None,
        seed=args.seed,
        targets=parse_targets(args.targets),
        max_faces=args.max_faces,
        max_reconstructions=args.max_reconstructions,
        ssi_max_pairs=args.ssi_max_pairs,
        ssi_components=args.ssi_components,
        importance_bootstrap=args.bootstrap,
        max_pairs=args.max_pairs,
        explain_pairs=args.explain_pairs,
        attack_steps=args.attack_steps,
        max_occlusions=args.max_occlusions,
        privacy_label=args.privacy_label,
        embed_chunk=args.embed_chunk,
        embed_concurrency=args.embed_concurrency,
        connect_timeout=args.connect_timeout,
        quiet=args.quiet,
        judge=args.judge or "",
    )


def _cmd_audit(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
        t0 = time.perf_counter()
        run_audit(cfg)
    except AuditError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 4
    print(f"audit done in {time.perf_counter() - t0:.0f} s -> {Path(args.out) / 'index.html'}")
    return 0


def add_audit_parser(sub: Any) -> None:
    """``facexplain audit``."""
    d = AuditConfig(fr_model="", data=Path(), out=Path())
    p = sub.add_parser(
        "audit",
        help="audit an FR model through the running services: HTML report + audit.json",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument(
        "--fr-model", required=True, help="NAME@ALIAS the services must serve, e.g. facexplain-fr-dlib128@champion"
    )
    p.add_argument("--data", required=True, help="folder of face images (identity = sub-folder; optional labels.csv)")
    p.add_argument("--pairs", help="CSV a,b,genuine (paths relative to DATA); default: pairs of the audited faces")
    p.add_argument("--out", required=True, help="report folder: index.html, audit.json, images/, importance/")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (sampling, SSI, MI, attacks)")
    p.add_argument(
        "--targets",
        nargs="+",
        help="SERVICE=TARGET (embedding, decoding, directions, attributes, counterfactual), or one HOST for the "
        f"default ports 50051-50055 (default 127.0.0.1). TARGET: {TARGET_SYNTAX}",
    )
    p.add_argument(
        "--judge",
        metavar="TARGET",
        help="an embedding service serving an independent FR model (e.g. facexplain-fr-hsefaceres1024): it judges "
        "every reconstruction too, beside the audited model",
    )
    p.add_argument("--max-faces", type=int, default=d.max_faces, help="faces audited (0 = all)")
    p.add_argument("--max-reconstructions", type=int, default=d.max_reconstructions)
    p.add_argument("--ssi-max-pairs", type=int, default=d.ssi_max_pairs, help="donor pairs blended per SSI region")
    p.add_argument("--ssi-components", type=int, default=d.ssi_components, help="SSI directions per region")
    p.add_argument("--bootstrap", type=int, default=d.importance_bootstrap, help="importance subsamples (0 = none)")
    p.add_argument("--max-pairs", type=int, default=d.max_pairs, help="pairs scored for the counterfactual step")
    p.add_argument("--explain-pairs", type=int, default=d.explain_pairs, help="counterfactuals per pair kind")
    p.add_argument("--attack-steps", type=int, default=d.attack_steps)
    p.add_argument(
        "--privacy-label", default=d.privacy_label, help="binary label whose direction the privacy step removes"
    )
    p.add_argument("--max-occlusions", type=int, default=d.max_occlusions, help="faces occluded (eyes, nose, mouth)")
    p.add_argument(
        "--embed-chunk", type=_positive, default=d.embed_chunk, help="faces per EmbedBatch when embedding all of DATA"
    )
    p.add_argument(
        "--embed-concurrency",
        type=_positive,
        default=d.embed_concurrency,
        help="EmbedBatch calls in flight: with an embedding TARGET of several replicas (dns:///, ipv4: list) "
        "they spread over them",
    )
    p.add_argument("--connect-timeout", type=float, default=d.connect_timeout)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_audit)
