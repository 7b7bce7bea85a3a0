"""The shipped decoder's reconstructions judged by two FR models: the one it inverts and an independent one.

    python bench/bench_second_judge.py [--model hse|faceplugin] [--per-identity 5] [--max-faces 0] [--threads 2]

Identity scores of reconstructions have so far come from the default model, i.e. from the network the
decoder was trained to invert (its perceptual loss reads that network), which is not an independent
judge. Here the same faces are also judged by an independent model, each model under its own stored rule:
HSE FaceRes (``--model hse``, ``facexplain-fr-hsefaceres1024``: different architecture, training data and
loss; README "A second, independent FR model") or faceplugin's MobileFaceNet (``--model faceplugin``,
``facexplain-fr-faceplugin512``, whose impostor scores correlate least with the default model's). "Second"
below names whichever judges.

Faces: the strict sealed CelebA identities (``data/splits/celeba-sealed.txt`` minus the identities that
judged recipes before the seal), the set the shipped decoder's held-out figures are quoted on. This
bench chooses nothing (no recipe, no epoch), it only adds a judge, so the seal's purpose holds.

Per face, from the original photo: the default pipeline's template t and dlib chip; the decoder's
64-px face dec(t). Then:

* default judge: dec(t) re-embedded in the default chip geometry vs t (what the decoding service's
  ``identity_cosine`` / ``same_person`` report);
* second judge: HSE FaceRes on the decoded face (upscaled, the chip as the face box, then its own
  landmark stages and five-point alignment: :func:`chip_templates`) vs HSE on the original photo (its
  full pipeline, detection included);
* the same second judge with the canonical presentation that decoder training and the audit use
  (:mod:`facexplain.metrics.judge`: the decoded face warped onto HSE's five-point geometry from the
  default chip's mean-face landmarks, no landmark network; rows ``*_canonical``);
* control for the second judge: the original's own dlib chip brought to the decoder's 64 px and
  treated exactly like a decoded face. It separates what the decoder loses from what the crop and the
  resolution alone cost under the second model's front end (a perfect 64-px decoder scores this).

A face where a pipeline finds no face in the original photo counts as not accepted (and is reported). Writes
``bench/results/second-judge-cpu.json`` (hse) or ``bench/results/third-judge-cpu.json`` (faceplugin).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import machine, write  # noqa: E402
from facexplain.artifacts.decoder import load_decoder_bundle  # noqa: E402
from facexplain.artifacts.embedder import (  # noqa: E402
    SECOND_FR_MODEL,
    THIRD_FR_MODEL,
    second_fr_pipeline,
    third_fr_pipeline,
)
from facexplain.data.faces import load_image  # noqa: E402
from facexplain.data.faceset import records_from_spec  # noqa: E402
from facexplain.data.splits import read_identity_list, recipe_evaluation_identities  # noqa: E402
from facexplain.metrics.judge import ChipGeometry, judge_scores, judge_templates  # noqa: E402
from facexplain.metrics.reconstruction import embed_images, resize01  # noqa: E402
from facexplain.pipeline import FacePipeline  # noqa: E402

CELEBA = "../shared/data/celeba_subset"
# --model -> (the judge's pipeline, what it is, default results file)
JUDGES = {
    "hse": (second_fr_pipeline, f"HSE FaceRes ({SECOND_FR_MODEL})", "second-judge-cpu"),
    "faceplugin": (third_fr_pipeline, f"faceplugin's MobileFaceNet ({THIRD_FR_MODEL})", "third-judge-cpu"),
}
SEALED_LIST = REPO / "data" / "splits" / "celeba-sealed.txt"
SHIPPED_DECODER = REPO / "models" / "facexplain-dfd-dlib128" / "1" / "bundle"


def chip_templates(pipe: Any, faces01: torch.Tensor, px: int = 256) -> torch.Tensor:
    """Templates of ``pipe``'s model for faces already cut as dlib chips, in [0, 1]: the chip is upscaled to
    ``px`` and taken as the face box, then the model's own landmark stages and alignment run as on a photo.

    Not the detector: face-api's SSD finds too few of the blurry 64-px decoded faces (3 of 8 in a trial,
    on a grey canvas or without), which would turn a detection failure into an identity verdict. The box
    hardly matters (on sample faces the whole chip and three tighter boxes gave cosines within 0.002)."""
    from facexplain.models.landmarks import landmarks_for_image_boxes
    from facexplain.models.shape_predictor import refine_landmarks

    images = list(F.interpolate(faces01.float(), size=(px, px), mode="bilinear", align_corners=False).clamp(0, 1) * 255)
    index = torch.arange(len(images))
    boxes = torch.tensor([0.0, 0.0, float(px), float(px)]).repeat(len(images), 1)
    with torch.no_grad():
        lms = landmarks_for_image_boxes(pipe.landmark_net, images, index, boxes)
        if pipe.shape_predictor is not None:
            lms = refine_landmarks(pipe.shape_predictor, images, index, lms).float()
        return torch.stack([pipe.template_from_image(im, lm).float().cpu() for im, lm in zip(images, lms, strict=True)])


def _judge(pipe: Any, faces01: torch.Tensor, refs: list[torch.Tensor | None], px: int) -> list[dict[str, Any]]:
    """``pipe``'s template of each chip against the reference template (its photo's), under its stored rule."""
    out: list[dict[str, Any]] = []
    templates = chip_templates(pipe, faces01, px)
    for t, ref in zip(templates, refs, strict=True):
        if ref is None:  # the second model found no face in the original photo
            out.append({"found": False, "cosine": None, "accepted": False})
            continue
        a, b = ref[None].float(), t[None]
        out.append(
            {
                "found": True,
                "cosine": float(F.cosine_similarity(a, b).item()),
                "accepted": bool(pipe.info.rule.accepts(a, b).item()),
            }
        )
    return out


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    cos = [r["cosine"] for r in rows if r["cosine"] is not None]
    return {
        "faces": len(rows),
        "found": sum(r["found"] for r in rows),
        "mean_cosine": float(np.mean(cos)) if cos else None,
        "accepted": float(np.mean([r["accepted"] for r in rows])) if rows else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=CELEBA)
    ap.add_argument("--decoder-bundle", default=str(SHIPPED_DECODER))
    ap.add_argument("--per-identity", type=int, default=5, help="faces per strict sealed identity (0 = all)")
    ap.add_argument("--max-faces", type=int, default=0, help="cap on faces in all (0 = none)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--face-px", type=int, default=256, help="chips upscaled to this size for the second model")
    ap.add_argument("--model", choices=sorted(JUDGES), default="hse", help="the independent judge")
    ap.add_argument("--out", default="", help="results name (default: by --model)")
    args = ap.parse_args()
    make_judge, judge_label, default_out = JUDGES[args.model]
    if args.threads:
        torch.set_num_threads(args.threads)

    sealed = set(read_identity_list(SEALED_LIST))
    _, records, _ = records_from_spec(args.data)
    chose = recipe_evaluation_identities(r.identity for r in records) & sealed
    faces, per_id = [], {}
    for r in sorted((r for r in records if r.identity in sealed - chose), key=lambda r: str(r.path)):
        if args.per_identity and per_id.get(r.identity, 0) >= args.per_identity:
            continue
        per_id[r.identity] = per_id.get(r.identity, 0) + 1
        faces.append(r)
    if args.max_faces:
        faces = faces[: args.max_faces]

    default = FacePipeline.default("cpu")
    second = make_judge("cpu")
    decoder = load_decoder_bundle(args.decoder_bundle)
    source = ChipGeometry.of(default.info)  # where the decoded faces sit: the default model's chip
    rows: dict[str, list[dict[str, Any]]] = {
        k: []
        for k in (
            "default_decoded",
            "second_decoded",
            "second_chip64",
            "second_decoded_canonical",
            "second_chip64_canonical",
        )
    }
    misses: list[str] = []
    t0 = time.perf_counter()
    for start in tqdm(range(0, len(faces), args.batch_size), desc="faces", unit="batch"):
        batch = faces[start : start + args.batch_size]
        photos = [load_image(Path(r.path)) for r in batch]
        found = [(i, res) for i, res in enumerate(default.analyze(photos)) if res is not None]
        misses += [Path(batch[i].path).name for i in range(len(batch)) if i not in {k for k, _ in found}]
        if not found:
            continue
        keep = [i for i, _ in found]
        t = torch.stack([res.template.float().cpu() for _, res in found])
        decoded = decoder.decode(t)
        # default judge: the service's own measure (decoded face re-embedded in the chip geometry)
        t_dec = embed_images(default.embed_chips, decoded, default.info.chip_size)
        for a, b in zip(t, t_dec, strict=True):
            rows["default_decoded"].append(
                {
                    "found": True,
                    "cosine": float(F.cosine_similarity(a[None], b[None]).item()),
                    "accepted": bool(default.info.rule.accepts(a[None], b[None]).item()),
                }
            )
        originals = second.analyze([photos[i] for i in keep])
        refs = [None if r is None else r.template.float().cpu() for r in originals]
        rows["second_decoded"] += _judge(second, decoded, refs, args.face_px)
        chips64 = resize01(torch.stack([res.chip.float().cpu() / 255.0 for _, res in found]), decoder.out_size)
        rows["second_chip64"] += _judge(second, chips64, refs, args.face_px)
        for key, faces01 in (("second_decoded_canonical", decoded), ("second_chip64_canonical", chips64)):
            scores = judge_scores(refs, judge_templates(second, faces01, source), second.info.rule)
            rows[key] += [
                {"found": r is not None, "cosine": None if r is None else float(c), "accepted": bool(a)}
                for r, c, a in zip(refs, scores.cosine.tolist(), scores.accepted.tolist(), strict=True)
            ]
    seconds = time.perf_counter() - t0
    result = {
        "benchmark": f"shipped decoder judged by the default model and by {judge_label} (independent)",
        "judge": second.info.name,
        "machine": machine(),
        "decoder_bundle": str(Path(args.decoder_bundle).resolve().relative_to(REPO)),
        "decoder": {k: decoder.meta.get(k) for k in ("name", "version") if k in decoder.meta}
        | {"fr_model": decoder.meta.get("fr_model"), "out_size": decoder.out_size},
        "second_input": {
            "face_px": args.face_px,
            "box": "the whole chip (no detection)",
            "canonical": "facexplain.metrics.judge: the default chip's mean-face landmarks, no landmark network",
        },
        "second_rule": {"metric": second.info.rule.metric, "threshold": second.info.rule.threshold},
        "data": {
            "spec": args.data,
            "sealed_list": str(SEALED_LIST.relative_to(REPO)),
            "identities": len(per_id),
            "faces": len(faces),
            "per_identity": args.per_identity,
            "left_out_identities": sorted(chose),
            "default_pipeline_misses": misses,
        },
        "seconds": round(seconds, 1),
        "judges": {k: _summary(v) for k, v in rows.items()},
    }
    path = write(args.out or default_out, result)
    print(f"wrote {path}")
    for k, v in result["judges"].items():
        print(f"  {k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
