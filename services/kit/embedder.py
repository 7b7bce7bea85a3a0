"""The FR model (embedder) as a served model: what every service that embeds faces shares.

The embedding service serves it; the decoding service needs it too (Reconstruct embeds the input
face and re-embeds the reconstruction, and the decoder must invert exactly the served FR version).
Both load it the same way: by alias from the registry with a watcher, local face-api weights as the
fallback, so one function builds the slot for both.
"""

from __future__ import annotations

import json
from typing import Final, Literal

import torch

from facexplain.artifacts.embedder import KIND, KIND_EMBEDDER
from facexplain.metrics.verification import VerificationRule
from facexplain.pipeline import DetectedFace, EmbedderInfo, FacePipeline, FaceResult, FaceSelection
from services.api.v1 import common_pb2, embedding_pb2
from services.kit.config import ServiceSettings
from services.kit.errors import InvalidArgument
from services.kit.metrics import ServiceMetrics
from services.kit.models import ModelSlot, ServedModel
from services.kit.reload import ModelWatcher, serve_from_registry

_INPUT_MODES = {embedding_pb2.INPUT_MODE_UNSPECIFIED, embedding_pb2.INPUT_MODE_PHOTO, embedding_pb2.INPUT_MODE_ALIGNED}

_SELECTION: dict[int, FaceSelection] = {
    embedding_pb2.FACE_SELECTION_UNSPECIFIED: FaceSelection.LARGEST,
    embedding_pb2.FACE_SELECTION_LARGEST: FaceSelection.LARGEST,
    embedding_pb2.FACE_SELECTION_MOST_CONFIDENT: FaceSelection.MOST_CONFIDENT,
}


# The batch key's mode for items that are aligned chips (``INPUT_MODE_ALIGNED``): they skip detection.
ALIGNED: Final[Literal["aligned"]] = "aligned"

# Items that may share one batched ``analyze`` (services/kit/batching.py): same served version, same
# selection (or ``ALIGNED`` in its place: aligned chips that share one FR forward), and, for a call that
# brings its own batch, the same call (a third element unique to it: see ``own_batch``).
AnalyzeMode = FaceSelection | Literal["aligned"]
AnalyzeKey = tuple[ServedModel[FacePipeline], AnalyzeMode] | tuple[ServedModel[FacePipeline], AnalyzeMode, object]


def own_batch(served: ServedModel[FacePipeline], mode: AnalyzeMode) -> AnalyzeKey:
    """The key of a call whose images run as a forward of their own, never merged with other calls' images.

    For calls that bring their own batch (EmbedBatch). A template depends, in its last float32 bits (about
    5e-7 measured on the default model), on which other images share its forward pass; a batch request run
    alone gets the same templates whatever else the server is doing, so a client that sends chunks
    concurrently (the audit, spreading them over replicas) gets the templates it would get sending them one
    after another, and two runs of it agree to the bit. Single-image calls still merge: that is what the
    batcher is for.
    """
    return (served, mode, object())


def aligned_face(chip_size: int) -> DetectedFace:
    """The stand-in face of an aligned chip: the whole chip, no landmarks (no detector ran)."""
    return DetectedFace(torch.tensor([0.0, 0.0, float(chip_size), float(chip_size)]), 1.0, torch.zeros(0, 2))


def analyze_batch(key: AnalyzeKey, images: list[torch.Tensor]) -> list[FaceResult | None]:
    """One batched pipeline forward for a dynamic batcher's inference thread: detection to template for
    photos, the FR net alone for aligned chips (checked by :func:`check_aligned` before queueing)."""
    served, mode = key[0], key[1]
    if mode == ALIGNED:
        pipe = served.model
        face = aligned_face(pipe.info.chip_size)
        templates = pipe.embed_aligned(images)
        return [FaceResult(face, t, chip) for t, chip in zip(templates, images, strict=True)]
    assert isinstance(mode, FaceSelection)
    return served.model.analyze(images, mode)


def input_mode(value: int) -> bool:
    """True for ``INPUT_MODE_ALIGNED``, False for a photo; an unknown number is INVALID_ARGUMENT."""
    if value not in _INPUT_MODES:
        raise InvalidArgument(f"unknown input mode {value}")
    return value == embedding_pb2.INPUT_MODE_ALIGNED


def check_aligned(image: torch.Tensor, pipeline: FacePipeline) -> torch.Tensor:
    """``image`` as an aligned chip of ``pipeline``'s FR model, or INVALID_ARGUMENT naming the size it must be."""
    info = pipeline.info
    size = info.chip_size
    h, w = int(image.shape[1]), int(image.shape[2])
    if (h, w) != (size, size):
        raise InvalidArgument(
            f"an aligned input must be a {size}x{size} chip in the geometry of FR model {info.name} "
            f"(chip_size {size}, padding {info.chip_padding}), got a {w}x{h} image; send the photo with "
            "INPUT_MODE_PHOTO instead, or the chip EmbedResponse.aligned returned"
        )
    return image


def face_selection(value: int) -> FaceSelection:
    """The wire ``FaceSelection`` as the pipeline's; an unknown number is INVALID_ARGUMENT."""
    if value not in _SELECTION:
        raise InvalidArgument(f"unknown face selection {value}")
    return _SELECTION[value]


def box_to_proto(face_box: torch.Tensor, score: float) -> common_pb2.Box:
    """A detected face's (x1, y1, x2, y2) box and score on the wire."""
    x1, y1, x2, y2 = (float(v) for v in face_box)
    return common_pb2.Box(x1=x1, y1=y1, x2=x2, y2=y2, score=score)


def rule_to_proto(rule: VerificationRule) -> common_pb2.VerificationRule:
    """The FR model's stored verification rule on the wire (always defined on raw templates)."""
    return common_pb2.VerificationRule(
        metric=rule.metric,
        threshold=rule.threshold,
        accept_below=rule.accept_below,
        source=rule.source,
        normalized=False,
    )


def five_point_metadata(info: EmbedderInfo) -> dict[str, str]:
    """A five-point model's alignment for ModelStatus, as the registry-served bundle's metadata gives it."""
    if info.alignment == "dlib" or info.reference is None:
        return {}
    return {"alignment_scheme": info.alignment, "alignment_reference": json.dumps([list(p) for p in info.reference])}


def served_pipeline(pipeline: FacePipeline) -> ServedModel[FacePipeline]:
    """A pipeline as a served model, labelled with its own name and version (local weights)."""
    info = pipeline.info
    return ServedModel(
        name=info.name,
        version=info.version,
        kind=KIND_EMBEDDER,
        model=pipeline,
        metadata={
            "template_dim": str(info.dim),
            "chip_size": str(info.chip_size),
            "chip_padding": str(info.chip_padding),
            "verification_metric": info.rule.metric,
            "verification_threshold": str(info.rule.threshold),
            "verification_accept_below": str(info.rule.accept_below).lower(),
            "source": "face-api 1.7.15 weights (npm), PyTorch port",
            **five_point_metadata(info),
        },
        device=str(pipeline.device),
    )


def serve_embedder(
    settings: ServiceSettings,
    metrics: ServiceMetrics,
    *,
    name: str | None = None,
    alias: str | None = None,
    pipeline: FacePipeline | None = None,
) -> tuple[ModelSlot[FacePipeline], ModelWatcher[FacePipeline] | None]:
    """The FR model's slot: ``pipeline`` if given (tests, benchmarks), else ``name@alias`` from the
    registry (see :func:`~services.kit.reload.serve_from_registry`) with the local face-api weights as
    the fallback.
    """

    def local() -> ServedModel[FacePipeline]:
        return served_pipeline(pipeline or FacePipeline.default(settings.torch_device()))

    if pipeline is not None:
        served = local()
        metrics.set_served(served.name, served.version, KIND_EMBEDDER)
        return ModelSlot(served, label=KIND_EMBEDDER), None
    return serve_from_registry(
        settings,
        metrics,
        kind=KIND,
        fallback=local,
        name=name,
        alias=alias,
    )
