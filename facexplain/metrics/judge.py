"""A second, independent FR model as the judge of decoded faces.

A decoder's identity figures from the FR model it inverts are a white-box score: the decoder was trained
against that network's features. An independent model (HSE FaceRes, ``facexplain-fr-hsefaceres1024``)
judges the same faces under its own calibrated rule:

* reference: the judge's template of the **original photo** (its full pipeline, detection included);
* decoded face: a decoder draws faces in the chip geometry of the FR model it inverts (dlib's chip:
  the canonical mean face at fixed chip pixels), so the decoded face's landmarks are that canonical
  mean face by construction. :func:`judge_chips` warps it onto the judge's own geometry (its five-point
  224x224 alignment for HSE) from those canonical points, then the judge's FR forward runs on the chip.

The canonical warp needs no landmark network, so it runs through an embedding service too (the chip is
sent with ``INPUT_MODE_ALIGNED``), and it is what decoder training and the audit both use. Checked
against re-finding the landmarks on each decoded face (the judge's landmark stages on the upscaled face,
the chip as the face box; ``bench/bench_second_judge.py`` reports both): on 48 CelebA faces of the
shipped decoder the two presentations' templates agree at cosine 0.986 and their identity scores
correlate at 0.992 (mean cosine 0.377 vs 0.378).

The *control* is the original's own aligned chip brought to the decoder's resolution and judged exactly
like a decoded face: what a perfect decoder of that size would score.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from facexplain.faces.align import (
    ALIGNMENT_POINTS,
    ARCFACE_5PT_ALIGNMENT,
    DLIB_ALIGNMENT,
    FIVE_POINT_GROUPS,
    align_faces,
    chip_template,
)
from facexplain.metrics.verification import VerificationRule


@dataclass(frozen=True)
class ChipGeometry:
    """Where a face sits in a model's chips: dlib's 68-point chip, or a five-point similarity onto
    ``reference`` (chip pixels). :class:`facexplain.pipeline.EmbedderInfo` carries the same fields."""

    chip_size: int
    chip_padding: float = 0.25
    alignment: str = DLIB_ALIGNMENT
    reference: tuple[tuple[float, float], ...] | None = None

    @classmethod
    def of(cls, info: Any) -> ChipGeometry:
        """The geometry of an ``EmbedderInfo`` (or anything with its four fields)."""
        ref = tuple((float(x), float(y)) for x, y in info.reference) if info.reference is not None else None
        return cls(int(info.chip_size), float(info.chip_padding), str(info.alignment), ref)

    def align_args(self) -> dict[str, Any]:
        ref = torch.tensor(self.reference, dtype=torch.float64) if self.reference is not None else None
        return {"size": self.chip_size, "padding": self.chip_padding, "alignment": self.alignment, "reference": ref}


def canonical_landmarks(size: int, source: ChipGeometry) -> torch.Tensor:
    """(68, 2) landmarks of a face drawn in ``source``'s chip geometry at ``size`` pixels.

    dlib geometry: its mean face at the chip's padding (the alignment points; the jaw and brows, which no
    alignment reads, are left at 0). Five-point geometry: each five-point group at its reference point.
    Pixel-centre scaling from the model's chip size to ``size``.
    """
    lm = torch.zeros(68, 2, dtype=torch.float64)
    if source.alignment == DLIB_ALIGNMENT:
        lm[list(ALIGNMENT_POINTS)] = chip_template(source.chip_size, source.chip_padding)
    elif source.alignment == ARCFACE_5PT_ALIGNMENT and source.reference is not None:
        for group, point in zip(FIVE_POINT_GROUPS, source.reference, strict=True):
            lm[list(group)] = torch.tensor(point, dtype=torch.float64)
    else:
        raise ValueError(f"no canonical landmarks for alignment {source.alignment!r} without reference points")
    return ((lm + 0.5) * (size / source.chip_size) - 0.5).float()


def judge_chips(faces01: torch.Tensor, source: ChipGeometry, judge: ChipGeometry) -> torch.Tensor:
    """(N, 3, s, s) faces in [0, 1] drawn in ``source``'s geometry -> (N, 3, S, S) chips in [0, 255] in the
    judge's geometry (S = its chip size), by its own alignment from the canonical landmarks."""
    if faces01.ndim != 4 or faces01.shape[1] != 3 or faces01.shape[-1] != faces01.shape[-2]:
        raise ValueError(f"faces must be (N, 3, s, s), got {tuple(faces01.shape)}")
    n, size = faces01.shape[0], faces01.shape[-1]
    landmarks = canonical_landmarks(size, source).to(faces01.device).expand(n, 68, 2)
    return align_faces(faces01.float().clamp(0, 1) * 255.0, landmarks, **judge.align_args()).clamp(0, 255)


@torch.no_grad()
def judge_templates(pipe: Any, faces01: torch.Tensor, source: ChipGeometry, batch: int = 32) -> torch.Tensor:
    """The judge pipeline's templates of faces drawn in ``source``'s geometry (see :func:`judge_chips`)."""
    judge = ChipGeometry.of(pipe.info)
    out = [
        pipe.embed_chips(judge_chips(faces01[i : i + batch].to(pipe.device), source, judge)).float().cpu()
        for i in range(0, faces01.shape[0], batch)
    ]
    return torch.cat(out) if out else torch.zeros(0, pipe.info.dim)


@torch.no_grad()
def photo_references(pipe: Any, photos: Sequence[torch.Tensor], batch: int = 16) -> list[torch.Tensor | None]:
    """The judge's template of each original photo (its full pipeline); None where it finds no face."""
    refs: list[torch.Tensor | None] = []
    for i in range(0, len(photos), batch):
        refs += [None if r is None else r.template.float().cpu() for r in pipe.analyze(list(photos[i : i + batch]))]
    return refs


@dataclass
class JudgeScores:
    """Per face: the judge's cosine (NaN where it found no face in the original) and its verdict."""

    cosine: torch.Tensor  # (N,) float
    accepted: torch.Tensor  # (N,) bool; False where there is no reference

    def summary(self) -> dict[str, float | int | None]:
        found = ~torch.isnan(self.cosine)
        n = int(self.cosine.numel())
        return {
            "faces": n,
            "found": int(found.sum()),
            "mean_cosine": float(self.cosine[found].mean()) if bool(found.any()) else None,
            "accepted": float(self.accepted.float().mean()) if n else None,
        }


def judge_scores(refs: Sequence[torch.Tensor | None], templates: torch.Tensor, rule: VerificationRule) -> JudgeScores:
    """Each template against its reference under the judge's rule; a missing reference is not accepted."""
    if len(refs) != templates.shape[0]:
        raise ValueError(f"{len(refs)} references for {templates.shape[0]} templates")
    cos = torch.full((len(refs),), float("nan"))
    acc = torch.zeros(len(refs), dtype=torch.bool)
    for i, ref in enumerate(refs):
        if ref is None:
            continue
        a, b = ref[None].float(), templates[i : i + 1].float()
        cos[i] = F.cosine_similarity(a, b).item()
        acc[i] = bool(rule.accepts(a, b).item())
    return JudgeScores(cos, acc)


def judge_decoded(
    pipe: Any,
    photos: Sequence[torch.Tensor] | None,
    decoded01: torch.Tensor,
    source: ChipGeometry,
    refs: Sequence[torch.Tensor | None] | None = None,
) -> JudgeScores:
    """The judge's identity scores of decoded faces against their original photos (or given ``refs``)."""
    if refs is None:
        if photos is None:
            raise ValueError("give the original photos or the judge's reference templates")
        refs = photo_references(pipe, photos)
    return judge_scores(refs, judge_templates(pipe, decoded01, source), pipe.info.rule)
