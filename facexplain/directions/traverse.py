"""Traversal: move a template along a direction by a list of step sizes (Plesh et al. eq. 6 / 9 / 12).

Every direction method ends the same way: ``t(alpha) = t + alpha * v`` for a few alphas, then the
templates are decoded to a strip of faces (decoding is the caller's, so this module needs no decoder).
What differs is the unit of alpha. SSI directions are unit vectors whose natural scale is the spread of
real templates along them, so alphas are given in standard deviations (``alpha * sigma * v``); centroid
directions are raw class-mean differences (alpha = 1 moves a neutral face to the class mean); regression
directions use the alpha that reaches a target label value (:func:`facexplain.directions.labels.alpha_to_target`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _alphas(alphas: Sequence[float] | torch.Tensor) -> torch.Tensor:
    a = torch.as_tensor(alphas, dtype=torch.float64).reshape(-1)
    if a.numel() == 0:
        raise ValueError("need at least one alpha")
    if not bool(torch.isfinite(a).all()):
        raise ValueError("alphas must be finite")
    return a


def unit(direction: torch.Tensor) -> torch.Tensor:
    """``direction / |direction|`` along the last axis; a zero direction is an error, not NaNs."""
    n = direction.norm(dim=-1, keepdim=True)
    if bool((n == 0).any()):
        raise ValueError("a direction of zero length has no unit vector")
    return direction / n


def traverse(
    template: torch.Tensor, direction: torch.Tensor, alphas: Sequence[float] | torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """``t + alpha * scale * v`` for each alpha: (D,) -> (A, D), or (B, D) -> (B, A, D).

    ``direction`` is used as given (not normalised): pass :func:`unit` of it for steps in template
    units. Computed in float64 and returned in the template's dtype, so alpha = 0 reproduces the
    template exactly.
    """
    if template.shape[-1] != direction.shape[-1] or direction.dim() != 1:
        raise ValueError(
            f"template (..., {template.shape[-1]}) and direction {tuple(direction.shape)} must share dimension D"
        )
    a = _alphas(alphas).to(template.device) * float(scale)
    step = a[:, None] * direction.to(template.device, torch.float64)  # (A, D)
    out = template.to(torch.float64).unsqueeze(-2) + step
    return out.to(template.dtype if template.is_floating_point() else torch.float32)


def projected_std(templates: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Standard deviation (unbiased) of ``templates`` (n, D) projected on each unit-normalised direction (k, D).

    The natural unit for a step along a direction: how much real templates vary along it. Returns
    (k,) float64.
    """
    if templates.dim() != 2 or templates.shape[0] < 2:
        raise ValueError(f"need (n >= 2, D) templates, got {tuple(templates.shape)}")
    d = directions.unsqueeze(0) if directions.dim() == 1 else directions
    proj = templates.to(torch.float64) @ unit(d.to(templates.device, torch.float64)).T
    return proj.std(dim=0, correction=1)


def traverse_std(
    template: torch.Tensor,
    direction: torch.Tensor,
    alphas_std: Sequence[float] | torch.Tensor,
    std: float,
) -> torch.Tensor:
    """``t + alpha * std * v / |v|``: alphas in standard deviations of the data along the direction.

    ``std`` is usually :func:`projected_std` of the discovery data (or an SSI result's ``stddev``),
    so alpha = 2 is "two standard deviations of real faces", comparable across directions and models.
    """
    if not std > 0:
        raise ValueError(f"std must be positive, got {std}")
    return traverse(template, unit(direction.to(torch.float64)), alphas_std, scale=float(std))
