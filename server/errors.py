"""The one table from error kinds to status codes (gRPC, and HTTP for the HTTP transport), and what of
an error goes back to the client."""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus

import grpc

from handlers.errors import ArchiveError, InvalidInputError, NotFoundError, clip
from server.batcher import BatcherClosedError, DeadlineExceededError, QueueFullError
from server.decode import DecodeBudgetError

class StreamLimitError(Exception):
    """``max_streams`` ExplainStreams are open: a new one is refused as it opens."""


# error kind -> (gRPC status code, HTTP status); the HTTP column follows gRPC's own mapping of codes to
# HTTP statuses (grpc-gateway), but for RESOURCE_EXHAUSTED: 429 says "retry later" to HTTP clients.
STATUS_BY_ERROR: tuple[tuple[type[BaseException], grpc.StatusCode, HTTPStatus], ...] = (
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT, HTTPStatus.BAD_REQUEST),
    (NotFoundError, grpc.StatusCode.NOT_FOUND, HTTPStatus.NOT_FOUND),
    (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED, HTTPStatus.TOO_MANY_REQUESTS),
    (StreamLimitError, grpc.StatusCode.RESOURCE_EXHAUSTED, HTTPStatus.TOO_MANY_REQUESTS),
    (DecodeBudgetError, grpc.StatusCode.RESOURCE_EXHAUSTED, HTTPStatus.TOO_MANY_REQUESTS),
    (DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED, HTTPStatus.GATEWAY_TIMEOUT),
    (BatcherClosedError, grpc.StatusCode.UNAVAILABLE, HTTPStatus.SERVICE_UNAVAILABLE),
    (ArchiveError, grpc.StatusCode.FAILED_PRECONDITION, HTTPStatus.BAD_REQUEST),
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
    return statuses_for(error)[0]


def statuses_for(error: BaseException) -> tuple[grpc.StatusCode, HTTPStatus]:
    """The gRPC and HTTP statuses for ``error``; INTERNAL (500) only for what no row names (a bug)."""
    for kind, code, http_status in STATUS_BY_ERROR:
        if isinstance(error, kind):
            return code, http_status
    return grpc.StatusCode.INTERNAL, HTTPStatus.INTERNAL_SERVER_ERROR


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
