"""Template modification for soft-biometric privacy: remove a label direction (DFD §4.5).

A label direction (the centroid difference of ``Smiling`` faces and the rest, say; ``labels.py``) is
where the template moves most with the label. Projecting it out, ``t' = t - (t . u) u`` with ``u`` the
unit direction, leaves every template orthogonal to it, so a verifier that compares by angle loses only
what the template had along ``u``; rescaling ``t'`` to ``|t|`` keeps the norm the model's rule reads (dlib's
L2 rule on raw templates). This is the simplest of the privacy-enhancing modifications DFD §4.5 asks to
validate, and the validation (:mod:`facexplain.metrics.privacy`) shows what it does not do: an attribute
carried along other directions stays readable by a probe fitted on the modified templates.
"""

from __future__ import annotations

import torch


def remove_direction(templates: torch.Tensor, direction: torch.Tensor, renormalize: bool = True) -> torch.Tensor:
    """(N, D) or (D,) templates with ``direction`` (D,) projected out, each rescaled to its own norm.

    Raises ValueError for a zero or non-finite direction, or a dimension mismatch. A template lying
    exactly along the direction has nothing left and comes back as zeros.
    """
    single = templates.dim() == 1
    t = templates[None] if single else templates
    if t.dim() != 2 or direction.dim() != 1 or t.shape[1] != direction.shape[0]:
        raise ValueError(f"templates {tuple(templates.shape)} and direction {tuple(direction.shape)} do not match")
    d = direction.to(torch.float64)
    if not bool(torch.isfinite(d).all()) or float(d.norm()) == 0.0:
        raise ValueError("the direction must be finite and non-zero")
    u = d / d.norm()
    x = t.to(torch.float64)
    out = x - (x @ u)[:, None] * u[None]
    kept, norm = out.norm(dim=1, keepdim=True), x.norm(dim=1, keepdim=True)
    # what is left of a template (nearly) along the direction is rounding noise: zero it, never inflate it
    gone = kept <= 1e-6 * norm
    out = torch.where(gone, torch.zeros_like(out), out)
    if renormalize:
        out = torch.where(gone, out, out * (norm / kept.clamp_min(1e-300)))
    out = out.to(templates.dtype if templates.is_floating_point() else torch.float32)
    return out[0] if single else out
