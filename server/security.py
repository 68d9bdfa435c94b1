"""Transport security and hostile-input guards for the grpc.aio server.

* :func:`server_credentials`: TLS from a certificate chain and key (PEM); with a client CA,
  every client must present a certificate signed by it (mutual TLS).
* :class:`BearerTokenInterceptor`: every rpc must carry ``authorization: Bearer <token>``
  metadata with one of the configured tokens, else UNAUTHENTICATED. Health checking and
  server reflection stay open, so probes and tooling work without a secret. The token is
  checked on the headers: a refused rpc's message is never read (nor inflated, if compressed).
* :class:`DecodeGuardInterceptor`: a request whose bytes are not a valid protobuf message
  of the rpc's type answers INVALID_ARGUMENT (gRPC itself would answer UNKNOWN, and a bad
  message inside a stream would end it without a status).

Tokens are compared in constant time (:func:`hmac.compare_digest`), against every
configured token, so the time taken says nothing about how much of a guess was right.
"""

from __future__ import annotations

import hmac
import inspect
import ipaddress
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Iterable
from pathlib import Path
from typing import NoReturn

import grpc

from handlers.errors import InvalidInputError
from server.rpc import FIELD_TRAILER
from server.settings import Settings

log = logging.getLogger(__name__)

# Services that answer without a token: load balancers and `grpcurl list` must work unauthenticated.
OPEN_SERVICES: tuple[str, ...] = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
AUTH_HEADER = "authorization"
SCHEME = "bearer"
MIN_TOKEN_CHARS = 16


class SecurityConfigError(ValueError):
    """TLS or token settings that cannot work (a missing file, a key without a certificate, …)."""


def _read(path: Path | str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SecurityConfigError(f"cannot read the {what} {path}: {exc}") from exc


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials from ``settings.tls_cert`` / ``tls_key`` (and ``tls_client_ca``), or None."""
    cert, key, client_ca = settings.tls_cert, settings.tls_key, settings.tls_client_ca
    if cert is None and key is None:
        if client_ca is not None:
            raise SecurityConfigError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if cert is None or key is None:
        raise SecurityConfigError("TLS needs both --tls-cert and --tls-key")
    pair = (_read(key, "TLS private key"), _read(cert, "TLS certificate chain"))
    if client_ca is None:
        return grpc.ssl_server_credentials([pair])
    return grpc.ssl_server_credentials([pair], root_certificates=_read(client_ca, "client CA bundle"),
                                       require_client_auth=True)


def load_tokens(path: Path | str) -> list[bytes]:
    """The accepted tokens: one per line (several allow rotation); blank lines and ``#`` comments skipped."""
    tokens = []
    for line in _read(path, "token file").decode("utf-8", errors="strict").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            if len(line) < MIN_TOKEN_CHARS:
                raise SecurityConfigError(f"a token in {path} is shorter than {MIN_TOKEN_CHARS} characters")
            if any(ch.isspace() for ch in line):
                raise SecurityConfigError(f"a token in {path} contains white space")
            tokens.append(line.encode())
    if not tokens:
        raise SecurityConfigError(f"the token file {path} holds no token")
    return tokens


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bearer_tokens(settings: Settings) -> BearerTokens | None:
    """The tokens an rpc (or an HTTP request) must present, or None when none is needed."""
    return None if settings.auth_token_file is None else BearerTokens(load_tokens(settings.auth_token_file))


def interceptors(settings: Settings) -> list[grpc.aio.ServerInterceptor]:
    """The server's interceptors, outermost first: authentication, then the decode guard."""
    chain: list[grpc.aio.ServerInterceptor] = []
    if settings.auth_token_file is not None:
        chain.append(BearerTokenInterceptor(bearer_tokens(settings)))
        if settings.tls_cert is None and not is_loopback(settings.host):
            log.warning("bearer tokens are checked but TLS is off on %s: tokens travel in clear text",
                        settings.host)
    elif not is_loopback(settings.host):
        log.warning("serving on %s without token authentication", settings.host)
    chain.append(DecodeGuardInterceptor())
    return chain


def _bearer(metadata: Iterable | None) -> bytes | None:
    """The token of the request's ``authorization: Bearer …`` metadata, if any."""
    for key, value in metadata or ():
        if key.lower() != AUTH_HEADER:
            continue
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == SCHEME and token.strip():
            return token.strip().encode("utf-8", errors="surrogateescape")
        return None
    return None


class WrappedHandlers:
    """An interceptor's wrappers, each made once: building one (closures, ``_replace``) costs more than the
    rest of an rpc's interception, and the handlers underneath are the same objects call after call.

    A wrapper is kept under its key with the handler it wraps, which stays alive, so the handler's ``id``
    in a key names it alone. At most ``limit`` are kept (a server has a few dozen handlers), so a chain
    that made a new handler per call would cost time, never memory.
    """

    def __init__(self, limit: int = 256):
        self._limit = limit
        self._kept: dict[Hashable, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def get(self, key: Hashable, handler: grpc.RpcMethodHandler,
            wrap: Callable[[grpc.RpcMethodHandler], grpc.RpcMethodHandler]) -> grpc.RpcMethodHandler:
        kept = self._kept.get(key)
        if kept is not None and kept[0] is handler:
            return kept[1]
        wrapped = wrap(handler)
        if len(self._kept) < self._limit:
            self._kept[key] = (handler, wrapped)
        return wrapped

    def __len__(self) -> int:
        return len(self._kept)


def handler_kind(handler: grpc.RpcMethodHandler) -> str:
    return {(False, False): "unary_unary", (False, True): "unary_stream",
            (True, False): "stream_unary", (True, True): "stream_stream"}[
        (bool(handler.request_streaming), bool(handler.response_streaming))]


class BearerTokens:
    """The accepted bearer tokens (gRPC metadata or HTTP headers: ``authorization: Bearer <token>``)."""

    def __init__(self, tokens: list[bytes]):
        if not tokens:
            raise SecurityConfigError("at least one token is needed")
        self._tokens = list(tokens)

    def authorized(self, metadata: Iterable | None) -> bool:
        presented = _bearer(metadata)
        if presented is None:
            return False
        ok = False
        for token in self._tokens:  # no early exit: every token is compared
            ok |= hmac.compare_digest(presented, token)
        return ok


def refusal_handler(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler that answers ``code`` from the headers alone, for an rpc of any kind.

    grpc.aio reads (and inflates) the whole request message before it calls a handler whose
    request is unary; a request-streaming handler is called first and reads nothing unless it
    asks. The client of a unary rpc sees the status all the same.
    """
    async def refuse(request_iterator, context: grpc.aio.ServicerContext):
        await context.abort(code, message)
    return grpc.stream_unary_rpc_method_handler(refuse)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for any rpc outside :data:`OPEN_SERVICES` without a valid bearer token."""

    def __init__(self, tokens: BearerTokens, open_services: tuple[str, ...] = OPEN_SERVICES):
        self._tokens = tokens
        self._open = open_services

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable],
                                handler_call_details: grpc.HandlerCallDetails):
        method = handler_call_details.method or ""
        if method.startswith(self._open) or self._tokens.authorized(handler_call_details.invocation_metadata):
            return await continuation(handler_call_details)
        # The same answer whether the method exists or not, and the message is never read.
        return _DENY


_DENY = refusal_handler(grpc.StatusCode.UNAUTHENTICATED,
                        "missing or invalid bearer token (metadata `authorization: Bearer <token>`)")


class _Undecodable:
    """Stands in for a request message whose bytes did not parse."""

    __slots__ = ("error",)

    def __init__(self, error: Exception):
        self.error = error


def _safe_deserializer(deserializer: Callable[[bytes], object]) -> Callable[[bytes], object]:
    def decode(data: bytes) -> object:
        try:
            return deserializer(data)
        except Exception as exc:  # DecodeError, or anything a custom deserializer raises
            return _Undecodable(exc)
    return decode


async def _refuse_undecodable(context, method: str, undecodable: _Undecodable) -> NoReturn:
    context.set_trailing_metadata(((FIELD_TRAILER, "request"),))
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                        f"request: cannot decode the message of {method}: {undecodable.error}")


class DecodeGuardInterceptor(grpc.aio.ServerInterceptor):
    """Undecodable request bytes -> INVALID_ARGUMENT (unary) or an InvalidInputError from the
    request iterator (streams, which the servicer turns into an INVALID_ARGUMENT status)."""

    def __init__(self):
        self.guarded = WrappedHandlers()  # by method: only methods that have a handler are kept

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None or not hasattr(handler, "_replace"):
            return handler
        method = handler_call_details.method or ""
        return self.guarded.get((method, id(handler)), handler, lambda h: _guarded(h, method))


def _guarded(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    kind = handler_kind(handler)
    behavior = getattr(handler, kind)
    if not handler.request_streaming:
        wrapped = _guard_unary_request(behavior, method, kind == "unary_stream")
    else:
        wrapped = _guard_request_stream(behavior, method, kind == "stream_stream")
    return handler._replace(request_deserializer=_safe_deserializer(handler.request_deserializer), **{kind: wrapped})


def _guard_unary_request(behavior, method: str, streaming_response: bool):
    if streaming_response and inspect.isasyncgenfunction(behavior):
        async def guarded_gen(request, context):
            if isinstance(request, _Undecodable):
                await _refuse_undecodable(context, method, request)
            async for response in behavior(request, context):
                yield response
        return guarded_gen

    async def guarded(request, context):
        if isinstance(request, _Undecodable):
            await _refuse_undecodable(context, method, request)
        result = behavior(request, context)
        return await result if inspect.isawaitable(result) else result
    return guarded


def _guard_request_stream(behavior, method: str, streaming_response: bool):
    async def checked(request_iterator: AsyncIterator) -> AsyncIterator:
        async for request in request_iterator:
            if isinstance(request, _Undecodable):
                raise InvalidInputError("request", f"cannot decode a message of {method}: {request.error}")
            yield request

    if streaming_response and inspect.isasyncgenfunction(behavior):
        async def guarded_gen(request_iterator, context):
            async for response in behavior(checked(request_iterator), context):
                yield response
        return guarded_gen

    async def guarded(request_iterator, context):
        result = behavior(checked(request_iterator), context)
        return await result if inspect.isawaitable(result) else result
    return guarded
