"""Server bootstrap shared by every service: gRPC server with limits, health, reflection, metrics, SIGTERM.

A service's ``app.py`` declares only what differs: the models it serves, its servicer and the generated
``add_*_to_server`` function (its ``build_server``). :func:`service_metrics` does the process set-up
before models load, :func:`run_service` the rest (logging, start, signals, the banner, waiting); this
module owns everything operational so the services stay about their method.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from concurrent import futures
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.kit.config import ServiceSettings
from services.kit.logs import configure_logging
from services.kit.metrics import ServiceMetrics

log = logging.getLogger("facexplain.server")
S = TypeVar("S", bound=ServiceSettings)


class GrpcServer:
    """One gRPC server hosting one facexplain service, started and stopped as a unit."""

    def __init__(
        self,
        settings: ServiceSettings,
        service_full_name: str,
        servicer: Any,
        add_to_server: Callable[[Any, grpc.Server], None],
        metrics: ServiceMetrics,
    ) -> None:
        self.settings = settings
        self.service_full_name = service_full_name
        self.metrics = metrics
        options = [
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=settings.max_workers, thread_name_prefix="rpc"),
            options=options,
        )
        self.servicer = servicer
        add_to_server(servicer, self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (service_full_name, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.port = self.server.add_insecure_port(f"{settings.host}:{settings.port}")
        if self.port == 0:
            raise RuntimeError(f"could not bind {settings.host}:{settings.port}")
        self._stopped = threading.Event()

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    def start(self) -> GrpcServer:
        if self.settings.metrics_enabled:
            self.metrics.serve_http(self.settings.metrics_port, self.settings.host)
        self.server.start()
        for name in ("", self.service_full_name):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "serving %s on %s (metrics port %s)",
            self.service_full_name,
            self.address,
            self.metrics.port,
            extra={"fx_service": self.service_full_name, "fx_port": self.port, "fx_metrics_port": self.metrics.port},
        )
        return self

    def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING at once (load balancers drain), let in-flight calls finish, then close."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(self.settings.grace_period_s if grace is None else grace).wait()
        close = getattr(self.servicer, "close", None)
        if callable(close):  # e.g. the servicer's inference threads (services/kit/batching.py)
            close()
        self.metrics.close()
        log.info("stopped %s", self.service_full_name)

    def install_signal_handlers(self) -> None:
        def _handler(signum: int, _frame: object) -> None:
            log.info("signal %s: graceful shutdown", signal.Signals(signum).name)
            threading.Thread(target=self.stop, daemon=True).start()

        signal.signal(signal.SIGTERM, _handler)
        signal.signal(signal.SIGINT, _handler)

    def wait(self) -> None:
        self.server.wait_for_termination()


def service_metrics(settings: ServiceSettings, service: str) -> ServiceMetrics:
    """What every server does before loading its models: size torch's thread pool, then open its metrics."""
    if settings.torch_threads:
        import torch  # only here: the rest of this module is gRPC plumbing that needs no torch

        torch.set_num_threads(settings.torch_threads)
    return ServiceMetrics(service)


def run_service(service: str, settings: S, build_server: Callable[[S], GrpcServer]) -> None:
    """``facexplain serve <service>``: configure logging, build and start the server, serve until SIGTERM."""
    configure_logging(settings.log_level, settings.log_format)
    server = build_server(settings).start()
    server.install_signal_handlers()
    print(f"{service} service listening on {server.address} (metrics :{server.metrics.port})", flush=True)
    server.wait()
