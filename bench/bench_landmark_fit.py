"""The landmark front end's two fitted constants, refitted on faces no test or gate uses (issue 25 item 8).

    python bench/bench_landmark_fit.py [--identities 60] [--per-identity 6] [--threads 2]

``BOX_FROM_POINTS`` (where dlib's HOG detector puts its box, from 68 points) was fitted on the 100
reference faces ``test_shape_predictor.py`` checks, and ``MAX_SHIFT`` (when the pipeline keeps the seed
points) was chosen on the held-apart identities behind the pair-AUC gate. Here both are fitted on
``fitting_sample``: CelebA identities on the training side of the seed-0 split (neither test nor
validation, so none of ``held_apart_sample``'s), not sealed, and none of the identities of the 60 CelebA
reference faces (the 40 ORL ones are another data set; ORL is not used); the first ``--identities``
(sorted), each with its first ``--per-identity`` images (sorted). Measured:

* **box**: medians of dlib's own box against dlib's own points over the sample's faces where dlib's
  detector finds exactly one face (the fit ``bench_landmarks.refit_box`` does), a seeded bootstrap
  interval, and the refit rounded as the code's constants are (dx, dy to 0.001, k to 0.01);
* **max_shift**: by the criterion it was chosen by, pair AUC of the default pipeline's templates
  (dlib's L2) on the sample's identities, over a grid of thresholds with the refitted box; the best
  AUC wins, ties to the larger threshold (more of dlib's points kept); the landmark error against dlib
  on the same faces is reported beside it;
* **effect** (reported, not used to choose): pair AUC on the held-apart identities of the gRPC quality
  gate with the code's constants and with the refitted ones, and the template cosine between the two on
  both samples (what a decoder trained on the old templates would see).

Result: ``bench/results/landmark-fit-<device>.json``.
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

from bench.bench_landmarks import MIN_IOU, box_iou, errors, refit_box, templates_of  # noqa: E402
from bench.common import machine, write  # noqa: E402
from facexplain.data.faces import celeba_records  # noqa: E402
from facexplain.data.splits import (  # noqa: E402
    fitting_sample,
    held_apart_sample,
    read_identity_list,
    recipe_evaluation_identities,
)
from facexplain.metrics.verification import DLIB_L2_RULE, pair_scores, roc_auc  # noqa: E402
from facexplain.models.landmarks import landmarks_for_image_boxes  # noqa: E402
from facexplain.models.shape_predictor import BOX_FROM_POINTS, MAX_SHIFT, ShapePredictor68, refine_landmarks  # noqa: E402
from facexplain.pipeline import FacePipeline, FaceSelection  # noqa: E402
from tests.conftest import shared_data_dir  # noqa: E402
from tests.unit.faces_ref import RefFace, _reference_face, celeba_faces, load_rgb, to_tensor  # noqa: E402

SHIFT_GRID = (0.05, 0.075, 0.1, 0.125, 0.15, 0.175, 0.2, 0.25, 0.3, 0.4, 0.5, float("inf"))
BOOTSTRAP = 1000


def rounded(fit: dict[str, float]) -> tuple[float, float, float]:
    """As the code's constants are written: dx, dy to 0.001 eye distances, k to 0.01."""
    return round(fit["dx"], 3), round(fit["dy"], 3), round(fit["k"], 2)


def bootstrap(faces: list[RefFace], seed: int) -> dict[str, list[float]]:
    """95 % interval of each median over faces resampled with replacement."""
    rng = np.random.default_rng(seed)
    draws = [refit_box([faces[i] for i in rng.integers(0, len(faces), len(faces))]) for _ in range(BOOTSTRAP)]
    return {
        k: [round(float(np.percentile([d[k] for d in draws], q)), 4) for q in (2.5, 97.5)] for k in ("dx", "dy", "k")
    }


class Faces:
    """The pipeline's largest face in each image, its seed points, and what refine_landmarks makes of them."""

    def __init__(self, pipe: FacePipeline, paths: list[Path], labels: list[str]) -> None:
        self.pipe = pipe
        self.images = [to_tensor(load_rgb(p)) for p in paths]
        chosen = [pipe.select(d, FaceSelection.LARGEST) for d in pipe.detect(self.images)]
        self.index = torch.tensor([k for k, c in enumerate(chosen) if c is not None])
        boxes = torch.stack([chosen[k].box for k in self.index.tolist()])  # type: ignore[union-attr]
        self.boxes = boxes
        self.ids = np.array(labels)[self.index.numpy()]
        self.paths = [paths[k] for k in self.index.tolist()]
        self.seed = landmarks_for_image_boxes(pipe.landmark_net, self.images, self.index, boxes).double()
        self.seed_templates = templates_of(pipe, self.images, self.index, self.seed)
        self._dlib: dict[tuple[float, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def refined(self, box: tuple[float, float, float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """dlib's points without the fallback, their shift from the seed (eye distances), their templates."""
        if box not in self._dlib:
            never = ShapePredictor68.from_dlib(box_from_points=box, max_shift=float("inf"))
            pts = refine_landmarks(never, self.images, self.index, self.seed)
            shift = (pts - self.seed).norm(dim=2).mean(1) / (self.seed[:, 36] - self.seed[:, 45]).norm(dim=1)
            self._dlib[box] = (pts, shift, templates_of(self.pipe, self.images, self.index, pts))
        return self._dlib[box]

    def with_fallback(self, box: tuple[float, float, float], max_shift: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Points and templates as the pipeline makes them with these constants."""
        pts, shift, templates = self.refined(box)
        keep = shift > max_shift
        return torch.where(keep[:, None, None], self.seed, pts), torch.where(
            keep[:, None], self.seed_templates, templates
        )

    def auc(self, templates: torch.Tensor) -> float:
        sims, i, j = pair_scores(templates, DLIB_L2_RULE)
        return float(roc_auc(sims, self.ids[i] == self.ids[j]))


def sweep(faces: Faces, box: tuple[float, float, float], ref: dict[Path, RefFace]) -> list[dict[str, Any]]:
    """Pair AUC per threshold, and the landmark error against dlib's points where dlib found one face and
    the pipeline's largest face is that face (box IoU >= MIN_IOU)."""
    with_ref = [
        k
        for k, p in enumerate(faces.paths)
        if p in ref and box_iou(faces.boxes[k].double(), torch.tensor(ref[p].box, dtype=torch.float64)) >= MIN_IOU
    ]
    refs = [ref[faces.paths[k]] for k in with_ref]
    _, shift, _ = faces.refined(box)
    out = []
    for t in SHIFT_GRID:
        pts, templates = faces.with_fallback(box, t)
        err = errors(pts[with_ref].numpy(), refs)
        out.append(
            {
                "max_shift": t if np.isfinite(t) else "inf",
                "pair_auc": round(faces.auc(templates), 5),
                "faces_keeping_seed": int((shift > t).sum()),
                "landmark_error_vs_dlib": {
                    "faces": len(with_ref),
                    "mean": round(float(err.mean()), 5),
                    "median": round(float(np.median(err)), 5),
                    "p95": round(float(np.percentile(err, 95)), 5),
                },
            }
        )
    return out


def cosine_summary(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
    return {
        "mean": round(float(cos.mean()), 6),
        "p1": round(float(cos.quantile(0.01)), 6),
        "min": round(float(cos.min()), 6),
        "identical_templates": round(float((cos > 1 - 1e-9).double().mean()), 4),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--identities", type=int, default=60)
    p.add_argument("--per-identity", type=int, default=6)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--out", default="")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    celeba = shared_data_dir() / "celeba_subset"
    records = celeba_records(celeba)
    identity_of = {r.path.name: r.identity for r in records}
    test_ids = {identity_of[f.path.name] for f in celeba_faces(celeba)}
    paths, labels = fitting_sample(records, args.identities, args.per_identity, exclude=test_ids)
    held_paths, held_labels = held_apart_sample(records, n_identities=40, per_identity=6)
    sealed = set(read_identity_list(REPO / "data" / "splits" / "celeba-sealed.txt"))
    fit_ids = set(labels)
    assert not fit_ids & (test_ids | set(held_labels) | sealed | recipe_evaluation_identities(identity_of.values()))

    # box: dlib's own boxes and points on the fitting faces
    found = [(path, _reference_face(path)) for path in paths]
    ref = {path: face for path, face in found if face is not None}
    fit = refit_box(list(ref.values()))
    box = rounded(fit)
    print(f"box refit on {len(ref)} faces: {fit} -> {box} (code: {BOX_FROM_POINTS})")

    pipe = FacePipeline.default(args.device)
    fitting = Faces(pipe, paths, labels)
    grid = sweep(fitting, box, ref)
    best = max(grid, key=lambda r: (r["pair_auc"], float(r["max_shift"])))
    max_shift = float(best["max_shift"])
    print("max_shift sweep (pair AUC): " + ", ".join(f"{r['max_shift']} {r['pair_auc']}" for r in grid))
    grid_old_box = sweep(fitting, BOX_FROM_POINTS, ref)

    held = Faces(pipe, held_paths, held_labels)
    effect: dict[str, Any] = {}
    for name, faces in (("fitting_sample", fitting), ("held_apart", held)):
        _, old = faces.with_fallback(BOX_FROM_POINTS, MAX_SHIFT)
        _, new = faces.with_fallback(box, max_shift)
        effect[name] = {
            "faces": len(faces.index),
            "pair_auc_code_constants": round(faces.auc(old), 5),
            "pair_auc_refit_constants": round(faces.auc(new), 5),
            "template_cosine_code_vs_refit": cosine_summary(old, new),
        }
    print(f"effect: {effect}")

    payload = {
        "bench": "landmark-fit",
        "machine": machine(),
        "fitting_sample": {
            "rule": "facexplain.data.splits.fitting_sample: training side of the seed-0 split (test 0.2, val 0.1), "
            "not sealed, not an identity of the 60 CelebA reference faces of tests/unit/faces_ref.py; first "
            f"{args.identities} identities (sorted), first {args.per_identity} images each (sorted)",
            "identities": len(fit_ids),
            "images": len(paths),
            "faces_dlib_found_one": len(ref),
            "faces_pipeline_found": len(fitting.index),
            "excluded_reference_identities": len(test_ids),
            "identity_list": sorted(fit_ids),
        },
        "box_from_points": {
            "in_code": dict(zip(("dx", "dy", "k"), BOX_FROM_POINTS, strict=True)),
            "refit": fit,
            "refit_rounded": dict(zip(("dx", "dy", "k"), box, strict=True)),
            "bootstrap_95": bootstrap(list(ref.values()), args.seed),
        },
        "max_shift": {
            "in_code": MAX_SHIFT,
            "chosen": best["max_shift"],
            "criterion": "highest pair AUC (dlib L2) on the fitting sample, refitted box; ties to the larger threshold",
            "sweep_refit_box": grid,
            "sweep_code_box": grid_old_box,
        },
        "effect": effect,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    path = write(args.out or f"landmark-fit-{args.device}", payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
