"""Server bootstrap shared by every service: gRPC server with limits, TLS, authentication, the access log,
health that means ready, reflection, metrics, SIGTERM.

A service's ``app.py`` declares only what differs: the models it serves, its servicer and the generated
``add_*_to_server`` function (its ``build_server``). :func:`service_metrics` does the process set-up
before models load, :func:`run_service` the rest (logging, start, signals, the banner, waiting); this
module owns everything operational so the services stay about their method.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.kit import tls
from services.kit.access_log import AccessLogInterceptor
from services.kit.auth import AuthConfigError, Authenticator, AuthInterceptor, TokenStore
from services.kit.config import ServiceSettings
from services.kit.jwt_auth import JwksStore, JwtVerifier
from services.kit.logs import configure_logging
from services.kit.metrics import ServiceMetrics
from services.kit.models import ModelSlot

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
        required_models: Sequence[ModelSlot[Any]] = (),
    ) -> None:
        """``required_models``: the slots without which the service's main RPCs answer UNAVAILABLE; health
        reports NOT_SERVING while any of them is empty, so a load balancer sends no traffic to it."""
        self.settings = settings
        self.required_models = tuple(required_models)
        self.service_full_name = service_full_name
        self.metrics = metrics
        options = [
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        if settings.max_connection_age_s > 0:
            options.append(("grpc.max_connection_age_ms", max(1, round(settings.max_connection_age_s * 1000))))
        self.authenticator = authenticator(settings)
        self.tokens = self.authenticator.store if self.authenticator else None
        interceptors: list[grpc.ServerInterceptor] = []
        if settings.access_log:  # outermost: it also logs the calls authentication refuses
            interceptors.append(AccessLogInterceptor())
        if self.authenticator is not None:
            interceptors.append(AuthInterceptor(self.authenticator))
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=settings.max_workers, thread_name_prefix="rpc"),
            options=options,
            interceptors=interceptors,
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs or None,
        )
        self.servicer = servicer
        add_to_server(servicer, self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (service_full_name, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.host, self.port, self.certificates = tls.bind(self.server, settings)
        if self.port == 0:
            raise RuntimeError(f"could not bind {self.host}:{settings.port}")
        sources = [f"bearer tokens from {settings.auth_tokens_file}"] if settings.auth_tokens_file else []
        if settings.auth_jwks_file:
            sources.append(
                f"JWTs from JWKS {settings.auth_jwks_file} (issuer {settings.auth_jwt_issuer}, "
                f"audience {settings.auth_jwt_audience})"
            )
        log.info(
            "authentication %s",
            f"on: {'; '.join(sources)}"
            if sources
            else "OFF: any caller may call any RPC (set FACEXPLAIN_AUTH_TOKENS_FILE or FACEXPLAIN_AUTH_JWKS_FILE)",
        )
        self.health_server: grpc.Server | None = None
        self.health_port = 0
        if settings.health_port >= 0:
            # Health only, plaintext, two threads of its own and no concurrency cap: it answers while every
            # request worker is busy, and it carries no data, so it may listen beyond loopback without TLS.
            self.health_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="health"))
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            self.health_port = self.health_server.add_insecure_port(f"{settings.host}:{settings.health_port}")
            if self.health_port == 0:
                raise RuntimeError(f"could not bind the health port {settings.host}:{settings.health_port}")
        self._stopped = threading.Event()
        self._closed = threading.Event()  # set once stop() has closed everything, not just the gRPC server
        self._health_status: int | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> GrpcServer:
        if self.settings.metrics_enabled:
            self.metrics.serve_http(self.settings.metrics_port, self.host)
        self.server.start()
        if self.health_server is not None:
            self.health_server.start()
            log.info("health checks also on plaintext port %s:%s", self.settings.host, self.health_port)
        self._update_health()
        if self.required_models:
            threading.Thread(target=self._watch_health, name="health", daemon=True).start()
        log.info(
            "serving %s on %s (metrics port %s)",
            self.service_full_name,
            self.address,
            self.metrics.port,
            extra={"fx_service": self.service_full_name, "fx_port": self.port, "fx_metrics_port": self.metrics.port},
        )
        return self

    def missing_models(self) -> list[str]:
        return [slot.label for slot in self.required_models if slot.peek() is None]

    def _update_health(self) -> None:
        missing = self.missing_models()
        status = health_pb2.HealthCheckResponse.NOT_SERVING if missing else health_pb2.HealthCheckResponse.SERVING
        if status == self._health_status:
            return
        self._health_status = status
        for name in ("", self.service_full_name):
            self.health.set(name, status)  # ignored once graceful shutdown has begun
        if missing:
            log.warning("health NOT_SERVING: no %s loaded yet", ", ".join(missing))
        else:
            log.info("health SERVING")

    def _watch_health(self) -> None:
        """Follow the slots: a model loaded (or swapped in) after start makes the service ready."""
        while not self._stopped.wait(0.5):
            self._update_health()

    def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING at once (load balancers drain), let in-flight calls finish, then close."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        try:
            self.health.enter_graceful_shutdown()
            self.server.stop(self.settings.grace_period_s if grace is None else grace).wait()
            if self.health_server is not None:
                self.health_server.stop(0).wait()
            close = getattr(self.servicer, "close", None)
            if callable(close):  # e.g. the servicer's inference threads (services/kit/batching.py)
                close()
            self.metrics.close()
            log.info("stopped %s", self.service_full_name)
        finally:
            self._closed.set()

    def install_signal_handlers(self) -> None:
        def _handler(signum: int, _frame: object) -> None:
            log.info("signal %s: graceful shutdown", signal.Signals(signum).name)
            threading.Thread(target=self.stop, daemon=True).start()

        signal.signal(signal.SIGTERM, _handler)
        signal.signal(signal.SIGINT, _handler)

    @property
    def closed(self) -> bool:
        """stop() has run to its end (every part closed)."""
        return self._closed.is_set()

    def wait(self) -> None:
        """Return once the server is stopped *and* closed. The gRPC server terminates before ``stop`` has
        closed the health server, the inference threads and the metrics; returning then would let the
        interpreter exit under them (grpc's C++ threads abort the process: "terminate called without an
        active exception", exit code -6 instead of 0)."""
        self.server.wait_for_termination()
        if self._stopped.is_set():
            self._closed.wait(self.settings.grace_period_s + 30)


def service_metrics(settings: ServiceSettings, service: str) -> ServiceMetrics:
    """What every server does before loading its models: size torch's thread pool, then open its metrics."""
    if settings.torch_threads:
        import torch  # only here: the rest of this module is gRPC plumbing that needs no torch

        torch.set_num_threads(settings.torch_threads)
    return ServiceMetrics(service)


def authenticator(settings: ServiceSettings) -> Authenticator | None:
    """The credentials the settings configure (tokens file, JWKS file or both); None = auth off.
    Raises :class:`AuthConfigError` naming the file or setting that cannot be used."""
    store = TokenStore(settings.auth_tokens_file) if settings.auth_tokens_file else None
    verifier = None
    if settings.auth_jwks_file:
        verifier = JwtVerifier(
            JwksStore(settings.auth_jwks_file),
            settings.auth_jwt_issuer,
            settings.auth_jwt_audience,
            settings.auth_jwt_leeway_s,
        )
    return Authenticator(store, verifier) if store or verifier else None


def check_security_settings(settings: ServiceSettings) -> None:
    """Read the TLS files and the credentials files as the server will; raise what is wrong with them."""
    files = tls.ServerTLSFiles.from_settings(settings)
    if files is not None:
        tls.ReloadingCertificates(files)
    authenticator(settings)


def run_service(service: str, settings: S, build_server: Callable[[S], GrpcServer]) -> None:
    """``facexplain serve <service>``: configure logging, build and start the server, serve until SIGTERM."""
    configure_logging(settings.log_level, settings.log_format)
    try:  # before the models load (minutes): a typo in a certificate path or a credentials file fails at once
        check_security_settings(settings)
    except (tls.TLSConfigError, AuthConfigError, OSError) as exc:
        log.error("cannot start %s: %s", service, exc)
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    server = build_server(settings).start()
    server.install_signal_handlers()
    print(f"{service} service listening on {server.address} (metrics :{server.metrics.port})", flush=True)
    server.wait()
    _exit_after_close(0 if server.closed else 1)


def _exit_after_close(code: int) -> None:
    """Leave without interpreter finalisation once :meth:`GrpcServer.stop` has closed everything.

    Daemon threads that native code still holds (a registry watcher inside a download or ``torch.load``,
    grpc's and torch's pools) make finalisation abort now and then with "terminate called without an active
    exception" (exit -6 after a clean stop; seen in CI). Nothing is left to flush but the logs and the
    standard streams, so flush those and exit with the server's own status."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken pipe: nothing left to say
            stream.flush()
    os._exit(code)
