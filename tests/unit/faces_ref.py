"""dlib reference runs on a fixed subset of the real face data, shared by the model/alignment tests.

The subset is deterministic so figures are comparable across runs: the first image of each ORL
person (s1..s40, ``1.pgm``) and the first CelebA images, by sorted file name, in which dlib's HOG
detector (one up-sampling) finds exactly one face. dlib objects and results are cached per process
so that several test modules share one detection/alignment pass.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # face_recognition_models imports the deprecated pkg_resources
    import dlib
    import face_recognition_models

N_ORL = 40
N_CELEBA = 60
CHIP_SIZE = 150
CHIP_PADDING = 0.25
_UPSAMPLE = 1


@dataclass(frozen=True)
class RefFace:
    """One face as dlib sees it: the image, its detector box, 68 landmarks and aligned chip."""

    path: Path
    image: np.ndarray  # (H, W, 3) uint8 RGB
    box: tuple[float, float, float, float]  # x1, y1, x2, y2, exclusive right/bottom, pixels
    landmarks: np.ndarray  # (68, 2) float64, pixel-index coordinates
    chip: np.ndarray  # (150, 150, 3) uint8, dlib.get_face_chip(size=150, padding=0.25)
    shape: Any  # dlib.full_object_detection (kept for dlib calls)


@functools.lru_cache(maxsize=1)
def dlib_models() -> tuple[Any, Any, Any]:
    """(HOG detector, 68-point shape predictor, ResNet descriptor), loaded once per process."""
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(face_recognition_models.pose_predictor_model_location())
    recogniser = dlib.face_recognition_model_v1(face_recognition_models.face_recognition_model_location())
    return detector, predictor, recogniser


def load_rgb(path: Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB; greyscale (ORL) is replicated to three channels."""
    with Image.open(path) as img:
        return np.array(img.convert("RGB"))  # a writable copy, so torch.from_numpy is safe


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [0, 255], the layout the torch models take."""
    return torch.from_numpy(image).permute(2, 0, 1).float().contiguous()


def _reference_face(path: Path) -> RefFace | None:
    detector, predictor, _ = dlib_models()
    image = load_rgb(path)
    dets = detector(image, _UPSAMPLE)
    if len(dets) != 1:
        return None
    rect = dets[0]
    shape = predictor(image, rect)
    landmarks = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)
    chip = dlib.get_face_chip(image, shape, size=CHIP_SIZE, padding=CHIP_PADDING)
    box = (float(rect.left()), float(rect.top()), float(rect.right() + 1), float(rect.bottom() + 1))
    return RefFace(path, image, box, landmarks, np.ascontiguousarray(chip), shape)


@functools.lru_cache(maxsize=4)
def orl_faces(orl_dir: Path) -> tuple[RefFace, ...]:
    """First image of each ORL person where dlib finds exactly one face (all 40 at the time of writing)."""
    faces = (_reference_face(orl_dir / f"s{i}" / "1.pgm") for i in range(1, N_ORL + 1))
    return tuple(f for f in faces if f is not None)


@functools.lru_cache(maxsize=4)
def celeba_faces(celeba_dir: Path, count: int = N_CELEBA) -> tuple[RefFace, ...]:
    """The first ``count`` CelebA images (sorted by name) where dlib finds exactly one face."""
    found: list[RefFace] = []
    for path in sorted((celeba_dir / "images").glob("*.jpg")):
        face = _reference_face(path)
        if face is not None:
            found.append(face)
            if len(found) == count:
                break
    return tuple(found)


def dlib_descriptors(chips: list[np.ndarray]) -> np.ndarray:
    """dlib's 128-d descriptors of aligned 150x150 uint8 chips, as an (N, 128) float64 array."""
    _, _, recogniser = dlib_models()
    return np.array([np.array(d) for d in recogniser.compute_face_descriptor(chips)], dtype=np.float64)


@functools.cache
def dlib_chip_descriptor(dataset: str, data_dir: Path, index: int) -> np.ndarray:
    """dlib's descriptor of dlib's own chip of face ``index`` of a subset, cached per face.

    dlib's ResNet takes ~0.15 s per chip on one CPU core, so tests use a prefix of each subset
    and share the results across modules through this cache.
    """
    return dlib_descriptors([faces_for(dataset, data_dir)[index].chip])[0]


def faces_for(dataset: str, data_dir: Path) -> tuple[RefFace, ...]:
    """The reference subset of ``dataset`` ('orl' or 'celeba') under the shared data folder."""
    if dataset == "orl":
        return orl_faces(data_dir / "orl_faces")
    if dataset == "celeba":
        return celeba_faces(data_dir / "celeba_subset")
    raise ValueError(f"unknown data set {dataset!r}")
