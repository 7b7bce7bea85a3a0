"""Build and run the embedding server (``facexplain serve embedding``)."""

from __future__ import annotations

import logging

import torch

from facexplain.pipeline import FacePipeline
from services.api.v1 import embedding_pb2_grpc
from services.embedding.service import SERVICE_NAME, EmbeddingServicer, served_pipeline
from services.kit.config import ServiceSettings
from services.kit.logs import configure_logging
from services.kit.metrics import ServiceMetrics
from services.kit.models import ModelSlot
from services.kit.server import GrpcServer

log = logging.getLogger("facexplain.embedding")


def build_server(settings: ServiceSettings, pipeline: FacePipeline | None = None) -> GrpcServer:
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    pipeline = pipeline or FacePipeline.default(settings.torch_device())
    served = served_pipeline(pipeline)
    metrics = ServiceMetrics("embedding")
    metrics.set_served(served.name, served.version)
    servicer = EmbeddingServicer(ModelSlot(served), settings, metrics)
    return GrpcServer(
        settings, SERVICE_NAME, servicer, embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server, metrics
    )


def main(settings: ServiceSettings | None = None) -> None:
    settings = settings or ServiceSettings()
    configure_logging(settings.log_level, settings.log_format)
    server = build_server(settings).start()
    server.install_signal_handlers()
    print(f"embedding service listening on {server.address} (metrics :{server.metrics.port})", flush=True)
    server.wait()
