"""Typed Python clients over the generated gRPC stubs.

Retries cover UNAVAILABLE only (a server restarting or a pod rolling), with backoff; every call
carries a deadline so an audit pipeline never hangs on a dead service.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np

from services.api.v1 import common_pb2, decoding_pb2, decoding_pb2_grpc, embedding_pb2, embedding_pb2_grpc

R = TypeVar("R")
DEFAULT_MAX_MESSAGE = 64 * 1024 * 1024


def _retry_config(attempts: int) -> str:
    return json.dumps(
        {
            "methodConfig": [
                {
                    "name": [{"service": ""}],
                    "retryPolicy": {
                        "maxAttempts": max(2, attempts),
                        "initialBackoff": "0.2s",
                        "maxBackoff": "5s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ]
        }
    )


def open_channel(
    target: str,
    *,
    tls: bool = False,
    root_certificates: bytes | None = None,
    retries: int = 4,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE,
) -> grpc.Channel:
    """A channel with retry-on-UNAVAILABLE and generous message limits (images travel in requests)."""
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", _retry_config(retries)),
    ]
    if tls:
        return grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates), options=options)
    return grpc.insecure_channel(target, options=options)


def wait_ready(channel: grpc.Channel, timeout: float) -> None:
    """Block until the channel connects; raise a readable error naming the target otherwise."""
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
    except grpc.FutureTimeoutError:
        raise ConnectionError(f"service not reachable within {timeout:.0f} s") from None


def image_from_path(path: Path) -> common_pb2.Image:
    return common_pb2.Image(encoded=Path(path).read_bytes())


def template_array(t: common_pb2.Template) -> np.ndarray:
    return np.asarray(t.values, dtype=np.float32)


class EmbeddingClient:
    """Client for ``facexplain.v1.EmbeddingService``."""

    def __init__(self, target: str | grpc.Channel, *, timeout: float = 60.0, **channel_kwargs: Any) -> None:
        self.channel = open_channel(target, **channel_kwargs) if isinstance(target, str) else target
        self.stub = embedding_pb2_grpc.EmbeddingServiceStub(self.channel)
        self.timeout = timeout

    def _call(self, fn: Callable[..., R], request: Any, timeout: float | None) -> R:
        return fn(request, timeout=self.timeout if timeout is None else timeout, wait_for_ready=True)

    def embed(
        self,
        image: common_pb2.Image,
        *,
        normalize: bool = False,
        return_aligned: bool = False,
        timeout: float | None = None,
    ) -> embedding_pb2.EmbedResponse:
        req = embedding_pb2.EmbedRequest(image=image, normalize=normalize, return_aligned=return_aligned)
        return self._call(self.stub.Embed, req, timeout)

    def embed_batch(
        self,
        images: list[common_pb2.Image],
        *,
        normalize: bool = False,
        return_aligned: bool = False,
        timeout: float | None = None,
    ) -> embedding_pb2.EmbedBatchResponse:
        req = embedding_pb2.EmbedBatchRequest(images=images, normalize=normalize, return_aligned=return_aligned)
        return self._call(self.stub.EmbedBatch, req, timeout)

    def verify(
        self, a: common_pb2.Probe, b: common_pb2.Probe, *, timeout: float | None = None
    ) -> embedding_pb2.VerifyResponse:
        return self._call(self.stub.Verify, embedding_pb2.VerifyRequest(a=a, b=b), timeout)

    def landmarks(
        self, image: common_pb2.Image, *, all_faces: bool = False, timeout: float | None = None
    ) -> embedding_pb2.LandmarksResponse:
        return self._call(
            self.stub.Landmarks, embedding_pb2.LandmarksRequest(image=image, all_faces=all_faces), timeout
        )

    def model_status(self, *, timeout: float | None = None) -> common_pb2.ModelStatusResponse:
        return self._call(self.stub.ModelStatus, common_pb2.ModelStatusRequest(), timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> EmbeddingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DecodingClient:
    """Client for ``facexplain.v1.DecodingService`` (template -> face image with the served decoder).

    Templates go in as ``common_pb2.Template`` (e.g. ``EmbedResponse.template`` from the embedding
    service, or :meth:`template` for a plain vector); images come back PNG-encoded.
    """

    def __init__(self, target: str | grpc.Channel, *, timeout: float = 60.0, **channel_kwargs: Any) -> None:
        self.channel = open_channel(target, **channel_kwargs) if isinstance(target, str) else target
        self.stub = decoding_pb2_grpc.DecodingServiceStub(self.channel)
        self.timeout = timeout

    def _call(self, fn: Callable[..., R], request: Any, timeout: float | None) -> R:
        return fn(request, timeout=self.timeout if timeout is None else timeout, wait_for_ready=True)

    @staticmethod
    def template(
        values: Any, *, model: common_pb2.ModelRef | None = None, normalized: bool = False
    ) -> common_pb2.Template:
        """A ``Template`` from any 1-D float sequence (numpy array, list, tensor.tolist())."""
        vec = np.asarray(values, dtype=np.float32).reshape(-1)
        return common_pb2.Template(values=vec.tolist(), dim=int(vec.size), model=model, normalized=normalized)

    def decode(self, template: common_pb2.Template, *, timeout: float | None = None) -> decoding_pb2.DecodeResponse:
        return self._call(self.stub.Decode, decoding_pb2.DecodeRequest(template=template), timeout)

    def decode_batch(
        self, templates: list[common_pb2.Template], *, timeout: float | None = None
    ) -> decoding_pb2.DecodeBatchResponse:
        return self._call(self.stub.DecodeBatch, decoding_pb2.DecodeBatchRequest(templates=templates), timeout)

    def reconstruct(
        self,
        image: common_pb2.Image,
        *,
        selection: embedding_pb2.FaceSelection.ValueType = embedding_pb2.FACE_SELECTION_UNSPECIFIED,
        timeout: float | None = None,
    ) -> decoding_pb2.ReconstructResponse:
        req = decoding_pb2.ReconstructRequest(image=image, selection=selection)
        return self._call(self.stub.Reconstruct, req, timeout)

    def interpolate(
        self,
        a: common_pb2.Template,
        b: common_pb2.Template,
        *,
        steps: int = 0,
        mode: decoding_pb2.InterpolationMode.ValueType = decoding_pb2.INTERPOLATION_MODE_UNSPECIFIED,
        strip: bool = False,
        timeout: float | None = None,
    ) -> decoding_pb2.InterpolateResponse:
        req = decoding_pb2.InterpolateRequest(a=a, b=b, steps=steps, mode=mode, strip=strip)
        return self._call(self.stub.Interpolate, req, timeout)

    def model_status(self, *, timeout: float | None = None) -> common_pb2.ModelStatusResponse:
        return self._call(self.stub.ModelStatus, common_pb2.ModelStatusRequest(), timeout)

    def reload(self, model_name: str = "", *, timeout: float | None = None) -> common_pb2.ReloadResponse:
        """Re-resolve the aliases now (decoder and FR model, or only ``model_name``) and hot-swap."""
        return self._call(self.stub.Reload, common_pb2.ReloadRequest(model_name=model_name), timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> DecodingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
