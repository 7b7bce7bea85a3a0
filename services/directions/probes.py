"""What the apply-side RPCs share: a probe as a template, the set/decoder compatibility checks, PNGs.

Every direction lives in the template space of exactly one FR model version, and a decoder only
inverts the FR version it was trained for; the two aliases move independently. So each request takes
one snapshot of the FR slot, and every set, template and decoder it touches is checked against that
snapshot before any arithmetic: a mismatch is FAILED_PRECONDITION naming both sides, never a
confident picture of nonsense.
"""

from __future__ import annotations

import io

import torch
from PIL import Image as PILImage

from facexplain.artifacts.decoder import LoadedDecoder
from facexplain.pipeline import FacePipeline, FaceSelection
from facexplain.viz import image_grid
from services.api.v1 import common_pb2
from services.directions.sets import StoredSet
from services.kit.errors import FailedPrecondition, InvalidArgument, NoFaceFound, ServiceError
from services.kit.images import decode_image
from services.kit.models import ModelSlot, ServedModel
from services.kit.templates import template_from_proto


def probe_template(
    probe: common_pb2.Probe,
    fr: ServedModel[FacePipeline],
    max_pixels: int,
    which: str = "probe",
    selection: FaceSelection = FaceSelection.LARGEST,
) -> torch.Tensor:
    """The probe's raw template under the served FR model (an image is detected, aligned and embedded)."""
    kind = probe.WhichOneof("kind")
    info = fr.model.info
    try:
        if kind == "template":
            return template_from_proto(probe.template, info.dim, fr.name, model_version=fr.version)
        if kind == "image":
            image = decode_image(probe.image, max_pixels)
            result = fr.model.analyze([image], selection)[0]
            if result is None:
                raise NoFaceFound(f"the detector found no face in the {image.shape[2]}x{image.shape[1]} image")
            return result.template.float().cpu()
    except ServiceError as exc:
        raise type(exc)(f"{which}: {exc.message}") from None
    raise InvalidArgument(f"{which} is empty: set an image or a template")


def check_same_fr(entry: StoredSet, fr: ServedModel[FacePipeline]) -> None:
    """FAILED_PRECONDITION unless the set was made with exactly the FR version this service serves."""
    d = entry.data
    if (d.fr_name, d.fr_version) != (fr.name, fr.version):
        raise FailedPrecondition(
            f"set {d.set_id} lives in the template space of {d.fr_name} v{d.fr_version}, but this service serves "
            f"{fr.name} v{fr.version}; templates of the two are not comparable (rediscover the set for "
            f"v{fr.version}, or serve v{d.fr_version})"
        )


def decoder_for(slot: ModelSlot[LoadedDecoder], fr: ServedModel[FacePipeline]) -> ServedModel[LoadedDecoder]:
    """The served decoder, if it inverts the served FR version; FAILED_PRECONDITION otherwise."""
    decoder = slot.peek()
    if decoder is None:
        why = f" ({slot.last_reload_error})" if slot.last_reload_error else ""
        raise FailedPrecondition(
            f"decode requested but this service has no decoder for {fr.name} v{fr.version}{why}; "
            "ask without decode, or register a decoder for that FR version"
        )
    dec = decoder.model
    if (dec.fr_name, dec.fr_version) != (fr.name, fr.version):
        raise FailedPrecondition(
            f"decode requested but decoder {decoder.name} v{decoder.version} inverts {dec.fr_name} v{dec.fr_version}, "
            f"not the served {fr.name} v{fr.version}"
        )
    return decoder


def png01(image: torch.Tensor) -> common_pb2.Image:
    """(3, H, W) in [0, 1] -> PNG ``Image``."""
    arr = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return _png(arr)


def strip_png(frames01: torch.Tensor) -> common_pb2.Image:
    """(N, 3, H, W) frames in [0, 1] -> one PNG with the frames left to right (thin white gaps)."""
    return _png(image_grid(frames01, ncol=frames01.shape[0]))


def _png(arr: object) -> common_pb2.Image:
    buf = io.BytesIO()
    PILImage.fromarray(arr).save(buf, format="PNG")  # type: ignore[arg-type]
    return common_pb2.Image(encoded=buf.getvalue())
