"""EmbeddingService: the gRPC adapter over ``facexplain.pipeline.FacePipeline``.

Every pipeline forward that embeds (Embed, EmbedBatch, Verify's image probes) goes through one
:class:`~services.kit.batching.DynamicBatcher`: handler threads decode images and wait, one inference
thread runs concurrent calls' images as one ``analyze`` batch (detection, landmarks, alignment and
the FR net: detection dominates the time, so batching only the FR net would leave most of it per call).
The batch key is the served model snapshot plus the face selection, so a batch never mixes versions.

``INPUT_MODE_ALIGNED`` requests send chips already in the model's geometry (faces the pipeline aligned,
decoded faces, edited chips): they queue on the same inference thread under their own key and run the
FR net alone, which is all the photo path does with the chip once it has aligned it.
"""

from __future__ import annotations

import logging

import grpc
import torch

from facexplain.pipeline import FacePipeline, FaceResult, FaceSelection
from services.api.v1 import common_pb2, embedding_pb2, embedding_pb2_grpc
from services.kit.batching import BatchingConfig, DynamicBatcher
from services.kit.config import ServiceSettings
from services.kit.embedder import (
    ALIGNED,
    AnalyzeKey,
    AnalyzeMode,
    analyze_batch,
    box_to_proto,
    check_aligned,
    face_selection,
    input_mode,
    own_batch,
    rule_to_proto,
)
from services.kit.errors import InvalidArgument, NoFaceFound, ServiceError
from services.kit.images import decode_image, png_image
from services.kit.metrics import ServiceMetrics
from services.kit.models import ModelSlot, ServedModel
from services.kit.reload import reload_response
from services.kit.rpc import check_batch, check_deadline, unary
from services.kit.templates import template_from_proto, template_to_proto

log = logging.getLogger("facexplain.embedding")
SERVICE_NAME = embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"].full_name


def _landmarks(points: torch.Tensor) -> common_pb2.Landmarks:
    return common_pb2.Landmarks(points=[common_pb2.Point(x=float(x), y=float(y)) for x, y in points.tolist()])


class EmbeddingServicer(embedding_pb2_grpc.EmbeddingServiceServicer):
    def __init__(self, slot: ModelSlot[FacePipeline], settings: ServiceSettings, metrics: ServiceMetrics) -> None:
        self.slot = slot
        self.settings = settings
        self.metrics = metrics
        self.batcher: DynamicBatcher[AnalyzeKey, torch.Tensor, FaceResult | None] = DynamicBatcher(
            "embedder", analyze_batch, BatchingConfig.from_settings(settings), metrics
        )

    def close(self) -> None:
        """Stop the inference thread (the server calls this after in-flight calls finished)."""
        self.batcher.stop()

    # -- helpers -------------------------------------------------------------------------------------
    def _selection(self, value: int) -> FaceSelection:
        return face_selection(value)

    def _response(
        self,
        result: FaceResult,
        served: ServedModel[FacePipeline],
        normalize: bool,
        return_aligned: bool,
        aligned: bool = False,
    ) -> embedding_pb2.EmbedResponse:
        resp = embedding_pb2.EmbedResponse(
            template=template_to_proto(result.template, served, normalized=normalize), model=served.ref()
        )
        if not aligned:  # an aligned chip had no detection: no box, no landmarks to report
            resp.face.CopyFrom(box_to_proto(result.face.box, result.face.score))
            resp.landmarks.CopyFrom(_landmarks(result.face.landmarks))
        if return_aligned:
            resp.aligned.CopyFrom(png_image(result.chip))
        return resp

    def _analyze(
        self,
        served: ServedModel[FacePipeline],
        images: list[torch.Tensor],
        selection: FaceSelection,
        context: grpc.ServicerContext,
        aligned: bool = False,
        *,
        own_forward: bool = False,
    ) -> list[FaceResult | None]:
        mode: AnalyzeMode = ALIGNED if aligned else selection
        key = own_batch(served, mode) if own_forward else (served, mode)
        return self.batcher.run(key, images, context)

    def _probe_template(
        self,
        probe: common_pb2.Probe,
        served: ServedModel[FacePipeline],
        which: str,
        selection: FaceSelection,
        context: grpc.ServicerContext,
    ) -> torch.Tensor:
        kind = probe.WhichOneof("kind")
        info = served.model.info
        if kind == "template":
            if probe.template.normalized and info.rule.metric == "l2":
                raise InvalidArgument(
                    f"{which}: template is L2-normalised, but the verification rule of {info.name!r} is defined on "
                    "raw templates; send the raw template (normalize=false)"
                )
            try:
                return template_from_proto(probe.template, info.dim, info.name, model_version=info.version)
            except ServiceError as exc:
                raise type(exc)(f"{which}: {exc.message}") from None
        if kind == "image":
            try:
                image = decode_image(probe.image, self.settings.max_image_pixels)
            except ServiceError as exc:
                raise type(exc)(f"{which}: {exc.message}") from None
            result = self._analyze(served, [image], selection, context)[0]
            if result is None:
                raise NoFaceFound(f"{which} image")
            return result.template
        raise InvalidArgument(f"{which} is empty: set an image or a template")

    # -- RPCs ------------------------------------------------------------------------------------------
    @unary
    def Embed(self, request: embedding_pb2.EmbedRequest, context: grpc.ServicerContext) -> embedding_pb2.EmbedResponse:
        served = self.slot.current()
        selection = self._selection(request.selection)
        aligned = input_mode(request.input_mode)
        image = decode_image(request.image, self.settings.max_image_pixels)
        if aligned:
            check_aligned(image, served.model)
        check_deadline(context, "decoding")
        result = self._analyze(served, [image], selection, context, aligned)[0]
        if result is None:
            raise NoFaceFound(f"the detector found no face in the {image.shape[2]}x{image.shape[1]} image")
        return self._response(result, served, request.normalize, request.return_aligned, aligned)

    @unary
    def EmbedBatch(
        self, request: embedding_pb2.EmbedBatchRequest, context: grpc.ServicerContext
    ) -> embedding_pb2.EmbedBatchResponse:
        served = self.slot.current()
        n = len(request.images)
        check_batch(n, self.settings.max_batch_size, "images")
        selection = self._selection(request.selection)
        aligned = input_mode(request.input_mode)
        results: list[embedding_pb2.EmbedResult] = [embedding_pb2.EmbedResult(index=i) for i in range(n)]
        decoded: dict[int, torch.Tensor] = {}
        for i, img in enumerate(request.images):
            try:
                image = decode_image(img, self.settings.max_image_pixels)
                decoded[i] = check_aligned(image, served.model) if aligned else image
            except ServiceError as exc:
                results[i].error.CopyFrom(exc.item_error())
        check_deadline(context, "decoding")
        order = sorted(decoded)
        # a forward of this request's images alone: its templates do not depend on other callers (own_batch)
        faces = (
            self._analyze(served, [decoded[i] for i in order], selection, context, aligned, own_forward=True)
            if order
            else []
        )
        for i, res in zip(order, faces, strict=True):
            if res is None:
                err = NoFaceFound()
                results[i].error.CopyFrom(err.item_error())
            else:
                results[i].ok.CopyFrom(self._response(res, served, request.normalize, request.return_aligned, aligned))
        ok = sum(1 for r in results if r.WhichOneof("outcome") == "ok")
        self.metrics.items.labels("embedding", "EmbedBatch", "ok").inc(ok)
        self.metrics.items.labels("embedding", "EmbedBatch", "error").inc(n - ok)
        return embedding_pb2.EmbedBatchResponse(results=results, model=served.ref())

    @unary
    def Verify(
        self, request: embedding_pb2.VerifyRequest, context: grpc.ServicerContext
    ) -> embedding_pb2.VerifyResponse:
        served = self.slot.current()
        selection = self._selection(request.selection)
        a = self._probe_template(request.a, served, "a", selection, context)
        check_deadline(context, "probe a")
        b = self._probe_template(request.b, served, "b", selection, context)
        rule = served.model.info.rule
        cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
        l2 = float((a - b).norm())
        same = bool(rule.accepts(a[None], b[None])[0])
        return embedding_pb2.VerifyResponse(
            cosine=cos,
            l2_distance=l2,
            same_person=same,
            rule=rule_to_proto(rule),
            a=template_to_proto(a, served),
            b=template_to_proto(b, served),
            model=served.ref(),
        )

    @unary
    def Landmarks(
        self, request: embedding_pb2.LandmarksRequest, context: grpc.ServicerContext
    ) -> embedding_pb2.LandmarksResponse:
        served = self.slot.current()
        image = decode_image(request.image, self.settings.max_image_pixels)
        faces = served.model.detect([image])[0]
        if not faces:
            raise NoFaceFound(f"the detector found no face in the {image.shape[2]}x{image.shape[1]} image")
        if not request.all_faces:
            chosen = served.model.select(faces, self._selection(request.selection))
            faces = [chosen] if chosen is not None else []
        return embedding_pb2.LandmarksResponse(
            faces=[
                embedding_pb2.DetectedFace(box=box_to_proto(f.box, f.score), landmarks=_landmarks(f.landmarks))
                for f in faces
            ],
            model=served.ref(),
        )

    @unary
    def ModelStatus(
        self, request: common_pb2.ModelStatusRequest, context: grpc.ServicerContext
    ) -> common_pb2.ModelStatusResponse:
        return self.slot.status()

    @unary
    def Reload(self, request: common_pb2.ReloadRequest, context: grpc.ServicerContext) -> common_pb2.ReloadResponse:
        # The same path as the registry watcher's poll, run now (services/kit/reload.py).
        return reload_response(self.slot, request, context)
