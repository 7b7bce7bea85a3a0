"""``facexplain directions ...`` and ``facexplain traverse``: discover and apply directions via the directions service.

facexplain directions ssi data/sample --region nose --region eyes --max-pairs 2000 --out ssi.json
facexplain directions centroid celeba_subset --server --max-items 500 --label Smiling --positive 1 --out smiling.json
facexplain directions regression faces,labels.csv --label age --register --out age.json
facexplain traverse face.jpg --set facexplain-directions@3 --index 0 --alphas -2 -1 0 1 2 --scale stddev --out strip.png

A DIR is read on this machine and sent inline (``DIR`` or ``DIR,labels.csv``, as ``facexplain train``
reads folders); with ``--server`` it names a folder under the service's FACEXPLAIN_DATA_ROOT instead
and nothing is uploaded. Results go to ``--out`` as JSON (the DirectionSet messages, vectors
included), so an audit can cite the set id, its registered version, FR model and data manifest.

Exit status: 0 done, 2 bad input, 3 service not reachable, 4 the service refused or failed the job.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from tqdm import tqdm

from sdk.client import TARGET_SYNTAX, DirectionsClient, folder_dataset, image_from_path, server_dataset, wait_ready
from services.api.v1 import common_pb2, directions_pb2

DEFAULT_TARGET = "127.0.0.1:50053"


def _fail(msg: str, code: int) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


def _ready(client: Any, args: argparse.Namespace) -> bool:
    try:
        wait_ready(client.channel, args.connect_timeout)
    except ConnectionError:
        print(
            f"error: directions service at {args.target} is not reachable (is `facexplain serve directions` running?)",
            file=sys.stderr,
        )
        return False
    return True


def _dataset(args: argparse.Namespace) -> Any:
    if args.server:
        path, _, labels = args.data.partition(",")
        return server_dataset(
            path, labels_file=labels, max_items=args.max_items, sample_seed=args.sample_seed, name=args.name or path
        )
    dataset, _names = folder_dataset(args.data, args.name)
    return dataset


def _request(args: argparse.Namespace, dataset: Any) -> tuple[str, Any]:
    common = {"dataset": dataset, "register": args.register, "registered_name": args.registered_name}
    if args.method == "ssi":
        regions = []
        for spec in args.region or []:
            name, _, points = spec.partition("=")
            indices = [int(p) for p in points.split(",")] if points else []
            regions.append(directions_pb2.Region(name=name, landmark_indices=indices))
        req = directions_pb2.DiscoverSSIRequest(
            regions=regions,
            n_components=args.n_components,
            batch_size=args.batch_size,
            seed=args.seed,
            max_pairs=args.max_pairs,
            **common,
        )
        if args.feather_sigma is not None:
            req.feather_sigma = args.feather_sigma
        return "discover_ssi", req
    if args.method == "centroid":
        creq = directions_pb2.DiscoverCentroidRequest(
            label=args.label, positive_values=args.positive or [], normalize_templates=args.normalize, **common
        )
        if args.reference is not None:
            creq.reference_value = args.reference
        return "discover_centroid", creq
    rreq = directions_pb2.DiscoverRegressionRequest(
        label=args.label, cv_folds=args.cv_folds, seed=args.seed, normalize_templates=args.normalize, **common
    )
    if args.ridge is not None:
        rreq.ridge_alpha = args.ridge
    if args.probe:
        rreq.probe.CopyFrom(common_pb2.Probe(image=image_from_path(Path(args.probe))))
    if args.target_value is not None:
        rreq.target_value = args.target_value
    return "discover_regression", rreq


def _cmd_discover(args: argparse.Namespace) -> int:
    try:
        method, request = _request(args, _dataset(args))
    except (OSError, ValueError) as exc:
        return _fail(f"cannot read {args.data}: {exc}", 2)
    client = DirectionsClient(args.target, timeout=args.timeout)
    if not _ready(client, args):
        return 3
    bar: Any = None
    stage = ""

    def on_progress(p: Any) -> None:
        nonlocal bar, stage
        key = f"{p.stage}: {p.message.split(' (')[0]}" if p.stage == "blending" else p.stage
        if bar is None or key != stage:
            if bar is not None:
                bar.close()
            stage = key
            bar = tqdm(total=p.total or None, desc=key, unit="item", disable=args.quiet)
        bar.total = p.total or bar.total
        bar.n = p.done
        bar.refresh()

    try:
        result = client.run(getattr(client, method)(request), on_progress)
    except grpc.RpcError as err:
        return _fail(f"{method} failed: {err.code().name}: {err.details()}", 4)
    except KeyboardInterrupt:
        return _fail("interrupted: the job was cancelled and nothing was registered", 4)
    finally:
        if bar is not None:
            bar.close()
        client.close()

    def as_dict(msg: Any) -> dict[str, Any]:
        return MessageToDict(msg, preserving_proto_field_name=True)

    out = {
        "target": args.target,
        "method": args.method,
        "sets": [as_dict(s) for s in result.sets],
    }
    if result.probe is not None:
        out["probe"] = as_dict(result.probe)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    for s in result.sets:
        reg = f", registered as {s.registered.name} v{s.registered.version}" if s.registered.name else ""
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in sorted(s.metrics.items()))
        print(
            f"{s.method} set {s.id} for {s.target}: {len(s.directions)} directions from {s.n_items} items "
            f"({s.fr_model.name} v{s.fr_model.version}{reg}) {metrics}"
        )
    if result.probe is not None:
        p = result.probe
        print(f"probe: predicted {p.predicted:.4g}, alpha {p.alpha:.4g} reaches {p.target_value:.4g}")
    print(f"-> {path}")
    return 0


def _alphas(values: list[str]) -> list[float]:
    return [float(x) for v in values for x in v.split(",") if x.strip()]


def _cmd_traverse(args: argparse.Namespace) -> int:
    try:
        probe = common_pb2.Probe(image=image_from_path(Path(args.image)))
        alphas = _alphas(args.alphas or [])
    except OSError as exc:
        return _fail(f"cannot read {args.image}: {exc.strerror or exc}", 2)
    except ValueError as exc:
        return _fail(f"--alphas: {exc}", 2)
    scale = directions_pb2.ALPHA_SCALE_STDDEV if args.scale == "stddev" else directions_pb2.ALPHA_SCALE_ABSOLUTE
    client = DirectionsClient(args.target, timeout=args.timeout)
    if not _ready(client, args):
        return 3
    try:
        resp = client.traverse(probe, set=args.set, index=args.index, alphas=alphas, scale=scale, decode=True)
    except grpc.RpcError as err:
        return _fail(f"Traverse failed: {err.code().name}: {err.details()}", 4)
    finally:
        client.close()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(resp.strip.encoded)
    if args.frames:
        frames = Path(args.frames)
        frames.mkdir(parents=True, exist_ok=True)
        for a, frame in zip(resp.alphas, resp.frames, strict=True):
            (frames / f"alpha_{a:+g}.png").write_bytes(frame.encoded)
    cos = ", ".join(f"{a:+g}: {c:.3f}" for a, c in zip(resp.alphas, resp.cosine_to_probe, strict=True))
    print(
        f"{resp.direction.name} ({resp.fr_model.name} v{resp.fr_model.version}, decoder {resp.decoder.name} "
        f"v{resp.decoder.version}); cosine to the probe per alpha: {cos} -> {out}"
    )
    return 0


def _connection_args(p: argparse.ArgumentParser, timeout: float) -> None:
    p.add_argument(
        "--target", default=DEFAULT_TARGET, help=f"the directions service ({DEFAULT_TARGET}): {TARGET_SYNTAX}"
    )
    p.add_argument("--timeout", type=float, default=timeout, help="seconds the whole call may take")
    p.add_argument("--connect-timeout", type=float, default=30.0)


def add_directions_parsers(sub: Any) -> None:
    """``directions ssi|centroid|regression`` and ``traverse``."""
    d = sub.add_parser("directions", help="discover directions in template space through a running directions service")
    dsub = d.add_subparsers(dest="method", required=True)
    helps = {
        "ssi": "spatially isolated directions: blend a facial region between faces, PCA of the template changes",
        "centroid": "label centroids: mean template of a label value minus the reference group's",
        "regression": "(ridge) regression of a numeric label on templates; optional probe moved to a target value",
    }
    for method, text in helps.items():
        p = dsub.add_parser(method, help=text, description=text)
        p.add_argument("data", help="DIR or DIR,labels.csv on this machine (sent inline), or with --server a folder "
                       "under the service's FACEXPLAIN_DATA_ROOT (PATH or PATH,LABELS_FILE)")  # fmt: skip
        p.add_argument("--out", required=True, help="output JSON (the direction sets, vectors included)")
        p.add_argument("--server", action="store_true", help="DATA is on the server's data volume (nothing uploaded)")
        p.add_argument("--max-items", type=int, default=0, help="--server: use at most this many items (0 = all)")
        p.add_argument("--sample-seed", type=int, default=0, help="--server: 0 = the first max-items, else a sample")
        p.add_argument("--name", default="", help="dataset name recorded with the results")
        p.add_argument("--register", action="store_true", help="register the result in the MLflow registry")
        p.add_argument("--registered-name", default="", help="registered model name (default facexplain-directions)")
        p.add_argument("--seed", type=int, default=0, help="seed (SSI pairing, regression CV folds)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        _connection_args(p, 3600.0)
        if method == "ssi":
            p.add_argument(
                "--region",
                action="append",
                help="eyes, nose, lower_face, or NAME=i,j,k (iBUG landmark indices); repeatable; default all three",
            )
            p.add_argument("--n-components", type=int, default=0, help="directions per region (0 = 5)")
            p.add_argument(
                "--max-pairs", type=int, default=0, help="donor pairs blended per region (0 = server default)"
            )
            p.add_argument("--feather-sigma", type=float, help="blend mask edge, chip pixels (default 4, 0 = hard)")
            p.add_argument("--batch-size", type=int, default=0, help="faces per forward pass (0 = server default)")
        else:
            p.add_argument("--label", required=True, help="label key (a column of labels.csv), e.g. Smiling or age")
            p.add_argument("--normalize", action="store_true", help="use L2-normalised templates")
        if method == "centroid":
            p.add_argument("--positive", type=float, action="append", help="label value that gets a direction")
            p.add_argument("--reference", type=float, help="label value of the reference group (default: the rest)")
        if method == "regression":
            p.add_argument("--ridge", type=float, help="ridge strength (default 1.0, 0 = least squares)")
            p.add_argument("--cv-folds", type=int, default=0, help="folds for r2_cv (0 = 5, 1 = none)")
            p.add_argument("--probe", help="an image to move to --target-value along the direction")
            p.add_argument("--target-value", type=float, help="label value the probe should reach")
        p.set_defaults(func=_cmd_discover)

    t = sub.add_parser(
        "traverse",
        help="move a face along a stored direction and write the decoded strip (needs a decoder on the service)",
    )
    t.add_argument("image", help="a photo with the face")
    t.add_argument("--set", required=True, help="set id (from a discovery), or NAME@VERSION / NAME@ALIAS registered")
    t.add_argument("--index", type=int, default=0, help="direction within the set (0 = first)")
    t.add_argument("--alphas", nargs="+", help="steps, e.g. -2 -1 0 1 2 or -2,-1,0,1,2 (default -3..3)")
    t.add_argument("--scale", choices=["absolute", "stddev"], default="absolute", help="unit of the alphas")
    t.add_argument("--out", required=True, help="output PNG: the decoded frames left to right")
    t.add_argument("--frames", help="also write each frame into this folder (alpha_+1.png, ...)")
    _connection_args(t, 120.0)
    t.set_defaults(func=_cmd_traverse)
