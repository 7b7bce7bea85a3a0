"""The wrapper every RPC handler goes through: metrics, error mapping, deadlines.

Keeping this in one place is what makes "a bad request never takes a server down" true for every
service: an unexpected exception becomes INTERNAL for that call and the server keeps going.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from facexplain.models.program import EndpointError
from services.kit.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, ServiceError, Unavailable
from services.kit.images import request_budget
from services.kit.metrics import ServiceMetrics

log = logging.getLogger("facexplain.rpc")
F = TypeVar("F", bound=Callable[..., Any])


def check_deadline(context: grpc.ServicerContext, stage: str = "") -> None:
    """Stop work the client no longer waits for (deadline passed or call cancelled)."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        raise DeadlineExceeded(f"deadline exceeded{' during ' + stage if stage else ''}")
    if not context.is_active():
        raise DeadlineExceeded(f"call cancelled by the client{' during ' + stage if stage else ''}")


def check_batch(n: int, limit: int, items: str) -> None:
    """A batch request must hold between 1 and ``limit`` ``items`` (FACEXPLAIN_MAX_BATCH_SIZE)."""
    if n == 0:
        raise InvalidArgument(f"{items} is empty")
    if n > limit:
        raise ResourceExhausted(f"batch of {n} {items} exceeds the limit of {limit} (FACEXPLAIN_MAX_BATCH_SIZE)")


def _finish(metrics: ServiceMetrics, method: str, code: grpc.StatusCode, start: float) -> None:
    # The call's log line is the access log's (services/kit/access_log.py): one line per call, with its caller.
    elapsed = time.perf_counter() - start
    metrics.requests.labels(metrics.service, method, code.name).inc()
    metrics.latency.labels(metrics.service, method).observe(elapsed)


def _as_service_error(exc: BaseException) -> BaseException:
    """Exceptions with a status of their own: a black-box FR model's endpoint failing is UNAVAILABLE (its
    address and answer go to the server log, not to the caller)."""
    if isinstance(exc, EndpointError):
        log.warning("black-box FR endpoint failed: %s", exc)
        return Unavailable("the FR model's black-box endpoint failed (see the server log); retry later")
    return exc


def _abort(context: grpc.ServicerContext, exc: BaseException, method: str) -> grpc.StatusCode:
    if isinstance(exc, ServiceError):
        context.abort(exc.code, exc.message)
    log.exception("unhandled error in %s", method)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; see the server log")
    raise AssertionError("unreachable")  # pragma: no cover


def unary(fn: F) -> F:
    """Decorate a unary servicer method ``(self, request, context) -> response``; ``self.metrics`` counts it."""
    method = fn.__name__

    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        metrics: ServiceMetrics = self.metrics
        start = time.perf_counter()
        settings = getattr(self, "settings", None)
        try:
            check_deadline(context, "queueing")
            with request_budget(getattr(settings, "max_request_pixels", None)):  # this call's decoded pixels
                response = fn(self, request, context)
        except Exception as raised:
            exc = _as_service_error(raised)
            code = exc.code if isinstance(exc, ServiceError) else grpc.StatusCode.INTERNAL
            _finish(metrics, method, code, start)
            _abort(context, exc, method)
        _finish(metrics, method, grpc.StatusCode.OK, start)
        return response

    return wrapper  # type: ignore[return-value]


def streaming(fn: F) -> F:
    """Decorate a server-streaming servicer method that yields responses."""
    method = fn.__name__

    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        metrics: ServiceMetrics = self.metrics
        start = time.perf_counter()
        try:
            for item in fn(self, request, context):
                check_deadline(context, "streaming")
                yield item
        except GeneratorExit:  # gRPC closed the stream: the client cancelled or went away
            _finish(metrics, method, grpc.StatusCode.CANCELLED, start)
            raise
        except Exception as raised:
            exc = _as_service_error(raised)
            code = exc.code if isinstance(exc, ServiceError) else grpc.StatusCode.INTERNAL
            _finish(metrics, method, code, start)
            _abort(context, exc, method)
        _finish(metrics, method, grpc.StatusCode.OK, start)

    return wrapper  # type: ignore[return-value]
