"""The one table from error kinds to gRPC status codes."""

from __future__ import annotations

import grpc

from handlers.errors import ArchiveError, InvalidInputError, NotFoundError
from server.batcher import BatcherClosedError, DeadlineExceededError, QueueFullError

STATUS_BY_ERROR: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (BatcherClosedError, grpc.StatusCode.UNAVAILABLE),
    (ArchiveError, grpc.StatusCode.FAILED_PRECONDITION),
)


def status_for(error: BaseException) -> grpc.StatusCode:
    """The status code for ``error``; INTERNAL only for what no row names (a bug)."""
    for kind, code in STATUS_BY_ERROR:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


def field_of(error: BaseException) -> str:
    return getattr(error, "field", "")
