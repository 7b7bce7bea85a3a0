"""The access log: one structured line per call saying who asked what, when, from where and how it ended.

A biometric service must be able to answer "who looked at whose face"; it must also never write the face.
The line therefore holds only the call's envelope: principal, service, method, status code, duration,
request id and peer. Requests and responses are never touched here, so no image byte, template number
or token can reach it; the request id is the client's ``x-request-id`` only when it is a short plain
token (otherwise a fresh one), and it is returned in the trailing metadata for correlation.

The line is logged by ``facexplain.access`` with the message ``rpc <Method> <CODE>``; OK at INFO, other
codes at WARNING. :data:`current_call` lets the inner interceptors (authentication) name the principal;
under mutual TLS without a tokens file it is the client certificate's ``cn:<common name>``, else ``-``.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import grpc

log = logging.getLogger("facexplain.access")

REQUEST_ID_KEY = "x-request-id"
_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
ANONYMOUS = "-"


@dataclass
class CallRecord:
    service: str
    method: str
    peer: str
    request_id: str
    principal: str = ANONYMOUS
    start: float = field(default_factory=time.perf_counter)
    _logged: threading.Lock = field(default_factory=threading.Lock, repr=False)


current_call: ContextVar[CallRecord | None] = ContextVar("facexplain_current_call", default=None)


def split_method(full: str) -> tuple[str, str]:
    """``/facexplain.v1.EmbeddingService/Embed`` -> (``facexplain.v1.EmbeddingService``, ``Embed``)."""
    _, _, rest = full.partition("/")
    service, _, method = rest.partition("/")
    return service, method


def request_id(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _REQUEST_ID_OK.match(value):
            return value
    return uuid.uuid4().hex


def client_common_name(context: grpc.ServicerContext) -> str | None:
    """The CN of the client certificate the TLS layer verified (mutual TLS), else None."""
    try:
        names = context.auth_context().get("x509_common_name") or []
    except Exception:  # no transport security at all
        return None
    return names[0].decode(errors="replace") if names else None


def _code(context: grpc.ServicerContext, default: grpc.StatusCode) -> grpc.StatusCode:
    code = context.code()  # type: ignore[attr-defined]  # set by abort()/set_code(); grpc >= 1.38
    return code if isinstance(code, grpc.StatusCode) else default


Behavior = Callable[[Any, grpc.ServicerContext], Any]


def wrap_handler(handler: grpc.RpcMethodHandler, wrap: Callable[[Behavior, bool], Behavior]) -> grpc.RpcMethodHandler:
    """The same handler with its behaviour passed through ``wrap(behavior, streams_response)``."""
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            wrap(handler.unary_unary, False), handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            wrap(handler.unary_stream, True), handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            wrap(handler.stream_unary, False), handler.request_deserializer, handler.response_serializer
        )
    return grpc.stream_stream_rpc_method_handler(
        wrap(handler.stream_stream, True), handler.request_deserializer, handler.response_serializer
    )


def _emit(rec: CallRecord, code: grpc.StatusCode) -> None:
    if not rec._logged.acquire(blocking=False):  # the call's one line is already written
        return
    log.log(
        logging.INFO if code == grpc.StatusCode.OK else logging.WARNING,
        "rpc %s %s",
        rec.method,
        code.name,
        extra={
            "fx_principal": rec.principal,
            "fx_service": rec.service,
            "fx_method": rec.method,
            "fx_code": code.name,
            "fx_ms": round((time.perf_counter() - rec.start) * 1000, 2),
            "fx_request_id": rec.request_id,
            "fx_peer": rec.peer,
        },
    )


class AccessLogInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Outermost interceptor: opens the call's record, logs it once the call ends however it ends."""

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None], details: Any
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None:
            return None
        service, method = split_method(details.method)
        rid = request_id(details.invocation_metadata)

        def wrap(behavior: Behavior, streams: bool) -> Behavior:
            def open_record(context: grpc.ServicerContext) -> CallRecord:
                rec = CallRecord(service, method, context.peer(), rid)
                cn = client_common_name(context)
                if cn:  # mutual TLS names the caller even when no tokens file does; auth replaces it
                    rec.principal = f"cn:{cn}"
                context.set_trailing_metadata(((REQUEST_ID_KEY, rid),))
                return rec

            if not streams:

                def unary(request: Any, context: grpc.ServicerContext) -> Any:
                    rec = open_record(context)
                    token = current_call.set(rec)
                    try:
                        response = behavior(request, context)
                    except BaseException:
                        _emit(rec, _code(context, grpc.StatusCode.UNKNOWN))
                        raise
                    finally:
                        current_call.reset(token)
                    _emit(rec, _code(context, grpc.StatusCode.OK))
                    return response

                return unary

            def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                rec = open_record(context)
                # A cancelled stream's generator is closed only when gRPC drops it (garbage collection, maybe
                # never promptly): the termination callback writes the line then, unless the stream ended first.
                context.add_callback(lambda: _emit(rec, _code(context, grpc.StatusCode.CANCELLED)))
                current_call.set(rec)  # the generator runs in the pool thread's context: no reset needed
                try:
                    yield from behavior(request, context)
                except GeneratorExit:  # gRPC closed the stream: the client cancelled or went away
                    _emit(rec, grpc.StatusCode.CANCELLED)
                    raise
                except BaseException:
                    _emit(rec, _code(context, grpc.StatusCode.UNKNOWN))
                    raise
                finally:
                    current_call.set(None)
                _emit(rec, _code(context, grpc.StatusCode.OK))

            return stream

        return wrap_handler(handler, wrap)
