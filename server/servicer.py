"""protoserve.v1.Explainer: thin rpc handlers (convert -> call -> convert back)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc
from protoserve_client import pb, pb_grpc

from server import convert
from server.errors import field_of, message_of, status_for
from server.metrics import Metrics
from server.registry import ModelRegistry, PredictKey
from server.settings import Settings

log = logging.getLogger(__name__)


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class ExplainerServicer(pb_grpc.ExplainerServicer):
    def __init__(self, registry: ModelRegistry, settings: Settings, metrics: Metrics):
        self.registry = registry
        self.settings = settings
        self.metrics = metrics

    async def Predict(self, request: pb.PredictRequest, context) -> pb.PredictResponse:
        async with self._rpc("Predict", request.model, context):
            model = self.registry.get(request.model, request.version)
            served = model.runtime
            k = convert.top_k(request, served, self.settings)
            x = await convert.decode_input(request, served, self.settings, self.registry.images)
            scores = await model.batcher.submit(x, key=PredictKey(), deadline=_deadline(context))
            response = pb.PredictResponse(request_id=request.request_id, model=served.name, version=served.version)
            convert.add_class_scores(response.prediction, scores, served.labels, k)
            return response

    async def Explain(self, request: pb.ExplainRequest, context) -> pb.ExplainResponse:
        async with self._rpc("Explain", request.model, context):
            return await self._explain(request, _deadline(context))

    async def _explain(self, request: pb.ExplainRequest, deadline: float | None) -> pb.ExplainResponse:
        model = self.registry.get(request.model, request.version)
        served = model.runtime
        k = convert.top_k(request, served, self.settings)
        start = time.perf_counter()
        key, item = await convert.decode_explain(request, served, self.settings, self.registry.images)
        self.metrics.stage_duration.labels(served.name, "preprocess").observe(time.perf_counter() - start)
        row = await model.batcher.submit(item, key=key, deadline=deadline)
        start = time.perf_counter()
        response = convert.explain_response(request, served, key.method, k, row)
        self.metrics.stage_duration.labels(served.name, "encode").observe(time.perf_counter() - start)
        if response.components:
            top = max(response.components, key=lambda c: abs(c.contribution))
            self.metrics.component_uses.labels(served.name, key.method, top.id).inc()
        return response

    async def ExplainStream(self, request_iterator: AsyncIterator[pb.ExplainRequest],
                            context) -> AsyncIterator[pb.ExplainStreamResponse]:
        """Requests are explained concurrently (so they batch); answers come as they finish.
        A bad request gets a StreamError message; the stream goes on.

        At most ``max_stream_outstanding`` requests are read and not yet answered (computing, or
        waiting for the client to take their answer): at the bound the stream reads nothing more
        until the client takes an answer, and HTTP/2 flow control holds back the client's sends.
        """
        answers: asyncio.Queue = asyncio.Queue()  # at most max_stream_outstanding messages
        slots = asyncio.Semaphore(self.settings.max_stream_outstanding)
        pending: set[asyncio.Task] = set()
        deadline = _deadline(context)

        async def answer(request: pb.ExplainRequest) -> None:
            start = time.perf_counter()
            try:
                response = await self._explain(request, deadline)
                message = pb.ExplainStreamResponse(request_id=request.request_id, response=response)
                code = grpc.StatusCode.OK
            except Exception as exc:  # every error becomes a message on the stream
                code = status_for(exc)
                if code is grpc.StatusCode.INTERNAL:
                    log.exception("ExplainStream request %s failed", request.request_id)
                message = pb.ExplainStreamResponse(request_id=request.request_id, error=pb.StreamError(
                    code=code.name, message=message_of(exc), field=field_of(exc)))
            self._record("ExplainStream", request.model, code, time.perf_counter() - start)
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

        reader = asyncio.create_task(read_all())
        try:
            while (message := await answers.get()) is not None:
                yield message
                slots.release()  # resumed once gRPC has taken the message
            error = reader.exception() if reader.done() and not reader.cancelled() else None
        finally:
            reader.cancel()
            for task in pending:  # the stream ended early: its waiting requests are dropped before compute
                task.cancel()
        if error is not None:
            code = status_for(error)
            if code is grpc.StatusCode.INTERNAL:
                log.error("ExplainStream failed reading requests", exc_info=error)
            if field_of(error):
                context.set_trailing_metadata((("protoserve-field", field_of(error)),))
            await context.abort(code, message_of(error))

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        async with self._rpc("ListModels", "", context):
            return pb.ListModelsResponse(models=[convert.model_info(m.runtime, with_components=False)
                                                 for m in self.registry.all()])

    async def GetModel(self, request: pb.GetModelRequest, context) -> pb.ModelInfo:
        async with self._rpc("GetModel", request.model, context):
            return convert.model_info(self.registry.get(request.model, request.version).runtime, with_components=True)

    def _rpc(self, rpc: str, model: str, context) -> "_RpcScope":
        return _RpcScope(self, rpc, model, context)

    def _record(self, rpc: str, model: str, code: grpc.StatusCode, seconds: float) -> None:
        # Only known model names become label values, so a hostile client cannot grow the series.
        label = model if model in self.registry.models else ""
        self.metrics.requests.labels(rpc, label, code.name).inc()
        self.metrics.request_duration.labels(rpc, label).observe(seconds)


class _RpcScope:
    """Times an rpc, counts it by status code, and turns errors into gRPC statuses."""

    def __init__(self, servicer: ExplainerServicer, rpc: str, model: str, context):
        self.servicer, self.rpc, self.model, self.context = servicer, rpc, model, context

    async def __aenter__(self):
        self.start = time.perf_counter()
        return self

    async def __aexit__(self, kind, error, tb):
        seconds = time.perf_counter() - self.start
        if error is None:
            self.servicer._record(self.rpc, self.model, grpc.StatusCode.OK, seconds)
            return False
        if isinstance(error, (asyncio.CancelledError, grpc.aio.AbortError)):
            self.servicer._record(self.rpc, self.model, grpc.StatusCode.CANCELLED, seconds)
            return False
        code = status_for(error)
        if code is grpc.StatusCode.INTERNAL:
            log.exception("%s failed", self.rpc, exc_info=error)
        self.servicer._record(self.rpc, self.model, code, seconds)
        field = field_of(error)
        if field:
            self.context.set_trailing_metadata((("protoserve-field", field),))
        await self.context.abort(code, message_of(error))
