"""DFD §4.5: validate a soft-biometric privacy modification (remove a label's centroid direction).

Templates of the default model on the CelebA subset (the cached face set, as bench_aggregation), split
by identity as the shipped decoder's training split them: the label direction is found on the training
identities (``centroid_directions``: mean of the label's faces minus the rest's) and the modification
(:func:`facexplain.directions.suppress.remove_direction`) is validated on the decoder's held-out test
identities, which neither the direction nor the decoder saw:

* suppressed: held-out linear probe R² (fitted on original templates, scored on modified ones; and
  refitted on modified ones) and, through the decoder, the label's probe (the shipped accessory probes)
  on faces decoded from original and modified templates: AUC against the CelebA label;
* kept: verification over all pairs of the test faces at the model's rule (TAR / FAR / AUC), and each
  modified template's cosine to its original.

Writes bench/results/privacy-cpu.json. Usage:
``nice -n 15 .venv/bin/python -m bench.bench_privacy --faceset var/cache/facesets/X.npz``
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.bench_aggregation import CELEBA, DECODER, default_model_faceset
from bench.common import machine, write
from facexplain.artifacts.decoder import load_decoder_bundle
from facexplain.artifacts.probes import default_estimator
from facexplain.attributes.defaults import default_catalog
from facexplain.attributes.recovery import recover_dataset
from facexplain.data.faceset import FaceSet
from facexplain.data.splits import split_identities
from facexplain.directions.labels import centroid_directions
from facexplain.directions.suppress import remove_direction
from facexplain.metrics.privacy import attribute_auc, privacy_validation
from facexplain.pipeline import FacePipeline

PROBES = Path(__file__).resolve().parent.parent / "models" / "facexplain-probes-faceapi" / "1" / "bundle"


def one_label(faces: FaceSet, label: str, train: np.ndarray, test: np.ndarray, ctx: dict[str, Any]) -> dict[str, Any]:
    col = faces.label_names.index(label)
    assert faces.labels is not None
    y = faces.labels[:, col].double().numpy()
    x = faces.templates.double()
    found = centroid_directions(x[train.tolist()], [float(v) for v in y[train]])
    d = found.directions[0]
    before = x[test.tolist()]
    after = remove_direction(before, d)
    ids = [faces.identities[i] for i in test]
    rep = privacy_validation(before, after, y[test].tolist(), ids, ctx["rule"], seed=ctx["seed"])
    out: dict[str, Any] = {"label": label, "train_faces": len(train), "direction_norm": float(d.norm())}
    out.update(rep.as_dict())
    # through the decoder: the label's own probe on faces decoded from original / modified templates
    rng = np.random.default_rng(ctx["seed"])
    pick = np.sort(rng.choice(len(test), size=min(ctx["max_decoded"], len(test)), replace=False))
    chips = faces.chips[test[pick].tolist()]
    name = label.lower()
    decoder, catalog = ctx["decoder"], ctx["catalog"]
    _, rec_before = recover_dataset(chips, before[pick.tolist()].float(), decoder.decode, catalog, [name])
    _, rec_after = recover_dataset(chips, after[pick.tolist()].float(), decoder.decode, catalog, [name])
    pb, pa = rec_before[name][:, 0], rec_after[name][:, 0]
    out["decoded"] = {
        "faces": len(pick),
        "estimator": f"accessory probe {name} (models/facexplain-probes-faceapi v1)",
        "auc_before": attribute_auc(pb, y[test][pick]),
        "auc_after": attribute_auc(pa, y[test][pick]),
        "mean_before": float(np.nanmean(pb)),
        "mean_after": float(np.nanmean(pa)),
    }
    return out


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=CELEBA)
    ap.add_argument("--faceset", default="", help="a face set .npz of the default model (else built/cached)")
    ap.add_argument("--decoder", default=str(DECODER))
    ap.add_argument("--probes", default=str(PROBES), help="accessory probe bundle (the label estimators)")
    ap.add_argument("--labels", default="Smiling,Eyeglasses")
    ap.add_argument("--max-decoded", type=int, default=300, help="test faces decoded per label")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    pipeline = FacePipeline.default()
    faces = default_model_faceset(args.data, args.faceset, pipeline)
    decoder = load_decoder_bundle(args.decoder)
    split_seed = int((decoder.meta.get("training") or {}).get("seed", 0))
    side = split_identities(faces.identities, test_fraction=0.2, val_fraction=0.1, seed=split_seed)
    sides = np.array([side[i] for i in faces.identities])
    train, test = np.flatnonzero(sides == "train"), np.flatnonzero(sides == "test")
    ctx = {
        "rule": pipeline.info.rule,
        "seed": args.seed,
        "decoder": decoder,
        "catalog": default_catalog(probes=default_estimator(args.probes)),
        "max_decoded": args.max_decoded,
    }
    results = [one_label(faces, label, train, test, ctx) for label in args.labels.split(",")]
    rule = pipeline.info.rule
    payload = {
        "bench": "privacy",
        "paper": "DFD §4.5: validation of a template modification (label direction removed)",
        "machine": machine(),
        "data": {k: faces.meta.get(k) for k in ("manifest_sha256", "faces", "root", "fr_key")},
        "split": {"seed": split_seed, "train_faces": len(train), "test_faces": len(test)},
        "rule": {"metric": rule.metric, "threshold": rule.threshold, "accept_below": rule.accept_below},
        "seed": args.seed,
        "labels": results,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    path = write("privacy-cpu", payload)
    for r in results:
        vb, va, dec = r["verification_before"], r["verification_after"], r["decoded"]
        print(
            f"{r['label']}: probe R² {r['probe_r2_before']:.3f} -> fixed {r['probe_r2_fixed']:.3f}, refit "
            f"{r['probe_r2_refit']:.3f}; probe AUC {r['probe_auc_before']:.3f} -> fixed {r['probe_auc_fixed']:.3f}, "
            f"refit {r['probe_auc_refit']:.3f}; decoded AUC {dec['auc_before']:.3f} -> {dec['auc_after']:.3f}; "
            f"TAR {vb['tar']:.3f} -> {va['tar']:.3f}, FAR {vb['far']:.4f} -> {va['far']:.4f}, "
            f"AUC {vb['auc']:.4f} -> {va['auc']:.4f}; cosine to original {r['cosine_to_original_mean']:.3f}"
        )
    print(f"-> {path}")


if __name__ == "__main__":
    main()
