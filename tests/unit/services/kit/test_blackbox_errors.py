"""A black-box FR model's endpoint failing is UNAVAILABLE to the caller, without its address."""

from __future__ import annotations

import grpc

from facexplain.models.program import EndpointError
from services.kit.errors import ServiceError
from services.kit.rpc import _as_service_error


def test_endpoint_failure_is_unavailable_without_the_address() -> None:
    err = _as_service_error(EndpointError("black-box endpoint http://fr.internal:8600/ answered HTTP 500: boom"))
    assert isinstance(err, ServiceError) and err.code == grpc.StatusCode.UNAVAILABLE
    assert "fr.internal" not in err.message and "black-box endpoint failed" in err.message


def test_other_errors_are_left_alone() -> None:
    exc = RuntimeError("x")
    assert _as_service_error(exc) is exc
