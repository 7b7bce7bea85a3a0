"""Losses of "Towards Interpretable Face Recognition" (Yin et al., ICCV 2019): identity softmax, the
spatial activation diversity loss (SAD) and the feature activation diversity loss (FAD).

Notation: Ψ = {ψ_1 .. ψ_N} the filters of the filter bank (``SADFADNet.filter_bank``, each ψ_i of
shape |Φ| x 3 x 3), M_i(x) the response map of ψ_i on face x after Large Magnitude Filtering,
f(x) ∈ R^N the average-pooled representation, x̂ the same face with a synthetic occlusion.

* **SAD, filter term (eq. 1).** Filters that respond to the same pattern waste capacity and blur
  what each one means, so the filters are pushed to be orthogonal::

      L_C = || K^T K - I ||_F^2,   K = [k_1, ..., k_N],   k_i = vec(ψ_i) / ||vec(ψ_i)||_2

* **SAD, response term (eq. 2).** Orthogonal weights can still fire at the same place (the
  hypercolumn is not white), so the Gaussian-smoothed, LMF-filtered response maps of different
  filters are decorrelated directly, per face::

      L_R = || M̃^T M̃ - I ||_F^2,   M̃ = [m_1, ..., m_N],   m_i = vec(G * M_i) / ||vec(G * M_i)||_2

  averaged over the faces of the batch (G: a 3x3 Gaussian, σ = 1.5, as the authors' code). The
  smoothing makes two peaks one pixel apart count as overlapping. Identical maps give the maximum,
  N(N-1); maps with disjoint support give 0.

* **FAD (eq. 4).** A shared physical occlusion (``facexplain.faces.occlusion``) should change only
  the features of the filters that look at the occluded part. Per batch, the selection mask τ
  keeps the t elements of the representation whose mean absolute change is smallest (the
  elements the occlusion should not touch), and FAD makes those exactly invariant::

      δ_i = (1/B) Σ_b |f_i(x_b) - f_i(x̂_b)|,   τ_i = 1 if δ_i is among the t smallest of δ, else 0
      L_FAD = Σ_i τ_i δ_i

  τ is a selection (no gradient); the gradient flows through δ on both branches.

* **Masked softmax on the occluded branch (eq. 5).** The occluded face must still be recognised
  from the kept elements alone, which makes them discriminative::

      L_id^occ = - (1/B) Σ_b log softmax(W (τ ⊙ f(x̂_b)) + w_0)_{y_b}

  with the same classifier (W, w_0) as the clean branch's identity softmax L_id.

``reduction="sum"`` gives each equation exactly; ``"mean"`` divides L_C and L_R by the number of
off-diagonal entries N(N-1) (the average squared cosine of a pair, in [0, 1]) and L_FAD by t, so a
loss weight means the same for any N_f (the training config uses these; the authors' code averages
the SAD terms over pairs too).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

Reduction = Literal["sum", "mean"]

# Variant name -> (SAD, FAD, occluded branch): the five models the paper compares.
VARIANTS: dict[str, tuple[bool, bool, bool]] = {
    "base": (False, False, False),  # identity softmax only
    "base-aug": (False, False, True),  # + softmax on occluded faces (data augmentation, no τ, no FAD)
    "sad": (True, False, False),  # + SAD (eq. 1, 2)
    "fad": (False, True, True),  # + FAD (eq. 4) and the masked occluded softmax (eq. 5)
    "sad+fad": (True, True, True),  # everything; SAD's response term on both branches
}


def _gram_off_diagonal(columns: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    """|| K^T K - I ||_F^2 for column-normalised K (..., D, N), summed (or averaged) off the diagonal."""
    k = F.normalize(columns, dim=-2, eps=1e-12)
    gram = k.transpose(-1, -2) @ k
    n = gram.shape[-1]
    eye = torch.eye(n, dtype=gram.dtype, device=gram.device)
    # The diagonal of a normalised Gram matrix is 1 up to rounding; measuring it against I exactly (and
    # zero for an all-zero column) keeps the equation literal.
    total = ((gram - eye) ** 2).sum(dim=(-2, -1))
    if reduction == "mean":
        total = total / max(1, n * (n - 1))
    return total


def filter_orthogonality_loss(filters: torch.Tensor, reduction: Reduction = "sum") -> torch.Tensor:
    """Eq. (1): ``L_C = || K^T K - I ||_F^2`` with ``k_i = vec(ψ_i) / ||vec(ψ_i)||``.

    ``filters`` is (N, ...) (a conv weight (N, C, kh, kw)); each filter is one column of K. Zero for
    orthogonal filters, N(N-1) for N copies of one filter.
    """
    if filters.dim() < 2:
        raise ValueError(f"expected (N, ...) filters, got {tuple(filters.shape)}")
    return _gram_off_diagonal(filters.reshape(filters.shape[0], -1).T, reduction)


def gaussian_kernel(size: int = 3, sigma: float = 1.5) -> torch.Tensor:
    """(size, size) normalised Gaussian; 3 x 3 with σ = 1.5 is the authors' smoothing kernel."""
    ax = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    k = g[:, None] * g[None, :]
    return (k / k.sum()).float()


def gaussian_smooth(maps: torch.Tensor, size: int = 3, sigma: float = 1.5) -> torch.Tensor:
    """Smooth every (H, W) map of (B, N, H, W) with the same Gaussian (zero padding, same size)."""
    n = maps.shape[1]
    k = gaussian_kernel(size, sigma).to(maps.device, maps.dtype).expand(n, 1, size, size)
    return F.conv2d(maps, k, padding=size // 2, groups=n)


def response_diversity_loss(
    maps: torch.Tensor, reduction: Reduction = "sum", sigma: float = 1.5, kernel_size: int = 3
) -> torch.Tensor:
    """Eq. (2): ``L_R = || M̃^T M̃ - I ||_F^2``, m_i = vec(G * M_i) normalised, averaged over the batch.

    ``maps`` (B, N, H, W) are the LMF-filtered response maps. ``sigma <= 0`` skips the smoothing.
    """
    if maps.dim() != 4:
        raise ValueError(f"expected (B, N, H, W) response maps, got {tuple(maps.shape)}")
    smoothed = gaussian_smooth(maps, kernel_size, sigma) if sigma > 0 else maps
    b, n = smoothed.shape[:2]
    columns = smoothed.reshape(b, n, -1).transpose(1, 2)  # (B, H·W, N): one column per filter
    return _gram_off_diagonal(columns, reduction).mean()


def fad_selection(clean: torch.Tensor, occluded: torch.Tensor, keep: int) -> torch.Tensor:
    """τ: (N,) 0/1 mask of the ``keep`` (= t) elements with the smallest mean absolute change.

    The mean runs over the batch, which shares one physical occlusion; ties go to the lower index
    (a stable sort), so exactly t elements are kept. No gradient.
    """
    if clean.shape != occluded.shape or clean.dim() != 2:
        raise ValueError(f"expected two (B, N) feature batches, got {tuple(clean.shape)}, {tuple(occluded.shape)}")
    n = clean.shape[1]
    if not 0 < keep <= n:
        raise ValueError(f"t (elements kept) must be in 1..{n}, got {keep}")
    delta = (clean.detach() - occluded.detach()).abs().mean(dim=0)
    order = torch.sort(delta, stable=True).indices
    tau = torch.zeros(n, dtype=clean.dtype, device=clean.device)
    tau[order[:keep]] = 1.0
    return tau


def fad_loss(
    clean: torch.Tensor, occluded: torch.Tensor, keep: int, reduction: Reduction = "sum"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (4): ``L_FAD = Σ_i τ_i · (1/B) Σ_b |f_i(x_b) - f_i(x̂_b)|``; returns (loss, τ).

    Zero when clean and occluded features agree. ``"mean"`` divides by t.
    """
    tau = fad_selection(clean, occluded, keep)
    delta = (clean - occluded).abs().mean(dim=0)
    loss = (tau * delta).sum()
    if reduction == "mean":
        loss = loss / keep
    return loss, tau


def masked_identity_loss(
    classify: Callable[[torch.Tensor], torch.Tensor], occluded: torch.Tensor, tau: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Eq. (5): cross-entropy of the shared classifier on the masked occluded features ``τ ⊙ f(x̂)``."""
    return F.cross_entropy(classify(occluded * tau.to(occluded.dtype)), labels)


@dataclass(frozen=True)
class SADFADLossWeights:
    """Weights of the terms and the settings the equations leave open; see the module docstring.

    Defaults: L_C and L_R averaged over filter pairs (``reduction="mean"``) with weights 100 and 1
    (the authors' code: ``100 * diversityLossA`` and ``diversityLossB`` on both branches, each a mean
    over pairs); FAD summed over the t kept elements with weight 0.1 (the authors' ``occl_loss``);
    ``fad_keep`` is t (0: 260/320 of N_f, the authors' setting).
    """

    identity: float = 1.0
    filter: float = 100.0
    response: float = 1.0
    fad: float = 0.1
    occluded_identity: float = 1.0
    fad_keep: int = 0
    sad_reduction: Reduction = "mean"
    fad_reduction: Reduction = "sum"
    smooth_sigma: float = 1.5

    def keep_for(self, n_filters: int) -> int:
        """t for ``n_filters`` elements."""
        if self.fad_keep > 0:
            return min(self.fad_keep, n_filters)
        return max(1, round(n_filters * 260 / 320))


def sadfad_objective(
    variant: str,
    *,
    filters: torch.Tensor,
    classify: Callable[[torch.Tensor], torch.Tensor],
    clean_features: torch.Tensor,
    clean_maps: torch.Tensor,
    labels: torch.Tensor,
    weights: SADFADLossWeights,
    occluded_features: torch.Tensor | None = None,
    occluded_maps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float], torch.Tensor | None]:
    """The training objective of one of ``VARIANTS``; returns (total, terms as floats, τ or None).

    * base: L_id
    * base-aug: L_id + L_id on the occluded faces (unmasked)
    * sad: L_id + λ_C L_C + λ_R L_R
    * fad: L_id + λ_FAD L_FAD + L_id^occ (masked by τ)
    * sad+fad: all of them, L_R on the clean and on the occluded maps
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    use_sad, use_fad, use_occ = VARIANTS[variant]
    if use_occ and (occluded_features is None or occluded_maps is None):
        raise ValueError(f"variant {variant!r} needs the occluded branch's features and maps")
    terms: dict[str, torch.Tensor] = {}
    terms["identity"] = weights.identity * F.cross_entropy(classify(clean_features), labels)
    tau: torch.Tensor | None = None
    if use_sad:
        terms["filter"] = weights.filter * filter_orthogonality_loss(filters, weights.sad_reduction)
        resp = response_diversity_loss(clean_maps, weights.sad_reduction, weights.smooth_sigma)
        if use_occ and occluded_maps is not None:
            resp = resp + response_diversity_loss(occluded_maps, weights.sad_reduction, weights.smooth_sigma)
        terms["response"] = weights.response * resp
    if use_occ and occluded_features is not None:
        if use_fad:
            keep = weights.keep_for(clean_features.shape[1])
            fad, tau = fad_loss(clean_features, occluded_features, keep, weights.fad_reduction)
            terms["fad"] = weights.fad * fad
            terms["occluded_identity"] = weights.occluded_identity * masked_identity_loss(
                classify, occluded_features, tau, labels
            )
        else:
            terms["occluded_identity"] = weights.occluded_identity * F.cross_entropy(
                classify(occluded_features), labels
            )
    total = torch.stack(list(terms.values())).sum()
    logged = {k: float(v.detach()) for k, v in terms.items()}
    logged["total"] = float(total.detach())
    return total, logged, tau
