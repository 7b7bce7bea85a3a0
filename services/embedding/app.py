"""Build and run the embedding server (``facexplain serve embedding``)."""

from __future__ import annotations

import logging

from facexplain.pipeline import FacePipeline
from services.api.v1 import embedding_pb2_grpc
from services.embedding.service import SERVICE_NAME, EmbeddingServicer
from services.kit.config import ServiceSettings
from services.kit.embedder import serve_embedder
from services.kit.server import GrpcServer, run_service, service_metrics

log = logging.getLogger("facexplain.embedding")


def build_server(settings: ServiceSettings, pipeline: FacePipeline | None = None) -> GrpcServer:
    """The embedding server; with ``FACEXPLAIN_REGISTRY_URI`` set it serves ``model_name@model_alias``
    from the registry and hot-swaps when the alias moves, otherwise (or given ``pipeline``) local weights.
    """
    metrics = service_metrics(settings, "embedding")
    slot, _watcher = serve_embedder(settings, metrics, pipeline=pipeline)
    servicer = EmbeddingServicer(slot, settings, metrics)
    return GrpcServer(
        settings,
        SERVICE_NAME,
        servicer,
        embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server,
        metrics,
        required_models=[slot],
    )


def main(settings: ServiceSettings | None = None) -> None:
    run_service("embedding", settings or ServiceSettings(), build_server)
