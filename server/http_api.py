"""What the HTTP port answers (server/http_server.py carries it): routes, bearer tokens, errors.

==========================================================  ======  ==========================================
path                                                        method  answer
==========================================================  ======  ==========================================
``/v2/health/live``, ``/v2/health/ready``                   GET     200, or 503 when not ready (no token)
``/v2``                                                     GET     server metadata
``/v2/models/{name}[/versions/{v}]``                        GET     model metadata
``/v2/models/{name}[/versions/{v}]/ready``                  GET     200, or 503 when not ready
``/v2/models/{name}[/versions/{v}]/infer``                  POST    ModelInfer (server/oip_rest.py)
``/protoserve.v1.Explainer/{rpc}``                          POST    a unary rpc of protoserve.v1 (ListModels,
                                                                    GetModel, Predict, Explain) in the
                                                                    protobuf JSON mapping
``/``, ``/explorer.js``, ``/explorer.css``                  GET     the explorer page (no token: it asks
                                                                    for one when the server wants it)
==========================================================  ======  ==========================================

Errors answer ``{"error": message, "field": the request field at fault}`` with the HTTP status of the
error kind (server/errors.py's table), as KServe does; the messages and fields are gRPC's. Request
metrics are recorded as for gRPC, the rpc label prefixed ``http:``.
"""

from __future__ import annotations

import asyncio
import gc
import json
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from importlib import resources
from typing import NoReturn
from urllib.parse import unquote, urlsplit

from google.protobuf import json_format
from protoserve_client import pb

from handlers.errors import echo
from server import oip_rest
from server.dataplane import DataPlane
from server.http_server import HttpError, Request, Response, byte_count
from server.oip_infer import FIELD_NAMES, infer
from server.rpc import Rpcs, Status
from server.security import BearerTokens
from server.servicer import ExplainerCalls
from server.settings import Settings

# JSON of more than this is read or written on the JSON threads, off the event loop; up to it, on the
# loop, which it takes for at most about 10 ms (docs/limits.md).
ON_LOOP_JSON_BYTES = 64 << 10
# Parsed JSON takes many times its bytes as Python objects (docs/limits.md): one thread parses, so that
# memory is one body's whatever the connections (the others wait as bytes). And json.loads holds the GIL
# throughout: a second thread's call could follow the first's, stalling the event loop twice as long.
JSON_THREADS = 1
EXPLORER_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
                  "/explorer.js": ("explorer.js", "text/javascript; charset=utf-8"),
                  "/explorer.css": ("explorer.css", "text/css; charset=utf-8")}
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready", *EXPLORER_FILES})
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
EXPLAINER_PREFIX = "/protoserve.v1.Explainer/"
EXPLAINER_REQUESTS = {"ListModels": pb.ListModelsRequest, "GetModel": pb.GetModelRequest,
                      "Predict": pb.PredictRequest, "Explain": pb.ExplainRequest}
# The page may only talk to this server, and runs no script but its own.
PAGE_HEADERS = [("Content-Security-Policy", "default-src 'self'; img-src 'self' data: blob:; "
                                            "style-src 'self'; script-src 'self'; frame-ancestors 'none'")]


def _json(document, status: int = HTTPStatus.OK) -> Response:
    return Response(status, json.dumps(document, separators=(",", ":"), allow_nan=False).encode())


def error_response(error: HttpError) -> Response:
    document = {"error": str(error)}
    if error.field:
        document["field"] = error.field
    return Response(error.status, json.dumps(document).encode(), headers=error.headers)


def _fail(status: Status) -> NoReturn:
    raise HttpError(status.http, status.message, field=status.field)


class HttpApi:
    """Routes requests to the data plane (the OIP REST binding, protoserve.v1 in JSON) and the page."""

    def __init__(self, plane: DataPlane, settings: Settings, tokens: BearerTokens | None):
        self.plane = plane
        self.settings = settings
        self.tokens = tokens
        self.allowed_hosts = allowed_hosts(settings)
        self.oip_rpcs = Rpcs(plane.registry, plane.metrics, FIELD_NAMES)
        self.explainer_rpcs = Rpcs(plane.registry, plane.metrics)
        self.calls = ExplainerCalls(plane)
        folder = resources.files("server") / "explorer"
        self.page = {path: (folder / name).read_bytes() for path, (name, _) in EXPLORER_FILES.items()}
        self.json_threads = ThreadPoolExecutor(JSON_THREADS, thread_name_prefix="protoserve-http-json")

    def close(self) -> None:
        """Stop the JSON threads, once the HTTP server has closed: work not started is dropped; work
        running ends on its own (its request has gone)."""
        self.json_threads.shutdown(wait=False, cancel_futures=True)

    def admit(self, request: Request) -> None:
        """Refuse, from its head (its body is never read), a request for another host name, one that a
        page of another origin sends, one without a valid token, or one with too much JSON."""
        host = request.header("host")
        # DNS rebinding: a page of any site whose name resolves to this address reaches the port with
        # its own name in Host. Bound to loopback, only loopback names are served (--http-allowed-host).
        # A browser always sends Host, so a request without one is not a page's.
        if host and self.allowed_hosts is not None and host_name(host) not in self.allowed_hosts:
            raise HttpError(HTTPStatus.MISDIRECTED_REQUEST,
                            f"host {echo(host)} is not served here; served: {', '.join(sorted(self.allowed_hosts))} "
                            "(protoserve serve --http-allowed-host)", field="host")
        # A page of another origin may send requests (a browser adds Origin) but must not spend our compute.
        origin = request.header("origin")
        if origin and origin_authority(origin) != host.lower():
            raise HttpError(HTTPStatus.FORBIDDEN, f"requests from pages of other origins are refused "
                                                  f"(Origin {echo(origin)}, Host {echo(host)})", field="origin")
        if self.tokens is not None and request.path not in OPEN_PATHS and not self.tokens.authorized(request.headers):
            raise HttpError(HTTPStatus.UNAUTHORIZED,
                            "missing or invalid bearer token (header `Authorization: Bearer <token>`)",
                            [("WWW-Authenticate", 'Bearer realm="protoserve"')])
        # Parsed JSON numbers take many times their bytes (docs/limits.md): a JSON part is bounded apart.
        size = json_bytes(request)
        if size > self.settings.http_max_json_bytes:
            raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                            f"a JSON part of {size} bytes is over the limit of {self.settings.http_max_json_bytes} "
                            "(protoserve serve --http-max-json-bytes); send large tensors in binary "
                            "(Inference-Header-Content-Length), or over gRPC")

    async def handle(self, request: Request) -> Response:
        path = request.path
        if path in EXPLORER_FILES:
            _allow(request, "GET")
            return Response(HTTPStatus.OK, self.page[path], EXPLORER_FILES[path][1], PAGE_HEADERS)
        if path.startswith(EXPLAINER_PREFIX):
            _allow(request, "POST")
            return await self._explainer(path.removeprefix(EXPLAINER_PREFIX), request)
        parts = [unquote(part) for part in path.split("/")[1:]]
        if parts[:1] != ["v2"]:
            raise HttpError(HTTPStatus.NOT_FOUND, f"no such path {echo(path)}; the API is under /v2 "
                                                  f"and {EXPLAINER_PREFIX}, the explorer at /")
        return await self._v2(parts[1:], request)

    # ------------------------------------------------------------- Open Inference Protocol

    async def _v2(self, parts: list[str], request: Request) -> Response:
        if parts in ([], ["health", "live"], ["health", "ready"]):
            _allow(request, "GET")
            if not parts:
                return _json(oip_rest.server_metadata())
            if parts[1] == "live":
                return _json({"live": True})
            ready = self.plane.ready()
            return _json({"ready": ready}, HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE)
        if parts[:1] != ["models"] or len(parts) < 2:
            raise HttpError(HTTPStatus.NOT_FOUND, "no such path under /v2")
        name, rest = parts[1], parts[2:]
        version = ""
        if rest[:1] == ["versions"] and len(rest) >= 2:
            version, rest = rest[1], rest[2:]
        if rest == []:
            _allow(request, "GET")
            async with self.oip_rpcs.http_scope("http:ModelMetadata", name, _fail):
                runtime = self.plane.model(name, version)
                versions = [r.version for r in self.plane.models() if r.name == runtime.name]
                return _json(oip_rest.model_metadata(runtime, versions))
        if rest == ["ready"]:
            _allow(request, "GET")
            ready = self.plane.ready(name, version)  # an unknown model is not ready, as over gRPC
            return _json({"name": name, "ready": ready}, HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE)
        if rest == ["infer"]:
            _allow(request, "POST")
            return await self._infer(name, version, request)
        raise HttpError(HTTPStatus.NOT_FOUND, "no such path under /v2/models/{name}")

    async def _infer(self, name: str, version: str, request: Request) -> Response:
        async with self.oip_rpcs.http_scope("http:ModelInfer", name, _fail):
            parsed = await self._json_work(json_bytes(request), oip_rest.parse_infer, name, version, request.body,
                                           request.header(oip_rest.HEADER_LENGTH))
            outputs = await infer(self.plane, self.settings, parsed.request, None, lambda outputs: outputs)
            # Its JSON is written here, as protoserve.v1's is (the data plane's encode stage times the arrays).
            body, header_length = await self._json_work(oip_rest.answer_json_bytes(parsed, outputs),
                                                        oip_rest.infer_response, parsed, outputs)
        if header_length is None:
            return Response(HTTPStatus.OK, body, oip_rest.JSON_TYPE)
        return Response(HTTPStatus.OK, body, oip_rest.BINARY_TYPE, [("Inference-Header-Content-Length",
                                                                     str(header_length))])

    async def _json_work(self, size: int, function, *args):
        """``function(*args)``, which reads or writes ``size`` bytes of JSON: on the JSON threads, the
        garbage collector paused, when that is more than ON_LOOP_JSON_BYTES."""
        if size > ON_LOOP_JSON_BYTES:
            return await asyncio.get_running_loop().run_in_executor(self.json_threads, _gc_paused, function, *args)
        return function(*args)

    # ------------------------------------------------------------- protoserve.v1 in JSON

    async def _explainer(self, rpc: str, request: Request) -> Response:
        message_type = EXPLAINER_REQUESTS.get(rpc)
        if message_type is None:
            raise HttpError(HTTPStatus.NOT_FOUND, f"no rpc {echo(rpc)}; known: {', '.join(EXPLAINER_REQUESTS)}")
        # Parsed before the rpc's scope, as gRPC decodes a message before its servicer sees it.
        message = await self._json_work(json_bytes(request), _parse_message, request.body, message_type)
        async with self.explainer_rpcs.http_scope(f"http:{rpc}", getattr(message, "model", ""), _fail):
            if rpc == "ListModels":
                response = self.calls.list_models()
            elif rpc == "GetModel":
                response = self.calls.get_model(message)
            elif rpc == "Predict":
                response = await self.calls.predict(message, None)
            else:
                response = await self.calls.explain(message, None)
        return Response(HTTPStatus.OK, await self._json_work(response.ByteSize(), _message_json, response))


def _gc_paused(function, *args):
    """``function(*args)`` with the cyclic garbage collector paused: parsed JSON can be millions of lists,
    which every collection meanwhile would walk again (an 8 MiB body of ``[0],[0],...`` took 4 times
    as long to parse, the GIL held)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return function(*args)
    finally:
        if enabled:
            gc.enable()


def _message_json(message) -> bytes:
    return json_format.MessageToJson(message, preserving_proto_field_name=True, indent=None,
                                     always_print_fields_with_no_presence=True).encode()


def _parse_message(body: bytes, message_type):
    try:
        return json_format.Parse(body or b"{}", message_type())
    except (json_format.ParseError, ValueError, RecursionError) as error:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"request: not a {message_type.DESCRIPTOR.full_name} in JSON: "
                                                f"{echo(str(error))}", field="request") from None


def allowed_hosts(settings: Settings) -> frozenset[str] | None:
    """The host names the HTTP port answers for (None: any): ``--http-allowed-host``, else the loopback
    names when it is bound to loopback."""
    if settings.http_allowed_hosts:
        return frozenset(name.lower() for name in settings.http_allowed_hosts)
    return LOOPBACK_NAMES if settings.host in LOOPBACK_NAMES else None


def host_name(authority: str) -> str:
    """The name in a Host header: ``name:port`` -> name, ``[::1]:port`` -> ::1, lower case."""
    authority = authority.strip().lower()
    if authority.startswith("["):
        return authority[1:authority.find("]")]
    return authority.rpartition(":")[0] if ":" in authority else authority


def json_bytes(request: Request) -> int:
    """How many bytes of a request's body the routes parse as JSON, from its head (the server has checked
    Content-Length): all of it for protoserve.v1; for the OIP routes, the part before the binary tensor
    data an Inference-Header-Content-Length announces."""
    body_bytes = byte_count(request.header("content-length", "0")) or 0
    header_length = request.header(oip_rest.HEADER_LENGTH)
    if not header_length or request.path.startswith(EXPLAINER_PREFIX):
        return body_bytes
    # One that is no number of bytes within the body is refused before anything is parsed (parse_infer).
    return min(byte_count(header_length) or 0, body_bytes)


def origin_authority(origin: str) -> str | None:
    """The ``host:port`` of an Origin header, lower case; None when it cannot be read (``http://[::1``:
    urlsplit raises on a bracket never closed), which names no page of this server's either."""
    try:
        return urlsplit(origin).netloc.lower()
    except ValueError:
        return None


def _allow(request: Request, method: str) -> None:
    if request.method != method and not (method == "GET" and request.method == "HEAD"):
        raise HttpError(HTTPStatus.METHOD_NOT_ALLOWED, f"use {method}", [("Allow", method)])

