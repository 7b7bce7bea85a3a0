"""Landmarks against dlib's front end: the torch shape predictor, the pipeline, and what they cost (issue 2).

    python bench/bench_landmarks.py [--n-celeba 300] [--threads 2] [--device cpu]

Issue 2 asks the torch landmarks to agree with dlib's 68 points to under 3 % of the inter-ocular
distance (mean point error / outer-eye-corner distance, the test's metric). Faces: the first image of
each ORL person and the first ``--n-celeba`` CelebA images (sorted) where dlib's HOG detector finds one
face; dlib's detector box, 68 points and 150-px chip are the reference. Measured:

* **model**: the torch predictor vs dlib's, both on dlib's box: mean error and the share of faces whose
  68 points are identical to dlib's (integer) points;
* **pipeline**: ``FacePipeline`` with its own SSD detector (its detection of dlib's face, IoU >= 0.3):
  face-api's landmark net alone (what the pipeline used before) and dlib's predictor placed by it
  after 1, 2 and 3 passes, and after 2 without the fallback to the seed points (``MAX_SHIFT``); plus
  the cosine of the resulting template to dlib's descriptor of dlib's chip (the same ResNet, so this is
  front-end agreement only);
* **verification**: per landmark stage, pair AUC and the dlib rule's TAR / FAR on the held-apart CelebA
  identities of ``tests/integration/test_verification_quality.py`` (in-process here);
* **box**: ``BOX_FROM_POINTS`` refitted from dlib's boxes and points (the constants the code uses);
* **speed**: faces/s of the torch predictor in batches, face-api's net, and dlib's own predictor.

Result: ``bench/results/landmarks-<device>.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import machine, write  # noqa: E402
from facexplain.data.faces import celeba_records  # noqa: E402
from facexplain.data.splits import held_apart_sample  # noqa: E402
from facexplain.faces.align import align_faces_from_images  # noqa: E402
from facexplain.metrics.verification import DLIB_L2_RULE, pair_scores, roc_auc  # noqa: E402
from facexplain.models.landmarks import landmarks_for_image_boxes  # noqa: E402
from facexplain.models.shape_predictor import (  # noqa: E402
    BOX_FROM_POINTS,
    MAX_SHIFT,
    ShapePredictor68,
    refine_landmarks,
    shape_landmarks,
)
from facexplain.pipeline import FacePipeline, FaceSelection  # noqa: E402
from tests.conftest import shared_data_dir  # noqa: E402
from tests.unit.faces_ref import (  # noqa: E402
    RefFace,
    celeba_faces,
    dlib_descriptors,
    dlib_models,
    load_rgb,
    orl_faces,
    to_tensor,
)

TARGET = 0.03
MIN_IOU = 0.3  # a pipeline detection overlapping dlib's box less than this is another face (or none)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    lo, hi = torch.maximum(a[:2], b[:2]), torch.minimum(a[2:], b[2:])
    inter = float((hi - lo).clamp(min=0).prod())
    return inter / float((a[2:] - a[:2]).prod() + (b[2:] - b[:2]).prod() - inter)


def errors(points: np.ndarray, faces: list[RefFace]) -> np.ndarray:
    ref = np.stack([f.landmarks for f in faces])
    iod = np.linalg.norm(ref[:, 36] - ref[:, 45], axis=1)
    return np.linalg.norm(points - ref, axis=2).mean(axis=1) / iod


def summary(err: np.ndarray) -> dict[str, float]:
    return {
        "mean": round(float(err.mean()), 5),
        "median": round(float(np.median(err)), 5),
        "p95": round(float(np.percentile(err, 95)), 5),
        "max": round(float(err.max()), 5),
        "below_target": round(float((err < TARGET).mean()), 4),
    }


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def refit_box(faces: list[RefFace]) -> dict[str, float]:
    """The medians behind ``BOX_FROM_POINTS``, from dlib's own boxes and points."""
    p = torch.tensor(np.stack([f.landmarks for f in faces]))
    centre = p[:, [36, 45, 30, 48, 54]].mean(1)
    eyes = (p[:, 36:42].mean(1) - p[:, 42:48].mean(1)).norm(dim=1)
    box = torch.tensor([f.box for f in faces], dtype=torch.float64)
    mid = (box[:, :2] + box[:, 2:]) / 2
    return {
        "dx": round(float(((mid[:, 0] - centre[:, 0]) / eyes).median()), 4),
        "dy": round(float(((mid[:, 1] - centre[:, 1]) / eyes).median()), 4),
        "k": round(float(((box[:, 2] - box[:, 0]) / eyes).median()), 4),
    }


def rate(fn: Any, n: int, repeats: int = 3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return round(n / best, 1)


def landmark_variants(
    pipe: FacePipeline, images: list[torch.Tensor], idx: torch.Tensor, boxes: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The landmark stages compared: face-api's net alone, dlib's predictor after 1-3 passes, and the
    default (2 passes) without the fallback to the seed points."""
    predictor = pipe.shape_predictor
    assert predictor is not None
    seed = landmarks_for_image_boxes(pipe.landmark_net, images, idx, boxes)
    out = {"faceapi_net": seed.double()}
    for passes in (1, 2, 3):
        out[f"dlib_predictor_{passes}_pass"] = refine_landmarks(predictor, images, idx, seed, passes)
    never = ShapePredictor68.from_dlib(passes=predictor.passes, max_shift=float("inf"))
    out["dlib_predictor_2_pass_no_fallback"] = refine_landmarks(never, images, idx, seed)
    return out


def templates_of(
    pipe: FacePipeline, images: list[torch.Tensor], idx: torch.Tensor, points: torch.Tensor
) -> torch.Tensor:
    chips = align_faces_from_images(images, idx, points.float(), size=150, padding=0.25)
    with torch.no_grad():
        return pipe.embed_chips(chips).double()


def verification(pipe: FacePipeline, celeba: Path) -> dict[str, Any]:
    """Pair AUC and the dlib rule's TAR / FAR on the held-apart identities of the gRPC quality test
    (40 test-side identities, 6 images each), in-process, per landmark stage."""
    paths, names = held_apart_sample(celeba_records(celeba), n_identities=40, per_identity=6)
    labels = np.array(names)
    images = [to_tensor(load_rgb(p)) for p in paths]
    chosen = [pipe.select(d, FaceSelection.LARGEST) for d in pipe.detect(images)]
    idx = torch.tensor([k for k, c in enumerate(chosen) if c is not None])
    boxes = torch.stack([chosen[k].box for k in idx.tolist()])  # type: ignore[union-attr]
    ids = labels[idx.numpy()]
    out: dict[str, Any] = {"images": len(paths), "faces_found": len(idx)}
    for label, pts in landmark_variants(pipe, images, idx, boxes).items():
        t = templates_of(pipe, images, idx, pts)
        sims, i, j = pair_scores(t, DLIB_L2_RULE)
        genuine = ids[i] == ids[j]
        accepted = DLIB_L2_RULE.accepts(t[i], t[j]).numpy()
        out[label] = {
            "pair_auc": round(float(roc_auc(sims, genuine)), 4),
            "tar_dlib_rule": round(float(accepted[genuine].mean()), 4),
            "far_dlib_rule": round(float(accepted[~genuine].mean()), 4),
        }
    print(
        "verification (pair AUC): " + ", ".join(f"{k} {v['pair_auc']}" for k, v in out.items() if isinstance(v, dict))
    )
    return out


def measure(name: str, faces: list[RefFace], pipe: FacePipeline) -> dict[str, Any]:
    images = [to_tensor(f.image) for f in faces]
    n = len(faces)
    index = torch.arange(n)
    ref = np.stack([f.landmarks for f in faces])
    assert pipe.shape_predictor is not None
    on_box = shape_landmarks(pipe.shape_predictor, images, index, torch.tensor([f.box for f in faces])).numpy()
    rounded = np.floor(on_box + 0.5)
    model = summary(errors(rounded, faces)) | {
        "identical_faces": round(float((rounded == ref).all(axis=(1, 2)).mean()), 4)
    }

    # the pipeline's detection of the face dlib found (best overlap); images where it found none are left out
    dets = pipe.detect(images)
    found, picked = [], []
    for i, d in enumerate(dets):
        if not d:
            continue
        ious = [box_iou(det.box.double(), torch.tensor(faces[i].box, dtype=torch.float64)) for det in d]
        if max(ious) >= MIN_IOU:
            found.append(i)
            picked.append(d[int(np.argmax(ious))].box)
    boxes = torch.stack(picked)
    idx = torch.tensor(found)
    kept = [faces[i] for i in found]
    variants = landmark_variants(pipe, images, idx, boxes)
    dlib_ref = dlib_descriptors([f.chip for f in kept])
    pipeline: dict[str, Any] = {}
    for label, pts in variants.items():
        templates = templates_of(pipe, images, idx, pts).numpy()
        cos = cosine(templates, dlib_ref)
        pipeline[label] = summary(errors(pts.numpy(), kept)) | {
            "template_cosine_to_dlib": {"mean": round(float(cos.mean()), 5), "min": round(float(cos.min()), 5)}
        }
    print(
        f"{name}: {n} faces, model {model['mean']:.5f}; pipeline "
        + ", ".join(f"{k} {v['mean']:.4f}" for k, v in pipeline.items())
    )
    return {"faces": n, "same_face_found_by_pipeline": len(found), "model_on_dlib_boxes": model, "pipeline": pipeline}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-celeba", type=int, default=300)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    data = shared_data_dir()
    sets = {
        "orl": list(orl_faces(data / "orl_faces")),
        "celeba": list(celeba_faces(data / "celeba_subset", args.n_celeba)),
    }
    pipe = FacePipeline.default(args.device)
    results = {name: measure(name, faces, pipe) for name, faces in sets.items()}
    verify = verification(pipe, data / "celeba_subset")

    faces = sets["celeba"][:64]
    images = [to_tensor(f.image).to(args.device) for f in faces]
    index, boxes = torch.arange(len(faces)), torch.tensor([f.box for f in faces])
    _, dlib_predictor, _ = dlib_models()
    predictor = pipe.shape_predictor
    assert predictor is not None
    import dlib  # optional and slow to import: only this comparison needs it

    rects = [dlib.rectangle(*[int(v) for v in (f.box[0], f.box[1], f.box[2] - 1, f.box[3] - 1)]) for f in faces]
    speed = {
        "batch": len(faces),
        "torch_predictor_faces_per_s": rate(lambda: shape_landmarks(predictor, images, index, boxes), len(faces)),  # type: ignore[arg-type]
        "faceapi_net_faces_per_s": rate(
            lambda: landmarks_for_image_boxes(pipe.landmark_net, images, index, boxes.to(args.device)), len(faces)
        ),
        "dlib_predictor_faces_per_s_one_thread": rate(
            lambda: [dlib_predictor(f.image, r) for f, r in zip(faces, rects, strict=True)], len(faces)
        ),
    }
    payload = {
        "bench": "landmarks",
        "machine": machine(),
        "metric": "mean over 68 points of |p - dlib| / |dlib[36] - dlib[45]|, per face; summarised over faces",
        "target": TARGET,
        "max_shift": MAX_SHIFT,
        "box_from_points": {
            "in_code": dict(zip(("dx", "dy", "k"), BOX_FROM_POINTS, strict=True)),
            "refit": refit_box(sets["orl"] + sets["celeba"]),
        },
        "results": results,
        "verification_held_apart_celeba": verify,
        "speed": speed,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    path = write(args.out or f"landmarks-{args.device}", payload)
    print(f"speed {speed}\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
