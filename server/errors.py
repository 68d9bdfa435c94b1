"""The one table from error kinds to gRPC status codes, and what of an error goes back to the client."""

from __future__ import annotations

import grpc

from handlers.errors import ArchiveError, InvalidInputError, NotFoundError, clip
from server.batcher import BatcherClosedError, DeadlineExceededError, QueueFullError
from server.decode import DecodeBudgetError

STATUS_BY_ERROR: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DecodeBudgetError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (BatcherClosedError, grpc.StatusCode.UNAVAILABLE),
    (ArchiveError, grpc.StatusCode.FAILED_PRECONDITION),
)

# Messages travel in a header (percent-encoded, so up to 3x their UTF-8 size); a client drops a
# response whose headers pass its limit (8 KiB by default) as RESOURCE_EXHAUSTED. The sources clip
# what they echo (handlers.errors.echo); these caps hold whatever a message is made of.
MAX_MESSAGE_BYTES = 1024
MAX_FIELD_CHARS = 128


def status_for(error: BaseException) -> grpc.StatusCode:
    """The status code for ``error``; INTERNAL only for what no row names (a bug)."""
    for kind, code in STATUS_BY_ERROR:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


def message_of(error: BaseException) -> str:
    """``error``'s message for a status or a StreamError: at most MAX_MESSAGE_BYTES of UTF-8."""
    message = str(error)
    encoded = message.encode()
    if len(encoded) <= MAX_MESSAGE_BYTES:
        return message
    return encoded[:MAX_MESSAGE_BYTES - 3].decode(errors="ignore") + "..."


def field_of(error: BaseException) -> str:
    """The request field at fault, as a metadata value: printable ASCII (escapes), clipped."""
    return clip(ascii(getattr(error, "field", ""))[1:-1], MAX_FIELD_CHARS)
