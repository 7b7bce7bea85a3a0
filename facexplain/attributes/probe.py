"""Pixel probes: small classifiers for one binary CelebA attribute (Eyeglasses, Smiling, ...) on face images.

The independent estimator for attributes face-api has no net for. It sees **pixels only** (aligned
chips for training, decoded faces when measuring), never FR templates: a probe on templates would
share whatever the FR model encodes and could not check a template-space direction.

Two architectures, both seeded and small enough to train on a 2-core CPU in a minute or two:

* ``cnn``: four 3x3 conv layers (16-32-64-64 channels, ReLU, 2x2 max-pooling after the first three),
  global average pooling, dropout, one logit; ~60 k parameters;
* ``linear``: logistic regression on the grey image, the plain baseline.

Inputs of any size and range ([0, 1] or [0, 255], see :func:`facexplain.attributes.crops.to_255`) are
resized to ``config.size`` (64 px by default, the decoder's output size) inside the module, so the same
probe reads 150-px chips and 64-px decoded faces. Training augments with left-right flips (the CelebA
attributes probed here are symmetric), small shifts, brightness/contrast changes and, with probability
``blur_p``, a Gaussian blur: decoded faces are much smoother than photos, and a probe that only ever saw
sharp chips keys on texture the decoder cannot render. Classes are weighted to balance (Eyeglasses is
~6 % positive in the CelebA subset). Splits are identity-disjoint
(:func:`facexplain.data.splits.split_identities`), so test figures are for people the probe never saw.

A probe is saved as one small torch file (config, weights, training report) and loaded without
pickle (``weights_only``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from facexplain.attributes.crops import to_255
from facexplain.data.splits import split_identities
from facexplain.metrics.verification import roc_auc

PROBE_FORMAT = 1
# Per-channel statistics of 64-px CelebA chips (RGB, [0, 1]); a fixed normalisation, not data-dependent,
# so a saved probe needs nothing but its weights.
_MEAN = (0.52, 0.42, 0.37)
_STD = (0.29, 0.26, 0.26)


@dataclass(frozen=True)
class ProbeConfig:
    """How a probe is built and trained; saved with it."""

    attribute: str
    arch: Literal["cnn", "linear"] = "cnn"
    size: int = 64  # input resolution the images are resized to
    epochs: int = 12
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    test_fraction: float = 0.2  # identities held out for the test figures
    seed: int = 0  # initialisation, shuffles, augmentation
    # Seed of the identity split. Not 0 on purpose: the decoder's split uses seed 0, and a probe trained on
    # that split's training identities would find no test identity among them under the same hash.
    split_seed: int = 1
    blur_p: float = 0.5  # probability of a Gaussian blur per training image
    blur_sigma_max: float = 2.0  # pixels at ``size``
    shift_max: int = 3  # pixels at ``size``

    def __post_init__(self) -> None:
        if self.arch not in ("cnn", "linear"):
            raise ValueError(f"unknown probe architecture {self.arch!r}; use 'cnn' or 'linear'")
        if self.size < 16 or self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("size >= 16, epochs >= 1, batch_size >= 1 and lr > 0 are required")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")


class PixelProbe(nn.Module):
    """(N, 3, H, W) images, [0, 1] or [0, 255], any square size -> (N,) logits for the attribute."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, config: ProbeConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)
        self.net: nn.Module
        if config.arch == "cnn":
            layers: list[nn.Module] = []
            for k, (c_in, c_out) in enumerate(((3, 16), (16, 32), (32, 64), (64, 64))):
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
                if k < 3:
                    layers.append(nn.MaxPool2d(2))
            self.net = nn.Sequential(
                *layers,
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Dropout(0.2),
                nn.Linear(64, 1),
            )
        else:
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(config.size * config.size, 1))

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Images in any range/size -> the resized, normalised float32 input the layers see."""
        x = to_255(images) / 255.0
        size = self.config.size
        if x.shape[-1] != size or x.shape[-2] != size:
            shrink = x.shape[-1] > size
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
        return self.normalise01(x)

    def normalise01(self, x01: torch.Tensor) -> torch.Tensor:
        """[0, 1] images already at ``config.size`` -> the layers' input (grey for the linear probe)."""
        x = (x01 - self.mean) / self.std
        return x.mean(dim=1, keepdim=True) if self.config.arch == "linear" else x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.prepare(images)).squeeze(-1)


@dataclass(frozen=True)
class ProbeReport:
    """Held-out (test-identity) figures of a trained probe, and what it was trained on."""

    attribute: str
    arch: str
    n_train: int
    n_test: int
    positives_train: int
    positives_test: int
    identities_train: int
    identities_test: int
    auc: float
    accuracy: float  # at probability 0.5
    balanced_accuracy: float  # mean of the per-class accuracies at probability 0.5
    seconds: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) images, edges replicated (no dark frame)."""
    radius = max(1, math.ceil(3.0 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).view(1, 1, 1, -1)
    c = x.shape[1]
    out = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k.expand(c, 1, 1, -1), groups=c)
    return F.conv2d(
        F.pad(out, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c
    )


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian blur (sigma 0 leaves an image as it is), one call per distinct sigma."""
    out = x.clone()
    for s in torch.unique(sigma).tolist():
        if s > 0:
            sel = sigma == s
            out[sel] = _gaussian_blur(x[sel], float(s))
    return out


def _augment(x01: torch.Tensor, config: ProbeConfig, gen: torch.Generator) -> torch.Tensor:
    """Flips, shifts (edge-replicated), brightness/contrast and blur of [0, 1] images at ``config.size``."""
    n = x01.shape[0]
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x01.flip(-1), x01)
    if config.shift_max > 0:
        m = config.shift_max
        padded = F.pad(x, (m, m, m, m), mode="replicate")
        dx = torch.randint(0, 2 * m + 1, (n,), generator=gen).tolist()
        dy = torch.randint(0, 2 * m + 1, (n,), generator=gen).tolist()
        s = config.size
        x = torch.stack([padded[i, :, dy[i] : dy[i] + s, dx[i] : dx[i] + s] for i in range(n)])
    gain = 1.0 + (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.4
    bias = (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.2
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * gain + mean + bias).clamp(0.0, 1.0)
    if config.blur_p > 0 and config.blur_sigma_max > 0:
        on = torch.rand(n, generator=gen) < config.blur_p
        sigma = (torch.rand(n, generator=gen) * config.blur_sigma_max * 4).round() / 4 * on
        x = _blur(x, sigma)
    return x


def _resize01(images: torch.Tensor, size: int) -> torch.Tensor:
    x = to_255(images) / 255.0
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=x.shape[-1] > size)


@torch.no_grad()
def probe_logits(probe: PixelProbe, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(N, 3, H, W) images -> (N,) float32 logits (log-odds) of the attribute, on the CPU.

    The log-odds, not the probability, is what to follow along a direction: it does not saturate (see
    :func:`facexplain.attributes.expression.happy_log_odds`).
    """
    was = probe.training
    probe.eval()
    device = next(probe.parameters()).device
    out = [probe(images[s : s + batch_size].to(device)).float().cpu() for s in range(0, len(images), batch_size)]
    probe.train(was)
    return torch.cat(out) if out else torch.zeros(0)


def probe_probabilities(probe: PixelProbe, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(N, 3, H, W) images -> (N,) float32 probabilities of the attribute, on the CPU."""
    return torch.sigmoid(probe_logits(probe, images, batch_size))


def binary_metrics(probs: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> dict[str, float]:
    """AUC, accuracy and balanced accuracy (at 0.5) of probabilities against 0/1 labels."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    pred = p >= 0.5
    per_class = [float((pred[y == c] == c).mean()) for c in (False, True) if (y == c).any()]
    return {
        "auc": roc_auc(p, y) if 0 < y.sum() < len(y) else float("nan"),
        "accuracy": float((pred == y).mean()) if len(y) else float("nan"),
        "balanced_accuracy": float(np.mean(per_class)) if per_class else float("nan"),
    }


def identity_split(identities: Sequence[str], test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of train and test faces, identity-disjoint and stable (hash of seed and identity)."""
    side = split_identities(identities, test_fraction=test_fraction, seed=seed)
    test = np.array([side[i] == "test" for i in identities])
    return np.flatnonzero(~test), np.flatnonzero(test)


def train_probe(
    images: torch.Tensor,
    labels: torch.Tensor | Sequence[float],
    identities: Sequence[str],
    config: ProbeConfig,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> tuple[PixelProbe, ProbeReport]:
    """Train a probe on the train identities of (N, 3, S, S) ``images`` and report on the held-out ones.

    ``labels`` are 0/1 per image (NaN = unlabelled, left out). Identities go to train or test by
    ``config.split_seed`` (:func:`identity_split`); with no test identity the report's figures are NaN.
    Deterministic for a given seed on one
    machine (seeded init, shuffles and augmentation; single-threaded CPU kernels are deterministic).
    """

    t0 = time.perf_counter()
    y_all = torch.as_tensor(labels, dtype=torch.float32).reshape(-1)
    if y_all.shape[0] != images.shape[0] or len(identities) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images, {y_all.shape[0]} labels, {len(identities)} identities")
    keep = ~torch.isnan(y_all)
    bad = set(torch.unique(y_all[keep]).tolist()) - {0.0, 1.0}
    if bad:
        raise ValueError(f"labels must be 0/1 (or NaN), got {sorted(bad)}")
    ids = [identities[i] for i in torch.nonzero(keep).flatten().tolist()]
    x_all = images[keep]
    y_all = y_all[keep]
    train_idx, test_idx = identity_split(ids, config.test_fraction, config.split_seed)
    y_train = y_all[train_idx]
    pos = int(y_train.sum())
    if pos == 0 or pos == len(train_idx):
        raise ValueError(f"attribute {config.attribute!r}: the training identities have only one class")

    torch.manual_seed(config.seed)
    probe = PixelProbe(config).to(device)
    x_train = _resize01(x_all[train_idx], config.size)  # (n, 3, s, s) float32 in [0, 1], held once
    opt = torch.optim.AdamW(probe.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps = config.epochs * math.ceil(len(train_idx) / config.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=steps, pct_start=0.2)
    pos_weight = torch.tensor((len(train_idx) - pos) / pos, device=device)
    gen = torch.Generator().manual_seed(config.seed)
    probe.train()
    for epoch in range(config.epochs):
        order = torch.randperm(len(train_idx), generator=gen)
        total = 0.0
        for s in range(0, len(order), config.batch_size):
            b = order[s : s + config.batch_size]
            xb = _augment(x_train[b], config, gen).to(device)
            logits = probe.net(probe.normalise01(xb)).squeeze(-1)
            loss = F.binary_cross_entropy_with_logits(logits, y_train[b].to(device), pos_weight=pos_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(b)
        if progress:
            print(f"probe {config.attribute} epoch {epoch + 1}/{config.epochs}: loss {total / len(order):.4f}")
    probe.eval()
    y_test = y_all[test_idx]
    m = binary_metrics(probe_probabilities(probe, x_all[test_idx]), y_test)
    report = ProbeReport(
        attribute=config.attribute,
        arch=config.arch,
        n_train=len(train_idx),
        n_test=len(test_idx),
        positives_train=pos,
        positives_test=int(y_test.sum()),
        identities_train=len({ids[i] for i in train_idx}),
        identities_test=len({ids[i] for i in test_idx}),
        auc=m["auc"],
        accuracy=m["accuracy"],
        balanced_accuracy=m["balanced_accuracy"],
        seconds=round(time.perf_counter() - t0, 2),
    )
    return probe, report


def save_probe(probe: PixelProbe, path: Path | str, report: ProbeReport | None = None) -> Path:
    """One torch file: format, config, weights (CPU) and the training report."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in probe.state_dict().items()}
    payload = {
        "format": PROBE_FORMAT,
        "config": asdict(probe.config),
        "state_dict": state,
        "report": report.as_dict() if report is not None else None,
    }
    tmp = out.with_suffix(out.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(out)
    return out


def load_probe(path: Path | str, device: str | torch.device = "cpu") -> tuple[PixelProbe, ProbeReport | None]:
    """A probe saved by :func:`save_probe`, frozen and in eval mode, with its report if one was saved."""
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    if payload.get("format") != PROBE_FORMAT:
        raise ValueError(f"{path}: probe format {payload.get('format')!r}, this code reads {PROBE_FORMAT}")
    config = ProbeConfig(**payload["config"])
    probe = PixelProbe(config)
    probe.load_state_dict(payload["state_dict"], strict=True)
    probe.requires_grad_(False)
    rep = payload.get("report")
    report = ProbeReport(**rep) if rep else None
    return probe.to(device).eval(), report
