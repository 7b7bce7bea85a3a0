"""The SAD/FAD training loop and its evaluation: Adam or SGD, per-epoch validation on unseen identities,
checkpoints after every epoch and an exact resume.

One step: a batch of training faces (random crops), and for the variants with an occluded branch
the same faces under one synthetic occlusion drawn for the whole batch (seeded by run seed, epoch
and step); both go through the network in one pass (BatchNorm sees clean and occluded faces
together), then the variant's objective (``facexplain.losses.sadfad.sadfad_objective``).

Validation measures verification on identities the net never saw: ROC AUC and TAR at FAR 1% /
0.1% over all pairs of clean faces (cosine of the representations), and the same with every probe
occluded (one occlusion per evaluation batch, from a fixed seed so every epoch and every variant
sees the same occluders) against the clean faces. The best epoch is the one with the highest mean of
the clean and occluded AUC.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from facexplain.faces.occlusion import FaceMesh
from facexplain.losses.sadfad import VARIANTS, SADFADLossWeights, sadfad_objective
from facexplain.metrics.interpretability import PeakLocationReport, feature_difference, peak_location_stats
from facexplain.metrics.verification import roc_auc
from facexplain.models.sadfad import SADFADNet
from training.common import EpochLog, checkpoint_tail, restore_checkpoint_tail, save_atomic
from training.distributed import Dist, epoch_batches
from training.sadfad.data import OcclusionSpec, SADFADSplit, batch_inputs, crop_offsets

CHECKPOINT = "last.pt"
EVAL_OCCLUSION_SEED = 20190927  # fixed: every epoch and every variant is evaluated under the same occluders


@dataclass
class FitResult:
    best_state: dict[str, torch.Tensor]
    best_epoch: int
    history: list[EpochLog]
    stopped: str  # why training ended
    steps: int
    train_images_per_s: float
    extra: dict[str, Any] = field(default_factory=dict)


# -- verification ----------------------------------------------------------------------------------------


def tar_at_far(scores: np.ndarray, genuine: np.ndarray, far: float) -> tuple[float, float]:
    """(TAR, threshold) at false-accept rate ``far``: accept when score > threshold.

    The threshold is the impostor score with ``floor(far · n_impostor)`` impostors above it, so at most
    that many impostors are accepted; NaN when there are no genuine or no impostor pairs.
    """
    s = np.asarray(scores, dtype=np.float64)
    g = np.asarray(genuine).astype(bool)
    imp = np.sort(s[~g])[::-1]
    if len(imp) == 0 or not g.any():
        return float("nan"), float("nan")
    k = math.floor(far * len(imp) + 1e-9)
    thr = float(imp[min(k, len(imp) - 1)])
    return float((s[g] > thr).mean()), thr


def verification_metrics(
    probes: torch.Tensor, gallery: torch.Tensor, identities: list[str], prefix: str = ""
) -> dict[str, float]:
    """Cosine verification of every probe i against every gallery face j != i (same index = same face).

    ``probes`` and ``gallery`` are index-aligned (N, d): the same faces, e.g. occluded and clean.
    """
    n = len(identities)
    out: dict[str, float] = {f"{prefix}pairs_genuine": 0.0}
    if n < 2:
        return out
    p = torch.nn.functional.normalize(probes.double(), dim=1)
    q = torch.nn.functional.normalize(gallery.double(), dim=1)
    sim = (p @ q.T).numpy()
    ids = np.asarray(identities)
    same = ids[:, None] == ids[None, :]
    off = ~np.eye(n, dtype=bool)
    if probes.data_ptr() == gallery.data_ptr() or torch.equal(probes, gallery):
        off = np.triu(off)  # symmetric: count each unordered pair once
    scores, genuine = sim[off], same[off]
    out[f"{prefix}pairs_genuine"] = float(genuine.sum())
    if genuine.all() or not genuine.any():
        return out
    out[f"{prefix}auc"] = roc_auc(scores, genuine)
    for far, name in ((0.01, "far1"), (0.001, "far0.1")):
        tar, thr = tar_at_far(scores, genuine, far)
        out[f"{prefix}tar_{name}"] = tar
        out[f"{prefix}threshold_{name}"] = thr
    return out


@dataclass
class Embedded:
    """What evaluation computes for a set of faces (CPU tensors)."""

    clean: torch.Tensor  # (N, N_f)
    occluded: torch.Tensor  # (N, N_f)
    maps: torch.Tensor | None  # (N, N_f, m, m) clean response maps (only when asked)
    landmarks: torch.Tensor  # (N, 68, 2) in the input frame


@torch.no_grad()
def embed_split(
    model: SADFADNet,
    split: SADFADSplit,
    mesh: FaceMesh,
    occlusion: OcclusionSpec,
    device: torch.device,
    limit: int = 0,
    batch_size: int = 64,
    keep_maps: bool = False,
) -> Embedded:
    """Representations of the centred crops, clean and occluded (seeded per evaluation batch)."""
    model.eval()
    cfg = model.config
    n = len(split) if limit <= 0 else min(limit, len(split))
    clean, occl, maps, lms = [], [], [], []
    for k, s in enumerate(range(0, n, batch_size)):
        idx = torch.arange(s, min(n, s + batch_size))
        x, lm = batch_inputs(split, idx, cfg)
        xo, _ = occlusion.apply(x, lm, mesh, EVAL_OCCLUSION_SEED + k)
        out = model(torch.cat([x, xo]).to(device))
        f = out.features.float().cpu()
        clean.append(f[: len(idx)])
        occl.append(f[len(idx) :])
        if keep_maps:
            maps.append(out.maps[: len(idx)].float().cpu())
        lms.append(lm)
    d = cfg.n_filters
    return Embedded(
        clean=torch.cat(clean) if clean else torch.zeros(0, d),
        occluded=torch.cat(occl) if occl else torch.zeros(0, d),
        maps=torch.cat(maps) if maps else None,
        landmarks=torch.cat(lms) if lms else torch.zeros(0, 68, 2),
    )


def evaluate(
    model: SADFADNet,
    split: SADFADSplit,
    mesh: FaceMesh,
    occlusion: OcclusionSpec,
    device: torch.device,
    limit: int = 0,
    with_peaks: bool = False,
) -> tuple[dict[str, float], PeakLocationReport | None, torch.Tensor]:
    """Verification (clean, occluded), optionally peak-location statistics; and the per-filter feature
    difference between clean and occluded faces."""
    emb = embed_split(model, split, mesh, occlusion, device, limit, keep_maps=with_peaks)
    ids = split.identities[: emb.clean.shape[0]]
    metrics = verification_metrics(emb.clean, emb.clean, ids, "clean_")
    metrics.update(verification_metrics(emb.occluded, emb.clean, ids, "occluded_"))
    diff = feature_difference(emb.clean, emb.occluded) if emb.clean.shape[0] else torch.zeros(0)
    if diff.numel():
        metrics["feature_diff_mean"] = float(diff.mean())
        metrics["feature_diff_max"] = float(diff.max())
    report = None
    if with_peaks and emb.maps is not None and emb.maps.shape[0]:
        report = peak_location_stats(emb.maps, model.config.input_size, emb.landmarks, mesh)
        metrics.update(report.summary())
    return metrics, report, diff


def selection_score(val: dict[str, float]) -> float:
    """Higher is better: mean of clean and occluded AUC (NaN when validation cannot measure them)."""
    a, b = val.get("clean_auc", float("nan")), val.get("occluded_auc", float("nan"))
    return (a + b) / 2


# -- the loop ----------------------------------------------------------------------------------------------


def make_optimizer(
    model: torch.nn.Module, name: str, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)


def step_seed(seed: int, epoch: int, step: int) -> int:
    """The occlusion seed of one training step: a function of the run seed, epoch and step only."""
    return (seed * 1_000_003 + epoch * 100_003 + step) % (2**63)


@dataclass
class _Progress:
    """What carries over from epoch to epoch, and from a checkpoint into a resumed run."""

    best_state: dict[str, torch.Tensor]
    start_epoch: int = 0
    steps: int = 0  # optimiser steps so far (``max_steps`` counts these)
    best_score: float = -math.inf
    best_epoch: int = -1  # 0-based; -1 before any epoch
    history: list[EpochLog] = field(default_factory=list)


@dataclass
class _Step:
    """What one optimiser step needs besides the batch: the objective's settings and the occluder."""

    variant: str
    weights: SADFADLossWeights
    mesh: FaceMesh
    occlusion: OcclusionSpec
    use_occlusion: bool
    seed: int
    device: torch.device


def fit(
    model: SADFADNet,
    splits: dict[str, SADFADSplit],
    *,
    variant: str,
    weights: SADFADLossWeights,
    mesh: FaceMesh,
    occlusion: OcclusionSpec,
    optimizer: str = "adam",
    lr: float = 1e-3,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    batch_size: int = 32,
    epochs: int = 1,
    max_steps: int = 0,
    max_minutes: float = 0.0,
    crop_jitter: bool = True,
    eval_faces: int = 512,
    seed: int = 0,
    device: torch.device | None = None,
    checkpoint_dir: Path,
    resume: bool = False,
    on_epoch: Callable[[EpochLog], None] | None = None,
    run_state: dict[str, Any] | None = None,
    progress: bool = True,
) -> FitResult:
    """Train ``model`` in place (it keeps the best weights at the end); see the module docstring.

    ``on_epoch(log)`` runs after each epoch (tracking). ``run_state`` is stored in every checkpoint and
    handed back on resume (the MLflow run id lives there). ``max_steps`` > 0 stops after that many
    optimiser steps in total (the epoch then ends early, and is validated and checkpointed).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}")
    device = device or torch.device("cpu")
    _, _, use_occ = VARIANTS[variant]
    model.to(device)
    opt = make_optimizer(model, optimizer, lr, momentum, weight_decay)
    train, val = splits["train"], splits["val"]
    step = _Step(variant, weights, mesh, occlusion, use_occ, seed, device)
    state = _Progress(best_state=copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()}))
    ckpt_path = checkpoint_dir / CHECKPOINT
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    if resume and ckpt_path.is_file():
        state = _resume(model, opt, ckpt_path, device, run_state, progress)
    t_start = time.perf_counter()
    seen_total, time_total = 0, 0.0
    stopped = "epochs" if state.start_epoch < epochs else "already complete"
    if max_steps and state.steps >= max_steps:
        stopped = "already complete"
    for epoch in range(state.start_epoch, epochs if stopped == "epochs" else state.start_epoch):
        train_means, seen, dt, budget_hit = _train_epoch(
            model, opt, train, step, state, batch_size, crop_jitter, max_steps, epoch, epochs, progress
        )
        if budget_hit:
            stopped = f"step budget of {max_steps} reached"
        seen_total += seen
        time_total += dt
        val_metrics: dict[str, float] = {}
        if len(val):
            val_metrics, _, _ = evaluate(model, val, mesh, occlusion, device, limit=eval_faces)
        score = selection_score(val_metrics)
        if math.isnan(score):
            score = -train_means.get("total", math.inf)  # no usable validation: the lowest training loss
        improved = score > state.best_score
        if improved:
            state.best_score, state.best_epoch = score, epoch
            state.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
        log = EpochLog(epoch + 1, train_means, val_metrics, dt, seen / dt if dt > 0 else float("nan"), improved)
        state.history.append(log)
        if on_epoch is not None:
            on_epoch(log)
        _save_checkpoint(model, opt, state, ckpt_path, epoch, run_state)
        if stopped != "epochs":
            break
        if max_minutes > 0 and (time.perf_counter() - t_start) / 60 >= max_minutes:
            stopped = f"time budget of {max_minutes:g} min reached"
            break
    model.load_state_dict(state.best_state)
    return FitResult(
        best_state=state.best_state,
        best_epoch=state.best_epoch + 1,
        history=state.history,
        stopped=stopped,
        steps=state.steps,
        train_images_per_s=seen_total / time_total if time_total > 0 else float("nan"),
    )


def _resume(
    model: SADFADNet,
    opt: torch.optim.Optimizer,
    ckpt_path: Path,
    device: torch.device,
    run_state: dict[str, Any] | None,
    progress: bool,
) -> _Progress:
    """Everything the last checkpoint holds back in place, so the resumed run continues the same sequence."""
    # weights_only: our checkpoints hold tensors and plain containers only, so a file swapped
    # into the run folder cannot run code on --resume (issue 23)
    ck = torch.load(ckpt_path, map_location=device, weights_only=True)
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    state = _Progress(
        best_state=ck["best_state"],
        start_epoch=ck["epoch"] + 1,
        steps=ck["steps"],
        best_score=ck["best_score"],
        best_epoch=ck["best_epoch"],
    )
    state.history = restore_checkpoint_tail(ck, run_state, progress, ckpt_path)
    return state


def _train_epoch(
    model: SADFADNet,
    opt: torch.optim.Optimizer,
    train: SADFADSplit,
    step: _Step,
    state: _Progress,
    batch_size: int,
    crop_jitter: bool,
    max_steps: int,
    epoch: int,
    epochs: int,
    progress: bool,
) -> tuple[dict[str, float], int, float, bool]:
    """One pass over the epoch's batches (seeded by run seed and epoch, as are the crops); returns the
    mean loss terms, the faces seen, the seconds, and whether the step budget ended the epoch early."""
    cfg = model.config
    gen = torch.Generator().manual_seed(step.seed * 1_000_003 + epoch)
    batches = epoch_batches(len(train), batch_size, gen, Dist())
    model.train()
    sums: dict[str, float] = {}
    seen = 0
    budget_hit = False
    t0 = time.perf_counter()
    bar = tqdm(batches, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", leave=False, disable=not progress)
    for k, idx in enumerate(bar):
        offsets = crop_offsets(len(idx), cfg, gen if crop_jitter else None)
        x, lm = batch_inputs(train, idx, cfg, offsets)
        terms = _train_step(model, opt, step, x, lm, train.labels[idx], epoch, k)
        state.steps += 1
        for name, v in terms.items():
            sums[name] = sums.get(name, 0.0) + v * len(idx)
        seen += len(idx)
        bar.set_postfix(loss=f"{terms['total']:.4f}")
        if max_steps and state.steps >= max_steps:
            budget_hit = True
            break
    bar.close()
    dt = time.perf_counter() - t0
    return {k: v / max(1, seen) for k, v in sums.items()}, seen, dt, budget_hit


def _train_step(
    model: SADFADNet,
    opt: torch.optim.Optimizer,
    step: _Step,
    x: torch.Tensor,
    lm: torch.Tensor,
    labels: torch.Tensor,
    epoch: int,
    k: int,
) -> dict[str, float]:
    """One optimiser step on a batch; clean and occluded faces share one forward pass (one BatchNorm)."""
    y = labels.to(step.device)
    if step.use_occlusion:
        xo, _ = step.occlusion.apply(x, lm, step.mesh, step_seed(step.seed, epoch, k))
        out = model(torch.cat([x, xo]).to(step.device))
        b = len(x)
        occ_f, occ_m = out.features[b:], out.maps[b:]
        clean_f, clean_m = out.features[:b], out.maps[:b]
    else:
        out = model(x.to(step.device))
        clean_f, clean_m, occ_f, occ_m = out.features, out.maps, None, None
    loss, terms, _ = sadfad_objective(
        step.variant,
        filters=model.filter_bank,
        classify=model.classify,
        clean_features=clean_f,
        clean_maps=clean_m,
        labels=y,
        weights=step.weights,
        occluded_features=occ_f,
        occluded_maps=occ_m,
    )
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss became {float(loss)} at epoch {epoch + 1}, step {k + 1}; lower --lr")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return terms


def _save_checkpoint(
    model: SADFADNet,
    opt: torch.optim.Optimizer,
    state: _Progress,
    ckpt_path: Path,
    epoch: int,
    run_state: dict[str, Any] | None,
) -> None:
    """Everything ``_resume`` needs, written atomically after every epoch."""
    save_atomic(
        ckpt_path,
        {
            "epoch": epoch,
            "steps": state.steps,
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "best_state": state.best_state,
            "best_score": state.best_score,
            "best_epoch": state.best_epoch,
            **checkpoint_tail(state.history, run_state),
        },
    )
