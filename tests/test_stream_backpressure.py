"""ExplainStream backpressure: a client that sends and never reads cannot grow the server's memory.

The server reads at most ``max_stream_outstanding`` requests that it has not answered yet; the
answers it did send sit in the client's HTTP/2 receive window (the client's memory). Then it stops
reading, HTTP/2 flow control stops the client's sends, and the other clients are served as before.
Requests read are counted by the server's ``protoserve_requests_total{rpc="ExplainStream"}`` (each
one is answered).
"""

from __future__ import annotations

import asyncio
import math
import threading
import time

import grpc
import pytest
from protoserve_client import ExplainerClient, explain_request, pb, pb_grpc

from conftest import RunningServer
from server.settings import Settings

OUTSTANDING = 4
SENT = 4000  # 12.4 MiB of requests, more than gRPC's receive windows take in
# The client's stream receive window: 64 KiB with bandwidth-delay probing off (with it on, gRPC grows
# the window to a few MiB, which only lets more of the answers through to the client).
CLIENT_OPTIONS = [("grpc.use_local_subchannel_pool", 1), ("grpc.http2.bdp_probe", 0)]
CLIENT_WINDOW = 65535


@pytest.fixture(scope="module")
def small_window_server(demo_store):
    running = RunningServer(Settings(model_store=demo_store, port=0, metrics_port=0, shutdown_grace_s=2.0,
                                     max_stream_outstanding=OUTSTANDING))
    yield running
    running.stop()


def _answered(server, code: str = "OK") -> float:
    value = server.app.metrics.registry.get_sample_value(
        "protoserve_requests_total", {"rpc": "ExplainStream", "model": "mnist", "code": code})
    return value or 0.0


def _settled(read, quiet_s: float = 1.5, limit_s: float = 60.0) -> float:
    """``read()`` once it has not changed for ``quiet_s`` (at most ``limit_s``)."""
    end = time.monotonic() + limit_s
    value, since = read(), time.monotonic()
    while time.monotonic() < end:
        time.sleep(0.1)
        now = read()
        if now != value:
            value, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
    return value


def test_a_client_that_never_reads_holds_at_most_the_bound(small_window_server, mnist_split):
    server = small_window_server
    x = mnist_split["x_test"][0].numpy()
    # Answers with input-sized heatmaps (~10 KB each), so that few fit in the client's window.
    requests = [explain_request(x, model="mnist", heatmaps="input", request_id=str(i)) for i in range(SENT)]
    pulled = 0

    def produce():
        nonlocal pulled
        for request in requests:
            pulled += 1
            yield request

    before = _answered(server)
    with grpc.insecure_channel(server.address, options=CLIENT_OPTIONS) as channel:
        stub = pb_grpc.ExplainerStub(channel)
        answer_bytes = pb.ExplainStreamResponse(request_id=str(SENT),
                                                response=stub.Explain(requests[0], timeout=30)).ByteSize()
        answers = stub.ExplainStream(produce(), timeout=300)
        read_by_server = _settled(lambda: _answered(server)) - before
        # The bound, the answers in the client's window, and one on its way.
        bound = OUTSTANDING + math.ceil(CLIENT_WINDOW / answer_bytes) + 1
        print(f"never-reading client: the server read {read_by_server:.0f} of {SENT} requests (bound {bound}, "
              f"answers of {answer_bytes} bytes); the client could send {pulled}")
        assert OUTSTANDING <= read_by_server <= bound
        assert pulled < SENT  # flow control held the client back
        # Meanwhile other clients are served as usual.
        with ExplainerClient(server.address, timeout=30) as other:
            assert other.explain(x, model="mnist", heatmaps="none").components
            assert other.predict(x, model="mnist").prediction
        # Once the client reads, every request is answered, none lost.
        ids = set()
        for answer in answers:
            assert answer.WhichOneof("result") == "response", answer
            ids.add(answer.request_id)
    assert ids == {str(i) for i in range(SENT)}
    assert _answered(server) - before == SENT


def test_a_stream_that_ends_early_leaves_nothing_behind(small_window_server, mnist_split):
    """A client that goes away mid-stream: its reader and answer tasks end with the stream."""
    server = small_window_server
    x = mnist_split["x_test"][1].numpy()

    async def count_tasks() -> int:
        return len(asyncio.all_tasks())

    baseline = server.call(count_tasks())
    stop = threading.Event()

    def endless():
        i = 0
        while not stop.is_set() and i < 100_000:
            yield explain_request(x, model="mnist", heatmaps="input", request_id=str(i))
            i += 1

    with grpc.insecure_channel(server.address, options=CLIENT_OPTIONS) as channel:
        answers = pb_grpc.ExplainerStub(channel).ExplainStream(endless(), timeout=300)
        _settled(lambda: _answered(server))
        assert server.call(count_tasks()) > baseline  # the stream's tasks are alive while it is open
        answers.cancel()
        stop.set()
    assert _settled(lambda: server.call(count_tasks())) <= baseline
    with ExplainerClient(server.address, timeout=30) as other:
        stream = other.explain_stream(iter([explain_request(x, model="mnist", request_id="after")]), timeout=60)
        assert [a.request_id for a in stream] == ["after"]
