"""DecodingService: the gRPC adapter over a registered Deep Face Decoder and the FR model it inverts.

Two slots, each followed by its own registry watcher: the decoder (``LoadedDecoder``; empty until
the registry provides a valid version, so its RPCs answer UNAVAILABLE meanwhile) and the FR model
(``FacePipeline``; local face-api weights as fallback) that Reconstruct embeds with. A decoder is
only meaningful for the exact FR version it was trained on, and the two aliases move independently,
so every request snapshots both slots and checks that pair first (FAILED_PRECONDITION naming both
when they disagree) rather than decoding templates into confident nonsense.

Every decoder forward (Decode, DecodeBatch, Interpolate, Reconstruct) runs on the decoder's inference
thread through a :class:`~services.kit.batching.DynamicBatcher`, so concurrent calls share one batched
forward against one decoder version (the batch key is the decoder snapshot the request checked);
Reconstruct's face analysis goes through the FR model's batcher the same way.

Nothing here logs or keeps templates or images (see DESIGN.md); the RPC wrapper logs method, status
and latency only.
"""

from __future__ import annotations

import logging
from functools import lru_cache

import grpc
import torch
import torch.nn.functional as F

from facexplain.artifacts.decoder import LoadedDecoder
from facexplain.directions.interpolation import lerp, positions, slerp
from facexplain.faces.occlusion import OCCLUSION_REGIONS, FaceMesh, chip_mesh, occlude, occlusion_masks, region_rect
from facexplain.faces.regions import landmarks_to_chip
from facexplain.metrics.image import SSIM_WINDOW, psnr, ssim
from facexplain.metrics.occlusion import occlusion_effects
from facexplain.metrics.reconstruction import embed_images, resize01
from facexplain.pipeline import FacePipeline, FaceResult
from services.api.v1 import common_pb2, decoding_pb2, decoding_pb2_grpc
from services.decoding.settings import DecodingSettings
from services.kit.batching import BatchingConfig, DynamicBatcher
from services.kit.embedder import AnalyzeKey, analyze_batch, box_to_proto, face_selection, rule_to_proto
from services.kit.errors import FailedPrecondition, InvalidArgument, NoFaceFound, ResourceExhausted, ServiceError
from services.kit.images import decode_image, png_image
from services.kit.metrics import ServiceMetrics
from services.kit.models import ModelSlot, ServedModel, combined_status
from services.kit.reload import reload_response
from services.kit.rpc import check_batch, check_deadline, unary
from services.kit.templates import template_from_proto, template_to_proto

log = logging.getLogger("facexplain.decoding")
SERVICE_NAME = decoding_pb2.DESCRIPTOR.services_by_name["DecodingService"].full_name
DEFAULT_STEPS = 8

_MODES = {
    decoding_pb2.INTERPOLATION_MODE_UNSPECIFIED: decoding_pb2.INTERPOLATION_MODE_LINEAR,
    decoding_pb2.INTERPOLATION_MODE_LINEAR: decoding_pb2.INTERPOLATION_MODE_LINEAR,
    decoding_pb2.INTERPOLATION_MODE_SLERP: decoding_pb2.INTERPOLATION_MODE_SLERP,
}


def _png01(image: torch.Tensor) -> common_pb2.Image:
    """(3, H, W) in [0, 1] -> PNG ``Image``."""
    return png_image(image.clamp(0.0, 1.0) * 255.0)


def _fr_ref(decoder: LoadedDecoder) -> common_pb2.ModelRef:
    return common_pb2.ModelRef(name=decoder.fr_name, version=decoder.fr_version)


def _same_model(a: common_pb2.ModelRef, b: common_pb2.ModelRef) -> bool:
    """False only when both templates name a model (or version) and the names differ."""
    if a.name and b.name and a.name != b.name:
        return False
    return not (a.version and b.version and a.version != b.version)


def decode_batch(decoder: ServedModel[LoadedDecoder], templates: list[torch.Tensor]) -> list[torch.Tensor]:
    """One batched decoder forward for the dynamic batcher: (d,) templates -> (3, S, S) images in [0, 1]."""
    return list(decoder.model.decode(torch.stack([t.float() for t in templates])))


def chip_at(chip255: torch.Tensor, size: int) -> torch.Tensor:
    """The FR model's aligned chip (3, S, S) in [0, 255] as the decoder's reference: (1, 3, size, size) in [0, 1].

    Antialiased bilinear, as the decoder's training targets are made, so PSNR/SSIM compare the
    reconstruction with what the decoder could at best have drawn at its resolution.
    """
    return resize01(chip255[None].float() / 255.0, size).clamp(0.0, 1.0)


@lru_cache(maxsize=4)
def _mesh(size: int, padding: float) -> FaceMesh:
    """The occlusion mesh of an FR model's chip geometry (a Delaunay triangulation: built once)."""
    return chip_mesh(size, padding)


def occlusion_regions(names: list[str]) -> list[str]:
    """The regions an Occlude request names (all when none), or INVALID_ARGUMENT."""
    if not names:
        return list(OCCLUSION_REGIONS)
    known = ", ".join(OCCLUSION_REGIONS)
    seen: set[str] = set()
    for name in names:
        if name not in OCCLUSION_REGIONS:
            raise InvalidArgument(f"unknown occlusion region {name!r}; one of {known}")
        if name in seen:
            raise InvalidArgument(f"occlusion region {name!r} is named twice")
        seen.add(name)
    return list(names)


class DecodingServicer(decoding_pb2_grpc.DecodingServiceServicer):
    def __init__(
        self,
        decoder_slot: ModelSlot[LoadedDecoder],
        fr_slot: ModelSlot[FacePipeline],
        settings: DecodingSettings,
        metrics: ServiceMetrics,
    ) -> None:
        self.decoder_slot = decoder_slot
        self.fr_slot = fr_slot
        self.settings = settings
        self.metrics = metrics
        config = BatchingConfig.from_settings(settings)
        self.decoder_batcher: DynamicBatcher[ServedModel[LoadedDecoder], torch.Tensor, torch.Tensor] = DynamicBatcher(
            "decoder", decode_batch, config, metrics
        )
        self.fr_batcher: DynamicBatcher[AnalyzeKey, torch.Tensor, FaceResult | None] = DynamicBatcher(
            "embedder", analyze_batch, config, metrics
        )

    def close(self) -> None:
        """Stop the inference threads (the server calls this after in-flight calls finished)."""
        self.decoder_batcher.stop()
        self.fr_batcher.stop()

    # -- helpers -------------------------------------------------------------------------------------
    def _models(self) -> tuple[ServedModel[LoadedDecoder], ServedModel[FacePipeline]]:
        """One snapshot of both models for the whole request, checked to belong together."""
        decoder = self.decoder_slot.current()  # UNAVAILABLE while no decoder is loaded
        fr = self.fr_slot.current()
        dec = decoder.model
        if (dec.fr_name, dec.fr_version) != (fr.name, fr.version):
            raise FailedPrecondition(
                f"decoder {decoder.name} v{decoder.version} inverts FR model {dec.fr_name} v{dec.fr_version}, but "
                f"this service serves FR model {fr.name} v{fr.version}; templates of the two are not comparable. "
                f"Promote a decoder trained for {fr.name} v{fr.version}, or point the FR alias back at "
                f"v{dec.fr_version}"
            )
        return decoder, fr

    @staticmethod
    def _template(t: common_pb2.Template, decoder: LoadedDecoder, which: str = "") -> torch.Tensor:
        """A request template the decoder can invert, or INVALID_ARGUMENT / FAILED_PRECONDITION."""
        try:
            return template_from_proto(t, decoder.template_dim, decoder.fr_name, model_version=decoder.fr_version)
        except ServiceError as exc:
            if not which:
                raise
            raise type(exc)(f"{which}: {exc.message}") from None

    def _decode_response(self, image: torch.Tensor, decoder: ServedModel[LoadedDecoder]) -> decoding_pb2.DecodeResponse:
        return decoding_pb2.DecodeResponse(image=_png01(image), decoder=decoder.ref(), fr_model=_fr_ref(decoder.model))

    # -- RPCs ------------------------------------------------------------------------------------------
    @unary
    def Decode(self, request: decoding_pb2.DecodeRequest, context: grpc.ServicerContext) -> decoding_pb2.DecodeResponse:
        decoder, _fr = self._models()
        vec = self._template(request.template, decoder.model)
        image = self.decoder_batcher.run(decoder, [vec], context)[0]
        return self._decode_response(image, decoder)

    @unary
    def DecodeBatch(
        self, request: decoding_pb2.DecodeBatchRequest, context: grpc.ServicerContext
    ) -> decoding_pb2.DecodeBatchResponse:
        decoder, _fr = self._models()
        n = len(request.templates)
        check_batch(n, self.settings.max_batch_size, "templates")
        results = [decoding_pb2.DecodeResult(index=i) for i in range(n)]
        valid: dict[int, torch.Tensor] = {}
        for i, t in enumerate(request.templates):
            try:
                valid[i] = self._template(t, decoder.model)
            except ServiceError as exc:
                results[i].error.CopyFrom(exc.item_error())
        check_deadline(context, "template checks")
        order = sorted(valid)
        if order:
            images = self.decoder_batcher.run(decoder, [valid[i] for i in order], context)
            for k, i in enumerate(order):
                results[i].ok.CopyFrom(self._decode_response(images[k], decoder))
        self.metrics.items.labels("decoding", "DecodeBatch", "ok").inc(len(order))
        self.metrics.items.labels("decoding", "DecodeBatch", "error").inc(n - len(order))
        return decoding_pb2.DecodeBatchResponse(results=results, decoder=decoder.ref(), fr_model=_fr_ref(decoder.model))

    @unary
    def Reconstruct(
        self, request: decoding_pb2.ReconstructRequest, context: grpc.ServicerContext
    ) -> decoding_pb2.ReconstructResponse:
        decoder, fr = self._models()
        selection = face_selection(request.selection)
        image = decode_image(request.image, self.settings.max_image_pixels)
        check_deadline(context, "image decoding")
        result = self.fr_batcher.run((fr, selection), [image], context)[0]
        if result is None:
            raise NoFaceFound(f"the detector found no face in the {image.shape[2]}x{image.shape[1]} image")
        check_deadline(context, "embedding")
        dec = decoder.model
        aligned = chip_at(result.chip, dec.out_size)
        recon = self.decoder_batcher.run(decoder, [result.template], context)[0][None].float()
        # Re-embed the reconstruction as the FR model sees faces (as training evaluates it).
        info = fr.model.info
        recon_template = embed_images(fr.model.embed_chips, recon, info.chip_size)[0]
        template = result.template.float()
        # SSIM's 11-px window does not fit a decoder rendering less than 11 px: shrink it rather than fail.
        window = min(SSIM_WINDOW, dec.out_size)
        rule = info.rule
        metrics = decoding_pb2.ReconstructionMetrics(
            psnr=float(psnr(recon, aligned)[0]),
            ssim=float(ssim(recon, aligned, window=window)[0]),
            identity_cosine=float(F.cosine_similarity(template, recon_template, dim=0)),
            same_person=bool(rule.accepts(template[None], recon_template[None])[0]),
            rule=rule_to_proto(rule),
        )
        return decoding_pb2.ReconstructResponse(
            aligned=_png01(aligned[0]),
            reconstruction=_png01(recon[0]),
            template=template_to_proto(template, fr),
            metrics=metrics,
            decoder=decoder.ref(),
            fr_model=_fr_ref(dec),
            face=box_to_proto(result.face.box, result.face.score),
        )

    @unary
    def Occlude(
        self, request: decoding_pb2.OccludeRequest, context: grpc.ServicerContext
    ) -> decoding_pb2.OccludeResponse:
        decoder, fr = self._models()
        regions = occlusion_regions(list(request.regions))
        selection = face_selection(request.selection)
        image = decode_image(request.image, self.settings.max_image_pixels)
        check_deadline(context, "image decoding")
        result = self.fr_batcher.run((fr, selection), [image], context)[0]
        if result is None:
            raise NoFaceFound(f"the detector found no face in the {image.shape[2]}x{image.shape[1]} image")
        info = fr.model.info
        dec = decoder.model
        size, padding = info.chip_size, info.chip_padding
        # The occluders are drawn on the FR model's own chip, so the model embeds what it would see.
        chip_lm = landmarks_to_chip(result.face.landmarks[None].float().cpu(), size, padding)
        mesh = _mesh(size, padding)
        masks = torch.cat([occlusion_masks(mesh, chip_lm, region_rect(r, size, padding), size) for r in regions])
        chip = result.chip.float()[None].expand(len(regions), -1, -1, -1)
        occluded = occlude(chip, masks)
        with torch.no_grad():
            occ_templates = fr.model.embed_chips(occluded).float().cpu()
        check_deadline(context, "embedding the occluded faces")
        template = result.template.float()
        images = self.decoder_batcher.run(decoder, [template, *occ_templates], context)
        decoded_clean, decoded_occ = images[0].float(), torch.stack(images[1:]).float()
        decoded_templates = embed_images(fr.model.embed_chips, decoded_occ, size)
        aligned = chip_at(result.chip, dec.out_size)[0]
        occluded01 = resize01(occluded / 255.0, dec.out_size).clamp(0.0, 1.0)
        effects = occlusion_effects(
            template,
            occ_templates,
            decoded_templates,
            aligned,
            occluded01,
            decoded_clean,
            decoded_occ,
            masks,
            info.rule,
        )
        results = [
            decoding_pb2.OcclusionResult(
                region=r, occluded=_png01(occluded01[i]), reconstruction=_png01(decoded_occ[i]), **e.as_dict()
            )
            for i, (r, e) in enumerate(zip(regions, effects, strict=True))
        ]
        return decoding_pb2.OccludeResponse(
            aligned=_png01(aligned),
            reconstruction=_png01(decoded_clean),
            results=results,
            rule=rule_to_proto(info.rule),
            decoder=decoder.ref(),
            fr_model=_fr_ref(dec),
            face=box_to_proto(result.face.box, result.face.score),
        )

    @unary
    def Interpolate(
        self, request: decoding_pb2.InterpolateRequest, context: grpc.ServicerContext
    ) -> decoding_pb2.InterpolateResponse:
        decoder, _fr = self._models()
        steps = request.steps or DEFAULT_STEPS
        if steps < 2:
            raise InvalidArgument(f"steps is {steps}: need at least 2 frames (both ends), or 0 for {DEFAULT_STEPS}")
        limit = self.settings.max_interpolation_steps
        if steps > limit:
            raise ResourceExhausted(
                f"{steps} steps exceed the limit of {limit} frames (FACEXPLAIN_MAX_INTERPOLATION_STEPS)"
            )
        if request.mode not in _MODES:
            raise InvalidArgument(f"unknown interpolation mode {request.mode}")
        mode = _MODES[request.mode]
        a_ref, b_ref = request.a.model, request.b.model
        if not _same_model(a_ref, b_ref):
            raise InvalidArgument(
                f"a comes from {a_ref.name or '?'} v{a_ref.version or '?'} and b from {b_ref.name or '?'} "
                f"v{b_ref.version or '?'}: templates of different FR models cannot be interpolated"
            )
        dec = decoder.model
        a = self._template(request.a, dec, "a")
        b = self._template(request.b, dec, "b")
        s = positions(steps)
        path = slerp(a, b, s) if mode == decoding_pb2.INTERPOLATION_MODE_SLERP else lerp(a, b, s)
        check_deadline(context, "interpolation")
        frames = self.decoder_batcher.run(decoder, list(path), context)
        # Unit templates stay unit length only on the sphere (slerp); a chord between them is shorter.
        normalized = request.a.normalized and request.b.normalized and mode == decoding_pb2.INTERPOLATION_MODE_SLERP
        fr_ref = _fr_ref(dec)
        resp = decoding_pb2.InterpolateResponse(
            frames=[_png01(f) for f in frames],
            templates=[
                common_pb2.Template(values=v.tolist(), dim=int(v.numel()), model=fr_ref, normalized=normalized)
                for v in path.float()
            ],
            positions=[float(x) for x in s],
            decoder=decoder.ref(),
            fr_model=fr_ref,
        )
        if request.strip:
            resp.strip.CopyFrom(_png01(torch.cat(list(frames), dim=-1)))
        return resp

    @unary
    def ModelStatus(
        self, request: common_pb2.ModelStatusRequest, context: grpc.ServicerContext
    ) -> common_pb2.ModelStatusResponse:
        return combined_status([self.decoder_slot, self.fr_slot])

    @unary
    def Reload(self, request: common_pb2.ReloadRequest, context: grpc.ServicerContext) -> common_pb2.ReloadResponse:
        # The watchers' poll path, run now for the decoder and the FR model (or the one named).
        return reload_response([self.decoder_slot, self.fr_slot], request, context)
