"""How close can face-api's landmark net get to dlib's 68 points if it is taught them? (issue 2)

    python bench/bench_landmark_distill.py [--max-train 0] [--epochs 12] [--lr 3e-4] [--threads 2]

Issue 2 asks the torch landmarks to agree with dlib's shape predictor to under 3 % of the
inter-ocular distance. The port of face-api's net is exact (it matches face-api itself to 2e-7) and
measures 3.9 % (ORL) / 5.4 % (CelebA) on the test's reference faces (``tests/unit/test_landmarks.py``):
two different models. The fix on the table is to distil dlib's points into the net, which changes the
default model's chips and templates, so before anyone decides on it this bench measures what it would
buy, with the test's metric on the test's faces:

* **port**: face-api's weights as they are (the figure the test reports);
* **refit fc**: only the last (linear) layer re-fitted by ridge regression to dlib's points, features
  unchanged (closed form; ``--ridge``);
* **fine-tuned**: the whole net trained from face-api's weights (Adam, ``--lr``, ``--epochs``, batch 32,
  brightness/contrast and +-4 % scale / +-4 % shift jitter), error after every epoch.

Teacher data: dlib's HOG detector and 68-point predictor on CelebA images of identities *not* among
the test's CelebA faces (the test's own images excluded too); ORL is never trained on at all. Inputs
are face-api's crop of the dlib box with the test's box adjustment, so train and test see the same
kind of input. Seeded (``--seed``): the image sample, the batches and the jitter. Result:
``bench/results/landmarks-distill-<device>.json``.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import machine, write  # noqa: E402
from facexplain.models.landmarks import DLIB_BOX_SCALE, DLIB_BOX_SHIFT_Y, FaceLandmark68Net, net_input  # noqa: E402
from tests.conftest import shared_data_dir  # noqa: E402
from tests.unit.faces_ref import RefFace, faces_for, reference_face, to_tensor  # noqa: E402

TARGET = 0.03


class Inputs:
    """Net inputs (N, 3, 112, 112) uint8, dlib's points in input-square units (N, 68, 2), crop frames."""

    def __init__(self, faces: list[RefFace]) -> None:
        xs, rel, frames, pts = [], [], [], []
        for f in faces:
            made = net_input(to_tensor(f.image), f.box, DLIB_BOX_SCALE, DLIB_BOX_SHIFT_Y)
            if made is None:
                raise ValueError(f"{f.path}: dlib's box leaves the image")
            x, origin, side = made
            xs.append(x.round().clamp(0, 255).to(torch.uint8))
            rel.append((f.landmarks - origin) / side)
            frames.append([*origin, side])
            pts.append(f.landmarks)
        self.x = torch.stack(xs)
        self.rel = torch.tensor(np.stack(rel), dtype=torch.float32)
        self.frames = np.array(frames, dtype=np.float64)
        self.points = np.stack(pts)
        iod = np.linalg.norm(self.points[:, 36] - self.points[:, 45], axis=1)
        self.iod_rel = torch.tensor(iod / self.frames[:, 2], dtype=torch.float32)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def error(self, rel_pred: np.ndarray) -> float:
        """Mean point error / outer-eye-corner distance, as ``tests/unit/test_landmarks.py`` computes it."""
        pred = rel_pred * self.frames[:, 2, None, None] + self.frames[:, None, :2]
        iod = np.linalg.norm(self.points[:, 36] - self.points[:, 45], axis=1)
        return float((np.linalg.norm(pred - self.points, axis=2).mean(axis=1) / iod).mean())


def teacher_faces(celeba: Path, test: tuple[RefFace, ...], max_train: int, seed: int) -> list[RefFace]:
    with open(celeba / "labels.csv", newline="") as fh:
        identity = {row["file"]: row["identity"] for row in csv.DictReader(fh)}
    held = {f.path.name for f in test}
    held_ids = {identity[name] for name in held}
    paths = [
        p for p in sorted((celeba / "images").glob("*.jpg")) if p.name not in held and identity[p.name] not in held_ids
    ]
    order = np.random.default_rng(seed).permutation(len(paths))
    if max_train > 0:
        order = order[:max_train]
    found = (reference_face(paths[i]) for i in tqdm(order, desc="dlib teacher", unit="img"))
    return [f for f in found if f is not None]


@torch.no_grad()
def predict(net: FaceLandmark68Net, data: Inputs) -> np.ndarray:
    net.eval()
    out = [net(data.x[s : s + 128].float()) for s in range(0, len(data), 128)]
    return torch.cat(out).double().numpy()


def refit_fc(net: FaceLandmark68Net, train: Inputs, tests: dict[str, Inputs], ridge: float) -> dict[str, float]:
    """Ridge from the net's features to dlib's points, shrunk towards face-api's own last layer."""
    with torch.no_grad():
        feats = torch.cat([net.features(train.x[s : s + 128].float()) for s in range(0, len(train), 128)])
    f = feats.double().numpy()
    t = train.rel.reshape(len(train), -1).double().numpy()
    w0 = net.fc.weight.detach().double().numpy()
    mf, mt = f.mean(axis=0), t.mean(axis=0)
    fc = f - mf
    lam = ridge * len(f)
    w = np.linalg.solve(fc.T @ fc + lam * np.eye(f.shape[1]), fc.T @ (t - mt) + lam * w0.T).T
    b = mt - w @ mf
    out = {}
    for name, data in tests.items():
        with torch.no_grad():
            g = (
                torch.cat([net.features(data.x[s : s + 128].float()) for s in range(0, len(data), 128)])
                .double()
                .numpy()
            )
        out[name] = round(data.error((g @ w.T + b).reshape(len(data), -1, 2)), 5)
    return out


def jitter(x: torch.Tensor, rel: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Brightness/contrast and a small scale/shift of the input square, the points moved alike."""
    n = x.shape[0]
    x = x * (0.8 + 0.4 * torch.rand(n, 1, 1, 1, generator=gen)) + 20 * torch.randn(n, 1, 1, 1, generator=gen)
    scale = 1 + 0.08 * (torch.rand(n, generator=gen) - 0.5)
    shift = 0.08 * (torch.rand(n, 2, generator=gen) - 0.5)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    moved = torch.nn.functional.grid_sample(x.clamp(0, 255), grid, align_corners=False)
    # output point p samples input scale * p + shift (in [-1, 1] units): a point moves to (q - shift) / scale
    target = ((2 * rel - 1 - shift[:, None, :]) / scale[:, None, None] + 1) / 2
    return moved, target


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-train", type=int, default=0, help="CelebA teacher images tried (0 = all eligible)")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--ridge", type=float, default=1e-4, help="refit fc: penalty towards face-api's weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    data = shared_data_dir()
    test_sets = {name: Inputs(list(faces_for(name, data))) for name in ("orl", "celeba")}
    train = Inputs(teacher_faces(data / "celeba_subset", faces_for("celeba", data), args.max_train, args.seed))
    print(f"{len(train)} teacher faces; test faces: orl {len(test_sets['orl'])}, celeba {len(test_sets['celeba'])}")

    net = FaceLandmark68Net.from_faceapi()
    port = {name: round(d.error(predict(net, d)), 5) for name, d in test_sets.items()}
    fc_only = refit_fc(net, train, test_sets, args.ridge)
    print(f"port {port}; refit fc {fc_only}")

    net.requires_grad_(True)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    curve = []
    for epoch in range(args.epochs):
        net.train()
        order = torch.randperm(len(train), generator=gen)
        total, t0 = 0.0, time.perf_counter()
        for s in range(0, len(train), 32):
            b = order[s : s + 32]
            x, target = jitter(train.x[b].float(), train.rel[b], gen)
            loss = ((net(x) - target).norm(dim=2).mean(dim=1) / train.iod_rel[b]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(b)
        row = {"epoch": epoch + 1, "train": round(total / len(train), 5), "seconds": round(time.perf_counter() - t0, 1)}
        row.update({name: round(d.error(predict(net, d)), 5) for name, d in test_sets.items()})
        curve.append(row)
        print(row, flush=True)

    best = {name: min(r[name] for r in curve) for name in test_sets} if curve else {}
    result: dict[str, Any] = {
        "benchmark": "landmark distillation (issue 2)",
        "machine": machine(),
        "args": vars(args),
        "metric": "mean point error / outer-eye-corner distance vs dlib's 68 points on dlib HOG boxes (as the test)",
        "target": TARGET,
        "teacher_faces": len(train),
        "test_faces": {name: len(d) for name, d in test_sets.items()},
        "port": port,
        "refit_fc": fc_only,
        "fine_tuned_curve": curve,
        "fine_tuned_best_epoch_per_set": best,
        "fine_tuned_final": {name: curve[-1][name] for name in test_sets} if curve else {},
        "meets_target_after_fine_tuning": {name: bool(curve and curve[-1][name] < TARGET) for name in test_sets},
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    path = write(args.out or f"landmarks-distill-{dev}", result)
    print(f"{path}: final {result['fine_tuned_final']} (target < {TARGET})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
