"""The /metrics HTTP endpoint: prometheus_client's exposition, behind bounds a stranger cannot lift.

prometheus_client's own ``start_http_server`` starts a thread per connection and never times one
out, so idle connections pile up threads. Here:

* the endpoint binds ``metrics_host`` (loopback by default, whatever ``--host`` is): the metrics
  name the models, methods and components, which the gRPC port tells only with a token;
* with ``metrics_token_file``, a scrape needs ``Authorization: Bearer <token>`` (else 401);
* a connection must send its request head (at most :data:`MAX_HEAD_BYTES`) within
  ``metrics_timeout_s`` and take the answer within as much again, or it is closed; one request
  per connection (HTTP/1.0);
* at most ``metrics_max_connections`` connections are served at once, one thread each; a
  connection beyond that is closed as soon as it is accepted.
"""

from __future__ import annotations

import http.server
import io
import logging
import socket
import socketserver
import threading
import time
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from server.security import BearerTokens, is_loopback, load_tokens
from server.settings import Settings

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 8192  # request line and headers; a scrape sends a few hundred bytes
PATH = "/metrics"


def metrics_tokens(settings: Settings) -> BearerTokens | None:
    """The tokens a scrape must present, or None (read at start-up, so a bad file fails fast)."""
    if settings.metrics_token_file is None:
        if not is_loopback(settings.metrics_host):
            log.warning("metrics on %s without a token: anyone who reaches it reads model and component names",
                        settings.metrics_host)
        return None
    return BearerTokens(load_tokens(settings.metrics_token_file))


class MetricsServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """Serves ``GET /metrics`` from ``registry`` in a background thread; :meth:`close` stops it."""

    daemon_threads = True
    block_on_close = False  # close() does not wait for connections; each ends within 2 x timeout_s
    allow_reuse_address = True
    request_queue_size = 64  # the accept backlog; what is accepted beyond max_connections is closed at once

    def __init__(self, registry: CollectorRegistry, host: str, port: int, tokens: BearerTokens | None,
                 timeout_s: float, max_connections: int):
        self.address_family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        super().__init__((host, port), _Handler)
        self.registry, self.tokens, self.timeout_s = registry, tokens, timeout_s
        self.connections = threading.BoundedSemaphore(max_connections)
        self.refused = 0  # connections closed at once because max_connections were being served
        self._thread = threading.Thread(target=self.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()

    @classmethod
    def from_settings(cls, registry: CollectorRegistry, settings: Settings,
                      tokens: BearerTokens | None) -> MetricsServer:
        return cls(registry, settings.metrics_host, settings.metrics_port, tokens, settings.metrics_timeout_s,
                   settings.metrics_max_connections)

    @property
    def port(self) -> int:
        return self.server_address[1]

    def process_request(self, request, client_address) -> None:
        if not self.connections.acquire(blocking=False):
            self.refused += 1
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release()

    def handle_error(self, request, client_address) -> None:
        log.debug("metrics request from %s failed", client_address, exc_info=True)

    def close(self) -> None:
        self.shutdown()
        self.server_close()


def _read_head(connection: socket.socket, deadline: float) -> bytes | None:
    """The request line and headers, or None if they are not complete by ``deadline`` within MAX_HEAD_BYTES."""
    head = b""
    while b"\r\n\r\n" not in head and b"\n\n" not in head:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or len(head) >= MAX_HEAD_BYTES:
            return None
        connection.settimeout(remaining)
        try:
            chunk = connection.recv(MAX_HEAD_BYTES - len(head))
        except OSError:  # timed out or reset
            return None
        if not chunk:
            return None
        head += chunk
    return head


class _Handler(http.server.BaseHTTPRequestHandler):
    server: MetricsServer
    default_request_version = "HTTP/1.0"  # no HTTP/0.9: every answer starts with a status line

    def setup(self) -> None:
        # The head is read under one deadline (a slow trickle cannot hold the connection), the answer
        # is built in memory and sent under a fresh one (sendall's timeout bounds the whole send).
        self.connection = self.request
        self.head = _read_head(self.connection, time.monotonic() + self.server.timeout_s)
        self.rfile = io.BytesIO(self.head or b"")
        self.wfile = io.BytesIO()

    def handle(self) -> None:
        if self.head is not None:
            self.handle_one_request()

    def finish(self) -> None:
        answer = self.wfile.getvalue()
        if answer:
            self.connection.settimeout(self.server.timeout_s)
            try:
                self.connection.sendall(answer)
            except OSError:
                pass  # the scraper went away or did not read in time

    def do_GET(self) -> None:
        tokens = self.server.tokens
        if tokens is not None and not tokens.authorized(self.headers.items()):
            self._answer(401, b"missing or invalid bearer token (header `Authorization: Bearer <token>`)\n",
                         [("WWW-Authenticate", 'Bearer realm="protoserve metrics"')])
        elif urlsplit(self.path).path != PATH:
            self._answer(404, f"not found; metrics are at {PATH}\n".encode())
        else:
            self._answer(200, generate_latest(self.server.registry), content_type=CONTENT_TYPE_LATEST)

    def _answer(self, status: int, body: bytes, headers: list[tuple[str, str]] = (),
                content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        log.debug("metrics %s: " + format, self.address_string(), *args)
