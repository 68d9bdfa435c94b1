"""SIGTERM under load: health goes NOT_SERVING, new requests are refused, accepted ones finish, exit 0.

`protoserve serve` runs as a real subprocess. Every request must end either OK with the right
answer (compared with the same archive run in process) or UNAVAILABLE (refused); a request the
server accepted and then lost would show as CANCELLED, DEADLINE_EXCEEDED, INTERNAL or UNKNOWN.
Clients that keep sending through the whole shutdown see the same, and a refusal while draining
reads no request message (the server's RSS says so).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from protoserve_client import explain_request, pb, pb_grpc

from conftest import free_port

BIN = Path(sys.executable).parent
EXPLAINER = "protoserve.v1.Explainer"
N_FIRST_WAVE = 50
GRACE_S = 20.0


@pytest.fixture(scope="module")
def expected(demo_store, mnist_split):
    """In-process answers for the first 50 test digits: (inputs, logits, target logits)."""
    from handlers.archive import read_archive
    from handlers.runtime import ExplainItem, ModelRuntime

    served = ModelRuntime(read_archive(demo_store / "mnist-1.psar"))
    x = mnist_split["x_test"][:N_FIRST_WAVE]
    logits, explanation, _ = served.explain(served.default_method, [ExplainItem(xi, None, []) for xi in x], "none")
    return x.numpy(), logits, explanation.target_logit


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


class PeakRss:
    """Samples a process's RSS every 20 ms in a thread, while in the ``with`` block."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mib(self.pid))
            self._stop.wait(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)
        self.peak = max(self.peak, rss_mib(self.pid))


# What refusing 8 large messages at a time may cost: gRPC's HTTP/2 receive windows of the streams in
# flight (gRPC grows a window with its bandwidth-delay estimate: about 5 MiB each on loopback), never
# the messages themselves (60 MiB each).
REFUSAL_RSS_BOUND_MIB = 128


def send_large_messages(address: str, count: int, compression: grpc.Compression, metadata=()) -> Counter:
    """``count`` Predict calls of 60 MiB each (random bytes, or zeros when compressed), 8 at a time;
    returns their codes."""
    body = b"\0" * (60 << 20) if compression is grpc.Compression.Gzip else os.urandom(60 << 20)
    codes: Counter = Counter()
    options = [("grpc.max_send_message_length", 100 << 20), ("grpc.use_local_subchannel_pool", 1)]
    with grpc.insecure_channel(address, options=options) as channel:
        predict = channel.unary_unary(f"/{EXPLAINER}/Predict")
        for wave in range(0, count, 8):
            calls = [predict.future(body, timeout=120, compression=compression, metadata=metadata)
                     for _ in range(min(8, count - wave))]
            for call in calls:
                codes[call.exception().code() if call.exception() else grpc.StatusCode.OK] += 1
    return codes


def serve_process(store: Path, log_path: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    """`protoserve serve` on a free loopback port, once its Explainer service is SERVING."""
    port = free_port()
    log = open(log_path, "w")
    process = subprocess.Popen([BIN / "protoserve", "serve", "--model-store", store, "--port", str(port),
                                "--metrics-port", "0", *flags], stdout=log, stderr=subprocess.STDOUT)
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
    process, address = serve_process(demo_store, log_path, "--grace", str(GRACE_S))
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


def _open_stream(channel: grpc.Channel, release: threading.Event):
    """An ExplainStream the server has taken (it answered a first request), whose requests then
    wait for ``release``: an rpc in flight, accepted before the signal."""
    def requests():
        yield pb.ExplainRequest(model="no-such-model", request_id="first")
        release.wait(120)

    stream = pb_grpc.ExplainerStub(channel).ExplainStream(requests(), timeout=120)
    first = next(stream)
    assert (first.request_id, first.error.code) == ("first", "NOT_FOUND")
    return stream


def test_clients_that_keep_sending_through_shutdown_see_only_ok_or_unavailable(tmp_path):
    """8 clients, each on its own connection, send ListModels back to back and ignore refusals, so the
    server is never quiet and drains for the whole grace period; a stream accepted before the signal
    stays open through it. No call may end CANCELLED (grpc/grpc#41785 without the connection close)."""
    store = tmp_path / "store"
    store.mkdir()
    log_path = tmp_path / "server.log"
    process, address = serve_process(store, log_path, "--grace", "3")
    codes: Counter = Counter()
    draining_refusals = 0
    lock = threading.Lock()
    stop = threading.Event()
    options = [("grpc.use_local_subchannel_pool", 1)]

    def keep_sending():
        nonlocal draining_refusals
        with grpc.insecure_channel(address, options=options) as channel:
            list_models = pb_grpc.ExplainerStub(channel).ListModels
            end = time.monotonic() + 120
            while not stop.is_set() and time.monotonic() < end:
                try:
                    list_models(pb.ListModelsRequest(), timeout=10)
                    code, details = grpc.StatusCode.OK, ""
                except grpc.RpcError as error:
                    code, details = error.code(), error.details() or ""
                with lock:
                    codes[code] += 1
                    draining_refusals += "shutting down" in details

    release = threading.Event()
    stream_outcome = []
    try:
        with grpc.insecure_channel(address, options=options) as stream_channel:
            stream = _open_stream(stream_channel, release)
            senders = [threading.Thread(target=keep_sending) for _ in range(8)]
            for sender in senders:
                sender.start()
            end = time.monotonic() + 60
            while codes[grpc.StatusCode.OK] < 100 and time.monotonic() < end:
                time.sleep(0.05)
            process.send_signal(signal.SIGTERM)
            returncode = process.wait(timeout=60)
            time.sleep(0.5)  # and a little after the process is gone
            stop.set()
            for sender in senders:
                sender.join(30)
            try:
                list(stream)
                stream_outcome.append(grpc.StatusCode.OK)
            except grpc.RpcError as error:
                stream_outcome.append(error.code())
    finally:
        release.set()
        stop.set()
        if process.poll() is None:
            process.kill()
            process.wait()
    log = log_path.read_text()
    assert returncode == 0, log
    print(f"keep sending through shutdown: {dict((c.name, n) for c, n in codes.items())}, "
          f"{draining_refusals} refused while draining; the stream: {stream_outcome}")
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
    assert codes[grpc.StatusCode.OK] >= 100 and draining_refusals >= 8
    # The open stream outlived the grace period: its connection was closed, which it sees as UNAVAILABLE.
    assert stream_outcome == [grpc.StatusCode.UNAVAILABLE]
    assert "grace period over (1 rpc(s) in flight)" in log


def test_refusals_while_draining_read_no_message(tmp_path):
    """While the server drains (held open by a stream), 24 messages of 60 MiB and 8 gzip-compressed ones
    (60 MiB inflated) are refused with UNAVAILABLE from their headers: RSS grows by far less than one."""
    store = tmp_path / "store"
    store.mkdir()
    log_path = tmp_path / "server.log"
    process, address = serve_process(store, log_path, "--grace", "60")
    release = threading.Event()
    try:
        with grpc.insecure_channel(address) as channel:
            stream = _open_stream(channel, release)
            check = health_pb2_grpc.HealthStub(channel).Check
            process.send_signal(signal.SIGTERM)
            end = time.monotonic() + 30
            while check(health_pb2.HealthCheckRequest(service=EXPLAINER), timeout=10).status != \
                    health_pb2.HealthCheckResponse.NOT_SERVING:
                assert time.monotonic() < end, "health did not go NOT_SERVING"
                time.sleep(0.05)
            assert send_large_messages(address, 1, grpc.Compression.NoCompression) == \
                {grpc.StatusCode.UNAVAILABLE: 1}  # warm-up
            start = rss_mib(process.pid)
            with PeakRss(process.pid) as rss:
                plain = send_large_messages(address, 24, grpc.Compression.NoCompression)
                gzip = send_large_messages(address, 8, grpc.Compression.Gzip)
            assert plain == {grpc.StatusCode.UNAVAILABLE: 24} and gzip == {grpc.StatusCode.UNAVAILABLE: 8}
            print(f"draining: 32 x 60 MiB refused; server RSS {start:.0f} MiB -> peak {rss.peak:.0f} MiB")
            assert rss.peak - start < REFUSAL_RSS_BOUND_MIB, (start, rss.peak)
            release.set()
            assert list(stream) == []
        assert process.wait(timeout=60) == 0
    finally:
        release.set()
        if process.poll() is None:
            process.kill()
            process.wait()


class WindowlessWatch:
    """A grpc.health.v1.Health/Watch over raw HTTP/2 whose client grants the server no flow-control
    window (SETTINGS_INITIAL_WINDOW_SIZE 0), so the server's first answer can never be sent: a client
    that never reads. It acknowledges the server's SETTINGS and PINGs, as a live client does."""

    def __init__(self, address: str):
        host, port = address.rsplit(":", 1)
        self.socket = socket.create_connection((host, int(port)))
        headers = b"".join(self._literal(name, value) for name, value in (
            (b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/grpc.health.v1.Health/Watch"),
            (b":authority", address.encode()), (b"content-type", b"application/grpc"), (b"te", b"trailers")))
        message = b"\x00" + (0).to_bytes(4, "big")  # HealthCheckRequest(service=""), empty
        self.socket.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
                            + self._frame(0x4, 0, 0, (0x4).to_bytes(2, "big") + (0).to_bytes(4, "big"))
                            + self._frame(0x1, 0x4, 1, headers)        # HEADERS, END_HEADERS
                            + self._frame(0x0, 0x1, 1, message))       # DATA, END_STREAM
        self.closed = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @staticmethod
    def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
        return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload

    @staticmethod
    def _literal(name: bytes, value: bytes) -> bytes:  # HPACK: literal, not indexed, new name, no Huffman
        return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value

    def _read(self):
        buffer = b""
        while chunk := self._recv():
            buffer += chunk
            while len(buffer) >= 9 and len(buffer) >= 9 + int.from_bytes(buffer[:3], "big"):
                size, kind, flags = int.from_bytes(buffer[:3], "big"), buffer[3], buffer[4]
                payload, buffer = buffer[9:9 + size], buffer[9 + size:]
                if kind == 0x4 and not flags & 0x1:
                    self.socket.sendall(self._frame(0x4, 0x1, 0, b""))       # SETTINGS ACK
                elif kind == 0x6 and not flags & 0x1:
                    self.socket.sendall(self._frame(0x6, 0x1, 0, payload))   # PING ACK
        self.closed.set()

    def _recv(self) -> bytes:
        try:
            return self.socket.recv(65536)
        except OSError:
            return b""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.socket.close()
        self._reader.join(10)


def test_a_health_watch_that_never_reads_holds_neither_health_nor_the_shutdown(tmp_path):
    """A Watch whose answer can never be sent (open without a token, as health is) must not hold the
    status changes of everyone else: another watcher sees NOT_SERVING on SIGTERM, and the server exits
    within its grace period (with grpc_health's servicer it waited for that client to leave)."""
    store = tmp_path / "store"
    store.mkdir()
    log_path = tmp_path / "server.log"
    process, address = serve_process(store, log_path, "--grace", "3")
    try:
        with WindowlessWatch(address) as stuck, grpc.insecure_channel(address) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=60)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            time.sleep(1.0)  # the stuck Watch has run and waits to write
            process.send_signal(signal.SIGTERM)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert process.wait(timeout=30) == 0
            assert stuck.closed.wait(10)  # its connection went with the server
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
