"""The decoder training loop: Adam, early stopping on validation, checkpoints and resume, optional DDP.

One process trains on cpu or one GPU; under ``torchrun`` (``WORLD_SIZE`` > 1) every rank trains on
its shard of each epoch's batches through ``DistributedDataParallel`` and rank 0 alone validates,
logs and checkpoints. The checkpoint after every epoch holds the model, optimiser, early-stopping
state, history and the MLflow run id, so ``--resume`` continues the same run where it stopped.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from facexplain.losses.dfd import DFDLossWeights, PerceptualFeatures, dfd_loss, pair_difference_loss
from facexplain.metrics.image import psnr, ssim
from facexplain.models.decoder import DeepFaceDecoder
from training.common import EpochLog, checkpoint_tail, restore_checkpoint_tail, save_atomic
from training.decoder.data import DecoderSplit
from training.distributed import (
    Dist,
    broadcast_floats,
    epoch_batches,
    init_distributed,
    reduce_means,
    shard_batches,
    wrap_ddp,
)

CHECKPOINT = "last.pt"


@dataclass
class FitResult:
    best_state: dict[str, torch.Tensor]
    best_epoch: int
    history: list[EpochLog]
    stopped: str  # why training ended
    train_images_per_s: float
    epochs_done: int = 0  # epochs completed in total (every rank counts; only rank 0 keeps history)
    extra: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def evaluate_split(
    decoder: DeepFaceDecoder,
    split: DecoderSplit,
    perceptual: PerceptualFeatures | None,
    weights: DFDLossWeights,
    device: torch.device,
    batch_size: int = 128,
) -> tuple[dict[str, float], torch.Tensor]:
    """Mean loss terms, PSNR and SSIM over ``split``; also the reconstructions (CPU)."""
    decoder.eval()
    sums: dict[str, float] = {}
    recons = []
    for i in range(0, len(split), batch_size):
        t = split.templates[i : i + batch_size].to(device)
        y = split.targets[i : i + batch_size].to(device)
        m = split.masks[i : i + batch_size].to(device)
        r = decoder(t)
        _, comps = dfd_loss(r, y, m, perceptual, weights)
        for k, v in comps.items():
            sums[k] = sums.get(k, 0.0) + float(v) * t.shape[0]
        sums["psnr"] = sums.get("psnr", 0.0) + float(psnr(r, y).sum())
        sums["ssim"] = sums.get("ssim", 0.0) + float(ssim(r, y).sum())
        recons.append(r.cpu())
    n = max(1, len(split))
    return {k: v / n for k, v in sums.items()}, torch.cat(recons) if recons else torch.zeros(0)


class WeightAverage:
    """Exponential moving average of the decoder's weights (and BatchNorm statistics).

    Why: with a few thousand faces the weights after any one step carry that step's batch noise;
    their running average generalises better to unseen identities at no training cost, so
    validation, early stopping, the test figures and the saved bundle all use the average.
    ``decay`` is warmed up as ``min(decay, (1 + step) / (10 + step))`` so the average does not
    drag the random initialisation along for its first thousand steps.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.steps = 0
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for k, v in model.state_dict().items():
            avg = self.state[k]
            if avg.is_floating_point():
                avg.mul_(d).add_(v.detach(), alpha=1 - d)
            else:  # BatchNorm's num_batches_tracked
                avg.copy_(v)

    def to_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "steps": self.steps, "state": self.state}

    def load(self, data: dict[str, Any]) -> None:
        self.decay, self.steps = float(data["decay"]), int(data["steps"])
        self.state = {k: v.clone() for k, v in data["state"].items()}


@dataclass
class _Progress:
    """What carries over from epoch to epoch, and from a checkpoint into a resumed run."""

    best_state: dict[str, torch.Tensor]
    start_epoch: int = 0
    best_val: float = math.inf
    best_epoch: int = -1  # 0-based; -1 before any epoch
    bad: int = 0  # epochs since the last validation improvement
    history: list[EpochLog] = field(default_factory=list)


@dataclass
class _Loop:
    """The fixed parts of one training run: the model (DDP-wrapped or not), optimiser, schedule, average."""

    decoder: DeepFaceDecoder
    model: torch.nn.Module  # what the step runs: the decoder, or its DistributedDataParallel wrapper
    scored: DeepFaceDecoder  # what is validated and kept: the decoder, or a twin holding the average
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.ReduceLROnPlateau | None
    average: WeightAverage | None
    dist: Dist
    device: torch.device


def fit(
    decoder: DeepFaceDecoder,
    splits: dict[str, DecoderSplit],
    *,
    perceptual: PerceptualFeatures | None,
    weights: DFDLossWeights,
    lr: float,
    batch_size: int,
    epochs: int,
    patience: int,
    seed: int,
    device: torch.device,
    checkpoint_dir: Path,
    resume: bool = False,
    max_minutes: float = 0.0,
    lr_decay: float = 0.0,
    ema: float = 0.0,
    pair_weight: float = 0.0,
    on_epoch: Callable[[EpochLog, torch.Tensor], None] | None = None,
    run_state: dict[str, Any] | None = None,
    progress: bool = True,
) -> FitResult:
    """Train ``decoder`` in place; returns the best (lowest validation loss) weights and the history.

    With ``ema`` in (0, 1) the weights validated, kept as best and returned are the moving average
    (``WeightAverage``), not the last step's.

    With ``pair_weight`` > 0 and ``splits["train"].pairs`` set, every step also decodes ``batch_size // 2``
    (face, region blend) pairs, drawn with a generator seeded by ``seed``, the epoch and the rank, and adds
    ``pair_weight`` x :func:`~facexplain.losses.dfd.pair_difference_loss` (logged as ``pair_difference``).

    ``on_epoch(log, val_recons)`` runs on rank 0 after each epoch (logging, images). ``run_state`` is
    stored in every checkpoint and handed back on resume (the MLflow run id lives there).
    """
    loop = _make_loop(decoder, device, lr, lr_decay, ema)
    dist = loop.dist
    train, val = splits["train"], splits["val"]
    pairs = train.pairs if pair_weight > 0 else None
    if pair_weight > 0 and (pairs is None or len(pairs) == 0):
        raise ValueError("pair_weight > 0 needs (face, blend) pairs in the training split")
    ckpt_path = checkpoint_dir / CHECKPOINT
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    state = _Progress(best_state=copy.deepcopy(decoder.state_dict()))
    if resume and ckpt_path.is_file():
        state = _resume(loop, ckpt_path, run_state)
    if dist.world > 1:
        _check_same_start(loop, state.start_epoch, ckpt_path)
    t_start = time.perf_counter()
    seen_total, time_total = 0, 0.0
    stopped = "epochs"
    epochs_done = state.start_epoch
    if state.start_epoch >= epochs:
        stopped = "already complete"
    for epoch in range(state.start_epoch, epochs):
        train_means, seen, dt = _train_epoch(
            loop, train, perceptual, weights, pairs, pair_weight, batch_size, seed, epoch, epochs, progress
        )
        seen_total += seen  # every rank's faces
        time_total += dt
        stop_now = False  # rank 0 decides; under torchrun it tells the others
        if dist.main:
            log, recons = _validate(loop, state, val, perceptual, weights, epoch, train_means, seen, dt)
            if on_epoch is not None:
                on_epoch(log, recons)
            _save_checkpoint(loop, state, ckpt_path, epoch, run_state)
            if len(val) > 0 and state.bad >= patience:
                stopped = f"early stopping: no validation improvement for {patience} epochs"
                stop_now = True
            elif max_minutes > 0 and (time.perf_counter() - t_start) / 60 >= max_minutes:
                stopped = f"time budget of {max_minutes:g} min reached"
                stop_now = True
        epochs_done = epoch + 1
        if dist.world > 1:
            stop_now = _share_decision(loop, stop_now)
            if stop_now and not dist.main:
                stopped = "stopped by rank 0"
        if stop_now:
            break
    decoder.load_state_dict(state.best_state)
    return FitResult(
        best_state=state.best_state,
        best_epoch=state.best_epoch + 1,
        history=state.history,
        stopped=stopped,
        train_images_per_s=seen_total / time_total if time_total > 0 else float("nan"),
        epochs_done=epochs_done,
    )


def _make_loop(decoder: DeepFaceDecoder, device: torch.device, lr: float, lr_decay: float, ema: float) -> _Loop:
    """The model on its device (DDP-wrapped under torchrun), Adam, the optional plateau decay and average."""
    dist = init_distributed(device)
    decoder.to(device)
    model = wrap_ddp(decoder, device, dist)
    opt = torch.optim.Adam(decoder.parameters(), lr=lr)
    # Optional: multiply the learning rate by ``lr_decay`` after an epoch without validation improvement.
    sched = (
        torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=lr_decay, patience=0, min_lr=lr * 1e-2)
        if 0.0 < lr_decay < 1.0
        else None
    )
    average = WeightAverage(decoder, ema) if ema > 0 else None
    # What is validated and kept: the averaged weights, loaded into a twin of the decoder.
    scored = copy.deepcopy(decoder) if average is not None else decoder
    return _Loop(decoder, model, scored, opt, sched, average, dist, device)


def _resume(loop: _Loop, ckpt_path: Path, run_state: dict[str, Any] | None) -> _Progress:
    """Everything the last checkpoint holds back in place, so the resumed run continues the same sequence."""
    # weights_only: our checkpoints hold tensors and plain containers only, so a file swapped
    # into the run folder cannot run code on --resume (issue 23)
    ck = torch.load(ckpt_path, map_location=loop.device, weights_only=True)
    loop.decoder.load_state_dict(ck["decoder"])
    loop.opt.load_state_dict(ck["optimizer"])
    if loop.sched is not None and ck.get("scheduler"):
        loop.sched.load_state_dict(ck["scheduler"])
    if loop.average is not None and ck.get("ema"):
        loop.average.load(ck["ema"])
    state = _Progress(
        best_state=ck["best_state"],
        start_epoch=ck["epoch"] + 1,
        best_val=ck["best_val"],
        best_epoch=ck["best_epoch"],
        bad=ck["bad_epochs"],
    )
    state.history = restore_checkpoint_tail(ck, run_state, loop.dist.main, ckpt_path)
    return state


def _train_epoch(
    loop: _Loop,
    train: DecoderSplit,
    perceptual: PerceptualFeatures | None,
    weights: DFDLossWeights,
    pairs: torch.Tensor | None,
    pair_weight: float,
    batch_size: int,
    seed: int,
    epoch: int,
    epochs: int,
    progress: bool,
) -> tuple[dict[str, float], int, float]:
    """One pass over this rank's batches; returns the mean loss terms, the faces seen and the seconds,
    over every rank under torchrun (the slowest rank's seconds).

    The batch order and the pair draws are seeded by run seed and epoch (and rank), so a resumed run
    and an uninterrupted one see the same batches. Under torchrun each rank takes its shard of the
    epoch (``shard_batches``: a ``DistributedSampler`` with the same seed), so the ranks together see
    the batches one process with ``batch_size * world`` would.
    """
    dist, device, model = loop.dist, loop.device, loop.model
    if dist.world > 1:
        batches = shard_batches(len(train), batch_size, seed * 1_000_003, epoch, dist)
    else:
        batches = epoch_batches(len(train), batch_size, torch.Generator().manual_seed(seed * 1_000_003 + epoch), dist)
    pair_gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 7919 + dist.rank)
    n_pairs = max(1, batch_size // 2)
    loop.decoder.train()
    sums: dict[str, float] = {}
    seen = 0
    t0 = time.perf_counter()
    bar = tqdm(
        batches, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", leave=False, disable=not (progress and dist.main)
    )
    for idx in bar:
        t = train.templates[idx].to(device, non_blocking=True)
        y = train.targets[idx].to(device, non_blocking=True)
        m = train.masks[idx].to(device, non_blocking=True)
        loss, comps = dfd_loss(model(t), y, m, perceptual, weights)
        if pairs is not None:
            pick = pairs[torch.randint(len(pairs), (n_pairs,), generator=pair_gen)]
            both = pick.T.reshape(-1)  # faces, then their blends
            decoded = model(train.templates[both].to(device, non_blocking=True))
            real = train.targets[both].to(device, non_blocking=True)
            diff = pair_difference_loss(decoded[:n_pairs], decoded[n_pairs:], real[:n_pairs], real[n_pairs:])
            loss = loss + pair_weight * diff
            comps = {**comps, "pair_difference": diff.detach(), "total": loss.detach()}
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {float(loss)} at epoch {epoch + 1}; lower --lr")
        loop.opt.zero_grad(set_to_none=True)
        loss.backward()
        loop.opt.step()
        if loop.average is not None:
            loop.average.update(loop.decoder)
        for k, v in comps.items():
            sums[k] = sums.get(k, 0.0) + float(v) * len(idx)
        seen += len(idx)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    return reduce_means(sums, seen, time.perf_counter() - t0, dist)


def _validate(
    loop: _Loop,
    state: _Progress,
    val: DecoderSplit,
    perceptual: PerceptualFeatures | None,
    weights: DFDLossWeights,
    epoch: int,
    train_means: dict[str, float],
    seen: int,
    dt: float,
) -> tuple[EpochLog, torch.Tensor]:
    """Rank 0 scores the kept weights (validation loss, or training loss without validation faces),
    steps the plateau schedule, keeps the best weights and appends the epoch to the history."""
    if loop.average is not None:
        loop.scored.load_state_dict(loop.average.state)
    if len(val) > 0:
        val_means, recons = evaluate_split(loop.scored, val, perceptual, weights, loop.device)
        score = val_means["total"]
    else:
        val_means, recons = {}, torch.zeros(0)
        score = train_means["total"]
    improved = score < state.best_val
    if loop.sched is not None:
        loop.sched.step(score)
    if improved:
        state.best_val, state.best_epoch, state.bad = score, epoch, 0
        state.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in loop.scored.state_dict().items()})
    else:
        state.bad += 1
    log = EpochLog(epoch + 1, train_means, val_means, dt, seen / dt, improved)
    state.history.append(log)
    return log, recons


def _save_checkpoint(
    loop: _Loop, state: _Progress, ckpt_path: Path, epoch: int, run_state: dict[str, Any] | None
) -> None:
    """Everything ``_resume`` needs, written atomically after every epoch."""
    save_atomic(
        ckpt_path,
        {
            "epoch": epoch,
            "decoder": loop.decoder.state_dict(),
            "optimizer": loop.opt.state_dict(),
            "scheduler": loop.sched.state_dict() if loop.sched is not None else None,
            "ema": loop.average.to_dict() if loop.average is not None else None,
            "best_state": state.best_state,
            "best_val": state.best_val,
            "best_epoch": state.best_epoch,
            "bad_epochs": state.bad,
            **checkpoint_tail(state.history, run_state),
        },
    )


def _check_same_start(loop: _Loop, start_epoch: int, ckpt_path: Path) -> None:
    """Every rank must resume from the same checkpoint: a rank that cannot see rank 0's ``last.pt`` (another
    node, a folder that is not shared) would start over and wait forever in a different epoch's all-reduce."""
    (rank0_start,) = broadcast_floats([float(start_epoch)], loop.dist)
    if int(rank0_start) != start_epoch:
        raise RuntimeError(
            f"rank {loop.dist.rank} would start at epoch {start_epoch + 1} but rank 0 at {int(rank0_start) + 1}: "
            f"{ckpt_path} must be on storage every node sees (a shared volume) to --resume"
        )


def _share_decision(loop: _Loop, stop_now: bool) -> bool:
    """Rank 0's stop decision and (possibly decayed) learning rate, broadcast so every rank steps alike."""
    stop, lr = broadcast_floats([float(stop_now), loop.opt.param_groups[0]["lr"]], loop.dist)
    for group in loop.opt.param_groups:
        group["lr"] = lr
    return stop > 0
