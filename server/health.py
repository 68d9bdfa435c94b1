"""grpc.health.v1 for the asyncio server, whose status changes never wait on a client.

grpc_health's asyncio servicer writes each watcher's answer while holding the lock that setting a
status takes, so one Watch whose client never reads (an HTTP/2 window of 0) blocks every later
change: the supervisor's NOT_SERVING and the shutdown's. Here a change is a dict write and an event;
each Watch writes from its own coroutine, and one that cannot write holds only itself.
"""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from handlers.errors import echo

ServingStatus = health_pb2.HealthCheckResponse.ServingStatus
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthServicer(health_pb2_grpc.HealthServicer):
    """The status of each service ("" is the whole server), as ``Check`` and ``Watch`` report it."""

    def __init__(self) -> None:
        self._status: dict[str, ServingStatus] = {"": SERVING}
        self._changed = asyncio.Event()  # replaced at each change: a watcher waits on the one it read with
        self._shutting_down = False

    def set(self, service: str, status: ServingStatus) -> None:
        """Sets a service's status (ignored once shutting down: shutdown wins)."""
        if not self._shutting_down:
            self._update({service: status})

    def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING from now on."""
        self._shutting_down = True
        self._update(dict.fromkeys(self._status, NOT_SERVING))

    def _update(self, statuses: dict[str, ServingStatus]) -> None:
        self._status.update(statuses)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def Check(self, request, context):
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {echo(request.service)}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request, context):
        last = None
        while True:
            changed = self._changed
            status = self._status.get(request.service, SERVICE_UNKNOWN)
            if status != last:  # intermediate statuses may be skipped: a watcher wants the latest
                await context.write(health_pb2.HealthCheckResponse(status=status))
                last = status
            await changed.wait()
