"""The face folders facexplain reads: ORL (one folder per person) and the CelebA subset (labels.csv)."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".pgm", ".bmp", ".ppm", ".webp"}


@dataclass(frozen=True)
class FaceRecord:
    path: Path
    identity: str
    labels: dict[str, float] = field(default_factory=dict)


def load_image(path: Path) -> torch.Tensor:
    """An image file as a (3, H, W) float32 RGB tensor in [0, 255] (greyscale replicated)."""
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def list_images(root: Path) -> list[Path]:
    """Every image file below ``root``, sorted, so runs see the same order everywhere."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def orl_records(root: Path) -> list[FaceRecord]:
    """ORL / AT&T: folders ``s1`` .. ``s40``, one per person."""
    return [FaceRecord(p, p.parent.name) for p in list_images(root) if p.parent.name.startswith("s")]


def celeba_records(root: Path) -> list[FaceRecord]:
    """CelebA subset: ``images/`` plus ``labels.csv`` (file, identity, 40 binary attributes)."""
    out = []
    with open(root / "labels.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            file, ident = row.pop("file"), row.pop("identity")
            out.append(FaceRecord(root / "images" / file, ident, {k: float(v) for k, v in row.items()}))
    return out
