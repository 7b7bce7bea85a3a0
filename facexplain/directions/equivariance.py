"""Geometric equivariance (DFD §4.3.1): linear maps that undo a rotation, translation or scaling in template space.

An FR model is trained on aligned chips, so a face that is rotated, shifted or zoomed inside the chip
gets a different template and may no longer verify. The Deep Face Decoder paper shows that the change
is close to *linear* in template space: a single matrix M, fitted by least squares on pairs
(template of the original chip, template of the transformed chip), maps a transformed probe's template
back near its original, ``e(original) ~= M e(transformed)``, and raises verification of transformed
probes. This module transforms chips (pure torch ``affine_grid`` / ``grid_sample``: no torchvision),
fits and applies M, and measures verification with and without it under an FR model's own rule.

Conventions: images are (B, C, H, W) in pixel-index coordinates; positive angles rotate the content
counter-clockwise *as displayed* (y points down), positive ``tx`` / ``ty`` move it right / down by
that many pixels, ``scale`` > 1 enlarges it; all about the image centre. Pixels that come from outside
the input are filled per ``padding_mode`` (zeros = black, as a chip cut from outside an image).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from facexplain.metrics.verification import DLIB_L2_RULE, VerificationRule, roc_auc

PaddingMode = Literal["zeros", "border", "reflection"]


@dataclass(frozen=True)
class GeometricTransform:
    """A similarity transform of the chip about its centre: rotation, then scaling, then translation."""

    angle: float = 0.0  # degrees, counter-clockwise as displayed
    tx: float = 0.0  # pixels, positive = right
    ty: float = 0.0  # pixels, positive = down
    scale: float = 1.0  # > 1 enlarges the content

    def __post_init__(self) -> None:
        if not (math.isfinite(self.angle) and math.isfinite(self.tx) and math.isfinite(self.ty)):
            raise ValueError("transform parameters must be finite")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale must be positive, got {self.scale}")

    def theta(self, height: int, width: int) -> torch.Tensor:
        """(2, 3) float64 ``affine_grid`` matrix (output -> input, normalised coords, align_corners=False).

        In centred pixel coordinates the content moves as ``q = s R p + t``; the sampler needs the
        inverse ``p = R^T (q - t) / s``, expressed in the normalised frame ``n = S q`` with
        ``S = diag(2 / W, 2 / H)``: ``A = S R^T S^-1 / s`` and offset ``-A S t``. Working in pixels
        keeps rotations rigid on non-square images.
        """
        a = math.radians(self.angle)
        c, s = math.cos(a), math.sin(a)
        rot_t = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)  # R^T, R = [[c, s], [-s, c]] (y down)
        sc = torch.diag(torch.tensor([2.0 / width, 2.0 / height], dtype=torch.float64))
        lin = sc @ rot_t @ torch.linalg.inv(sc) / self.scale
        off = -lin @ sc @ torch.tensor([self.tx, self.ty], dtype=torch.float64)
        return torch.cat([lin, off[:, None]], dim=1)

    def apply(self, images: torch.Tensor, padding_mode: PaddingMode = "zeros") -> torch.Tensor:
        """(B, C, H, W) or (C, H, W) images -> transformed float32 images of the same shape (bilinear)."""
        return geometric_transform(images, self, padding_mode)

    def as_dict(self) -> dict[str, float]:
        return {"angle": self.angle, "tx": self.tx, "ty": self.ty, "scale": self.scale}


def geometric_transform(
    images: torch.Tensor, transform: GeometricTransform, padding_mode: PaddingMode = "zeros"
) -> torch.Tensor:
    """Apply ``transform`` to (B, C, H, W) or (C, H, W) images (uint8 or float) -> float32, bilinear.

    Differentiable with respect to float inputs (``grid_sample``), so attacks may go through it.
    """
    single = images.dim() == 3
    x = images.unsqueeze(0) if single else images
    if x.dim() != 4:
        raise ValueError(f"expected (B, C, H, W) or (C, H, W) images, got {tuple(images.shape)}")
    x = x.to(torch.float32)
    b, _, h, w = x.shape
    theta = transform.theta(h, w).to(x.device, torch.float32).expand(b, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)
    return out[0] if single else out


def embed_transformed(
    chips: torch.Tensor,
    embed_fn: Callable[[torch.Tensor], torch.Tensor],
    transform: GeometricTransform,
    batch_size: int = 64,
    padding_mode: PaddingMode = "zeros",
) -> torch.Tensor:
    """Templates (N, D) on the CPU of ``chips`` (N, 3, S, S) after ``transform``; batched, no gradients.

    ``embed_fn`` takes float32 chips in [0, 255] on the chips' device (e.g. ``FacePipeline.embed_chips``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    out = []
    with torch.no_grad():
        for s in range(0, chips.shape[0], batch_size):
            out.append(embed_fn(geometric_transform(chips[s : s + batch_size], transform, padding_mode)).cpu())
    return torch.cat(out)


@dataclass(frozen=True)
class EquivarianceMap:
    """``e(original) ~= matrix @ e(transformed) + bias``, fitted by (ridge) least squares."""

    matrix: torch.Tensor  # (D, D) float64
    bias: torch.Tensor | None  # (D,) float64, or None for a purely linear map (the paper's form)
    ridge: float
    n: int  # template pairs fitted on
    r2: float  # fraction of the originals' variance the map explains on the fitting pairs
    transform: GeometricTransform | None = None  # what the map undoes, for the record


def fit_linear_map(
    originals: torch.Tensor,
    transformed: torch.Tensor,
    ridge: float = 0.0,
    bias: bool = False,
    transform: GeometricTransform | None = None,
) -> EquivarianceMap:
    """Least-squares M with ``originals ~= transformed @ M^T`` (rows are paired templates).

    Minimises ``|X M^T (+ 1 b^T) - Y|^2 + ridge |M|^2`` with X the transformed and Y the original
    templates. A D x D map has D^2 unknowns, so without a ridge it needs at least D pairs of
    independent templates (fewer: the minimum-norm solution, which fits the pairs exactly and
    generalises badly; use ``ridge`` > 0). With ``bias`` the intercept is fitted unpenalised.
    """
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    y = originals.detach().to("cpu", torch.float64)
    x = transformed.detach().to("cpu", torch.float64)
    if x.dim() != 2 or x.shape != y.shape:
        raise ValueError(f"paired (n, D) templates expected, got {tuple(y.shape)} and {tuple(x.shape)}")
    if not (bool(torch.isfinite(x).all()) and bool(torch.isfinite(y).all())):
        raise ValueError("templates contain NaN or infinite values")
    n, d = x.shape
    if n < 2:
        raise ValueError("need at least 2 template pairs")
    if bias:
        x_mean, y_mean = x.mean(dim=0), y.mean(dim=0)
        xs, ys = x - x_mean, y - y_mean
    else:
        xs, ys = x, y
    if ridge > 0:
        mt = torch.linalg.solve(xs.T @ xs + ridge * torch.eye(d, dtype=torch.float64), xs.T @ ys)
    else:
        mt = torch.linalg.lstsq(xs, ys, driver="gelsd").solution
    m = mt.T.contiguous()
    b = (y_mean - m @ x_mean) if bias else None
    pred = x @ mt + (b if b is not None else 0.0)
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean(dim=0)) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 0.0
    return EquivarianceMap(m, b, float(ridge), n, r2, transform)


def apply_map(templates: torch.Tensor, emap: EquivarianceMap) -> torch.Tensor:
    """(n, D) or (D,) templates -> ``M t + b`` in the templates' dtype and device (normalising a probe)."""
    m = emap.matrix.to(templates.device, torch.float64)
    out = templates.to(torch.float64) @ m.T
    if emap.bias is not None:
        out = out + emap.bias.to(templates.device, torch.float64)
    return out.to(templates.dtype if templates.is_floating_point() else torch.float32)


@dataclass(frozen=True)
class MapEvaluation:
    """Verification of transformed probes against original templates, without and with the map.

    ``same_image_*``: probe i (transformed) vs original i, the fraction the rule accepts and the mean
    score. With identities, every probe vs every *other* original: true accept rate (same identity),
    false accept rate (different identity) at the rule's threshold and ROC AUC; None without identities.
    """

    rule_source: str
    n_probes: int
    same_image_accept_without: float
    same_image_accept_with: float
    mean_score_without: float
    mean_score_with: float
    tar_without: float | None = None
    tar_with: float | None = None
    far_without: float | None = None
    far_with: float | None = None
    auc_without: float | None = None
    auc_with: float | None = None


def _cross_pairs(
    probes: torch.Tensor, gallery: torch.Tensor, identities: list[str], rule: VerificationRule, chunk: int = 256
) -> tuple[float, float, float]:
    """TAR, FAR and AUC of all probe i vs gallery j pairs with i != j."""
    ids = np.asarray(identities)
    n = probes.shape[0]
    sims, accepted, genuine = [], [], []
    for s in range(0, n, chunk):
        p = probes[s : s + chunk]
        acc = rule.accepts(p[:, None, :], gallery[None, :, :])
        sim = rule.similarity(p[:, None, :], gallery[None, :, :])
        rows = np.arange(s, s + p.shape[0])[:, None]
        cols = np.arange(n)[None, :]
        off = rows != cols
        sims.append(sim.numpy()[off])
        accepted.append(acc.numpy()[off])
        genuine.append((ids[rows] == ids[cols])[off])
    sim_all, acc_all, gen_all = np.concatenate(sims), np.concatenate(accepted), np.concatenate(genuine)
    if not gen_all.any() or gen_all.all():
        raise ValueError("identity metrics need both same-identity and different-identity pairs")
    return float(acc_all[gen_all].mean()), float(acc_all[~gen_all].mean()), roc_auc(sim_all, gen_all)


def evaluate_map(
    originals: torch.Tensor,
    transformed: torch.Tensor,
    emap: EquivarianceMap,
    rule: VerificationRule = DLIB_L2_RULE,
    identities: list[str] | None = None,
) -> MapEvaluation:
    """Verify transformed probes against their originals under ``rule``, with and without ``emap``.

    Use templates the map was *not* fitted on (held-out faces): on the fitting pairs a map with
    D^2 parameters can look better than it is.
    """
    y = originals.detach().to("cpu", torch.float64)
    x = transformed.detach().to("cpu", torch.float64)
    if x.shape != y.shape or x.dim() != 2:
        raise ValueError(f"paired (n, D) templates expected, got {tuple(y.shape)} and {tuple(x.shape)}")
    mapped = apply_map(x, emap)
    cross: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None
    if identities is not None:
        if len(identities) != x.shape[0]:
            raise ValueError(f"{x.shape[0]} probes but {len(identities)} identities")
        cross = (_cross_pairs(x, y, identities, rule), _cross_pairs(mapped, y, identities, rule))
    return MapEvaluation(
        rule_source=rule.source,
        n_probes=x.shape[0],
        same_image_accept_without=float(rule.accepts(x, y).double().mean()),
        same_image_accept_with=float(rule.accepts(mapped, y).double().mean()),
        mean_score_without=float(rule.score(x, y).mean()),
        mean_score_with=float(rule.score(mapped, y).mean()),
        tar_without=None if cross is None else cross[0][0],
        tar_with=None if cross is None else cross[1][0],
        far_without=None if cross is None else cross[0][1],
        far_with=None if cross is None else cross[1][1],
        auc_without=None if cross is None else cross[0][2],
        auc_with=None if cross is None else cross[1][2],
    )
