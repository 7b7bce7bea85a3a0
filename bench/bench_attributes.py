"""Attribute-recovery importance benchmark (issue 6): I(a; â) per attribute for registered FR models.

For each FR model given (``--fr-model``, and optionally ``--compare`` with its own decoder), on the
decoder's **test identities** (never seen by the decoder; the same identity split as
``bench_directions``), every attribute of the default catalogue is estimated on the original aligned
chips (a) and on the faces decoded from their templates (â) (:func:`facexplain.attributes.recovery.
recover_dataset`), and ranked by the mutual information I(a; â) (:func:`facexplain.attributes.importance.
importance_table`, Kraskov k-NN, half-sample intervals) with the seeded shuffled control (``--permutations``
shuffles: their mean and a permutation p-value per attribute). The run is repeated with the same seed on
the same estimates to check the table is reproducible.

Two measurements without the decoder say whether a low I(a; â) is the template's or the decoder's:
probes from templates to each attribute of the original faces, a ridge fit and a 20-nearest-neighbour
average (which sees non-linear dependence, e.g. on |yaw|), fitted on the decoder's training identities
and scored (R²) on the test faces (:mod:`facexplain.attributes.template_probe`), and the
cosine between the templates of a face and of its mirror image next to that of two photos of one
person (a mirror-invariant model cannot keep yaw's or roll's sign).

Accessory attributes need a registered probe set (``--probes``, default ``facexplain-probes-faceapi@champion``);
without one the table has no accessory rows and says so.

Writes ``bench/results/attributes-importance-<device>.{json,csv,png}`` with the machine and date.

    python bench/bench_attributes.py [--n 400] [--bootstrap 50] [--threads 2]
        [--compare facexplain-sadfad-...@champion --compare-decoder facexplain-dfd-...@champion]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_directions import CELEBA, decode, load_context, pick
from bench.common import RESULTS, machine, write
from facexplain.artifacts.probes import load_probe_bundle
from facexplain.attributes.defaults import default_catalog
from facexplain.attributes.gate import attribute_gate
from facexplain.attributes.report import importance_chart, write_compare_csv
from facexplain.attributes.template_probe import knn_decodability, linear_decodability, linear_predictions
from facexplain.metrics.invariance import mirror_invariance
from facexplain.paths import var_dir
from registry import Registry, RegistryError


def _probes(spec: str, uri: str, device: torch.device) -> tuple[Any, dict[str, Any]]:
    """The registered accessory probes, or (None, reason) when none is registered."""
    if not spec:
        return None, {"used": False, "reason": "--probes empty"}
    name, _, ref = spec.partition("@")
    registry = Registry(uri, timeout_s=30.0, max_retries=2)
    try:
        info = registry.get_version(name, ref) if ref.isdigit() else registry.resolve(name, ref or "champion")
    except RegistryError as err:
        return None, {"used": False, "reason": f"{spec}: {err}"}
    path = registry.download(info, var_dir() / "models")
    return load_probe_bundle(path, str(device)), {"used": True, "name": info.name, "version": info.version}


def _one_model(args: argparse.Namespace, fr: str, dec: str, probes: Any) -> dict[str, Any]:
    from facexplain.attributes.importance import importance_table  # scipy: only this bench stage needs it
    from facexplain.attributes.recovery import recover_dataset  # scipy, likewise

    ns = argparse.Namespace(**{**vars(args), "fr_model": fr, "decoder": dec})
    ctx = load_context(ns)
    idx = pick(ctx.b_idx, ctx.faces.identities, args.n, args.seed)
    catalog = default_catalog(ctx.device, probes)
    chips = ctx.faces.chips[idx]
    templates = ctx.faces.templates[idx]
    t0 = time.perf_counter()
    original, recovered = recover_dataset(
        chips, templates, lambda t: decode(ctx, t), catalog, batch_size=args.batch_size, progress=_bar(len(idx))
    )
    t_recover = time.perf_counter() - t0
    specs = catalog.specs
    kw = dict(
        estimator="knn",
        k=args.k,
        n_bootstrap=args.bootstrap,
        ci_level=0.95,
        seed=args.seed,
        n_permutations=args.permutations,
    )
    t0 = time.perf_counter()
    rows = importance_table(original, recovered, specs, shuffled_control=True, **kw)
    t_mi = time.perf_counter() - t0
    again = importance_table(original, recovered, specs, shuffled_control=True, **kw)
    same = rows == again
    t0 = time.perf_counter()
    probe = _template_probe(args, ctx, catalog, idx, original)
    mirror = _mirror_cosine(ctx, idx, args.batch_size)
    t_probe = time.perf_counter() - t0
    finite = [r for r in rows if math.isfinite(r.mi)]
    smallest = min(r.mi for r in finite)
    largest_control = max(r.control_mi for r in finite)
    # Which attributes sit at the control, and whether either template probe finds them (R² > 0.02 on
    # held-out identities): found -> the decoder or the estimator lost it; not found -> the template.
    at_control = {
        r.attribute: {
            "mi": r.mi,
            "linear_r2": probe["attributes"].get(r.attribute, {}).get("r2"),
            "knn_r2": probe["attributes"].get(r.attribute, {}).get("knn_r2"),
        }
        for r in sorted(finite, key=lambda r: r.mi)
        if r.mi <= largest_control
    }
    by_group: dict[str, list[float]] = {}
    for r in finite:
        by_group.setdefault(r.group, []).append(r.mi)
    return {
        "context": ctx.info,
        "faces": len(idx),
        "identities": len({ctx.faces.identities[i] for i in idx}),
        "seconds": {"recover": round(t_recover, 1), "importance": round(t_mi, 1), "template_probe": round(t_probe, 1)},
        "rows": [r.__dict__ for r in rows],
        "template_probe": probe,
        "mirror": mirror,
        "checks": {
            "attributes": len(rows),
            "finite": len(finite),
            "smallest_mi": smallest,
            "largest_control_mi": largest_control,
            "control_below_smallest": bool(largest_control < smallest),
            # issue 25 item 7: gated over the attributes the template is shown to carry (held-out R² > 0.05)
            "gate": asdict(
                attribute_gate(
                    rows,
                    {a: {"linear": v.get("r2"), "knn": v.get("knn_r2")} for a, v in probe["attributes"].items()},
                )
            ),
            "at_or_below_control": at_control,
            "not_significant_p_over_0_05": [r.attribute for r in finite if r.p_value > 0.05],
            "reproducible_same_seed": same,
        },
        "group_mean_mi": {g: float(np.mean(v)) for g, v in by_group.items()},
        "slack": _slack(rows, probe),
        "_rows": rows,
    }


def _template_probe(
    args: argparse.Namespace, ctx: Any, catalog: Any, idx: np.ndarray, original: dict[str, np.ndarray]
) -> dict[str, Any]:
    """Ridge from templates to each attribute of the original faces: fitted on up to ``--probe-train``
    faces of the decoder's training identities, scored on the test faces above (other people)."""
    fit_idx = pick(ctx.a_idx, ctx.faces.identities, args.probe_train, args.seed)
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(fit_idx), args.batch_size):
        rows = fit_idx[start : start + args.batch_size]
        for name, v in catalog.estimate(ctx.faces.chips[rows].float() / 255.0).items():
            parts.setdefault(name, []).append(np.asarray(v, dtype=np.float64).reshape(len(rows), -1))
    fit_values = {name: np.concatenate(p) for name, p in parts.items()}
    fit_t, test_t = ctx.faces.templates[fit_idx].numpy(), ctx.faces.templates[idx].numpy()
    out: dict[str, Any] = {"alpha": 1.0, "knn_k": 20, "fit_faces": len(fit_idx), "attributes": {}}
    for spec in catalog.specs:
        if spec.discrete:  # category codes have no linear order to regress on
            continue
        score = linear_decodability(fit_t, fit_values[spec.name], test_t, original[spec.name])
        knn = knn_decodability(fit_t, fit_values[spec.name], test_t, original[spec.name], k=20)
        out["attributes"][spec.name] = {
            **score.__dict__,
            "knn_r2": knn.r2,
            "knn_r": knn.r,
            "probe_mi": _probe_mi(args, fit_t, fit_values[spec.name], test_t, original[spec.name]),
        }
    # A mirror-invariant model cannot keep the sign of yaw or roll but could keep its size.
    for angle in ("yaw", "roll"):
        if angle in fit_values and angle in original:
            fit_abs, test_abs = np.abs(fit_values[angle]), np.abs(original[angle])
            score = linear_decodability(fit_t, fit_abs, test_t, test_abs)
            knn = knn_decodability(fit_t, fit_abs, test_t, test_abs, k=20)
            out["attributes"][f"|{angle}|"] = {**score.__dict__, "knn_r2": knn.r2, "knn_r": knn.r}
    return out


def _probe_mi(args: argparse.Namespace, fit_t: Any, fit_v: Any, test_t: Any, test_v: Any) -> float:
    """I(a; ridge(z)) on the test faces with the importance table's estimator (KSG, same k and seed):
    a second lower bound of I(a; z), comparable number for number with I(a; â)."""
    from facexplain.attributes.importance import mutual_information

    pred, observed, _ = linear_predictions(fit_t, fit_v, test_t, test_v)
    if pred.shape[0] < args.k + 2:
        return math.nan
    return mutual_information(observed, pred, estimator="knn", k=args.k, seed=args.seed).mi


def _slack(rows: list[Any], probe: dict[str, Any]) -> dict[str, Any]:
    """How loose the decoder's bound I(a; â) <= I(a; z) is, as far as the ridge probe can show.

    Both I(a; â) and I(a; ridge(z)) are lower bounds of I(a; z) (each is a function of z), so
    ``max(0, I(a; ridge(z)) - I(a; â))`` is a lower bound of the slack: information the template
    provably holds that the decoded face does not show. It says nothing where the probe finds less than
    the decoder (a non-linear code the ridge cannot read); "beyond the interval" marks attributes whose
    probe value lies above the decoder estimate's upper interval end, so sampling noise cannot explain it.
    """
    per: dict[str, Any] = {}
    for r in rows:
        pm = probe["attributes"].get(r.attribute, {}).get("probe_mi")
        if pm is None or not math.isfinite(pm) or not math.isfinite(r.mi):
            continue
        per[r.attribute] = {
            "decoded_mi": r.mi,
            "decoded_ci_high": r.ci_high,
            "probe_mi": pm,
            "slack_at_least": max(0.0, pm - r.mi),
            "beyond_interval": bool(pm > r.ci_high),
        }
    beyond = sorted((a for a, v in per.items() if v["beyond_interval"]), key=lambda a: -per[a]["slack_at_least"])
    return {
        "attributes": per,
        "compared": len(per),
        "probe_above_decoder": sum(1 for v in per.values() if v["slack_at_least"] > 0),
        "beyond_interval": beyond,
        "mean_slack_at_least": float(np.mean([v["slack_at_least"] for v in per.values()])) if per else math.nan,
    }


def _mirror_cosine(ctx: Any, idx: np.ndarray, batch_size: int) -> dict[str, float]:
    """How alike the model finds a face and its mirror image, next to two photos of one person
    (:mod:`facexplain.metrics.invariance`): a model that finds the first at least as alike cannot keep
    the sign of yaw or roll in its templates."""
    chips = ctx.faces.chips[idx]
    with torch.no_grad():
        flipped = torch.cat(
            [
                ctx.pipeline.embed_chips(torch.flip(chips[s : s + batch_size], dims=[-1]).float()).float().cpu()
                for s in range(0, len(idx), batch_size)
            ]
        )
    m = mirror_invariance(ctx.faces.templates[idx].numpy(), flipped.numpy(), [ctx.faces.identities[i] for i in idx])
    return {
        "face_vs_mirror_cosine_mean": m.mirror_cosine_mean,
        "face_vs_mirror_cosine_min": m.mirror_cosine_min,
        "same_person_other_photo_cosine_mean": m.same_person_cosine_mean,
    }


def _bar(total: int) -> Any:
    bar = tqdm(total=total, desc="recover", unit="face")

    def update(done: int, _total: int) -> None:
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    return update


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--registry", default="", help="MLflow URI (default $FACEXPLAIN_REGISTRY_URI or :5000)")
    ap.add_argument("--fr-model", default="facexplain-fr-dlib128@champion")
    ap.add_argument("--decoder", default="facexplain-dfd-dlib128@champion")
    ap.add_argument("--compare", default="", help="a second FR model NAME@ALIAS (needs --compare-decoder)")
    ap.add_argument("--compare-decoder", default="")
    ap.add_argument("--probes", default="facexplain-probes-faceapi@champion", help="accessory probes ('' = none)")
    ap.add_argument("--data", default=CELEBA)
    ap.add_argument("--faceset", default="", help="a face set .npz instead of --data")
    ap.add_argument("--split-seed", type=int, default=-1, help="A/B split seed (default: the decoder's)")
    ap.add_argument("--n", type=int, default=400, help="test-identity faces (0 = all)")
    ap.add_argument("--bootstrap", type=int, default=50, help="half-sample resamples for the intervals")
    ap.add_argument("--k", type=int, default=3, help="KSG neighbours")
    ap.add_argument("--permutations", type=int, default=20, help="shuffles of the control (mean and p-value)")
    ap.add_argument("--probe-train", type=int, default=1500, help="training-identity faces for the template probe")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default="", help="result stem (default bench/results/attributes-importance-<dev>)")
    args = ap.parse_args()
    if bool(args.compare) != bool(args.compare_decoder):
        ap.error("--compare and --compare-decoder go together")
    if args.threads:
        torch.set_num_threads(args.threads)
    uri = args.registry or os.environ.get("FACEXPLAIN_REGISTRY_URI", "") or "http://127.0.0.1:5000"
    args.registry = uri
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    args.device = str(device)
    probes, probes_info = _probes(args.probes, uri, device)

    models = [(args.fr_model, args.decoder)] + ([(args.compare, args.compare_decoder)] if args.compare else [])
    results = [_one_model(args, fr, dec, probes) for fr, dec in models]

    stem = Path(args.out) if args.out else RESULTS / f"attributes-importance-{device.type}"
    labels = [f"{r['context']['fr_model']['name']} v{r['context']['fr_model']['version']}" for r in results]
    tables = [(lab, r.pop("_rows")) for lab, r in zip(labels, results, strict=True)]
    write_compare_csv(tables, stem.with_suffix(".csv"))
    importance_chart(tables, stem.with_suffix(".png"), title=f"I(a; â) on unseen identities, seed {args.seed}")
    payload = {
        "machine": machine(),
        "config": {k: v for k, v in vars(args).items()},
        "probes": probes_info,
        "estimator": "KSG k-NN (Kraskov et al. 2004, alg. 1); plug-in for categorical attributes",
        "models": dict(zip(labels, results, strict=True)),
        "files": [str(stem.with_suffix(".csv")), str(stem.with_suffix(".png"))],
    }
    path = write(stem.name, payload)
    print(f"wrote {path}")
    for lab, r in zip(labels, results, strict=True):
        c = r["checks"]
        print(
            f"{lab}: {c['finite']}/{c['attributes']} attributes, smallest MI {c['smallest_mi']:.3f}, "
            f"largest control {c['largest_control_mi']:.3f}, reproducible {c['reproducible_same_seed']}"
        )
        for name, v in c["at_or_below_control"].items():
            print(f"  at/below control: {name} {v['mi']:.3f} (template R² linear {v['linear_r2']}, k-NN {v['knn_r2']})")
        top = sorted(payload["models"][lab]["rows"], key=lambda d: -d["mi"] if math.isfinite(d["mi"]) else 1e9)[:10]
        print("  top 10:", ", ".join(f"{d['attribute']} {d['mi']:.2f}" for d in top))
        probe, mirror = payload["models"][lab]["template_probe"]["attributes"], payload["models"][lab]["mirror"]
        print(
            "  template probe R² (held-out identities): "
            + ", ".join(
                f"{a} {probe[a]['r2']:.2f} (k-NN {probe[a]['knn_r2']:.2f})"
                for a in ("yaw", "|yaw|", "pitch", "roll", "age")
                if a in probe
            )
            + f"; face vs mirror cosine {mirror['face_vs_mirror_cosine_mean']:.3f} "
            f"(same person, other photo {mirror['same_person_other_photo_cosine_mean']:.3f})"
        )
        g = c["gate"]
        print(
            f"  gate over carried attributes (probe R² > {g['min_r2']}): {'met' if g['passed'] else 'NOT met'}; "
            f"{len(g['carried'])} carried, smallest {g['smallest_carried']} {g['smallest_carried_mi']:.3f} vs control "
            f"{g['largest_control_mi']:.3f}; at/below control {g['below_or_at_control']}; not carried "
            + ", ".join(f"{a} (R² {r2:.2f})" for a, r2 in g["not_carried"].items())
        )
        sl = payload["models"][lab]["slack"]
        print(
            f"  slack of I(a; â) <= I(a; z): probe above decoder on {sl['probe_above_decoder']}/{sl['compared']}, "
            f"beyond the interval on {len(sl['beyond_interval'])}: "
            + ", ".join(f"{a} +{sl['attributes'][a]['slack_at_least']:.2f}" for a in sl["beyond_interval"][:10])
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
