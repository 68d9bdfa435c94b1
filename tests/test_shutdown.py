"""SIGTERM under load: health goes NOT_SERVING, new requests are refused, accepted ones finish, exit 0.

`protoserve serve` runs as a real subprocess. Every request must end either OK with the right
answer (compared with the same archive run in process) or UNAVAILABLE (refused); a request the
server accepted and then lost would show as CANCELLED, DEADLINE_EXCEEDED, INTERNAL or UNKNOWN.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from protoserve_client import explain_request, pb_grpc

from conftest import free_port

BIN = Path(sys.executable).parent
EXPLAINER = "protoserve.v1.Explainer"
N_FIRST_WAVE = 50
GRACE_S = 20.0


@pytest.fixture(scope="module")
def expected(demo_store, mnist_split):
    """In-process answers for the first 50 test digits: (inputs, logits, target logits)."""
    from handlers.archive import read_archive
    from handlers.runtime import ExplainItem, ServedModel

    served = ServedModel(read_archive(demo_store / "mnist-1.psar"))
    x = mnist_split["x_test"][:N_FIRST_WAVE]
    logits, explanation, _ = served.explain(served.default_method, [ExplainItem(xi, None, []) for xi in x], "none")
    return x.numpy(), logits, explanation.target_logit


def _start(store: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(log_path, "w")
    process = subprocess.Popen([BIN / "protoserve", "serve", "--model-store", store, "--port", str(port),
                                "--metrics-port", "0", "--grace", str(GRACE_S)],
                               stdout=log, stderr=subprocess.STDOUT)
    log.close()
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    with grpc.insecure_channel(address) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        while True:
            if process.poll() is not None:
                raise AssertionError(f"server exited with {process.returncode}:\n{log_path.read_text()}")
            try:
                if check(health_pb2.HealthCheckRequest(service=EXPLAINER), timeout=2).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return process, address
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                process.kill()
                raise AssertionError(f"server did not become SERVING:\n{log_path.read_text()}")
            time.sleep(0.2)


def test_sigterm_under_load_loses_no_accepted_request(demo_store, expected, tmp_path):
    inputs, logits, target_logits = expected
    log_path = tmp_path / "server.log"
    process, address = _start(demo_store, log_path)
    try:
        channel = grpc.insecure_channel(address)
        stub = pb_grpc.ExplainerStub(channel)
        statuses: list[int] = []
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=EXPLAINER),
                                                          timeout=300)

        def follow():
            try:
                for reply in watch:
                    statuses.append(reply.status)
                    if reply.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                        watch.cancel()  # an open watch would hold the server for the whole grace period
            except grpc.RpcError:
                pass  # the server went away

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()

        results: list[tuple[int, grpc.StatusCode, object]] = []
        lock = threading.Lock()
        first_done = threading.Event()

        def record(index: int):
            def done(future):
                try:
                    outcome = (index, grpc.StatusCode.OK, future.result())
                except grpc.RpcError as error:
                    outcome = (index, error.code(), error.details())
                with lock:
                    results.append(outcome)
                first_done.set()
            return done

        def send(index: int):
            request = explain_request(inputs[index % len(inputs)], model="mnist", heatmaps="none", top_k=10,
                                      request_id=str(index))
            future = stub.Explain.future(request, timeout=120)
            future.add_done_callback(record(index))
            return future

        first_wave = [send(i) for i in range(N_FIRST_WAVE)]
        assert first_done.wait(120), "no request finished"
        process.send_signal(signal.SIGTERM)
        # A client that goes on sending after SIGTERM, one request at a time, until one is refused:
        # each must be refused (or, if accepted, answered).
        later = []
        for i in range(N_FIRST_WAVE, N_FIRST_WAVE + 200):
            later.append(send(i))
            if later[-1].exception(timeout=120) is not None:
                break
        returncode = process.wait(timeout=GRACE_S + 120)
        for future in first_wave + later:
            try:
                future.exception(timeout=120)
            except grpc.FutureCancelledError:
                pass
        follower.join(30)
        channel.close()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log = log_path.read_text()
    assert returncode == 0, log
    assert "shutting down" in log
    codes = {}
    for index, code, value in results:
        codes[code] = codes.get(code, 0) + 1
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE), f"request {index}: {code} {value}"
        if code is grpc.StatusCode.OK:
            j = index % len(inputs)
            got = {s.class_index: s.logit for s in value.prediction}
            assert np.allclose([got[k] for k in range(10)], logits[j].numpy(), atol=1e-4), index
            assert abs(value.target_logit - float(target_logits[j])) <= 1e-4 * max(1.0, abs(value.target_logit))
    assert len(results) == len(first_wave) + len(later)
    assert codes.get(grpc.StatusCode.OK, 0) >= 1
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert statuses[:1] == [serving] and not_serving in statuses, statuses
    print(f"SIGTERM test: {len(results)} requests, codes {({c.name: n for c, n in codes.items()})}")
