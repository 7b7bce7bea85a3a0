"""``facexplain counterfactual ...``: adversarial counterfactuals, attribute significance and the decoder as a defence.

facexplain counterfactual attack IMAGE REF [--method pgd] [--epsilon 8/255] [--steps 10] [--minimal] --out DIR
facexplain counterfactual explain IMAGE REF [--method cw] [--attributes yaw age ...] [--n-random 10] --out DIR
facexplain counterfactual defence --pairs pairs.csv [--method pgd] [--epsilon 8/255] --out DIR

``attack`` writes into OUT ``adversarial.png`` (the perturbed IMAGE, same size), ``perturbation.png``
(amplified difference, 128 = no change) and ``attack.json`` (norms, scores before/after, decision flip,
models, the resolved spec). ``explain`` adds ``decoded_probe.png``, ``decoded_reference.png``,
``decoded_adversarial.png``, ``lbp_map.png`` (s_a of the 7 x 7 LBP texture patches over the decoded
probe), ``significance.csv`` (attribute, group, s_a, significant, delta, delta_reference,
delta_control; s_a descending, ``inf`` = the pair does not differ on the attribute but the attack
moved it, ``nan`` = 0/0 or not estimable) and ``explain.json``. ``defence`` reads a CSV with columns
``a,b,genuine[,id]`` (paths relative to the CSV's folder; genuine 1/0, true/false), sends the pairs
inline, and writes ``defence.json`` and ``roc.csv`` (curve, fpr, tpr, threshold).

The surrogate (white box) and target default to the served FR model; ``--target-model dlib`` judges on
dlib's own descriptor (transfer). Exit status: 0 done, 2 bad input, 3 service not reachable,
4 the service refused or failed the request.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from sdk.client import TARGET_SYNTAX, CounterfactualClient, image_from_path, image_pair, wait_ready
from services.api.v1 import common_pb2, counterfactual_pb2

DEFAULT_TARGET = "127.0.0.1:50055"
_METHODS = {"fgsm": 1, "ifgsm": 2, "pgd": 3, "cw": 4}
_GOALS = {"auto": 0, "dodge": 1, "impersonate": 2}
_NORMS = {"auto": 0, "linf": 1, "l2": 2}


def _fail(msg: str, code: int) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


def _number(text: str) -> float:
    """A float, or a fraction such as 8/255."""
    try:
        return float(Fraction(text)) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (use e.g. 0.03 or 8/255)") from None


def _model_ref(text: str) -> Any:
    if not text:
        return common_pb2.ModelRef()
    name, _, version = text.partition("@")
    return common_pb2.ModelRef(name=name, version=version)


def _spec(args: argparse.Namespace) -> Any:
    return counterfactual_pb2.AttackSpec(
        method=_METHODS[args.method],  # type: ignore[arg-type]
        goal=_GOALS[args.goal],  # type: ignore[arg-type]
        norm=_NORMS[args.norm],  # type: ignore[arg-type]
        epsilon=args.epsilon,
        steps=args.steps,
        step_size=args.step_size,
        random_start=args.random_start,
        cw_c=args.cw_c,
        cw_confidence=args.cw_confidence,
        cw_learning_rate=args.cw_lr,
        minimal_epsilon=args.minimal,
        epsilon_tolerance=args.tolerance,
        seed=args.seed,
        surrogate_model=_model_ref(args.surrogate),
        target_model=_model_ref(args.target_model),
        full_budget=args.full_budget,
    )


def _client(args: argparse.Namespace) -> Any:
    client = CounterfactualClient(args.target, timeout=args.timeout)
    try:
        wait_ready(client.channel, args.connect_timeout)
    except ConnectionError:
        client.close()
        print(
            f"error: counterfactual service at {args.target} is not reachable "
            "(is `facexplain serve counterfactual` running?)",
            file=sys.stderr,
        )
        return None
    return client


def _rpc_error(what: str, err: grpc.RpcError) -> int:
    return _fail(f"{what} failed: {err.code().name}: {err.details()}", 4)


def _to_dict(msg: Any) -> dict[str, Any]:
    return MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def _strip_images(d: dict[str, Any]) -> dict[str, Any]:
    """The JSON copy of a response without image bytes (they are written as PNG files beside it)."""
    return {k: v for k, v in d.items() if not (isinstance(v, dict) and ("encoded" in v or "tensor" in v))}


def _write_attack(out: Path, resp: Any) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "adversarial.png").write_bytes(resp.adversarial.encoded)
    (out / "perturbation.png").write_bytes(resp.perturbation.encoded)
    return _strip_images(_to_dict(resp))


def _print_attack(resp: Any) -> None:
    used = resp.spec_used
    print(
        f"surrogate {resp.surrogate.name} v{resp.surrogate.version}, target {resp.target.name} v{resp.target.version} "
        f"({resp.rule.metric}, threshold {resp.rule.threshold:g})"
    )
    print(
        f"score {resp.score_before:.4f} -> {resp.score_after:.4f}; same person {resp.same_before} -> {resp.same_after}"
        f"; flipped: {resp.flipped}"
    )
    print(
        f"linf {resp.linf * 255:.2f}/255, l2 {resp.l2:.3f}; epsilon used {resp.epsilon_used:.5g}; "
        f"{resp.steps_used} steps; seed {resp.seed}; method {used.method}"
    )


def _images(args: argparse.Namespace) -> tuple[Any, Any] | None:
    try:
        return image_from_path(Path(args.image)), image_from_path(Path(args.reference))
    except OSError as exc:
        print(f"error: cannot read the images: {exc.strerror or exc}", file=sys.stderr)
        return None


def _cmd_attack(args: argparse.Namespace) -> int:
    images = _images(args)
    if images is None:
        return 2
    client = _client(args)
    if client is None:
        return 3
    try:
        resp = client.attack(*images, _spec(args))
    except grpc.RpcError as err:
        return _rpc_error("Attack", err)
    finally:
        client.close()
    out = Path(args.out)
    data = _write_attack(out, resp)
    (out / "attack.json").write_text(json.dumps(data, indent=2) + "\n")
    _print_attack(resp)
    print(f"wrote {out}/adversarial.png, perturbation.png, attack.json")
    return 0


def _fmt(v: float) -> str:
    return "nan" if math.isnan(v) else ("inf" if math.isinf(v) else f"{v:.4g}")


def write_significance_csv(path: Path, rows: Any) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["attribute", "group", "s_a", "significant", "delta", "delta_reference", "delta_control"])
        for r in rows:
            w.writerow(
                [
                    r.attribute,
                    r.group,
                    _fmt(r.s_a),
                    int(r.significant),
                    _fmt(r.delta),
                    _fmt(r.delta_reference),
                    _fmt(r.delta_control),
                ]
            )


def _cmd_explain(args: argparse.Namespace) -> int:
    images = _images(args)
    if images is None:
        return 2
    client = _client(args)
    if client is None:
        return 3
    try:
        resp = client.explain(*images, _spec(args), attributes=args.attributes, n_random=args.n_random)
    except grpc.RpcError as err:
        return _rpc_error("Explain", err)
    finally:
        client.close()
    out = Path(args.out)
    attack = _write_attack(out, resp.attack)
    for name in ("decoded_probe", "decoded_reference", "decoded_adversarial"):
        (out / f"{name}.png").write_bytes(getattr(resp, name).encoded)
    (out / "lbp_map.png").write_bytes(resp.lbp_significance_map.encoded)
    write_significance_csv(out / "significance.csv", resp.significance)
    data = {
        "attack": attack,
        "decoder": _to_dict(resp.decoder),
        "significance": [
            {
                "attribute": r.attribute,
                "group": r.group,
                "s_a": _fmt(r.s_a) if not math.isfinite(r.s_a) else r.s_a,
                "significant": r.significant,
                "delta": r.delta,
                "delta_reference": r.delta_reference,
                "delta_control": r.delta_control if math.isfinite(r.delta_control) else None,
            }
            for r in resp.significance
        ],
    }
    (out / "explain.json").write_text(json.dumps(data, indent=2) + "\n")
    _print_attack(resp.attack)
    print(f"decoder {resp.decoder.name} v{resp.decoder.version}")
    print(f"{'attribute':<28} {'group':<11} {'s_a':>9} {'delta':>9} {'ref':>9} {'control':>9}")
    for r in list(resp.significance)[: args.top or None]:
        mark = "*" if r.significant else " "
        print(
            f"{r.attribute:<28} {r.group:<11} {_fmt(r.s_a):>9}{mark}{_fmt(r.delta):>9} "
            f"{_fmt(r.delta_reference):>9} {_fmt(r.delta_control):>9}"
        )
    print(f"wrote {out}/ (significance.csv, explain.json, lbp_map.png, decoded_*.png, adversarial.png)")
    return 0


def read_pairs(path: Path) -> list[tuple[Path, Path, bool, str]]:
    """``a,b,genuine[,id]`` rows (header required); paths relative to the CSV's folder."""
    rows = []
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"a", "b", "genuine"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(sorted(missing))} (need a,b,genuine[,id])")
        for k, row in enumerate(reader):
            g = str(row["genuine"]).strip().lower()
            if g not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(f"{path} row {k + 2}: genuine must be 1/0 or true/false, got {row['genuine']!r}")
            base = path.parent
            rows.append((base / row["a"], base / row["b"], g in ("1", "true", "yes"), row.get("id") or str(k)))
    return rows


def _cmd_defence(args: argparse.Namespace) -> int:
    try:
        pairs = [image_pair(a, b, g, i) for a, b, g, i in read_pairs(Path(args.pairs))]
    except (OSError, ValueError) as exc:
        return _fail(str(exc), 2)
    client = _client(args)
    if client is None:
        return 3

    def progress(p: Any) -> None:
        if not args.quiet:
            print(f"[{p.stage}] {p.done}/{p.total} {p.message}", file=sys.stderr)

    try:
        result = client.run_defence(client.defence_report(pairs, _spec(args)), progress)
    except grpc.RpcError as err:
        return _rpc_error("DefenceReport", err)
    finally:
        client.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "defence.json").write_text(json.dumps(_to_dict(result), indent=2) + "\n")
    with (out / "roc.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["curve", "fpr", "tpr", "threshold"])
        for name in ("roc_clean", "roc_without", "roc_with"):
            for p in getattr(result, name):
                w.writerow([name, p.fpr, p.tpr, p.threshold])
    print(
        f"target {result.target.name} v{result.target.version}, decoder {result.decoder.name} v{result.decoder.version}"
    )
    print(f"{result.n_pairs} pairs used, {len(result.skipped)} skipped")
    print(
        f"AUC clean {result.auc_clean:.4f}, attacked {result.auc_without:.4f}, attacked+decoded {result.auc_with:.4f}"
    )
    print(
        f"attack success {result.attack_success_rate:.3f} without the defence, "
        f"{result.attack_success_rate_with:.3f} with it"
    )
    for s in result.skipped:
        print(f"skipped pair {s.index} ({s.id}): {s.error.message}", file=sys.stderr)
    print(f"wrote {out}/defence.json, roc.csv")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--target", default=DEFAULT_TARGET, help=f"the counterfactual service ({DEFAULT_TARGET}): {TARGET_SYNTAX}"
    )
    p.add_argument("--timeout", type=float, default=600.0, help="seconds the request may take (also stops the attack)")
    p.add_argument("--connect-timeout", type=float, default=30.0)


def _spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=list(_METHODS), default="pgd")
    p.add_argument(
        "--goal", choices=list(_GOALS), default="auto", help="auto: dodge an accepted pair, else impersonate"
    )
    p.add_argument("--norm", choices=list(_NORMS), default="auto", help="auto: linf (cw: l2)")
    p.add_argument(
        "--epsilon", type=_number, default=0.0, help="budget in [0, 1] pixel units, e.g. 8/255 (0 = default)"
    )
    p.add_argument("--steps", type=int, default=0, help="iterations (0 = default per method)")
    p.add_argument("--step-size", type=_number, default=0.0, help="IFGSM/PGD step (0 = 2.5 * epsilon / steps)")
    p.add_argument("--random-start", action="store_true", help="PGD: random start in the ball")
    p.add_argument("--cw-c", type=float, default=0.0, help="CW: initial constant c (0 = 1)")
    p.add_argument("--cw-confidence", type=float, default=0.0, help="CW: margin kappa in score units")
    p.add_argument("--cw-lr", type=float, default=0.0, help="CW: Adam learning rate (0 = 0.01)")
    p.add_argument("--minimal", action="store_true", help="search the smallest epsilon that flips (not CW)")
    p.add_argument("--tolerance", type=_number, default=0.0, help="minimal-epsilon search resolution (0 = 1/255)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--surrogate", default="", help="NAME[@VERSION] of the white-box model (default: served FR)")
    p.add_argument(
        "--target-model",
        default="",
        help="NAME[@VERSION] judged, e.g. dlib or facexplain-fr-hsefaceres1024 when the service follows it "
        "(FACEXPLAIN_TARGET_MODEL_NAME); default: served FR",
    )
    p.add_argument(
        "--full-budget",
        action="store_true",
        help="IFGSM/PGD: run every step after the decision flips (no early stop); what transfers to a black box",
    )


def add_counterfactual_parsers(sub: Any) -> None:
    """``facexplain counterfactual attack|explain|defence``."""
    c = sub.add_parser(
        "counterfactual",
        help="adversarial counterfactuals, attribute significance s_a, decoder as defence",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    csub = c.add_subparsers(dest="counterfactual_command", required=True)

    a = csub.add_parser("attack", help="perturb IMAGE until the FR decision against REF flips")
    a.add_argument("image")
    a.add_argument("reference")
    a.add_argument("--out", required=True, help="output folder (created if missing)")
    _spec_args(a)
    _common(a)
    a.set_defaults(func=_cmd_attack)

    e = csub.add_parser("explain", help="attack, then rank the attributes the attack changed (s_a)")
    e.add_argument("image")
    e.add_argument("reference")
    e.add_argument("--attributes", nargs="+", default=[], help="attribute names (default: all)")
    e.add_argument("--n-random", type=int, default=0, help="random controls of the same norm (0 = 10)")
    e.add_argument("--top", type=int, default=20, help="print the N highest s_a (0 = all)")
    e.add_argument("--out", required=True, help="output folder (created if missing)")
    _spec_args(e)
    _common(e)
    e.set_defaults(func=_cmd_explain)

    d = csub.add_parser("defence", help="ROC of attacked pairs with and without the decoder as a defence")
    d.add_argument("--pairs", required=True, help="CSV with columns a,b,genuine[,id]")
    d.add_argument("--out", required=True, help="output folder (created if missing)")
    d.add_argument("--quiet", action="store_true", help="no progress lines")
    _spec_args(d)
    _common(d)
    d.set_defaults(func=_cmd_defence)
