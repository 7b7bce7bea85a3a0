"""Image -> detected face -> 68 landmarks -> aligned 150x150 chip -> template, in torch end to end.

The pipeline is the "FR model" the rest of facexplain explains: decoders invert its templates,
attacks differentiate through it. Landmarks fix the alignment (they are treated as constants), and
the chip is sampled from the image with a differentiable warp, so gradients reach the input pixels.

The default landmarks are dlib's: face-api's landmark net on the detector box gives rough points,
and dlib's shape predictor (in torch) runs on the box dlib's detector would have drawn around them.
So the default model is dlib's face_recognition pipeline except for the detector.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from enum import Enum

import torch

from facexplain.faces.align import DLIB_ALIGNMENT, align_faces, align_faces_from_images
from facexplain.faces.detect import FaceDetector
from facexplain.metrics.verification import DLIB_L2_RULE, VerificationRule
from facexplain.models.landmarks import FaceLandmark68Net, landmarks_for_image_boxes
from facexplain.models.recognition import FaceRecognitionNet
from facexplain.models.shape_predictor import (
    BOX_FROM_POINTS,
    MAX_SHIFT,
    REFINE_PASSES,
    ShapePredictor68,
    refine_landmarks,
)


class FaceSelection(Enum):
    LARGEST = "largest"
    MOST_CONFIDENT = "most_confident"


@dataclass(frozen=True)
class EmbedderInfo:
    """What a client needs to interpret a template: where it came from and how to compare it."""

    name: str
    version: str
    dim: int
    chip_size: int
    chip_padding: float
    rule: VerificationRule
    # how chips are cut: dlib's 68-point chip (default) or a five-point similarity onto ``reference``
    alignment: str = DLIB_ALIGNMENT
    reference: tuple[tuple[float, float], ...] | None = None

    def alignment_args(self) -> dict[str, object]:
        """Keyword arguments of :func:`facexplain.faces.align.align_faces` for this model's chips."""
        ref = torch.tensor(self.reference, dtype=torch.float64) if self.reference is not None else None
        return {"size": self.chip_size, "padding": self.chip_padding, "alignment": self.alignment, "reference": ref}


DEFAULT_EMBEDDER = EmbedderInfo(
    name="dlib-resnet128",
    version="local",
    dim=128,
    chip_size=150,
    chip_padding=0.25,
    rule=DLIB_L2_RULE,
)


# Face-set cache key (``fr_key``) of templates made by ``FacePipeline.default()`` outside the registry.
# It names the front end too (sets made before dlib's shape predictor joined it were "default-local"),
# and changes with any of the constants that say how the predictor is placed and trusted.
DEFAULT_FR_KEY = (
    "default-local-dlib68-"
    + hashlib.sha256(json.dumps([BOX_FROM_POINTS, REFINE_PASSES, MAX_SHIFT]).encode()).hexdigest()[:8]
)


@dataclass(frozen=True)
class DetectedFace:
    box: torch.Tensor  # (4,) x1, y1, x2, y2 in input pixels
    score: float
    landmarks: torch.Tensor  # (68, 2) input pixels


@dataclass(frozen=True)
class FaceResult:
    face: DetectedFace
    template: torch.Tensor  # (dim,) raw
    chip: torch.Tensor  # (3, S, S) float in [0, 255]


class FacePipeline:
    """The default FR model as one object; thread-safe (one forward pass at a time per pipeline)."""

    def __init__(
        self,
        detector: FaceDetector,
        landmark_net: FaceLandmark68Net,
        recognition_net: FaceRecognitionNet,
        info: EmbedderInfo = DEFAULT_EMBEDDER,
        device: str | torch.device = "cpu",
        shape_predictor: ShapePredictor68 | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.detector = detector
        self.landmark_net = landmark_net.to(self.device).eval()
        self.shape_predictor = shape_predictor.to(self.device).eval() if shape_predictor is not None else None
        self.recognition_net = recognition_net.to(self.device).eval()
        self.info = info
        self._lock = threading.Lock()

    @classmethod
    def default(cls, device: str | torch.device = "cpu") -> FacePipeline:
        """face-api's SSD detector, dlib's 68-point shape predictor (seeded by face-api's landmark net)
        and dlib's 128-d ResNet, all in torch: dlib's face_recognition pipeline up to the detector."""
        return cls(
            FaceDetector.default(device),
            FaceLandmark68Net.from_faceapi(),
            FaceRecognitionNet.from_faceapi(),
            DEFAULT_EMBEDDER,
            device,
            ShapePredictor68.from_dlib(),
        )

    def with_recognition(self, recognition_net: torch.nn.Module, info: EmbedderInfo) -> FacePipeline:
        """Another FR model on this pipeline's front end (detector, landmarks, alignment), e.g. a trained
        SAD/FAD net. Anything that maps (N, 3, S, S) chips to (N, dim) templates serves."""
        return FacePipeline(
            self.detector,
            self.landmark_net,
            recognition_net,  # type: ignore[arg-type]
            info,
            self.device,
            self.shape_predictor,
        )

    def _to_device(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        return [im.to(self.device, torch.float32) for im in images]

    @torch.no_grad()
    def detect(self, images: list[torch.Tensor]) -> list[list[DetectedFace]]:
        """All faces in each image, with landmarks, highest detector score first."""
        with self._lock:
            return self._detect(self._to_device(images))

    def _detect(self, images: list[torch.Tensor]) -> list[list[DetectedFace]]:
        dets = self.detector.detect(images)
        out: list[list[DetectedFace]] = [[] for _ in images]
        index = torch.cat([torch.full((len(d.boxes),), i, dtype=torch.long) for i, d in enumerate(dets)])
        if index.numel() == 0:
            return out
        boxes = torch.cat([d.boxes for d in dets])
        scores = torch.cat([d.scores for d in dets]).tolist()
        # one landmark batch over every face of every image: batches of one cost several times more per face
        lms = landmarks_for_image_boxes(self.landmark_net, images, index, boxes)
        if self.shape_predictor is not None:
            lms = refine_landmarks(self.shape_predictor, images, index, lms).float()
        lms = lms.cpu()
        for k, i in enumerate(index.tolist()):
            out[i].append(DetectedFace(boxes[k].cpu(), scores[k], lms[k]))
        return out

    @staticmethod
    def select(faces: list[DetectedFace], selection: FaceSelection) -> DetectedFace | None:
        if not faces:
            return None
        if selection is FaceSelection.MOST_CONFIDENT:
            return max(faces, key=lambda f: f.score)
        return max(faces, key=lambda f: float((f.box[2] - f.box[0]) * (f.box[3] - f.box[1])))

    def align(self, image: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        """The (3, S, S) chip the recognition net sees; differentiable w.r.t. ``image``."""
        return align_faces(
            image[None].to(self.device),
            landmarks[None].to(self.device, torch.float32),
            **self.info.alignment_args(),  # type: ignore[arg-type]
        )[0]

    def embed_chips(self, chips: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) chips in [0, 255] -> (N, dim) raw templates (keeps gradients if enabled)."""
        return self.recognition_net(chips.to(self.device))

    @torch.no_grad()
    def analyze(
        self, images: list[torch.Tensor], selection: FaceSelection = FaceSelection.LARGEST
    ) -> list[FaceResult | None]:
        """One face per image (``None`` where no face is found), templates computed in one batch."""
        with self._lock:
            images = self._to_device(images)
            chosen = [self.select(faces, selection) for faces in self._detect(images)]
            idx = [i for i, f in enumerate(chosen) if f is not None]
            results: list[FaceResult | None] = [None] * len(images)
            if not idx:
                return results
            landmarks = torch.stack([chosen[i].landmarks for i in idx])  # type: ignore[union-attr]
            chips = align_faces_from_images(
                images,
                torch.tensor(idx),
                landmarks.to(self.device, torch.float32),
                **self.info.alignment_args(),  # type: ignore[arg-type]
            )
            templates = self.embed_chips(chips).cpu()
            for k, i in enumerate(idx):
                face = chosen[i]
                assert face is not None
                results[i] = FaceResult(face, templates[k], chips[k].cpu())
            return results

    @torch.no_grad()
    def embed_aligned(self, chips: list[torch.Tensor]) -> torch.Tensor:
        """Templates of chips already in this model's geometry, e.g. ``FaceResult.chip`` or a decoded face.

        Skips detection, landmarks and alignment, which are most of :meth:`analyze`'s time, and runs
        the same FR forward as :meth:`analyze` does on its chips, so a chip the pipeline aligned gets
        the template the photo got. Each chip is (3, S, S) in [0, 255] with S = ``info.chip_size``.
        """
        size = self.info.chip_size
        for i, chip in enumerate(chips):
            if tuple(chip.shape) != (3, size, size):
                raise ValueError(f"chip {i} is {tuple(chip.shape)}, not (3, {size}, {size})")
        if not chips:
            return torch.zeros(0, self.info.dim)
        with self._lock:
            return self.embed_chips(torch.stack(chips).to(self.device, torch.float32)).cpu()

    def template_from_image(self, image: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        """Template of one image with fixed landmarks, differentiable w.r.t. the image pixels."""
        return self.embed_chips(self.align(image, landmarks)[None])[0]
