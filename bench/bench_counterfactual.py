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


def load_decoder(args: argparse.Namespace, device: str) -> tuple[LoadedDecoder, dict[str, Any]]:
    if args.decoder_bundle:
        dec = load_decoder_bundle(Path(args.decoder_bundle), device)
        return dec, {"bundle": str(args.decoder_bundle), "fr_model": f"{dec.fr_name}@{dec.fr_version}"}
    from registry import Registry

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


def main() -> None:
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
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    t_all = time.perf_counter()

    from facexplain.attributes.defaults import default_catalog

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
    out: dict[str, Any] = {
        "machine": machine(),
        "faceset": {"path": str(args.faceset), "faces": len(fs)},
        "decoder": decoder_ref,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "pairs": {"genuine_accepted": len(genuine), "impostor_rejected": len(impostors)},
    }

    def attack(method: str, pairs: list[tuple[int, int]], goal: str) -> tuple[AttackResult, float]:
        a = torch.tensor([q[0] for q in pairs], device=dev)
        b = torch.tensor([q[1] for q in pairs], device=dev)
        obj = VerificationObjective(rule, goal)  # type: ignore[arg-type]
        t = time.perf_counter()
        if method == "pgd":
            budget = AttackBudget(8 / 255, steps=args.pgd_steps, random_start=True)
            r = batched(
                pgd, embed, len(pairs), args.batch, x[a], templates[b], objective=obj, budget=budget, seed=args.seed
            )
        else:
            budget = AttackBudget(
                20.0, steps=args.cw_steps, norm="l2", restarts=args.cw_rounds - 1, step_size=args.cw_lr
            )
            r = batched(
                cw_l2, embed, len(pairs), args.batch, x[a], templates[b], objective=obj, budget=budget,
                initial_const=args.cw_c, seed=args.seed,
            )  # fmt: skip
        return r, time.perf_counter() - t

    results: dict[str, dict[str, Any]] = {}
    tables: dict[str, list[Explanation]] = {}
    ga = torch.tensor([q[0] for q in genuine], device=dev)
    gb = torch.tensor([q[1] for q in genuine], device=dev)
    for method in ("pgd", "cw"):
        r, sec = attack(method, genuine, "dodge")
        with torch.no_grad():
            z_adv = embed(r.adversarial)
        t = time.perf_counter()
        tables[method] = [
            explain_counterfactual(decoder.decode, catalog, templates[ga[i]], templates[gb[i]], z_adv[i])
            for i in range(len(genuine))
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
            "top_median": median_ranking(tables[method], args.top),
        }
        results[method]["_result"] = r
        print(method, {k: v for k, v in results[method].items() if not k.startswith("_")}, flush=True)

    # agreement of the two families
    per_pair = [topk_overlap(a.rows, b.rows, args.top) for a, b in zip(tables["pgd"], tables["cw"], strict=True)]
    flipped_both = (results["pgd"]["_result"].flipped & results["cw"]["_result"].flipped).cpu().tolist()
    both = [o for o, f in zip(per_pair, flipped_both, strict=True) if f]
    agg = topk_overlap(results["pgd"]["top_median"], results["cw"]["top_median"], args.top)
    out["agreement"] = {
        "k": args.top,
        "pairs": len(per_pair),
        "pairs_flipped_by_both": len(both),
        "count_mean": float(np.mean([o.count for o in both])) if both else None,
        "count_median": float(np.median([o.count for o in both])) if both else None,
        "jaccard_mean": float(np.mean([o.jaccard for o in both])) if both else None,
        "counts": [o.count for o in per_pair],
        "median_ranking_overlap": {"count": agg.count, "jaccard": agg.jaccard, "common": list(agg.common)},
    }
    print("agreement", out["agreement"], flush=True)

    # determinism: the PGD attack on the same batch under the same seed, and the tables, again (an item's
    # random start depends on its place in the batch, so the batch is the same as above)
    r2, _ = attack("pgd", genuine, "dodge")
    with torch.no_grad():
        z2 = embed(r2.adversarial)
    again = [
        explain_counterfactual(decoder.decode, catalog, templates[ga[i]], templates[gb[i]], z2[i])
        for i in range(min(3, len(genuine)))
    ]
    out["determinism"] = {
        "pgd_tables_identical_on_rerun": all(
            table_key(a) == table_key(b) for a, b in zip(again, tables["pgd"], strict=False)
        ),
        "pairs_checked": len(again),
    }
    print("determinism", out["determinism"], flush=True)

    # the decoder as a defence
    ia = torch.tensor([q[0] for q in impostors], device=dev)
    ib = torch.tensor([q[1] for q in impostors], device=dev)
    labels = np.r_[np.ones(len(genuine), bool), np.zeros(len(impostors), bool)]
    refs = torch.cat([templates[gb], templates[ib]])
    clean_t = torch.cat([templates[ga], templates[ia]])
    _, clean_def = decode_and_reembed(clean_t, decoder.decode, lambda c: net(c.to(dev)), 150)
    defence: dict[str, Any] = {}
    for method in ("pgd", "cw"):
        imp_r, sec = attack(method, impostors, "impersonate")
        with torch.no_grad():
            adv_t = torch.cat([embed(results[method]["_result"].adversarial), embed(imp_r.adversarial)])
        _, adv_def = decode_and_reembed(adv_t, decoder.decode, lambda c: net(c.to(dev)), 150)
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
    out["defence"] = defence
    out["results"] = {m: {k: v for k, v in d.items() if not k.startswith("_")} for m, d in results.items()}
    out["seconds_total"] = round(time.perf_counter() - t_all, 1)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")
        path = args.out
    else:
        path = write(args.name or f"counterfactual-{dev.type}", out)
    print("wrote", path)


if __name__ == "__main__":
    main()
