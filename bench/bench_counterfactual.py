"""Counterfactual explanations on CelebA genuine pairs: do PGD and CW agree on s_a? Does the decoder defend?

    python bench/bench_counterfactual.py [--registry http://127.0.0.1:5000] [--decoder facexplain-dfd-dlib128@champion]
        [--decoder-bundle DIR] [--pairs 20] [--impostors 20] [--threads 1] [--device cpu]

Pairs: the label-stratified CelebA face set (var/cache/facesets/<key>.npz, as bench_attacks.py), genuine
pairs the default model accepts (dodging) and impostor pairs it rejects (impersonation), chosen by hash.
The decoder is the registered one (``NAME@ALIAS`` in ``--registry``, downloaded to var/models) or a
bundle folder (``--decoder-bundle``, e.g. the demo decoder of ``facexplain train decoder --preset demo``).

Reports (Ren et al. §III-D, DFD §4.3.3 / Fig. 13):
- s_a tables for PGD L-inf 8/255 and CW-L2 counterfactuals of each genuine pair (full default catalogue
  without accessories, decoded with the decoder), and their agreement: per pair, the overlap of the two
  top-10 lists (count and Jaccard); over the set, the overlap of the top-10 by median s_a;
- determinism: PGD re-run on the same batch under the same seed, the first tables recomputed;
- the decoder as a defence: ROC AUC of clean, attacked, attacked + decoded and clean + decoded pairs
  (genuine pairs dodged, impostor pairs impersonated), and the attack success rate with and without it,
  for PGD and for CW.
Writes bench/results/counterfactual-<device>.json (``--name`` overrides the file name, ``--out`` the path).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bench_attacks import DEFAULT_FACESET, batched, genuine_pairs, impostor_pairs  # noqa: E402
from bench.common import machine, write  # noqa: E402
from facexplain.artifacts.decoder import LoadedDecoder, load_decoder_bundle  # noqa: E402
from facexplain.attacks import AttackBudget, AttackResult, VerificationObjective, chip_embedder, cw_l2, pgd  # noqa: E402
from facexplain.attributes.defaults import default_catalog  # noqa: E402
from facexplain.counterfactual import (  # noqa: E402
    Explanation,
    decode_and_reembed,
    defence_summary,
    explain_counterfactual,
    topk_overlap,
)
from facexplain.data.faceset import FaceSet  # noqa: E402
from facexplain.metrics.verification import DLIB_L2_RULE  # noqa: E402
from facexplain.models.recognition import FaceRecognitionNet  # noqa: E402
from registry import Registry  # noqa: E402


def load_decoder(args: argparse.Namespace, device: str) -> tuple[LoadedDecoder, dict[str, Any]]:
    if args.decoder_bundle:
        dec = load_decoder_bundle(Path(args.decoder_bundle), device)
        return dec, {"bundle": str(args.decoder_bundle), "fr_model": f"{dec.fr_name}@{dec.fr_version}"}

    name, _, alias = args.decoder.partition("@")
    registry = Registry(args.registry, timeout_s=30)
    info = registry.resolve(name, alias or "champion")
    path = registry.download(info, args.cache_dir)
    dec = load_decoder_bundle(path, device)
    return dec, {
        "registry": args.registry,
        "name": info.name,
        "version": info.version,
        "alias": alias or "champion",
        "fr_model": f"{dec.fr_name}@{dec.fr_version}",
    }


def median_ranking(tables: list[Explanation], k: int) -> list[str]:
    """Attributes by their median s_a over pairs (NaN ignored; inf counts as largest), top k."""
    values: dict[str, list[float]] = {}
    for ex in tables:
        for r in ex.rows:
            if not math.isnan(r.s_a):
                values.setdefault(r.attribute, []).append(r.s_a)
    med = {a: statistics.median(v) for a, v in values.items() if len(v) >= max(1, len(tables) // 2)}
    return sorted(med, key=lambda a: (-med[a], a))[:k]


def table_key(ex: Explanation) -> list[tuple[str, float, float]]:
    return [(r.attribute, r.s_a, r.delta) for r in ex.rows]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--faceset", type=Path, default=DEFAULT_FACESET)
    p.add_argument("--registry", default="http://127.0.0.1:5000")
    p.add_argument("--decoder", default="facexplain-dfd-dlib128@champion", help="NAME@ALIAS in --registry")
    p.add_argument("--cache-dir", type=Path, default=REPO / "var" / "models", help="where registry versions are kept")
    p.add_argument("--decoder-bundle", default="", help="a decoder bundle folder instead of the registry")
    p.add_argument("--pairs", type=int, default=20)
    p.add_argument("--impostors", type=int, default=20)
    p.add_argument("--pgd-steps", type=int, default=10)
    p.add_argument("--cw-steps", type=int, default=100)
    p.add_argument("--cw-rounds", type=int, default=4)
    p.add_argument("--cw-c", type=float, default=1.0)
    p.add_argument("--cw-lr", type=float, default=0.01)
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--name", default="", help="result file name (default counterfactual-<device>)")
    p.add_argument("--out", type=Path, default=None, help="write the JSON here instead of bench/results/")
    return p


@dataclass
class _Bench:
    """The decoder, the attribute catalogue, the surrogate FR model and the pairs every stage uses."""

    args: argparse.Namespace
    dev: torch.device
    decoder: LoadedDecoder
    catalog: Any
    net: FaceRecognitionNet
    embed: Any
    x: torch.Tensor  # every chip in [0, 1]
    templates: torch.Tensor
    rule: Any
    genuine: list[tuple[int, int]]  # accepted clean: dodging has a decision to flip
    impostors: list[tuple[int, int]]  # rejected clean: impersonation has a decision to flip

    def index(self, pairs: list[tuple[int, int]], side: int) -> torch.Tensor:
        return torch.tensor([q[side] for q in pairs], device=self.dev)


def main() -> None:
    """Attack genuine pairs (PGD, CW) and explain each flip; then how far the two attack families agree,
    whether the tables are reproducible, and how well the decoder works as a defence."""
    args = _parser().parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    t_all = time.perf_counter()
    b, decoder_ref = _load(args, dev)
    out: dict[str, Any] = {
        "machine": machine(),
        "faceset": {"path": str(args.faceset), "faces": len(b.x)},
        "decoder": decoder_ref,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "pairs": {"genuine_accepted": len(b.genuine), "impostor_rejected": len(b.impostors)},
    }
    results, tables = _explain_dodges(b)
    out["agreement"] = _agreement(b, results, tables)
    print("agreement", out["agreement"], flush=True)
    out["determinism"] = _determinism(b, tables)
    print("determinism", out["determinism"], flush=True)
    out["defence"] = _defence(b, results)
    out["results"] = {m: {k: v for k, v in d.items() if not k.startswith("_")} for m, d in results.items()}
    out["seconds_total"] = round(time.perf_counter() - t_all, 1)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")
        path = args.out
    else:
        path = write(args.name or f"counterfactual-{dev.type}", out)
    print("wrote", path)


def _load(args: argparse.Namespace, dev: torch.device) -> tuple[_Bench, dict[str, Any]]:
    """Models, faces, templates, and the pairs whose clean decision an attack can flip."""
    decoder, decoder_ref = load_decoder(args, str(dev))
    catalog = default_catalog(str(dev), None)
    fs = FaceSet.load(args.faceset)
    net = FaceRecognitionNet.from_faceapi().to(dev).eval()
    embed = chip_embedder(net)
    x = fs.chips.float().div(255).to(dev)
    with torch.no_grad():
        templates = torch.cat([embed(x[s : s + 64]) for s in range(0, len(fs), 64)])
    rule = DLIB_L2_RULE
    gen_all = genuine_pairs(fs, 10**9)
    gi = torch.tensor(gen_all)
    acc = rule.accepts(templates[gi[:, 0]], templates[gi[:, 1]]).cpu()
    genuine = [q for q, a in zip(gen_all, acc.tolist(), strict=True) if a][: args.pairs]
    imp_all = impostor_pairs(fs, 10**9)
    ii = torch.tensor(imp_all)
    rej = ~rule.accepts(templates[ii[:, 0]], templates[ii[:, 1]]).cpu()
    impostors = [q for q, r in zip(imp_all, rej.tolist(), strict=True) if r][: args.impostors]
    return _Bench(args, dev, decoder, catalog, net, embed, x, templates, rule, genuine, impostors), decoder_ref


def _attack(b: _Bench, method: str, pairs: list[tuple[int, int]], goal: str) -> tuple[AttackResult, float]:
    """PGD (L-inf 8/255) or CW-L2 on ``pairs``; returns the result and its seconds."""
    args = b.args
    pa, pb = b.index(pairs, 0), b.index(pairs, 1)
    obj = VerificationObjective(b.rule, goal)  # type: ignore[arg-type]
    t = time.perf_counter()
    if method == "pgd":
        budget = AttackBudget(8 / 255, steps=args.pgd_steps, random_start=True)
        r = batched(
            pgd, b.embed, len(pairs), args.batch, b.x[pa], b.templates[pb], objective=obj, budget=budget, seed=args.seed
        )
    else:
        budget = AttackBudget(20.0, steps=args.cw_steps, norm="l2", restarts=args.cw_rounds - 1, step_size=args.cw_lr)
        r = batched(
            cw_l2, b.embed, len(pairs), args.batch, b.x[pa], b.templates[pb], objective=obj, budget=budget,
            initial_const=args.cw_c, seed=args.seed,
        )  # fmt: skip
    return r, time.perf_counter() - t


def _explain_dodges(b: _Bench) -> tuple[dict[str, dict[str, Any]], dict[str, list[Explanation]]]:
    """Per attack family: dodge the genuine pairs, explain every adversarial template, rank the attributes.
    Each family's raw result is kept under ``_result`` for the later stages (not written)."""
    results: dict[str, dict[str, Any]] = {}
    tables: dict[str, list[Explanation]] = {}
    ga, gb = b.index(b.genuine, 0), b.index(b.genuine, 1)
    for method in ("pgd", "cw"):
        r, sec = _attack(b, method, b.genuine, "dodge")
        with torch.no_grad():
            z_adv = b.embed(r.adversarial)
        t = time.perf_counter()
        tables[method] = [
            explain_counterfactual(b.decoder.decode, b.catalog, b.templates[ga[i]], b.templates[gb[i]], z_adv[i])
            for i in range(len(b.genuine))
        ]
        results[method] = {
            "dodge": {
                "success_rate": r.success_rate(),
                "linf_255_mean": float(r.linf.mean() * 255),
                "l2_mean": float(r.l2.mean()),
                "steps_mean": float(r.steps.float().mean()),
                "attack_seconds": round(sec, 2),
                "explain_seconds": round(time.perf_counter() - t, 2),
            },
            "significant_fraction_mean": float(
                np.mean([len(ex.significant()) / max(1, len(ex.rows)) for ex in tables[method]])
            ),
            "top_median": median_ranking(tables[method], b.args.top),
        }
        results[method]["_result"] = r
        print(method, {k: v for k, v in results[method].items() if not k.startswith("_")}, flush=True)
    return results, tables


def _agreement(b: _Bench, results: dict[str, dict[str, Any]], tables: dict[str, list[Explanation]]) -> dict[str, Any]:
    """Top-k overlap of the PGD and CW explanations, over the pairs both families flipped."""
    top = b.args.top
    per_pair = [topk_overlap(p.rows, c.rows, top) for p, c in zip(tables["pgd"], tables["cw"], strict=True)]
    flipped_both = (results["pgd"]["_result"].flipped & results["cw"]["_result"].flipped).cpu().tolist()
    both = [o for o, f in zip(per_pair, flipped_both, strict=True) if f]
    agg = topk_overlap(results["pgd"]["top_median"], results["cw"]["top_median"], top)
    return {
        "k": top,
        "pairs": len(per_pair),
        "pairs_flipped_by_both": len(both),
        "count_mean": float(np.mean([o.count for o in both])) if both else None,
        "count_median": float(np.median([o.count for o in both])) if both else None,
        "jaccard_mean": float(np.mean([o.jaccard for o in both])) if both else None,
        "counts": [o.count for o in per_pair],
        "median_ranking_overlap": {"count": agg.count, "jaccard": agg.jaccard, "common": list(agg.common)},
    }


def _determinism(b: _Bench, tables: dict[str, list[Explanation]]) -> dict[str, Any]:
    """The PGD attack on the same batch under the same seed, and the tables, again (an item's random start
    depends on its place in the batch, so the batch is the same as in ``_explain_dodges``)."""
    ga, gb = b.index(b.genuine, 0), b.index(b.genuine, 1)
    r2, _ = _attack(b, "pgd", b.genuine, "dodge")
    with torch.no_grad():
        z2 = b.embed(r2.adversarial)
    again = [
        explain_counterfactual(b.decoder.decode, b.catalog, b.templates[ga[i]], b.templates[gb[i]], z2[i])
        for i in range(min(3, len(b.genuine)))
    ]
    return {
        "pgd_tables_identical_on_rerun": all(
            table_key(x) == table_key(y) for x, y in zip(again, tables["pgd"], strict=False)
        ),
        "pairs_checked": len(again),
    }


def _defence(b: _Bench, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The decoder as a defence: decode and re-embed clean and adversarial templates (the dodges above and
    fresh impersonations), and compare verification with and without that step."""
    dev, rule, templates = b.dev, b.rule, b.templates
    ga, gb = b.index(b.genuine, 0), b.index(b.genuine, 1)
    ia, ib = b.index(b.impostors, 0), b.index(b.impostors, 1)
    labels = np.r_[np.ones(len(b.genuine), bool), np.zeros(len(b.impostors), bool)]
    refs = torch.cat([templates[gb], templates[ib]])
    clean_t = torch.cat([templates[ga], templates[ia]])
    _, clean_def = decode_and_reembed(clean_t, b.decoder.decode, lambda c: b.net(c.to(dev)), 150)
    defence: dict[str, Any] = {}
    for method in ("pgd", "cw"):
        imp_r, sec = _attack(b, method, b.impostors, "impersonate")
        with torch.no_grad():
            adv_t = torch.cat([b.embed(results[method]["_result"].adversarial), b.embed(imp_r.adversarial)])
        _, adv_def = decode_and_reembed(adv_t, b.decoder.decode, lambda c: b.net(c.to(dev)), 150)
        s = defence_summary(
            rule,
            labels,
            rule.score(clean_t, refs).cpu().numpy(),
            rule.score(adv_t, refs).cpu().numpy(),
            rule.score(adv_def.to(dev), refs).cpu().numpy(),
            scores_clean_defended=rule.score(clean_def.to(dev), refs).cpu().numpy(),
        )
        defence[method] = {
            "auc": s.aucs(),
            "attack_success_rate": s.attack_success_rate,
            "attack_success_rate_with_defence": s.attack_success_rate_with,
            "eligible_pairs": s.n_eligible,
            "impersonation_success_rate": imp_r.success_rate(),
            "impersonation_seconds": round(sec, 2),
        }
        print("defence", method, defence[method], flush=True)
    return defence


if __name__ == "__main__":
    main()
