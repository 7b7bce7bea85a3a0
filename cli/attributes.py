"""``facexplain attributes ...``: attributes recovered from templates, via the attributes service.

facexplain attributes list --target 127.0.0.1:50054
facexplain attributes recover face.jpg [--attributes yaw age] [--decoded decoded.png] [--json out.json]
facexplain attributes diff a.jpg b.jpg [--top 10] [--json out.json]
facexplain attributes importance --data DIR[,labels.csv] [--attributes ...] [--seed 0] [--bootstrap 200] \\
    [--control [--permutations 20]] [--estimator knn|discrete] [--log-run] [--compare HOST2:PORT] --out DIR

``importance`` writes into OUT: ``importance.csv`` (attribute, group, mi, ci_low, ci_high, control_mi, n, p_value;
nats, MI descending), ``importance.json`` (the table with its FR model, decoder, seed and data manifest
hash) and ``importance.png`` (bar chart, bootstrap whiskers, shuffled control as black ticks). With
``--compare HOST2:PORT`` (a second attributes service serving another FR model) the same job runs there
too: its files go to ``OUT/compare/`` and ``importance_compare.csv`` / ``importance_compare.png`` show
both models side by side. ``--fr-model NAME[@VERSION]`` checks that ``--target`` serves that FR model.

A DIR is read on this machine and sent inline (``DIR`` or ``DIR,labels.csv``, as ``facexplain train``
reads folders; a label column named like an attribute is used as its ground truth); with ``--server``
it names a folder under the service's FACEXPLAIN_DATA_ROOT instead and nothing is uploaded.

Exit status: 0 done, 2 bad input, 3 service not reachable, 4 the service refused or failed the request.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from tqdm import tqdm

from facexplain.attributes import report
from sdk.client import TARGET_SYNTAX, AttributesClient, folder_dataset, image_from_path, server_dataset, wait_ready
from services.api.v1 import common_pb2

DEFAULT_TARGET = "127.0.0.1:50054"


def _fail(msg: str, code: int) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


def _client(target: str, args: argparse.Namespace) -> Any:
    """A connected AttributesClient, or None after saying the service is not reachable."""
    client = AttributesClient(target, timeout=args.timeout)
    try:
        wait_ready(client.channel, args.connect_timeout)
    except ConnectionError:
        client.close()
        print(
            f"error: attributes service at {target} is not reachable (is `facexplain serve attributes` running?)",
            file=sys.stderr,
        )
        return None
    return client


def _rpc_error(what: str, err: grpc.RpcError) -> int:
    return _fail(f"{what} failed: {err.code().name}: {err.details()}", 4)


def _fmt(values: Any) -> str:
    return ", ".join("nan" if not math.isfinite(v) else f"{v:.4g}" for v in values)


def _model(ref: Any) -> str:
    return f"{ref.name} v{ref.version}" if ref.name else "?"


# -- list / recover / diff --------------------------------------------------------------------------------


def _cmd_list(args: argparse.Namespace) -> int:
    client = _client(args.target, args)
    if client is None:
        return 3
    try:
        resp = client.list_attributes()
    except grpc.RpcError as err:
        return _rpc_error("ListAttributes", err)
    finally:
        client.close()
    print(f"FR model {_model(resp.fr_model)}, decoder {_model(resp.decoder)}; {len(resp.attributes)} attributes")
    for a in resp.attributes:
        unit = f" [{a.unit}]" if a.unit else ""
        comps = f" ({len(a.components)} components)" if len(a.components) > 1 else ""
        print(f"{a.group:<11} {a.name}{unit}{comps}{' discrete' if a.discrete else ''}")
    return 0


def _probe(path: str) -> Any:
    return common_pb2.Probe(image=image_from_path(Path(path)))


def _cmd_recover(args: argparse.Namespace) -> int:
    try:
        probe = _probe(args.image)
    except OSError as exc:
        return _fail(f"cannot read {args.image}: {exc.strerror or exc}", 2)
    client = _client(args.target, args)
    if client is None:
        return 3
    try:
        resp = client.recover_attributes(probe, attributes=args.attributes, return_decoded=bool(args.decoded))
    except grpc.RpcError as err:
        return _rpc_error("RecoverAttributes", err)
    finally:
        client.close()
    original = {v.name: v for v in resp.original}
    print(f"FR model {_model(resp.fr_model)}, decoder {_model(resp.decoder)}")
    print(f"{'attribute':<24} {'recovered (decoded face)':<36} original face")
    for v in resp.recovered:
        o = original.get(v.name)
        print(f"{v.name:<24} {_fmt(v.value)[:36]:<36} {_fmt(o.value)[:36] if o is not None else ''}")
    if args.decoded:
        Path(args.decoded).parent.mkdir(parents=True, exist_ok=True)
        Path(args.decoded).write_bytes(resp.decoded.encoded)
    if args.json:
        data = MessageToDict(resp, preserving_proto_field_name=True)
        data.pop("template", None)  # biometric: not written unless asked for by the caller's own code
        data.pop("decoded", None)
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
    return 0


def _cmd_diff(args: argparse.Namespace) -> int:
    try:
        a, b = _probe(args.image_a), _probe(args.image_b)
    except OSError as exc:
        return _fail(f"cannot read the images: {exc.strerror or exc}", 2)
    client = _client(args.target, args)
    if client is None:
        return 3
    try:
        resp = client.diff_attributes(a, b, attributes=args.attributes)
    except grpc.RpcError as err:
        return _rpc_error("DiffAttributes", err)
    finally:
        client.close()
    print(f"FR model {_model(resp.fr_model)}, decoder {_model(resp.decoder)}; largest differences first")
    print(f"{'attribute':<24} {'standardized':>12} {'magnitude':>12}  unit")
    for d in resp.diffs[: args.top or None]:
        print(f"{d.name:<24} {d.standardized:>12.3f} {d.magnitude:>12.4g}  {d.unit}")
    if args.json:
        data = MessageToDict(resp, preserving_proto_field_name=True)
        for key in ("a", "b", "decoded_a", "decoded_b"):
            data.pop(key, None)
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
    return 0


# -- importance -------------------------------------------------------------------------------------------


def _dataset(args: argparse.Namespace) -> Any:
    if args.server:
        path, _, labels = args.data.partition(",")
        return server_dataset(
            path, labels_file=labels, max_items=args.max_items, sample_seed=args.sample_seed, name=args.name or path
        )
    dataset, _names = folder_dataset(args.data, args.name)
    return dataset


class _Bar:
    """One tqdm bar per stage of the job (embedding, recovery, importance, ...)."""

    def __init__(self, label: str, quiet: bool) -> None:
        self.label = label
        self.quiet = quiet
        self.bar: Any = None
        self.stage = ""

    def __call__(self, p: Any) -> None:
        if p.stage == "skipped":
            if not self.quiet:
                tqdm.write(f"{self.label}: {p.message}", file=sys.stderr)
            return
        if self.bar is None or p.stage != self.stage:
            self.close()
            self.stage = p.stage
            self.bar = tqdm(
                total=p.total or None, desc=f"{self.label} {p.stage}", unit="", disable=self.quiet, leave=False
            )
        if p.total and self.bar.total != p.total:
            self.bar.total = p.total
        self.bar.n = p.done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _run_importance(target: str, label: str, args: argparse.Namespace, dataset: Any) -> Any:
    """The table from ``target``, or an exit code after saying what failed."""
    client = _client(target, args)
    if client is None:
        return 3
    try:
        if args.fr_model and target == args.target:
            name, _, version = args.fr_model.partition("@")
            served = client.list_attributes().fr_model
            if served.name != name or (version and served.version != version):
                return _fail(f"{target} serves FR model {_model(served)}, not {args.fr_model}", 4)
        events = client.importance(
            dataset,
            attributes=args.attributes,
            estimator=args.estimator,
            n_bootstrap=args.bootstrap,
            seed=args.seed,
            shuffled_control=args.control,
            log_run=args.log_run,
            knn_neighbors=args.k,
            ci_level=args.ci_level,
            experiment=args.experiment,
            n_permutations=args.permutations,
        )
        bar = _Bar(label, args.quiet)
        try:
            return client.run_importance(events, bar)
        finally:
            bar.close()
    except grpc.RpcError as err:
        return _rpc_error(f"Importance on {target}", err)
    except KeyboardInterrupt:
        return _fail("interrupted: the job was cancelled", 4)
    finally:
        client.close()


def _label(table: Any) -> str:
    return f"{table.fr_model.name}@{table.fr_model.version}"


def _cmd_importance(args: argparse.Namespace) -> int:
    if args.k < 0 or args.bootstrap < 0 or args.permutations < 0:
        return _fail("--k, --bootstrap and --permutations must not be negative", 2)
    try:
        dataset = _dataset(args)
    except (OSError, ValueError) as exc:
        return _fail(f"cannot read {args.data}: {exc}", 2)
    out = Path(args.out)
    table = _run_importance(args.target, "A" if args.compare else "", args, dataset)
    if isinstance(table, int):
        return table
    report.write_table_files(table, out)
    tables = [(_label(table), list(table.rows))]
    if args.compare:
        other = _run_importance(args.compare, "B", args, dataset)
        if isinstance(other, int):
            return other
        report.write_table_files(other, out / "compare")
        label_b = _label(other)
        if label_b == tables[0][0]:
            label_b += " (B)"
        tables.append((label_b, list(other.rows)))
        report.write_compare_csv(tables, out / "importance_compare.csv")
        report.importance_chart(tables, out / "importance_compare.png", title="I(a; â) per FR model")
    _summary(table, out)
    if args.compare:
        print(f"side by side with {_model(other.fr_model)} -> {out / 'importance_compare.csv'}, .png")
    return 0


def _summary(table: Any, out: Path) -> None:
    rows = list(table.rows)
    finite = [r for r in rows if math.isfinite(r.mi)]
    print(
        f"{len(rows)} attributes ranked for FR model {_model(table.fr_model)} (decoder {_model(table.decoder)}) on "
        f"{table.n_items} faces, estimator {table.estimator}, seed {table.seed} -> {out / 'importance.csv'}, .png"
    )
    for r in finite[:5]:
        print(
            f"  {r.attribute:<24} I = {r.mi:.3f} nats [{r.ci_low:.3f}, {r.ci_high:.3f}], "
            f"control {r.control_mi:.3f}, p {r.p_value:.3f}"
        )
    weak = [r.attribute for r in finite if r.p_value > 0.05]
    if weak and table.rows and any(r.control_mi for r in rows):
        print(f"  not shown to survive (permutation p > 0.05): {', '.join(weak)}")
    if table.mlflow_run_id:
        print(f"MLflow run {table.mlflow_run_id}")


# -- parsers ----------------------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--target", default=DEFAULT_TARGET, help=f"the attributes service ({DEFAULT_TARGET}): {TARGET_SYNTAX}"
    )
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds the request may take")
    p.add_argument("--connect-timeout", type=float, default=30.0)


def add_attributes_parsers(sub: Any) -> None:
    """``facexplain attributes list|recover|diff|importance``."""
    a = sub.add_parser("attributes", help="recover attributes from templates and rank them by mutual information")
    asub = a.add_subparsers(dest="attributes_command", required=True)

    ls = asub.add_parser("list", help="the attributes the service estimates")
    _common(ls)
    ls.set_defaults(func=_cmd_list)

    r = asub.add_parser("recover", help="attributes of the face decoded from an image's template (and of the original)")
    r.add_argument("image")
    r.add_argument("--attributes", nargs="+", default=[], help="attribute names (default: all)")
    r.add_argument("--decoded", help="write the decoded face here (PNG)")
    r.add_argument("--json", help="write the response (values, models; no template) here")
    _common(r)
    r.set_defaults(func=_cmd_recover)

    d = asub.add_parser("diff", help="attribute differences between two faces, both recovered from their templates")
    d.add_argument("image_a")
    d.add_argument("image_b")
    d.add_argument("--attributes", nargs="+", default=[], help="attribute names (default: all)")
    d.add_argument("--top", type=int, default=15, help="print the N largest differences (0 = all)")
    d.add_argument("--json", help="write all differences here")
    _common(d)
    d.set_defaults(func=_cmd_diff)

    i = asub.add_parser(
        "importance",
        help="mutual information I(a; â) of every attribute for the served FR model, over a dataset",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    i.add_argument("--data", required=True, help="DIR or DIR,labels.csv (read here and sent inline; see --server)")
    i.add_argument("--server", action="store_true", help="--data names a folder under the server's data root")
    i.add_argument("--max-items", type=int, default=0, help="with --server: use at most N items (0 = all)")
    i.add_argument("--sample-seed", type=int, default=0, help="with --server and --max-items: random sample seed")
    i.add_argument("--name", default="", help="dataset name recorded with the results")
    i.add_argument("--attributes", nargs="+", default=[], help="attribute names (default: all)")
    i.add_argument("--estimator", choices=["knn", "discrete"], default="knn")
    i.add_argument("--k", type=int, default=0, help="neighbours of the knn estimator (0 = 3)")
    i.add_argument("--bootstrap", type=int, default=200, help="resamples for the confidence interval (0 = none)")
    i.add_argument("--ci-level", type=float, default=0.0, help="confidence level (0 = 0.95)")
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--control", action="store_true", help="also estimate the shuffled control (about 0) and p-values")
    i.add_argument("--permutations", type=int, default=0, help="shuffles of the control (0 = the service's 20)")
    i.add_argument("--log-run", action="store_true", help="log the run to the service's MLflow server")
    i.add_argument("--experiment", default="", help="MLflow experiment (default facexplain-importance)")
    i.add_argument("--fr-model", default="", help="NAME[@VERSION]: fail unless --target serves this FR model")
    i.add_argument("--compare", default="", help="HOST:PORT of a second attributes service (another FR model)")
    i.add_argument("--out", required=True, help="output folder (created if missing)")
    i.add_argument("--quiet", action="store_true", help="no progress bars")
    _common(i)
    i.set_defaults(func=_cmd_importance)
