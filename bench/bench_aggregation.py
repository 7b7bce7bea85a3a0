"""DFD §4.4: verification against the number of templates aggregated per identity, and decoded centroids.

Templates of the default model (``FacePipeline.default()``, the weights ``facexplain-fr-dlib128`` v1
registers) on the CelebA subset; the face set is the cached one the other benches build (``--faceset``
names an .npz, else it is built or found under var/cache/facesets). Writes
bench/results/aggregation-<device>.json and, beside it, a PNG of decoded identity centroids.

* **curve**: :func:`facexplain.metrics.aggregation.aggregation_curve` over every identity with at least
  ``max(n) + 1`` faces, n = 1, 2, 4, ... (``--max-n``), ``--repeats`` seeded draws each: TAR and FAR at
  the model's own rule (dlib's L2 < 0.6; the threshold is not refitted per n) and AUC;
* **centroids**: for identities the shipped decoder never trained on (its held-out test identities,
  ``split_identities`` with the decoder's training seed), a single photo's template and the identity's
  normalised mean template are decoded; each decoding is re-embedded and compared (cosine, rule) with
  the identity's photos that did not enter the mean, so a better score says the centroid decodes to a
  face nearer the *person* than one photo's decoding does.

Usage: ``nice -n 15 .venv/bin/python -m bench.bench_aggregation [--faceset var/cache/facesets/X.npz]``
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import RESULTS, machine, write
from facexplain.artifacts.decoder import load_decoder_bundle
from facexplain.data.faceset import FaceSet, build_faceset, records_from_spec
from facexplain.data.splits import split_identities
from facexplain.directions.aggregate import mean_template
from facexplain.metrics.aggregation import aggregation_curve, largest_n, powers_of_two
from facexplain.metrics.reconstruction import embed_images
from facexplain.paths import var_dir
from facexplain.pipeline import DEFAULT_FR_KEY, FacePipeline
from facexplain.viz import pairs_grid, save_png

CELEBA = "../shared/data/celeba_subset"
DECODER = Path(__file__).resolve().parent.parent / "models" / "facexplain-dfd-dlib128" / "1" / "bundle"


def centroids(
    faces: FaceSet, pipeline: FacePipeline, decoder_dir: Path, n_ids: int, seed: int
) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """Decode one photo's template and the mean of the others, per held-out identity; judge both."""
    decoder = load_decoder_bundle(decoder_dir)
    training = decoder.meta.get("training") or {}
    side = split_identities(faces.identities, test_fraction=0.2, val_fraction=0.1, seed=int(training.get("seed", 0)))
    ids = np.asarray(faces.identities)
    test = sorted({i for i in faces.identities if side[i] == "test" and int((ids == i).sum()) >= 6})
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(test, size=min(n_ids, len(test)), replace=False).tolist())
    rule = pipeline.info.rule
    x = faces.templates.double()
    rows, singles, means = [], [], []
    for name in chosen:
        idx = rng.permutation(np.flatnonzero(ids == name))
        single, pool, judges = idx[0], idx[1 : 1 + len(idx) // 2], idx[1 + len(idx) // 2 :]
        # the judges are photos in neither the single nor the mean
        mean = mean_template(x[pool.tolist()], normalize_inputs=True)
        with torch.no_grad():
            images = decoder.decode(torch.stack([x[single], mean]).float())
        t = embed_images(pipeline.embed_chips, images, pipeline.info.chip_size).double()
        j = x[judges.tolist()]
        row: dict[str, Any] = {"identity": name, "mean_of": len(pool), "judges": len(judges)}
        for key, k in (("single", 0), ("centroid", 1)):
            row[f"{key}_identity_cosine"] = float(F.cosine_similarity(t[k][None], j, dim=1).mean())
            row[f"{key}_accepted"] = float(rule.accepts(t[k][None].expand_as(j), j).double().mean())
        rows.append(row)
        singles.append(images[0])
        means.append(images[1])
    summary = {
        k: float(np.mean([r[k] for r in rows]))
        for k in ("single_identity_cosine", "centroid_identity_cosine", "single_accepted", "centroid_accepted")
    }
    return (
        {"identities": rows, "summary": summary, "decoder": str(decoder_dir.parent.parent.name)},
        torch.stack(singles),
        torch.stack(means),
    )


def default_model_faceset(data: str, faceset: str, pipeline: FacePipeline) -> FaceSet:
    """``faceset`` when given, else the default model's face set of ``data`` (built once, then cached)."""
    if faceset:
        return FaceSet.load(Path(faceset))
    root, records, names = records_from_spec(data)
    return build_faceset(
        root, records, pipeline, fr_key=DEFAULT_FR_KEY, label_names=names, cache_dir=var_dir() / "cache" / "facesets"
    )


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=CELEBA)
    ap.add_argument("--faceset", default="", help="a face set .npz of the default model (else built/cached)")
    ap.add_argument("--decoder", default=str(DECODER), help="decoder bundle folder for the centroid pictures")
    ap.add_argument("--max-n", type=int, default=16, help="largest n aggregated (capped by the data)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--centroid-ids", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    pipeline = FacePipeline.default()
    faces = default_model_faceset(args.data, args.faceset, pipeline)
    max_n = min(args.max_n, largest_n(faces.identities))
    ns = powers_of_two(max_n)
    rule = pipeline.info.rule
    curve = aggregation_curve(faces.templates, faces.identities, ns, rule, seed=args.seed, repeats=args.repeats)
    cent, singles, means = centroids(faces, pipeline, Path(args.decoder), args.centroid_ids, args.seed)
    picture = RESULTS / "aggregation-cpu.png"
    save_png(pairs_grid(singles, means, ncol=len(singles)), picture)
    payload = {
        "bench": "aggregation",
        "paper": "DFD §4.4 (Fig. 16): verification vs the number of aggregated templates; decoded centroids",
        "machine": machine(),
        "data": {k: faces.meta.get(k) for k in ("manifest_sha256", "faces", "root", "fr_key")},
        "rule": {"metric": rule.metric, "threshold": rule.threshold, "accept_below": rule.accept_below},
        "aggregation": "normalised mean (facexplain.directions.aggregate.mean_template, normalize_inputs=True)",
        "seed": args.seed,
        "repeats": args.repeats,
        "curve": [p.as_dict() for p in curve],
        "centroids": cent,
        "centroids_png": picture.name,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    path = write("aggregation-cpu", payload)
    for p in curve:
        print(f"n={p.n:2d}  TAR {p.tar:.3f}  FAR {p.far:.4f}  AUC {p.auc:.4f}  ({p.identities} ids)")
    print(cent["summary"])
    print(f"-> {path}")


if __name__ == "__main__":
    main()
