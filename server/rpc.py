"""What every rpc of every protocol shares: its duration and its count by status code, and the
conversion of an error into a status (code, message, and the field at fault in the ``protoserve-field``
trailer), the field named in the protocol's own words."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from typing import NamedTuple, NoReturn

import grpc

from server.errors import field_of, message_of, statuses_for
from server.metrics import Metrics
from server.registry import ModelRegistry

log = logging.getLogger(__name__)

FIELD_TRAILER = "protoserve-field"


class Status(NamedTuple):
    code: grpc.StatusCode
    message: str
    field: str  # "" when no field is at fault
    http: HTTPStatus = HTTPStatus.INTERNAL_SERVER_ERROR  # the same status for the HTTP transport


def deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The rpc's deadline as a :func:`time.monotonic` time, or None."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class Rpcs:
    """The rpcs of one protocol. ``field_names`` renames the data plane's fields into the protocol's
    (server/errors.py); the protocol's own errors already use its names."""

    def __init__(self, registry: ModelRegistry, metrics: Metrics, field_names: Mapping[str, str] | None = None):
        self.registry = registry
        self.metrics = metrics
        self.field_names = field_names or {}
        # The labelled series of each (rpc, model label, code) seen: a label lookup costs microseconds, and the
        # keys are bounded (the rpcs are this server's, the models the store's, the codes gRPC's).
        self._series: dict[tuple[str, str, grpc.StatusCode], tuple] = {}

    def scope(self, rpc: str, model: str, context: grpc.aio.ServicerContext) -> RpcScope:
        """``async with`` around an rpc's work: times and counts it; an error aborts the rpc with its status."""
        return RpcScope(self, rpc, model, lambda status: self.abort(context, status))

    def http_scope(self, rpc: str, model: str, fail: Callable[[Status], NoReturn]) -> RpcScope:
        """As :meth:`scope` for a request of the HTTP transport: an error is passed to ``fail``, which
        raises what the transport answers with."""
        async def abort(status: Status) -> NoReturn:
            fail(status)
        return RpcScope(self, rpc, model, abort)

    def record(self, rpc: str, model: str, code: grpc.StatusCode, seconds: float) -> None:
        # Only known model names become label values, so a hostile client cannot grow the series.
        label = model if model in self.registry.models else ""
        series = self._series.get((rpc, label, code))
        if series is None:
            series = self._series[rpc, label, code] = (self.metrics.requests.labels(rpc, label, code.name),
                                                       self.metrics.request_duration.labels(rpc, label))
        count, duration = series
        count.inc()
        duration.observe(seconds)

    def status(self, error: BaseException) -> Status:
        code, http = statuses_for(error)
        return Status(code, message_of(error, self.field_names), field_of(error, self.field_names), http)

    async def abort(self, context: grpc.aio.ServicerContext, status: Status) -> None:
        """End the rpc with ``status``; raises grpc.aio.AbortError."""
        if status.field:
            context.set_trailing_metadata(((FIELD_TRAILER, status.field),))
        await context.abort(status.code, status.message)


class RpcScope:
    """One rpc: timed, counted by status code, its error turned into its status and passed to ``abort``
    (which raises)."""

    def __init__(self, rpcs: Rpcs, rpc: str, model: str, abort: Callable[[Status], Awaitable[NoReturn]]):
        self.rpcs, self.rpc, self.model, self.abort = rpcs, rpc, model, abort

    async def __aenter__(self) -> RpcScope:
        self.start = time.perf_counter()
        return self

    async def __aexit__(self, kind, error, tb) -> bool | None:
        seconds = time.perf_counter() - self.start
        if error is None:
            self.rpcs.record(self.rpc, self.model, grpc.StatusCode.OK, seconds)
            return False
        if isinstance(error, (asyncio.CancelledError, grpc.aio.AbortError)):
            self.rpcs.record(self.rpc, self.model, grpc.StatusCode.CANCELLED, seconds)
            return False
        status = self.rpcs.status(error)
        if status.code is grpc.StatusCode.INTERNAL:
            log.exception("%s failed", self.rpc, exc_info=error)
        self.rpcs.record(self.rpc, self.model, status.code, seconds)
        await self.abort(status)
