"""Decoder training data: a face set split by identity into train / val / test tensors at the output size."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from facexplain.data.faceset import FaceSet, concat_facesets
from facexplain.data.splits import split_identities
from facexplain.faces.regions import face_region_mask
from facexplain.metrics.reconstruction import resize01


@dataclass
class DecoderSplit:
    """One side of the split, ready for the loop: everything indexed alike."""

    name: str
    templates: torch.Tensor  # (N, d) raw
    targets: torch.Tensor  # (N, 3, S, S) float in [0, 1]: the aligned chips at the decoder's size
    masks: torch.Tensor  # (N, 1, S, S) face-region masks
    identities: list[str]
    paths: list[str]
    # (P, 2) row indices (face, its region blend) for the pair-difference term; None: no pairs
    pairs: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.templates.shape[0])


def chips_to_targets(chips_u8: torch.Tensor, size: int, chunk: int = 256) -> torch.Tensor:
    """(N, 3, C, C) uint8 chips -> (N, 3, size, size) float targets in [0, 1] (antialiased resize)."""
    out = [resize01(chips_u8[i : i + chunk].float() / 255.0, size) for i in range(0, chips_u8.shape[0], chunk)]
    return torch.cat(out).clamp(0, 1) if out else torch.zeros(0, 3, size, size)


def region_masks(landmarks_chip: torch.Tensor, chip_size: int, size: int) -> torch.Tensor:
    """Face-region masks at ``size`` from landmarks in ``chip_size`` pixel coordinates (pixel-centre scaling)."""
    if landmarks_chip.shape[0] == 0:
        return torch.zeros(0, 1, size, size)
    scaled = (landmarks_chip + 0.5) * (size / chip_size) - 0.5
    return face_region_mask(scaled, size)


def make_split(faces: FaceSet, name: str, size: int) -> DecoderSplit:
    chip_size = int(faces.meta.get("chip_size", faces.chips.shape[-1]))
    return DecoderSplit(
        name=name,
        templates=faces.templates.float(),
        targets=chips_to_targets(faces.chips, size),
        masks=region_masks(faces.landmarks, chip_size, size),
        identities=list(faces.identities),
        paths=list(faces.paths),
    )


def face_sides(faces: FaceSet, *, test_fraction: float, val_fraction: float, seed: int) -> list[str]:
    """Each face's side of the identity-disjoint split ("train", "val" or "test"), by index."""
    side = split_identities(faces.identities, test_fraction=test_fraction, val_fraction=val_fraction, seed=seed)
    return [side[i] for i in faces.identities]


def split_faceset(
    faces: FaceSet,
    size: int,
    *,
    test_fraction: float,
    val_fraction: float,
    seed: int,
    train_extra: Sequence[FaceSet] = (),
    pair_with: Sequence[int] = (),
) -> dict[str, DecoderSplit]:
    """Identity-disjoint train / val / test (val or test may be empty for tiny sets).

    Each of ``train_extra`` (the mirrored faces, the region blends: index-aligned with ``faces``) adds
    its training-side faces to the training split only: validation and test stay the original,
    unaugmented faces. ``pair_with`` names (by position) the extras whose rows pair with the original
    faces for the pair-difference term (the region blends): the training split then lists each
    (face row, extra row) pair in ``pairs``.
    """
    if any(not 0 <= k < len(train_extra) for k in pair_with):
        raise ValueError(f"pair_with {list(pair_with)} names no extra of {len(train_extra)}")
    sides = face_sides(faces, test_fraction=test_fraction, val_fraction=val_fraction, seed=seed)
    out = {}
    for name in ("train", "val", "test"):
        idx = [i for i, s in enumerate(sides) if s == name]
        part = faces.subset(idx)
        for extra in train_extra if name == "train" else ():
            if extra.identities != faces.identities:
                raise ValueError("train_extra must be index-aligned with the face set")
            part = concat_facesets(part, extra.subset(idx))
        out[name] = make_split(part, name, size)
        if name == "train" and pair_with:
            own = torch.arange(len(idx))
            out[name].pairs = torch.cat([torch.stack([own, own + (k + 1) * len(idx)], 1) for k in pair_with])
    if len(out["train"]) == 0:
        raise ValueError("the split left no training faces: use more identities or smaller test/val fractions")
    return out
