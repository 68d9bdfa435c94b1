"""A bounded HTTP/1.1 server on the process's event loop, for the Open Inference Protocol's REST binding
and the explorer page (server/http_api.py routes the requests).

Every resource a stranger can make it spend has a bound (docs/limits.md, "HTTP"):

* connections: at most ``http_max_connections`` at once, TLS handshakes included (TLS starts after a
  connection is counted); one more is answered 503 and closed;
* time: a request head must arrive within ``http_timeout_s`` of the connection opening or of the
  previous answer (so an idle keep-alive connection is closed then too), its body within as much
  again, and the answer must be taken within as much again; a TLS handshake gets as long;
* bytes: a head of at most :data:`MAX_HEAD_BYTES` (else 431), a body of at most
  ``http_max_body_bytes`` announced by Content-Length (else 413, before any of it is read; a body
  without Content-Length, chunked, is refused with 411), and at most ``http_max_buffered_bytes`` of
  bodies held at once over all connections (else 503, retry later);
* a request refused before its body is read (by :attr:`HttpServer.admit`, e.g. without a valid
  bearer token) closes the connection: the body is never read.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus

from server.security import SecurityConfigError
from server.settings import Settings

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 16 << 10  # request line and headers; browsers and clients send well under 2 KiB
MAX_HEADERS = 64
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
# The client went away, sent too little, or was too slow: its connection ends without an answer.
CLIENT_GONE = (OSError, asyncio.IncompleteReadError, TimeoutError, ssl.SSLError)


@dataclass(frozen=True)
class Request:
    """A request: ``path`` without its query, ``headers`` with lower-case names in the order sent."""

    method: str
    path: str
    query: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes = b""

    def header(self, name: str, default: str = "") -> str:
        """The first value of header ``name`` (lower case)."""
        return next((value for key, value in self.headers if key == name), default)


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


class HttpError(Exception):
    """Answer ``status`` with ``message``; ``field``: the request field at fault, if one is."""

    def __init__(self, status: HTTPStatus, message: str, headers: list[tuple[str, str]] | None = None,
                 field: str = ""):
        super().__init__(message)
        self.status = status
        self.headers = headers or []
        self.field = field


class ListenError(Exception):
    """The HTTP port cannot be opened."""


Handler = Callable[[Request], Awaitable[Response]]
Admit = Callable[[Request], None]  # raises HttpError to refuse a request from its head alone
ErrorBody = Callable[[HttpError], Response]


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The gRPC side's TLS (same certificate, key and client CA), or None without TLS."""
    if settings.tls_cert is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
        if settings.tls_client_ca is not None:
            context.load_verify_locations(settings.tls_client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as error:
        raise SecurityConfigError(f"cannot use --tls-cert/--tls-key/--tls-client-ca for HTTPS: {error}") from error
    context.set_alpn_protocols(["http/1.1"])
    return context


class HttpServer:
    """Serves ``handler`` on ``host:port``; ``admit`` sees each request's head before its body is read;
    ``error_response`` writes the answer of an :class:`HttpError`."""

    def __init__(self, handler: Handler, admit: Admit, error_response: ErrorBody, settings: Settings,
                 tls: ssl.SSLContext | None):
        self.handler, self.admit, self.error_response = handler, admit, error_response
        self.timeout_s = settings.http_timeout_s
        self.max_connections = settings.http_max_connections
        self.max_body_bytes = settings.http_max_body_bytes
        self.buffer_budget = settings.http_max_buffered_bytes
        self.buffered = 0  # bytes of request bodies held now, over all connections
        self.tls = tls
        self.refused = 0  # connections closed at once because max_connections were open
        self._connections: dict[asyncio.Task, bool] = {}  # connection -> busy with a request
        self._server: asyncio.Server | None = None
        self._draining = False

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the port (``port`` 0: a free one)."""
        try:
            self._server = await asyncio.start_server(self._accept, host, port, limit=MAX_HEAD_BYTES)
        except OSError as error:  # the port in use, the address not this machine's
            raise ListenError(f"cannot serve HTTP on {host}:{port}: {error.strerror or error}; choose another "
                              "--http-port (0 turns HTTP off)") from None
        return self._server.sockets[0].getsockname()[1]

    async def close(self, grace_s: float) -> None:
        """Stop listening and close idle connections; requests being answered get ``grace_s`` to finish."""
        self._draining = True
        if self._server is not None:
            self._server.close()
        for task, busy in list(self._connections.items()):
            if not busy:
                task.cancel()
        busy = [task for task in self._connections]
        if busy:
            _, pending = await asyncio.wait(busy, timeout=grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    # --------------------------------------------------------------------- connections

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._connections) >= self.max_connections or self._draining:
            self.refused += 1
            if self.tls is None:  # a TLS client could not read a plain answer
                writer.write(_status_only(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections; retry later"))
            writer.close()
            return
        task = asyncio.current_task()
        self._connections[task] = False
        try:
            if self.tls is not None:
                await writer.start_tls(self.tls, ssl_handshake_timeout=self.timeout_s)
            await self._serve(task, reader, writer)
        except (*CLIENT_GONE, asyncio.CancelledError):
            pass  # or the server is closing
        except Exception:  # a bug: this connection only
            log.exception("HTTP connection failed")
        finally:
            del self._connections[task]
            writer.transport.abort()

    async def _serve(self, task: asyncio.Task, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while not self._draining:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.timeout_s)
            except asyncio.LimitOverrunError:
                await self._write(writer, self.error_response(HttpError(
                    HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"request head over {MAX_HEAD_BYTES} bytes")), True)
                return
            self._connections[task] = True
            try:
                request = _parse_head(head)
                keep_alive = request.version == "HTTP/1.1" and request.header("connection").lower() != "close"
                try:
                    length = self._body_length(request)
                    self.admit(request)
                except HttpError as error:  # the body (if any) is not read: the connection ends
                    await self._write(writer, self.error_response(error), True)
                    return
                if length:
                    self.buffered += length
                    try:
                        if request.header("expect").lower() == "100-continue":
                            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                        body = await asyncio.wait_for(reader.readexactly(length), self.timeout_s)
                        request = Request(request.method, request.path, request.query, request.version,
                                          request.headers, body)
                        response = await self.handler(request)
                    finally:
                        self.buffered -= length
                else:
                    response = await self.handler(request)
                await self._write(writer, response, not keep_alive or self._draining, request.method == "HEAD")
            except HttpError as error:
                await self._write(writer, self.error_response(error), True)
                return
            except CLIENT_GONE:
                raise
            except Exception:  # a bug: this request fails alone, with a status
                log.exception("HTTP %s %s failed", request.method, request.path)
                await self._write(writer, self.error_response(HttpError(
                    HTTPStatus.INTERNAL_SERVER_ERROR, "internal error; see the server's log")), True)
                return
            finally:
                self._connections[task] = False
            if not keep_alive:
                return

    def _body_length(self, request: Request) -> int:
        if request.header("transfer-encoding"):
            raise HttpError(HTTPStatus.LENGTH_REQUIRED, "send the body with Content-Length (no chunked bodies)")
        length = byte_count(request.header("content-length", "0"))
        if length is None:
            raise HttpError(HTTPStatus.BAD_REQUEST, "Content-Length is not a number of bytes")
        if length > self.max_body_bytes:
            raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                            f"a body of {length} bytes is over the limit of {self.max_body_bytes}")
        if length and self.buffered + length > self.buffer_budget:
            raise HttpError(HTTPStatus.SERVICE_UNAVAILABLE, "the server holds as many request bodies as it may; "
                                                            "retry later", [("Retry-After", "1")])
        return length

    async def _write(self, writer: asyncio.StreamWriter, response: Response, close: bool,
                     head_only: bool = False) -> None:
        headers = [f"HTTP/1.1 {response.status} {_reason(response.status)}",
                   f"Content-Type: {response.content_type}", f"Content-Length: {len(response.body)}",
                   "Cache-Control: no-store", "X-Content-Type-Options: nosniff"]
        headers += [f"{name}: {value}" for name, value in response.headers]
        if close:
            headers.append("Connection: close")
        writer.write(("\r\n".join(headers) + "\r\n\r\n").encode("latin-1"))
        if not head_only:
            writer.write(response.body)
        await asyncio.wait_for(writer.drain(), self.timeout_s)


def byte_count(text: str) -> int | None:
    """A header's number of bytes (decimal), or None when it is not one: ASCII digits only (str.isdigit
    also takes "²", which int() refuses), at most 19 of them (int() refuses 5000)."""
    if not (text.isascii() and text.isdigit()) or len(text) > 19:
        return None
    return int(text)


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _status_only(status: HTTPStatus, message: str) -> bytes:
    body = message.encode()
    return (f"HTTP/1.1 {status.value} {status.phrase}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


def _parse_head(head: bytes) -> Request:
    """The request line and headers; HttpError 400 for anything malformed."""
    lines = head.decode("latin-1")[:-4].split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[2] not in ("HTTP/1.1", "HTTP/1.0"):
        raise HttpError(HTTPStatus.BAD_REQUEST, "malformed request line (expected METHOD /path HTTP/1.1)")
    method, target, version = parts
    if method not in METHODS:
        raise HttpError(HTTPStatus.NOT_IMPLEMENTED, "unknown method")
    if not target.startswith("/"):
        raise HttpError(HTTPStatus.BAD_REQUEST, "the request target must be a path")
    if len(lines) - 1 > MAX_HEADERS:
        raise HttpError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"more than {MAX_HEADERS} headers")
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip() or not name.isascii():
            raise HttpError(HTTPStatus.BAD_REQUEST, "malformed header line")
        headers.append((name.lower(), value.strip()))
    if sum(1 for name, _ in headers if name == "content-length") > 1:
        raise HttpError(HTTPStatus.BAD_REQUEST, "more than one Content-Length")
    path, _, query = target.partition("?")
    return Request(method, path, query, version, headers)
