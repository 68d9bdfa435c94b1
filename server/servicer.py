"""protoserve.v1.Explainer: thin rpc handlers (convert -> call -> convert back).

:class:`ExplainerCalls` is each unary rpc from request message to response message, whatever carries
it: the gRPC servicer here, and the HTTP transport's JSON mapping (server/http_api.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from functools import partial

import grpc
from protoserve_client import pb, pb_grpc

from server import convert, rpc
from server.dataplane import DataPlane
from server.errors import StreamLimitError
from server.rpc import Rpcs
from server.settings import Settings

log = logging.getLogger(__name__)


class ExplainerCalls:
    """The unary rpcs of protoserve.v1, message to message (``deadline``: a :func:`time.monotonic` time)."""

    def __init__(self, plane: DataPlane):
        self.plane = plane

    async def predict(self, request: pb.PredictRequest, deadline: float | None) -> pb.PredictResponse:
        return await self.plane.predict(convert.predict_call(request, deadline),
                                        partial(convert.predict_response, request))

    async def explain(self, request: pb.ExplainRequest, deadline: float | None) -> pb.ExplainResponse:
        return await self.plane.explain(convert.explain_call(request, deadline),
                                        partial(convert.explain_response, request))

    def list_models(self) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[convert.model_info(runtime, with_components=False)
                                             for runtime in self.plane.models()])

    def get_model(self, request: pb.GetModelRequest) -> pb.ModelInfo:
        return convert.model_info(self.plane.model(request.model, request.version), with_components=True)


class ExplainerServicer(pb_grpc.ExplainerServicer):
    def __init__(self, plane: DataPlane, settings: Settings):
        self.plane = plane
        self.settings = settings
        self.calls = ExplainerCalls(plane)
        self.rpcs = Rpcs(plane.registry, plane.metrics)  # the data plane's field names are this protocol's
        self.open_streams = 0

    async def Predict(self, request: pb.PredictRequest, context) -> pb.PredictResponse:
        async with self.rpcs.scope("Predict", request.model, context):
            return await self.calls.predict(request, rpc.deadline(context))

    async def Explain(self, request: pb.ExplainRequest, context) -> pb.ExplainResponse:
        async with self.rpcs.scope("Explain", request.model, context):
            return await self.calls.explain(request, rpc.deadline(context))

    async def ExplainStream(self, request_iterator: AsyncIterator[pb.ExplainRequest],
                            context) -> AsyncIterator[pb.ExplainStreamResponse]:
        """Requests are explained concurrently (so they batch); answers come as they finish.
        A bad request gets a StreamError message; the stream goes on.

        At most ``max_stream_outstanding`` requests are read and not yet answered (computing, or
        waiting for the client to take their answer): at the bound the stream reads nothing more
        until the client takes an answer, and HTTP/2 flow control holds back the client's sends.
        At most ``max_streams`` streams are open at once, so what they hold is bounded too.
        """
        if self.open_streams >= self.settings.max_streams:
            self.rpcs.record("ExplainStream", "", grpc.StatusCode.RESOURCE_EXHAUSTED, 0.0)
            await self.rpcs.abort(context, self.rpcs.status(StreamLimitError(
                f"{self.settings.max_streams} ExplainStreams are open (--max-streams); retry later")))
        answers: asyncio.Queue = asyncio.Queue()  # at most max_stream_outstanding messages
        slots = asyncio.Semaphore(self.settings.max_stream_outstanding)
        pending: set[asyncio.Task] = set()
        deadline = rpc.deadline(context)

        async def answer(request: pb.ExplainRequest) -> None:
            start = time.perf_counter()
            try:
                response = await self.calls.explain(request, deadline)
                message = pb.ExplainStreamResponse(request_id=request.request_id, response=response)
                code = grpc.StatusCode.OK
            except Exception as exc:  # every error becomes a message on the stream
                status = self.rpcs.status(exc)
                code = status.code
                if code is grpc.StatusCode.INTERNAL:
                    log.exception("ExplainStream request %s failed", request.request_id)
                message = pb.ExplainStreamResponse(request_id=request.request_id, error=pb.StreamError(
                    code=code.name, message=status.message, field=status.field))
            self.rpcs.record("ExplainStream", request.model, code, time.perf_counter() - start)
            answers.put_nowait(message)

        async def read_all() -> None:
            try:
                await slots.acquire()
                async for request in request_iterator:
                    task = asyncio.create_task(answer(request))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                    await slots.acquire()  # the next read waits for a free slot
            except Exception:
                # Reading failed (e.g. an undecodable message): answer what was read, then end
                # the stream with that error's status (below) instead of leaving it open.
                await asyncio.gather(*pending)
                answers.put_nowait(None)
                raise
            await asyncio.gather(*pending)
            answers.put_nowait(None)

        self.open_streams += 1
        reader = asyncio.create_task(read_all())
        try:
            while (message := await answers.get()) is not None:
                yield message
                slots.release()  # resumed once gRPC has taken the message
            error = reader.exception() if reader.done() and not reader.cancelled() else None
        finally:
            self.open_streams -= 1
            reader.cancel()
            for task in pending:  # the stream ended early: its waiting requests are dropped before compute
                task.cancel()
        if error is not None:
            status = self.rpcs.status(error)
            if status.code is grpc.StatusCode.INTERNAL:
                log.error("ExplainStream failed reading requests", exc_info=error)
            await self.rpcs.abort(context, status)

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        async with self.rpcs.scope("ListModels", "", context):
            return self.calls.list_models()

    async def GetModel(self, request: pb.GetModelRequest, context) -> pb.ModelInfo:
        async with self.rpcs.scope("GetModel", request.model, context):
            return self.calls.get_model(request)
