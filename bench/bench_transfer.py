"""Transfer of PGD counterfactuals from the default model to an independent FR model (HSE FaceRes, or
faceplugin's MobileFaceNet with ``--model faceplugin``).

    python bench/bench_transfer.py [--model hse|faceplugin] [--pairs 48] [--eps 2,4,8] [--steps 20] [--threads 2]

``bench_attacks.py`` measured "transfer" to dlib's own descriptor, which is the network the default
model ports (cosine 0.9997): a fidelity check, not transfer. Here the target is HSE FaceRes
(``facexplain-fr-hsefaceres1024``: another architecture, training set and loss), a real black box: it
receives 8-bit images, never gradients, and places its own landmarks and five-point alignment on the
attacked chip (the chip as the face box, as ``bench_second_judge.chip_templates`` does with decoded
faces), so the default model's alignment is not handed to it.

Pairs: disjoint genuine CelebA pairs in identity-hash order (``bench_attacks.genuine_pairs``; nothing
is fitted), those the default model accepts clean. Attack: PGD L-inf dodging on the default model (white
box), ``--steps`` steps, seeded random start, no early stop, at each epsilon. Target decision: the
attacked probe's HSE template against HSE's template of the partner's (clean) chip, under HSE's stored
cosine rule. A pair counts for the target only when HSE accepts it clean. Control: uniform random sign
noise of the same epsilon, so that what transfers is the attack's direction, not any perturbation of
that size. With ``--model faceplugin`` the target is ``facexplain-fr-faceplugin512`` (a 512-d ArcFace-style
MobileFaceNet, the model whose impostor scores correlate least with the default's), treated the same way;
"HSE" above then reads as that model.

Writes ``bench/results/transfer-cpu.json`` (hse) or ``bench/results/transfer-faceplugin-cpu.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bench_attacks import batched, genuine_pairs  # noqa: E402
from bench.bench_second_judge import chip_templates  # noqa: E402
from bench.common import machine, write  # noqa: E402
from facexplain.artifacts.embedder import second_fr_pipeline, third_fr_pipeline  # noqa: E402
from facexplain.attacks import AttackBudget, VerificationObjective, chip_embedder, pgd, quantise  # noqa: E402
from facexplain.data.faceset import FaceSet  # noqa: E402
from facexplain.metrics.verification import DLIB_L2_RULE  # noqa: E402
from facexplain.models.recognition import FaceRecognitionNet  # noqa: E402

DEFAULT_FACESET = REPO / "var" / "cache" / "facesets" / "2be8f59408ed551d7d90d093.npz"


# --model -> (the target's pipeline, what it is, results file)
TARGETS = {
    "hse": (second_fr_pipeline, "HSE FaceRes", "transfer-cpu"),
    "faceplugin": (third_fr_pipeline, "faceplugin's MobileFaceNet", "transfer-faceplugin-cpu"),
}


class HseTarget:
    """An independent model (HSE FaceRes by default) as a black box over [0, 1] chips: 8-bit images in,
    templates out (no gradients)."""

    def __init__(self, model: str = "hse") -> None:
        self.pipe = TARGETS[model][0]("cpu")
        self.rule = self.pipe.info.rule

    def __call__(self, chips01: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [chip_templates(self.pipe, quantise(chips01[s : s + 16].cpu())) for s in range(0, len(chips01), 16)]
        )


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a, b, dim=1)


def _target_rates(target: HseTarget, clean: torch.Tensor, adv: torch.Tensor, refs: torch.Tensor) -> dict[str, Any]:
    found = ~clean.isnan().any(1) & ~adv.isnan().any(1) & ~refs.isnan().any(1)
    before = target.rule.accepts(clean, refs) & found
    after = target.rule.accepts(adv, refs) & found
    eligible = before  # accepted clean, faces found everywhere
    flipped = eligible & ~after
    n = int(eligible.sum())
    return {
        "eligible": n,
        "flipped": int(flipped.sum()),
        "success_rate": float(flipped.sum()) / n if n else None,
        "missed_after_attack": int(adv.isnan().any(1).sum()),
        "cosine_before_mean": float(_cos(clean, refs)[eligible].mean()) if n else None,
        "cosine_after_mean": float(_cos(adv, refs)[eligible].mean()) if n else None,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--faceset", type=Path, default=DEFAULT_FACESET)
    p.add_argument("--pairs", type=int, default=48)
    p.add_argument("--eps", default="2,4,8", help="L-inf budgets in 1/255")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--model", choices=sorted(TARGETS), default="hse", help="the independent target model")
    args = p.parse_args()
    _, label, results = TARGETS[args.model]
    if args.threads:
        torch.set_num_threads(args.threads)
    t_all = time.perf_counter()

    fs = FaceSet.load(args.faceset)
    embed = chip_embedder(FaceRecognitionNet.from_faceapi())
    pairs = genuine_pairs(fs, 10**9)
    gi = torch.tensor(pairs[: args.pairs * 3])  # enough candidates for --pairs accepted clean
    x_a = fs.chips[gi[:, 0]].float().div(255)
    x_b = fs.chips[gi[:, 1]].float().div(255)
    with torch.no_grad():
        t_a, t_b = embed(x_a), embed(x_b)
    ok = DLIB_L2_RULE.accepts(t_a, t_b)
    keep = ok.nonzero().flatten()[: args.pairs]
    probe, refs = x_a[keep], t_b[keep]
    target = HseTarget(args.model)
    hse_refs = target(x_b[keep])
    hse_clean = target(probe)
    out: dict[str, Any] = {
        "benchmark": f"PGD L-inf dodging on the default model, judged on {label} (independent, black box)",
        "target_model": target.pipe.info.name,
        "machine": machine(),
        "faceset": {"path": str(args.faceset), "faces": len(fs), "identities": len(set(fs.identities))},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "pairs": {"candidates": len(gi), "accepted_clean_by_default": int(ok.sum()), "attacked": len(keep)},
        "target_rule": {"metric": target.rule.metric, "threshold": target.rule.threshold},
        "by_epsilon": {},
    }
    gen = torch.Generator().manual_seed(args.seed)
    for e in [int(v) for v in args.eps.split(",")]:
        eps = e / 255
        t0 = time.perf_counter()
        res = batched(
            pgd,
            embed,
            len(keep),
            args.batch,
            probe,
            refs,
            objective=VerificationObjective(DLIB_L2_RULE, "dodge"),
            budget=AttackBudget(eps, steps=args.steps),
            seed=args.seed,
            early_stop=False,
        )
        adv = quantise(res.adversarial)
        with torch.no_grad():
            white = ~DLIB_L2_RULE.accepts(embed(adv), refs)
        noise = (probe + eps * torch.sign(torch.rand(probe.shape, generator=gen) - 0.5)).clamp(0, 1)
        row = {
            "epsilon": f"{e}/255",
            "white_box_success_rate_8bit": float(white.float().mean()),
            "target": _target_rates(target, hse_clean, target(adv), hse_refs),
            "target_random_sign_noise": _target_rates(target, hse_clean, target(quantise(noise)), hse_refs),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        out["by_epsilon"][f"{e}/255"] = row
        print(row, flush=True)
    out["seconds_total"] = round(time.perf_counter() - t_all, 1)
    print("wrote", write(results, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
