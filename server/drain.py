"""Draining before shutdown: every rpc that arrives after the signal is answered UNAVAILABLE.

``grpc.aio.Server.stop(grace)`` lets the rpcs that reached a handler finish, but a call that
gRPC core has received and not yet handed to the Python server (and one that arrives on an open
connection while core shuts down) is cancelled: its client sees CANCELLED, as if the server had
accepted and then lost it (grpc/grpc#41785). A client that keeps sending always has such a call
in flight. So shutdown goes:

1. :meth:`DrainInterceptor.start`: from then on every rpc is refused with UNAVAILABLE ("retry
   elsewhere") from its headers alone, without reading its message;
2. :meth:`DrainInterceptor.wait_drained`: until the rpcs accepted before (counted while they run)
   have finished and no rpc has arrived for ``quiet_s``, or until the grace period ends;
3. :func:`close_sockets`: the server's listening sockets and TCP connections are shut down under
   gRPC, so a call still arriving dies with its connection, which its client reports as UNAVAILABLE;
4. only then ``server.stop``, which has nothing left to cancel.

Health checks and reflection still answer while draining (health says NOT_SERVING); they are not
counted as in flight, so a health watch does not hold the shutdown.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import socket
import time

import grpc

from server.security import OPEN_SERVICES, WrappedHandlers, handler_kind, refusal_handler

DRAINING_MESSAGE = "the server is shutting down; retry on another instance"
_REFUSE = refusal_handler(grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE)
_TCP_LISTEN = "0A"  # the state column of /proc/net/tcp


class DrainInterceptor(grpc.aio.ServerInterceptor):
    """Counts the rpcs in flight; after :meth:`start`, refuses new ones with UNAVAILABLE."""

    def __init__(self, open_services: tuple[str, ...] = OPEN_SERVICES):
        self._open = open_services
        self.draining = False
        self.in_flight = 0
        self.last_arrival = 0.0  # monotonic time of the last refused rpc
        self.refused = 0
        self.counted = WrappedHandlers()  # by the handler underneath (the same for every call of a method)

    def start(self) -> None:
        self.draining = True
        self.last_arrival = time.monotonic()

    async def wait_drained(self, quiet_s: float, max_s: float) -> bool:
        """Wait until no rpc is in flight and none was refused for ``quiet_s`` seconds, or ``max_s``
        seconds passed; True if drained."""
        end = time.monotonic() + max_s
        while (now := time.monotonic()) < end:
            if self.in_flight == 0 and now - self.last_arrival >= quiet_s:
                return True
            await asyncio.sleep(min(0.05, quiet_s))
        return False

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if method.startswith(self._open):
            return await continuation(handler_call_details)
        if self.draining:
            self.last_arrival = time.monotonic()
            self.refused += 1
            return _REFUSE
        handler = await continuation(handler_call_details)
        if handler is None or not hasattr(handler, "_replace"):
            return handler
        return self.counted.get(id(handler), handler, self._counted_handler)

    def _counted_handler(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        kind = handler_kind(handler)
        return handler._replace(**{kind: self._counted(getattr(handler, kind), handler.response_streaming)})

    def _counted(self, behavior, streaming_response: bool):
        if streaming_response and inspect.isasyncgenfunction(behavior):
            async def counted_gen(request, context):
                self.in_flight += 1
                try:
                    async for response in behavior(request, context):
                        yield response
                finally:
                    self.in_flight -= 1
            return counted_gen

        async def counted(request, context):
            self.in_flight += 1
            try:
                result = behavior(request, context)
                return await result if inspect.isawaitable(result) else result
            finally:
                self.in_flight -= 1
        return counted


def close_sockets(port: int) -> int:
    """Shut down this process's TCP sockets on ``port``; returns how many connections were closed.

    The listening sockets go first, so that no connection can arrive while the accepted ones are
    found and shut down (gRPC core logs "Failed accept4" once, as its acceptor closes). Linux only
    (reads /proc); elsewhere nothing is closed and shutdown falls back to gRPC's own.
    """
    for fd in _socket_fds(port, listening=True):
        _shut_down(fd)
    return sum(_shut_down(fd) for fd in _socket_fds(port, listening=False))


def _socket_fds(port: int, listening: bool) -> list[int]:
    """This process's descriptors of TCP sockets whose local port is ``port``."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as rows:
                next(rows)  # the header
                for row in rows:
                    fields = row.split()
                    if int(fields[1].rsplit(":", 1)[1], 16) == port and (fields[3] == _TCP_LISTEN) == listening:
                        inodes.add(f"socket:[{fields[9]}]")
        except OSError:
            continue
    fds = []
    for fd in os.listdir("/proc/self/fd") if inodes else ():
        try:
            if os.readlink(f"/proc/self/fd/{fd}") in inodes:
                fds.append(int(fd))
        except OSError:
            continue  # closed meanwhile
    return fds


def _shut_down(fd: int) -> bool:
    # On a duplicate descriptor: shutdown acts on the socket itself, and closing the duplicate leaves
    # gRPC's descriptor for gRPC to close.
    try:
        with socket.socket(fileno=os.dup(fd)) as connection:
            connection.shutdown(socket.SHUT_RDWR)
        return True
    except OSError:
        return False  # gone meanwhile
