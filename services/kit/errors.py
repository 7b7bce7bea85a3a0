"""Typed service errors and their gRPC status codes.

Handlers raise these; the RPC wrapper turns them into a status with the message intact. Anything
else becomes INTERNAL with a generic message (the details go to the log, never the payload).
"""

from __future__ import annotations

from typing import Any

import grpc


class ServiceError(Exception):
    """An error the client caused or can act on, with the gRPC code that says which."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def item_error(self) -> Any:
        """This error as one item's outcome in a batch response (``common_pb2.ItemError``)."""
        from services.api.v1 import common_pb2

        return common_pb2.ItemError(code=self.code.value[0], message=self.message)


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Cancelled(ServiceError):
    """The client cancelled the call; the job stopped at its next batch (nobody reads the status)."""

    code = grpc.StatusCode.CANCELLED


class NoFaceFound(FailedPrecondition):
    """The image decoded fine but the detector found no face in it."""

    def __init__(self, detail: str = "") -> None:
        msg = "no face found in the image"
        super().__init__(f"{msg}: {detail}" if detail else msg)
