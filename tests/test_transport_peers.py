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

from bench.run import ROOT, serving, thread_cpu_s
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


def test_the_cpu_split_tells_the_main_thread_from_the_others():
    # A process that spins 0.2 s of CPU on its main thread and 0.5 s on another, which then ends.
    burn = ("import threading, time\n"
            "def spin(seconds):\n"
            "    end = time.thread_time() + seconds\n"
            "    while time.thread_time() < end: pass\n"
            "worker = threading.Thread(target=spin, args=(0.5,)); worker.start(); worker.join(); spin(0.2)\n"
            "print('spun', flush=True); time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", burn], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "spun\n"
        cpu = thread_cpu_s(child.pid)
    finally:
        child.kill()
        child.wait(60)
    assert 0.2 <= cpu["main_thread"] < 0.45  # its spin, and the interpreter's start
    assert 0.48 <= cpu["other_threads"] < 0.6  # the thread's spin, counted after the thread ended
    assert thread_cpu_s(child.pid) == {}  # gone
