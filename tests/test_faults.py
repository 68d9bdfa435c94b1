"""Faults on a live server: deadlines and cancellations dropped before compute, an out-of-memory
batch split and retried, a crashed batch worker restarted while health says NOT_SERVING.

Faults are injected by wrapping ``BatchedModel.process`` (looked up per batch) on a server of
this module's own. Nothing here asserts on timings beyond generous upper bounds.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from protoserve_client import ExplainerClient, predict_request

from conftest import RunningServer
from server.settings import Settings

EXPLAINER = "protoserve.v1.Explainer"


@pytest.fixture(scope="module")
def fault_server(demo_store):
    running = RunningServer(Settings(model_store=demo_store, port=0, metrics_port=0, shutdown_grace_s=2.0,
                                     restart_backoff_s=1.0))
    yield running
    running.stop()


@pytest.fixture()
def fault_client(fault_server):
    with ExplainerClient(fault_server.address, timeout=60) as client:
        yield client


@pytest.fixture()
def model(fault_server):
    return fault_server.app.registry.get("mnist")


def _marked(value: float) -> np.ndarray:
    """An input whose first pixel identifies it inside a batch."""
    return np.full((1, 28, 28), value, np.float32)


def _mark(payload) -> float:
    tensor = payload if torch.is_tensor(payload) else payload.input
    return round(float(tensor.reshape(-1)[0]), 4)


class Gate:
    """Wraps ``process``: records every computed payload; the first batch waits until released."""

    def __init__(self, original):
        self.original = original
        self.entered = threading.Event()
        self.released = threading.Event()
        self.computed: list[float] = []
        self.batch_sizes: list[int] = []

    def __call__(self, key, payloads):
        self.computed.extend(_mark(p) for p in payloads)
        self.batch_sizes.append(len(payloads))
        self.entered.set()
        if not self.released.wait(120):
            raise TimeoutError("the test never released the gate")
        return self.original(key, payloads)


def _dropped(server: RunningServer, reason: str) -> float:
    value = server.app.metrics.registry.get_sample_value("protoserve_dropped_requests_total",
                                                         {"model": "mnist", "reason": reason})
    return value or 0.0


def _wait_for(condition, timeout: float = 60.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture()
def gate(model, monkeypatch):
    gate = Gate(model.process)
    monkeypatch.setattr(model, "process", gate)
    yield gate
    gate.released.set()


def test_an_expired_request_is_dropped_before_compute(fault_server, fault_client, model, gate):
    with ThreadPoolExecutor(1) as pool:
        blocker = pool.submit(fault_client.predict, _marked(0.1), model="mnist")
        assert gate.entered.wait(60)  # the worker is busy with the blocker
        before = _dropped(fault_server, "deadline") + _dropped(fault_server, "cancelled")
        call = fault_client.stub.Predict.future(predict_request(_marked(0.2), model="mnist"), timeout=3)
        with pytest.raises(grpc.RpcError) as caught:
            call.result()
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # Dropped by the batcher's deadline timer or by gRPC's cancellation at the deadline, whichever came first.
        _wait_for(lambda: _dropped(fault_server, "deadline") + _dropped(fault_server, "cancelled") > before,
                  what="the dropped-requests metric")
        assert model.batcher.queue_depth == 0
        gate.released.set()
        assert blocker.result(60).prediction
    assert 0.2 not in gate.computed and 0.1 in gate.computed


def test_an_expired_request_answers_deadline_exceeded_from_the_server(fault_server, model, gate):
    """The server's own answer (not just the client's timer): its deadline passes first."""
    from server.batcher import DeadlineExceededError

    async def submit_expiring():
        with pytest.raises(DeadlineExceededError):
            await model.batcher.submit(torch.full((1, 28, 28), 0.3), key=_predict_key(),
                                       deadline=time.monotonic() + 0.2)

    with ExplainerClient(fault_server.address, timeout=60) as client, ThreadPoolExecutor(1) as pool:
        blocker = pool.submit(client.predict, _marked(0.1), model="mnist")
        assert gate.entered.wait(60)
        before = _dropped(fault_server, "deadline")
        fault_server.call(submit_expiring())
        assert _dropped(fault_server, "deadline") == before + 1
        gate.released.set()
        assert blocker.result(60).prediction
    assert 0.3 not in gate.computed


def _predict_key():
    from server.registry import PredictKey

    return PredictKey()


def test_a_cancelled_call_is_dropped_before_compute(fault_server, fault_client, model, gate):
    with ThreadPoolExecutor(1) as pool:
        blocker = pool.submit(fault_client.predict, _marked(0.1), model="mnist")
        assert gate.entered.wait(60)
        before = _dropped(fault_server, "cancelled")
        call = fault_client.stub.Predict.future(predict_request(_marked(0.4), model="mnist"), timeout=60)
        _wait_for(lambda: model.batcher.queue_depth == 1, what="the call to be queued")
        call.cancel()
        _wait_for(lambda: _dropped(fault_server, "cancelled") > before, what="the cancelled call to be dropped")
        assert model.batcher.queue_depth == 0
        gate.released.set()
        assert blocker.result(60).prediction
    assert call.cancelled()
    assert 0.4 not in gate.computed


def test_an_out_of_memory_batch_is_split_and_every_request_answered(fault_server, fault_client, model, gate,
                                                                    mnist_split):
    """While the worker is held, 8 requests queue up; their batch runs out of memory; halves are retried."""
    digits = mnist_split["x_test"][:8].numpy()
    expected = model.runtime.predict(torch.from_numpy(digits))
    real_process = gate.original

    def oom_if_batched(key, payloads):
        if len(payloads) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_process(key, payloads)

    with ThreadPoolExecutor(9) as pool:
        blocker = pool.submit(fault_client.predict, _marked(0.1), model="mnist")
        assert gate.entered.wait(60)
        gate.original = oom_if_batched  # for the batches after the blocker
        futures = [pool.submit(fault_client.predict, d, model="mnist", top_k=10) for d in digits]
        _wait_for(lambda: model.batcher.queue_depth == len(digits), what="8 queued requests")
        gate.released.set()
        blocker.result(60)
        results = [f.result(60) for f in futures]
    assert max(gate.batch_sizes) == 8 and gate.batch_sizes.count(2) >= 4  # 8 -> 4 + 4 -> 2 + 2 + 2 + 2
    for response, logits in zip(results, expected):
        got = {s.class_index: s.logit for s in response.prediction}
        assert np.allclose([got[i] for i in range(10)], logits.numpy(), atol=1e-4)


class WorkerCrash(BaseException):
    """What no ``except Exception`` stops: it ends the batch worker."""


def test_a_crashed_worker_is_restarted_and_health_reports_it(fault_server, fault_client, model, monkeypatch):
    restarts = lambda: fault_server.app.metrics.registry.get_sample_value(  # noqa: E731
        "protoserve_worker_restarts_total", {"model": "mnist"}) or 0.0
    before = restarts()
    statuses: list[int] = []
    seen_recovery = threading.Event()
    with grpc.insecure_channel(fault_server.address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=EXPLAINER),
                                                          timeout=120)

        def follow():
            try:
                for reply in watch:
                    statuses.append(reply.status)
                    if health_pb2.HealthCheckResponse.NOT_SERVING in statuses and \
                            reply.status == health_pb2.HealthCheckResponse.SERVING:
                        seen_recovery.set()
            except grpc.RpcError:
                pass

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        _wait_for(lambda: statuses, what="the first health status")
        assert statuses[0] == health_pb2.HealthCheckResponse.SERVING

        original = model.process

        def crash(key, payloads):
            monkeypatch.setattr(model, "process", original)  # one crash only
            raise WorkerCrash()

        monkeypatch.setattr(model, "process", crash)
        with pytest.raises(grpc.RpcError) as caught:
            fault_client.predict(_marked(0.5), model="mnist")
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert seen_recovery.wait(60), f"health statuses seen: {statuses}"
        watch.cancel()
        follower.join(10)
    assert statuses[:3] == [health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING,
                            health_pb2.HealthCheckResponse.SERVING]
    assert restarts() == before + 1
    assert model.batcher.alive
    assert fault_client.predict(_marked(0.5), model="mnist").prediction
