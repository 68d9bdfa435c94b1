"""Issue 20's transport peers: gRPC servers that only compute an Explain, the context of ``server_added_over_floor``.

Each serves protoserve.v1's Explain on loopback in one architecture, computing what the in-process baseline of
:func:`bench.run.grpc_overhead_and_memory` computes (:meth:`ModelRuntime.explain` with ProtoNMF on the request's
input, on the same device, one torch thread) and answering with a fixed ExplainResponse (the real server's answer
to the same call, so the same bytes go back), beside a gRPC health service (the floor). None validates, batches,
makes host rows, encodes or records metrics, so a peer's figure is what its architecture costs by itself:

* ``asyncio_compute_thread``: grpc.aio on uvloop, the compute on one compute thread: protoserve's architecture;
* ``asyncio_inline``: the same with the compute on the event loop (no hand-off; it would stall every other rpc);
* ``sync_handler_thread``: grpc's thread-pool server, the compute on the thread that took the rpc.

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
from handlers.runtime import ExplainItem, ModelRuntime

ARCHITECTURES = ("asyncio_compute_thread", "asyncio_inline", "sync_handler_thread")


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
    else:
        peer = ThreadPeer if architecture == "asyncio_compute_thread" else InlinePeer
        uvloop.run(serve_asyncio(peer(model, answer), int(port)))


if __name__ == "__main__":
    main(*sys.argv[1:])
