"""Paths between two templates for ``Interpolate``: linear, and spherical with a linear norm.

Why not plain slerp of the vectors: templates are not unit length (the default model's norm is about
1.49) and decoders L2-normalise their input anyway, so what matters is the *direction*. Linear
interpolation cuts through the sphere, so mid-way directions shrink towards the mean face and the
decoded frames wash out; slerp of the directions keeps every frame on the sphere. The norm is then
interpolated linearly so the ends are reproduced exactly (a frame at s = 0 decodes like ``a``).
"""

from __future__ import annotations

import math

import torch

# Below this sin(angle) the two directions are treated as parallel (or antiparallel): the slerp
# weights sin((1 - s) w) / sin(w) lose all precision there, and parallel directions need no arc.
PARALLEL_EPS = 1e-6


def positions(steps: int) -> torch.Tensor:
    """``steps`` evenly spaced positions in [0, 1], both ends included (float64)."""
    if steps < 2:
        raise ValueError(f"need at least 2 steps (both ends), got {steps}")
    return torch.linspace(0.0, 1.0, steps, dtype=torch.float64)


def lerp(a: torch.Tensor, b: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """(d,), (d,), (n,) -> (n, d): ``(1 - s) a + s b``."""
    a64, b64, s64 = a.double(), b.double(), s.double()[:, None]
    return ((1.0 - s64) * a64 + s64 * b64).to(a.dtype)


def _orthogonal_unit(u: torch.Tensor) -> torch.Tensor:
    """A unit vector orthogonal to unit ``u`` (deterministic: from the axis least aligned with it)."""
    axis = torch.zeros_like(u)
    axis[int(u.abs().argmin())] = 1.0
    p = axis - (axis @ u) * u
    return p / p.norm()


def slerp(a: torch.Tensor, b: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """(d,), (d,), (n,) -> (n, d): directions on the great circle from ``a`` to ``b``, norm linear in ``s``.

    Nearly parallel directions follow the (normalised) chord, which is the arc to within float
    precision. Antiparallel directions have no unique great circle: the path turns through a fixed,
    deterministic orthogonal direction, so the same request always gives the same frames. ``a`` and
    ``b`` must be non-zero (the service rejects zero templates before calling this).
    """
    a64, b64, s64 = a.double(), b.double(), s.double()
    na, nb = a64.norm(), b64.norm()
    if float(na) == 0.0 or float(nb) == 0.0:
        raise ValueError("slerp needs non-zero vectors")
    ua, ub = a64 / na, b64 / nb
    cos_w = float((ua @ ub).clamp(-1.0, 1.0))
    omega = math.acos(cos_w)
    sin_w = math.sin(omega)
    col = s64[:, None]
    if sin_w < PARALLEL_EPS:
        if cos_w > 0:  # parallel: the chord, renormalised, is the arc
            dirs = (1.0 - col) * ua + col * ub
            dirs = dirs / dirs.norm(dim=1, keepdim=True)
        else:  # antiparallel: half a great circle through a fixed orthogonal direction
            p = _orthogonal_unit(ua)
            dirs = torch.cos(math.pi * col) * ua + torch.sin(math.pi * col) * p
    else:
        dirs = (torch.sin((1.0 - col) * omega) * ua + torch.sin(col * omega) * ub) / sin_w
    norms = (1.0 - col) * na + col * nb
    return (dirs * norms).to(a.dtype)
