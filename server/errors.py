"""The one table from error kinds to gRPC status codes, and what of an error goes back to the client."""

from __future__ import annotations

from collections.abc import Mapping

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
NO_RENAMES: Mapping[str, str] = {}  # protoserve.v1 names request fields as the data plane does

# Errors about one request field: ``field`` names it, ``detail`` says what is wrong.
FIELD_ERRORS = (InvalidInputError, DecodeBudgetError)


def status_for(error: BaseException) -> grpc.StatusCode:
    """The status code for ``error``; INTERNAL only for what no row names (a bug)."""
    for kind, code in STATUS_BY_ERROR:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


def protocol_field(field: str, names: Mapping[str, str]) -> str:
    """``field`` as a protocol names it: its first part (before any ".") renamed by ``names``
    (e.g. {"input": "inputs[0]"}: "input.data" -> "inputs[0].data")."""
    head, dot, rest = field.partition(".")
    return names.get(head, head) + dot + rest


def message_of(error: BaseException, names: Mapping[str, str] = NO_RENAMES) -> str:
    """``error``'s message for a status or a StreamError, its field named by ``names``: at most
    MAX_MESSAGE_BYTES of UTF-8."""
    message = f"{protocol_field(error.field, names)}: {error.detail}" if isinstance(error, FIELD_ERRORS) else str(error)
    encoded = message.encode()
    if len(encoded) <= MAX_MESSAGE_BYTES:
        return message
    return encoded[:MAX_MESSAGE_BYTES - 3].decode(errors="ignore") + "..."


def field_of(error: BaseException, names: Mapping[str, str] = NO_RENAMES) -> str:
    """The request field at fault ("" if none), named by ``names``, as a metadata value: printable ASCII
    (escapes), clipped."""
    field = protocol_field(error.field, names) if isinstance(error, FIELD_ERRORS) else ""
    return clip(ascii(field)[1:-1], MAX_FIELD_CHARS)
