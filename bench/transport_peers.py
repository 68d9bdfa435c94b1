"""Issue 20's transport peers: gRPC servers that only compute an Explain, the context of ``server_added_over_floor``.

Each serves protoserve.v1's Explain on loopback in one architecture, computing what the in-process baseline of
:func:`bench.run.grpc_overhead_and_memory` computes (:meth:`ModelRuntime.explain` with ProtoNMF on the request's
input, on the same device, one torch thread) and answering with a fixed ExplainResponse (the real server's answer
to the same call, so the same bytes go back), beside a gRPC health service (the floor). None validates, batches,
makes host rows, encodes or records metrics, so a peer's figure is what its architecture costs by itself:

* ``asyncio_compute_thread``: grpc.aio on uvloop, the compute on one compute thread: protoserve's architecture;
* ``asyncio_inline``: the same with the compute on the event loop (no hand-off; it would stall every other rpc);
* ``sync_handler_thread``: grpc's thread-pool server, the compute on the thread that took the rpc;
* ``sync_handler_thread_with_stages``: the same doing protoserve's own stages around the compute, as its data
  plane does them (the request read and validated, the host rows, the answer encoded; no batcher, no metrics):
  what protoserve's serving path would cost rewritten onto that server. It computes its answer (the same as the
  real server's) instead of sending the one it was given.

``python -m bench.transport_peers ARCHITECTURE PORT ARCHIVE RESPONSE DEVICE`` serves until killed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sys
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from protoserve_client import pb, pb_grpc
from protoserve_client.tensors import from_tensor

from handlers.archive import read_archive
from handlers.preprocess import input_from_array
from handlers.runtime import ExplainItem, ModelRuntime
from server import convert
from server.dataplane import ExplainResult, explain_options, top_k
from server.settings import Settings

_ONLY_COMPUTES = "computes the in-process baseline alone and sends the server's answer back"
ARCHITECTURES = {  # name -> what it is, for the bench's table
    "asyncio_compute_thread": f"grpc.aio on one compute thread (protoserve's architecture); {_ONLY_COMPUTES}",
    "asyncio_inline": f"grpc.aio computing on the event loop; {_ONLY_COMPUTES}",
    "sync_handler_thread": f"grpc's thread-pool server computing on the rpc's thread; {_ONLY_COMPUTES}",
    "sync_handler_thread_with_stages": "grpc's thread-pool server doing protoserve's own stages around the "
                                       "compute (the request read and validated, host rows, the answer encoded)",
}


class Peer(pb_grpc.ExplainerServicer):
    def __init__(self, model: ModelRuntime, response: pb.ExplainResponse):
        self.model, self.response = model, response

    def compute(self, request: pb.ExplainRequest) -> pb.ExplainResponse:
        inputs = torch.from_numpy(from_tensor(request.input))
        self.model.explain("protonmf", [ExplainItem(inputs, None, [[0]])], "feature_grid")
        return self.response


class ThreadPeer(Peer):
    def __init__(self, model: ModelRuntime, response: pb.ExplainResponse):
        super().__init__(model, response)
        self.compute_thread = concurrent.futures.ThreadPoolExecutor(1)

    async def Explain(self, request, context):
        return await asyncio.get_running_loop().run_in_executor(self.compute_thread, self.compute, request)


class InlinePeer(Peer):
    async def Explain(self, request, context):
        return self.compute(request)


class SyncPeer(Peer):
    def Explain(self, request, context):
        return self.compute(request)


class SyncStagesPeer(pb_grpc.ExplainerServicer):
    def __init__(self, model: ModelRuntime):
        self.model, self.settings = model, Settings(model_store=Path("."))

    def Explain(self, request, context):
        call = convert.explain_call(request, None)
        k = top_k(call.top_k, self.model, self.settings)
        key, target, suppress = explain_options(call, self.model, self.settings)
        inputs = input_from_array(call.examples[0].tensor, self.model.parts.input_spec)
        rows, _ = self.model.explain_rows(key.method, [ExplainItem(inputs, target, suppress)], key.heatmaps)
        return convert.explain_response(request, ExplainResult(self.model, key.method, k, rows))


async def serve_asyncio(peer: Peer, port: int) -> None:
    server = grpc.aio.server()
    pb_grpc.add_ExplainerServicer_to_server(peer, server)
    checks = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await checks.set("", health_pb2.HealthCheckResponse.SERVING)
    await server.wait_for_termination()


def serve_sync(peer: Peer, port: int) -> None:
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(8))
    pb_grpc.add_ExplainerServicer_to_server(peer, server)
    checks = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    checks.set("", health_pb2.HealthCheckResponse.SERVING)
    server.wait_for_termination()


def main(architecture: str, port: str, archive: str, response: str, device: str) -> None:
    import uvloop

    torch.set_num_threads(1)
    model = ModelRuntime(read_archive(Path(archive)), device)
    answer = pb.ExplainResponse.FromString(Path(response).read_bytes())
    if architecture == "sync_handler_thread":
        serve_sync(SyncPeer(model, answer), int(port))
    elif architecture == "sync_handler_thread_with_stages":
        serve_sync(SyncStagesPeer(model), int(port))
    else:
        peer = ThreadPeer if architecture == "asyncio_compute_thread" else InlinePeer
        uvloop.run(serve_asyncio(peer(model, answer), int(port)))


if __name__ == "__main__":
    main(*sys.argv[1:])
