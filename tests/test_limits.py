"""Per-request limits (docs/limits.md): message size (gRPC itself), input bytes, top_k, interventions."""

from __future__ import annotations

import select
import socket
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from protoserve_client import ExplainerClient, pb, pb_grpc

from conftest import RunningServer
from server.settings import Settings

MAX_MESSAGE = 256 << 10
MAX_INPUT = 2048  # a float32 MNIST input (3136 bytes) is over it, a uint8 one (784 bytes) under


@pytest.fixture(scope="module")
def small_server(demo_store):
    running = RunningServer(Settings(model_store=demo_store, port=0, metrics_port=0, shutdown_grace_s=2.0,
                                     max_message_bytes=MAX_MESSAGE, max_input_bytes=MAX_INPUT,
                                     max_top_k=7, max_interventions=2))
    yield running
    running.stop()


@pytest.fixture()
def small_client(small_server):
    with ExplainerClient(small_server.address, timeout=30) as client:
        yield client


def _rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def _oversized(n_bytes: int) -> pb.Tensor:
    return pb.Tensor(dtype="uint8", shape=[n_bytes], data=b"\x00" * n_bytes)


def test_a_message_over_the_servers_maximum_is_refused_by_grpc(small_client):
    error = _rpc_error(lambda: small_client.predict(_oversized(MAX_MESSAGE + 1024), model="mnist"))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in error.details() and str(MAX_MESSAGE) in error.details()
    digit = np.zeros((1, 28, 28), np.uint8)
    assert small_client.predict(digit, model="mnist").prediction  # still serving


def test_a_message_over_the_clients_maximum_is_refused_before_sending(server):
    with ExplainerClient(server.address, timeout=30, max_message_bytes=64 << 10) as client:
        error = _rpc_error(lambda: client.predict(_oversized(100 << 10), model="mnist"))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in error.details()


def test_input_bytes_over_the_limit_name_the_field(small_client):
    error = _rpc_error(lambda: small_client.predict(np.zeros((1, 28, 28), np.float32), model="mnist"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("input.data") and str(MAX_INPUT) in error.details()
    error = _rpc_error(lambda: small_client.explain(image=b"\x89PNG" + b"\x00" * MAX_INPUT, model="mnist"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith("image")
    assert small_client.explain(np.zeros((1, 28, 28), np.uint8), model="mnist").components


def test_top_k_and_interventions_limits(small_client):
    digit = np.zeros((1, 28, 28), np.uint8)
    assert len(small_client.predict(digit, model="mnist", top_k=7).prediction) == 7
    error = _rpc_error(lambda: small_client.predict(digit, model="mnist", top_k=8))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith("top_k")
    ok = small_client.explain(digit, model="mnist", interventions=[["c0.p0"], ["c1.p0"]], heatmaps="none")
    assert len(ok.interventions) == 2
    error = _rpc_error(lambda: small_client.explain(digit, model="mnist", interventions=[["c0.p0"]] * 3))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith("interventions")


def test_an_intervention_naming_more_components_than_the_method_has_is_refused_before_reading_them(client):
    digit = np.zeros((1, 28, 28), np.uint8)
    components = len([m for m in client.get_model("mnist").methods if m.name == "protonmf"][0].components)
    error = _rpc_error(lambda: client.explain(digit, model="mnist", method="protonmf",
                                              interventions=[["c0.p0"] * 200_000]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == f"interventions: set 0 names 200000 components; method 'protonmf' has {components}"
    ok = client.explain(digit, model="mnist", method="protonmf", interventions=[["c0.p0"] * components])
    assert len(ok.interventions) == 1


def test_heatmaps_come_only_for_the_reported_components(client):
    response = client.explain(np.zeros((1, 28, 28), np.float32), model="mnist", heatmaps="input")
    assert [h.component_id for h in response.heatmaps] == [c.id for c in response.components]


@pytest.mark.parametrize("shape", [[1] * 65, [1] * 33, [2 ** 62, 0]])
def test_tensor_shapes_numpy_cannot_hold_are_invalid_not_internal(client, shape):
    tensor = pb.Tensor(dtype="float32", shape=shape, data=b"" if 0 in shape else b"\x00" * 4)
    error = _rpc_error(lambda: client.stub.Predict(pb.PredictRequest(model="mnist", input=tensor), timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert dict(error.trailing_metadata())["protoserve-field"] == "input.shape"
    assert len(error.details()) < 200


def _served_settings(monkeypatch, tmp_path, *flags: str) -> Settings:
    """The Settings that `protoserve serve --model-store tmp_path *flags` would serve with (nothing served)."""
    import server.app
    from server import cli

    seen = []

    class Recorder:
        def __init__(self, settings):
            seen.append(settings)

        async def run_until_signal(self):
            return None

    monkeypatch.setattr(server.app, "App", Recorder)
    assert cli.main(["serve", "--model-store", str(tmp_path), *flags]) == 0
    return seen[0]


def test_the_decode_budget_flags_reach_the_settings(monkeypatch, tmp_path):
    settings = _served_settings(monkeypatch, tmp_path, "--max-image-pixels", "1000", "--decode-threads", "3",
                                "--max-decode-backlog", "5", "--decode-timeout-s", "0.25")
    assert (settings.max_image_pixels, settings.decode_threads, settings.max_decode_backlog,
            settings.decode_timeout_s) == (1000, 3, 5, 0.25)
    for name, value in (("max_image_pixels", 0), ("decode_threads", 0), ("max_decode_backlog", 0),
                        ("decode_timeout_s", 0.0)):
        with pytest.raises(ValueError, match=rf"^{name} must be "):
            Settings(model_store=tmp_path, **{name: value})


def _closed_within(sockets: list[socket.socket], seconds: float) -> list[bool]:
    """Which of ``sockets`` the server closes within ``seconds`` (what it sends meanwhile is read and dropped)."""
    closed = [False] * len(sockets)
    end = time.monotonic() + seconds
    while not all(closed) and (left := end - time.monotonic()) > 0:
        readable, _, _ = select.select([s for s, c in zip(sockets, closed) if not c], [], [], left)
        for s in readable:
            try:
                eof = s.recv(65536) == b""
            except OSError:  # reset
                eof = True
            closed[sockets.index(s)] |= eof
    return closed


def test_connections_and_rpcs_a_stranger_holds_are_bounded(demo_store):
    """Idle sockets (no HTTP/2 preface, an attacker's cheapest flood) get at most --max-connections slots,
    each for at most --handshake-timeout-s; rpcs in flight, health watches included, at most
    --max-concurrent-rpcs (RESOURCE_EXHAUSTED beyond). The server serves again once they are gone."""
    running = RunningServer(Settings(model_store=demo_store, port=0, metrics_port=0, shutdown_grace_s=1.0,
                                     max_connections=4, handshake_timeout_s=3.0, max_concurrent_rpcs=3))
    host, port = running.address.rsplit(":", 1)
    sockets = [socket.create_connection((host, int(port))) for _ in range(8)]
    try:
        closed_at_once = _closed_within(sockets, 1.0)
        assert sorted(closed_at_once) == [False] * 4 + [True] * 4, closed_at_once
        held = [s for s, closed in zip(sockets, closed_at_once) if not closed]
        assert _closed_within(held, 10.0) == [True] * 4  # the handshake timeout, 3 s
        with grpc.insecure_channel(running.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            watches = [health.Watch(health_pb2.HealthCheckRequest(), timeout=30) for _ in range(3)]
            assert [next(w).status for w in watches] == [health_pb2.HealthCheckResponse.SERVING] * 3
            with pytest.raises(grpc.RpcError) as refused:
                health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            watches[0].cancel()
            deadline = time.monotonic() + 10
            while True:  # the cancelled watch's slot comes back once the server has seen the cancellation
                try:
                    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
                        health_pb2.HealthCheckResponse.SERVING
                    break
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
                    time.sleep(0.05)
            for watch in watches[1:]:
                watch.cancel()
    finally:
        for s in sockets:
            s.close()
        running.stop()


def test_explain_streams_open_at_once_are_bounded(demo_store):
    """A stream that never reads holds its outstanding answers: --max-streams bounds how many do."""
    running = RunningServer(Settings(model_store=demo_store, port=0, metrics_port=0, shutdown_grace_s=1.0,
                                     max_streams=2))
    releases = [threading.Event() for _ in range(3)]

    def requests(release: threading.Event):
        yield pb.ExplainRequest(model="no-such-model", request_id="first")
        release.wait(60)

    try:
        with grpc.insecure_channel(running.address) as channel:
            stub = pb_grpc.ExplainerStub(channel)
            streams = [stub.ExplainStream(requests(release), timeout=60) for release in releases[:2]]
            assert [next(stream).error.code for stream in streams] == ["NOT_FOUND"] * 2  # both open
            refused = stub.ExplainStream(requests(releases[2]), timeout=60)
            with pytest.raises(grpc.RpcError) as error:
                next(refused)
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error.value.details() == "2 ExplainStreams are open (--max-streams); retry later"
            releases[0].set()
            assert list(streams[0]) == []  # ended: its slot is free again
            again = stub.ExplainStream(requests(releases[2]), timeout=60)
            assert next(again).error.code == "NOT_FOUND"
            for release in releases:
                release.set()
            assert list(streams[1]) == [] and list(again) == []
    finally:
        for release in releases:
            release.set()
        running.stop()


def test_the_connection_flags_reach_the_settings(monkeypatch, tmp_path):
    settings = _served_settings(monkeypatch, tmp_path, "--max-connections", "7", "--handshake-timeout-s", "2.5",
                                "--max-concurrent-rpcs", "9", "--max-streams", "3")
    assert (settings.max_connections, settings.handshake_timeout_s, settings.max_concurrent_rpcs,
            settings.max_streams) == (7, 2.5, 9, 3)
    for name, value in (("max_connections", 0), ("max_concurrent_rpcs", 0), ("handshake_timeout_s", 0.0)):
        with pytest.raises(ValueError, match="max_connections and max_concurrent_rpcs must be"):
            Settings(model_store=tmp_path, **{name: value})
    with pytest.raises(ValueError, match="^max_streams must be >= 1"):
        Settings(model_store=tmp_path, max_streams=0)
