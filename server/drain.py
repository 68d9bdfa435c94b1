"""Draining before shutdown: refuse new rpcs with UNAVAILABLE until gRPC has handed over every call.

``grpc.aio.Server.stop(grace)`` lets the rpcs that reached a handler finish, but a call that
gRPC core has received and not yet handed to the Python server is cancelled at once: its
client sees CANCELLED, as if the server had accepted and then lost it (grpc/grpc#41785).
Under load such calls pile up. So shutdown first drains: every rpc that reaches the server
from then on is refused with UNAVAILABLE ("retry elsewhere"), and only once no call has
arrived for ``quiet_s`` (or after ``max_s``) does the server stop. Health checks and
reflection still answer while draining (health says NOT_SERVING).
"""

from __future__ import annotations

import asyncio
import time

import grpc

from server.security import OPEN_SERVICES, handler_kind

DRAINING_MESSAGE = "the server is shutting down; retry on another instance"


class DrainInterceptor(grpc.aio.ServerInterceptor):
    """Passes rpcs through until :meth:`start`; from then on refuses them with UNAVAILABLE."""

    def __init__(self, open_services: tuple[str, ...] = OPEN_SERVICES):
        self._open = open_services
        self.draining = False
        self.last_arrival = 0.0  # monotonic time of the last refused rpc
        self.refused = 0

    def start(self) -> None:
        self.draining = True
        self.last_arrival = time.monotonic()

    async def wait_quiet(self, quiet_s: float, max_s: float) -> None:
        """Return once no rpc has been refused for ``quiet_s`` seconds, or after ``max_s``."""
        end = time.monotonic() + max_s
        while (now := time.monotonic()) < end and now - self.last_arrival < quiet_s:
            await asyncio.sleep(min(0.05, quiet_s))

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if not self.draining or handler is None or method.startswith(self._open):
            return handler
        self.last_arrival = time.monotonic()
        self.refused += 1
        kind = handler_kind(handler)
        return getattr(grpc, f"{kind}_rpc_method_handler")(
            _refuse_unary if not handler.request_streaming else _refuse_stream,
            response_serializer=handler.response_serializer)


async def _refuse_unary(request, context: grpc.aio.ServicerContext):
    await context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE)


async def _refuse_stream(request_iterator, context: grpc.aio.ServicerContext):
    await context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE)
