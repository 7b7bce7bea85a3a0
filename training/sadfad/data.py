"""SAD/FAD training data: a face set split by identity, chips resized once, crops and occlusions per batch.

The face set holds 150-px dlib chips (padding 0.25) and their landmarks. Each split keeps them
resized to the network's ``resize`` side (110 for a 96 input) as uint8, with the landmarks in that
frame; a batch is then only a crop (random in training, centred otherwise) and, for the variants
with an occluded branch, one synthetic occlusion shared by the batch (``facexplain.faces.occlusion``),
warped through a mesh over the training faces' mean landmarks in the centred input frame.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from facexplain.data.faceset import FaceSet
from facexplain.data.splits import split_identities
from facexplain.faces.occlusion import (
    FaceMesh,
    OcclusionRect,
    mean_template,
    occlude,
    occlusion_masks,
    sample_rectangle,
)
from facexplain.metrics.reconstruction import resize01
from facexplain.models.sadfad import SADFADConfig, chip_landmarks_to_input, chip_to_input


@dataclass
class SADFADSplit:
    """One side of the split, indexed alike; ``labels`` are class indices (-1: not a training class)."""

    name: str
    images: torch.Tensor  # (N, 3, R, R) uint8: the chips at the resize side
    landmarks: torch.Tensor  # (N, 68, 2) float: in the R x R frame
    labels: torch.Tensor  # (N,) long
    identities: list[str]
    paths: list[str]

    def __len__(self) -> int:
        return int(self.images.shape[0])


def resize_chips_u8(chips: torch.Tensor, size: int, chunk: int = 256) -> torch.Tensor:
    """(N, 3, C, C) uint8 chips -> (N, 3, size, size) uint8 (antialiased), in chunks to bound memory."""
    if chips.shape[0] == 0:
        return torch.zeros(0, 3, size, size, dtype=torch.uint8)
    out = [
        (resize01(chips[i : i + chunk].float() / 255.0, size).clamp(0, 1) * 255).round().to(torch.uint8)
        for i in range(0, chips.shape[0], chunk)
    ]
    return torch.cat(out)


def make_split(faces: FaceSet, name: str, model: SADFADConfig, classes: dict[str, int] | None = None) -> SADFADSplit:
    chip_size = int(faces.meta.get("chip_size", faces.chips.shape[-1]))
    r = model.resize
    landmarks = (faces.landmarks.float() + 0.5) * (r / chip_size) - 0.5
    labels = torch.tensor([(classes or {}).get(i, -1) for i in faces.identities], dtype=torch.long)
    return SADFADSplit(
        name, resize_chips_u8(faces.chips, r), landmarks, labels, list(faces.identities), list(faces.paths)
    )


def split_faceset(
    faces: FaceSet,
    model: SADFADConfig,
    *,
    test_fraction: float,
    val_fraction: float,
    seed: int,
    min_faces_per_identity: int = 2,
) -> tuple[dict[str, SADFADSplit], list[str]]:
    """Identity-disjoint train / val / test and the training classes (sorted identity names).

    Training identities with fewer than ``min_faces_per_identity`` faces are dropped: a softmax class
    seen once teaches the net nothing about within-identity variation. Val and test keep every face.
    """
    side = split_identities(faces.identities, test_fraction=test_fraction, val_fraction=val_fraction, seed=seed)
    counts = Counter(i for i in faces.identities if side[i] == "train")
    classes = sorted(i for i, c in counts.items() if c >= min_faces_per_identity)
    index = {c: k for k, c in enumerate(classes)}
    out: dict[str, SADFADSplit] = {}
    for name in ("train", "val", "test"):
        keep = [
            k for k, ident in enumerate(faces.identities) if side[ident] == name and (name != "train" or ident in index)
        ]
        out[name] = make_split(faces.subset(keep), name, model, index if name == "train" else None)
    if len(classes) < 2:
        raise ValueError(
            f"the split left {len(classes)} training identities with >= {min_faces_per_identity} faces; "
            "the identity softmax needs at least 2: use more data or smaller test/val fractions"
        )
    return out, classes


def crop_offsets(n: int, model: SADFADConfig, generator: torch.Generator | None) -> torch.Tensor:
    """(n, 2) crop corners: uniform over the resized chip with ``generator``, centred without."""
    span = model.resize - model.input_size
    if generator is None:
        return torch.full((n, 2), span // 2, dtype=torch.long)
    return torch.randint(0, span + 1, (n, 2), generator=generator)


def batch_inputs(
    split: SADFADSplit, index: torch.Tensor, model: SADFADConfig, offsets: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Network inputs (B, 3, S, S) float in [0, 255] and landmarks (B, 68, 2) in the input frame."""
    r = model.resize
    imgs = chip_to_input(split.images[index], model, offsets)
    lms = chip_landmarks_to_input(split.landmarks[index], r, model, offsets)
    return imgs, lms


def template_mesh(train: SADFADSplit, model: SADFADConfig) -> FaceMesh:
    """The frontal template: the training faces' mean landmarks in the centred input frame, meshed."""
    lms = chip_landmarks_to_input(train.landmarks, model.resize, model)
    return FaceMesh.from_template(mean_template(lms), model.input_size)


@dataclass(frozen=True)
class OcclusionSpec:
    """Occluder sides as fractions of the input frame, drawn per batch from a seed (see config)."""

    width: float = 1 / 3
    height: float = 1 / 8
    jitter: float = 0.0
    fill: float = 0.0

    def rectangle(self, seed: int, size: int) -> OcclusionRect:
        w, h = self.width * size, self.height * size
        return sample_rectangle(
            seed,
            size,
            width=(w * (1 - self.jitter), w * (1 + self.jitter)),
            height=(h * (1 - self.jitter), h * (1 + self.jitter)),
            margin=size / 24,
        )

    def apply(
        self, images: torch.Tensor, landmarks: torch.Tensor, mesh: FaceMesh, seed: int
    ) -> tuple[torch.Tensor, OcclusionRect]:
        """The batch with one physical occlusion (rectangle drawn from ``seed``) and the rectangle."""
        rect = self.rectangle(seed, mesh.size)
        masks = occlusion_masks(mesh, landmarks, rect, images.shape[-1])
        return occlude(images, masks, self.fill), rect
