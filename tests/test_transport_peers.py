"""The transport peers of `make bench`'s ``server_added_over_floor`` (bench/transport_peers.py): each architecture
serves, on loopback, the answer it was given to a real Explain request, beside a health service that says SERVING."""

from __future__ import annotations

import subprocess
import sys

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from protoserve_client import ExplainerClient

from bench.run import ROOT, serving
from bench.transport_peers import ARCHITECTURES
from conftest import free_port


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_a_peer_computes_and_answers_with_the_servers_answer(architecture, demo_store, client, tmp_path):
    x = np.random.default_rng(0).random((1, 28, 28), dtype=np.float32)
    call = dict(model="mnist", method="protonmf", heatmaps="feature_grid", interventions=[["c0.p0"]])
    answer = client.explain(x, **call)
    response = tmp_path / "response.pb"
    response.write_bytes(answer.SerializeToString())
    port = free_port()
    peer = serving(subprocess.Popen([sys.executable, "-m", "bench.transport_peers", architecture, str(port),
                                     str(demo_store / "mnist-1.psar"), str(response), "cpu"], cwd=ROOT,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True), port)
    try:
        with ExplainerClient(f"127.0.0.1:{port}", timeout=30) as peer_client, \
                grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert [peer_client.explain(x, **call) for _ in range(3)] == [answer] * 3
            check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert check.status == health_pb2.HealthCheckResponse.SERVING
            # It computes on the request's input: an input of three channels fails in the model, not in transport.
            with pytest.raises(grpc.RpcError) as failed:
                peer_client.explain(np.zeros((3, 28, 28), dtype=np.float32), **call)
            assert failed.value.code() == grpc.StatusCode.UNKNOWN
    finally:
        peer.kill()
        peer.wait(60)
