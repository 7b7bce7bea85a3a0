"""What a template keeps of an occluded face, and what the decoder draws there (DFD §4.3.2).

A region of the aligned chip is hidden (``facexplain.faces.occlusion``), the occluded chip is embedded,
and its template decoded. Two questions, each answered by numbers an auditor can compare:

* **what the template keeps**: the cosine between the occluded face's template and the clean one's
  (and whether the model's own rule still calls them one person), and the cosine between the clean
  template and the template of the *decoded* occluded face (identity left in the picture);
* **what the decoder fills in**: inside the hidden region, is the decoded-occluded face close to the
  occluder (the template recorded the occluder: the decoder paints it) or to the face (the template
  ignored it: the decoder fills in the face it expects)? Measured as mean absolute RGB error inside the
  mask against the occluded chip, the original chip and the clean face's decoding, and, as a yardstick,
  the same errors outside the mask, where nothing was hidden.

Every image is RGB in [0, 1] at the decoder's output size; masks are resized to it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from facexplain.metrics.verification import VerificationRule


@dataclass(frozen=True)
class OcclusionEffect:
    """One occluded face (see the module docstring); errors are mean |RGB difference| in [0, 1]."""

    occluded_fraction: float  # share of the chip's pixels hidden
    template_cosine: float  # cos(template of occluded chip, clean template)
    template_same_person: bool  # the FR rule accepts (occluded template, clean template)
    decoded_identity_cosine: float  # cos(template of decoded-occluded face, clean template)
    decoded_same_person: bool  # the rule accepts (decoded-occluded face, clean face)
    inside_to_occluder: float  # decoded-occluded vs the occluded chip, inside the mask
    inside_to_original: float  # decoded-occluded vs the original chip, inside the mask
    inside_to_clean_decoding: float  # decoded-occluded vs decoded-clean, inside the mask
    outside_to_original: float  # decoded-occluded vs the original chip, outside the mask
    outside_to_clean_decoding: float  # decoded-occluded vs decoded-clean, outside the mask

    @property
    def fills_in(self) -> bool:
        """The decoder drew something closer to the face than to the occluder inside the hidden region."""
        return self.inside_to_original < self.inside_to_occluder

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fills_in": self.fills_in}


def _masked_mae(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) x2, (B, 1, S, S) float weights -> (B,) mean |a - b| over the weighted pixels (NaN if none)."""
    w = mask.expand_as(a)
    return ((a - b).abs() * w).sum(dim=(1, 2, 3)) / w.sum(dim=(1, 2, 3))


def mask_at(masks: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 1, H, W) bool masks -> (B, 1, size, size) float coverage in [0, 1] (area-averaged when shrinking)."""
    m = masks.float()
    if m.shape[-1] == size and m.shape[-2] == size:
        return m
    return F.interpolate(m, size=(size, size), mode="area" if m.shape[-1] > size else "nearest")


def occlusion_effects(
    clean_template: torch.Tensor,
    occluded_templates: torch.Tensor,
    decoded_templates: torch.Tensor,
    original: torch.Tensor,
    occluded: torch.Tensor,
    decoded_clean: torch.Tensor,
    decoded_occluded: torch.Tensor,
    masks: torch.Tensor,
    rule: VerificationRule,
) -> list[OcclusionEffect]:
    """Measure B occlusions of one face.

    ``clean_template`` (D,) is the unoccluded face's template; ``occluded_templates`` (B, D) those of
    the occluded chips; ``decoded_templates`` (B, D) those of the decoded occluded faces re-embedded.
    Images: ``original`` (3, S, S) and ``decoded_clean`` (3, S, S), ``occluded`` and ``decoded_occluded``
    (B, 3, S, S), all in [0, 1] at one size S; ``masks`` (B, 1, H, W) bool at any size (resized to S).
    """
    b = occluded_templates.shape[0]
    if decoded_templates.shape[0] != b or occluded.shape[0] != b or decoded_occluded.shape[0] != b:
        raise ValueError("one occluded template, image, decoding and mask per occlusion")
    size = original.shape[-1]
    if occluded.shape[-1] != size or decoded_clean.shape[-1] != size or decoded_occluded.shape[-1] != size:
        raise ValueError("every image must be at the same size")
    inside = mask_at(masks, size)
    outside = 1.0 - inside
    clean = clean_template.float()[None].expand(b, -1)
    orig = original.float()[None].expand(b, -1, -1, -1)
    dclean = decoded_clean.float()[None].expand(b, -1, -1, -1)
    docc = decoded_occluded.float()
    t_cos = F.cosine_similarity(occluded_templates.float(), clean, dim=1)
    t_same = rule.accepts(clean, occluded_templates.float())
    d_cos = F.cosine_similarity(decoded_templates.float(), clean, dim=1)
    d_same = rule.accepts(clean, decoded_templates.float())
    fields = {
        "occluded_fraction": inside.mean(dim=(1, 2, 3)),
        "inside_to_occluder": _masked_mae(docc, occluded.float(), inside),
        "inside_to_original": _masked_mae(docc, orig, inside),
        "inside_to_clean_decoding": _masked_mae(docc, dclean, inside),
        "outside_to_original": _masked_mae(docc, orig, outside),
        "outside_to_clean_decoding": _masked_mae(docc, dclean, outside),
    }
    return [
        OcclusionEffect(
            occluded_fraction=float(fields["occluded_fraction"][i]),
            template_cosine=float(t_cos[i]),
            template_same_person=bool(t_same[i]),
            decoded_identity_cosine=float(d_cos[i]),
            decoded_same_person=bool(d_same[i]),
            inside_to_occluder=float(fields["inside_to_occluder"][i]),
            inside_to_original=float(fields["inside_to_original"][i]),
            inside_to_clean_decoding=float(fields["inside_to_clean_decoding"][i]),
            outside_to_original=float(fields["outside_to_original"][i]),
            outside_to_clean_decoding=float(fields["outside_to_clean_decoding"][i]),
        )
        for i in range(b)
    ]
