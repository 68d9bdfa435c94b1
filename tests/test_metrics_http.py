"""The metrics endpoint (server/metrics_http.py): loopback by default, optional token, bounded connections.

Each test runs a real MetricsServer on 127.0.0.1 (or `protoserve serve` as a subprocess) and talks
to it over plain sockets, as a scraper or an attacker would.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from conftest import free_port
from server.metrics_http import MAX_HEAD_BYTES, MetricsServer
from server.security import BearerTokens
from server.settings import Settings

TOKEN = "metrics-scrape-token-0123456789"
SCRAPE = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def _registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("protoserve_requests", "Rpcs answered.", ["model"], registry=registry).labels("mnist").inc(3)
    return registry


@pytest.fixture()
def endpoint(request):
    """A MetricsServer on a free loopback port; ``request.param``: keyword overrides."""
    options = {"tokens": None, "timeout_s": 0.5, "max_connections": 4, **getattr(request, "param", {})}
    server = MetricsServer(_registry(), "127.0.0.1", 0, **options)
    yield server
    server.close()


def _connect(server: MetricsServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def _closed_within(connection: socket.socket, seconds: float) -> float:
    """Seconds until the server closes ``connection`` (reading and discarding), or fail after ``seconds``."""
    start = time.monotonic()
    connection.settimeout(seconds)
    try:
        while connection.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"the connection was still open after {seconds} s")
    return time.monotonic() - start


def _get(server: MetricsServer, token: str | None = None, path: str = "/metrics") -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{server.port}{path}")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_the_exposition_is_prometheus_clients(endpoint):
    status, text = _get(endpoint)
    assert status == 200
    [family] = [f for f in text_string_to_metric_families(text) if f.name == "protoserve_requests"]
    assert [(s.labels, s.value) for s in family.samples if s.name.endswith("_total")] == [({"model": "mnist"}, 3.0)]
    assert _get(endpoint, path="/")[0] == 404
    assert _get(endpoint, path="/metrics?name[]=x")[0] == 200


@pytest.mark.parametrize("endpoint", [{"tokens": BearerTokens([TOKEN.encode()])}], indirect=True)
def test_a_token_is_needed_when_one_is_set(endpoint):
    for token in (None, "wrong-token-of-enough-length", TOKEN[:-1], ""):
        status, body = _get(endpoint, token)
        assert status == 401, token
        assert "protoserve" not in body and "mnist" not in body
    assert _get(endpoint, path="/elsewhere")[0] == 401  # nothing is told without the token, not even a 404
    status, text = _get(endpoint, TOKEN)
    assert status == 200 and "protoserve_requests_total" in text


def test_idle_connections_are_closed_after_the_timeout(endpoint):
    connections = [_connect(endpoint) for _ in range(3)]
    for connection in connections:
        assert _closed_within(connection, 10) < 10
        connection.close()
    assert _get(endpoint)[0] == 200


def test_a_trickled_request_is_closed_at_the_deadline(endpoint):
    """One byte every 0.1 s is never idle for the timeout, but the head has one deadline (0.5 s)."""
    connection = _connect(endpoint)
    start = time.monotonic()
    try:
        for byte in SCRAPE[:-2] + b"X-Slow: " + b"a" * 200:
            connection.sendall(bytes([byte]))
            time.sleep(0.1)
            if time.monotonic() - start > 10:
                pytest.fail("the server kept a trickling connection open for 10 s")
    except (BrokenPipeError, ConnectionResetError):
        pass  # closed: what the test wants
    assert _closed_within(connection, 10) < 10
    connection.close()


def test_an_oversized_head_is_closed_without_an_answer(endpoint):
    connection = _connect(endpoint)
    try:
        connection.sendall(b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * (2 * MAX_HEAD_BYTES))
    except (BrokenPipeError, ConnectionResetError):
        pass
    connection.settimeout(10)
    try:
        assert connection.recv(65536) == b""
    except ConnectionResetError:
        pass
    connection.close()


@pytest.mark.parametrize("endpoint", [{"timeout_s": 5.0}], indirect=True)
def test_threads_stay_bounded_under_many_idle_connections(endpoint):
    baseline = threading.active_count()
    connections = [_connect(endpoint) for _ in range(60)]
    # The connections over the bound (4) are closed as soon as they are accepted.
    end = time.monotonic() + 4
    while endpoint.refused < 56 and time.monotonic() < end:
        time.sleep(0.05)
    assert endpoint.refused == 56
    assert threading.active_count() - baseline == 4
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # no slot for a scrape either, until...
        _get(endpoint)
    assert endpoint.refused == 57
    for connection in connections:
        assert _closed_within(connection, 15) < 15
        connection.close()
    # Once the idle ones timed out, a scrape is served again and the threads are gone.
    assert _get(endpoint)[0] == 200
    end = time.monotonic() + 10
    while threading.active_count() > baseline and time.monotonic() < end:
        time.sleep(0.05)
    assert threading.active_count() <= baseline


_HEAD_PARTS = st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT", b"G\x00T", b" ", b"/metrics", b"/", b"/metrics?x=1",
                                b"HTTP/1.1", b"HTTP/1.0", b"HTTP/9.9", b"\r\n", b"\n", b"\r\n\r\n", b"Host: a",
                                b"Authorization: Bearer ", b"Authorization: Basic x", TOKEN.encode()[:-1],
                                b"Content-Length: 99999999", b"Transfer-Encoding: chunked", b":", b"\xff\xfe"])


@pytest.fixture(scope="module")
def fuzzed_endpoint():
    server = MetricsServer(_registry(), "127.0.0.1", 0, tokens=BearerTokens([TOKEN.encode()]), timeout_s=0.5,
                           max_connections=4)
    yield server
    server.close()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(head=st.one_of(st.lists(_HEAD_PARTS, max_size=24).map(b"".join), st.binary(max_size=3 * MAX_HEAD_BYTES)),
       half_close=st.booleans())
def test_any_request_head_gets_an_answer_or_a_close_never_the_metrics(fuzzed_endpoint, head, half_close):
    """Whatever bytes come in: a status line that is not 200 (no valid token), or the connection closed,
    within the deadline; and the endpoint keeps serving."""
    with _connect(fuzzed_endpoint) as connection:
        try:
            connection.sendall(head)
            if half_close:
                connection.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = b""
        connection.settimeout(5)
        try:
            while chunk := connection.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
        except TimeoutError:
            pytest.fail("the connection was still open 5 s later (timeout 0.5 s)")
    assert answer == b"" or answer.startswith((b"HTTP/1.0 ", b"HTTP/1.1 ")), answer[:80]
    assert not answer.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")) and b"protoserve_" not in answer
    assert _get(fuzzed_endpoint, TOKEN)[0] == 200


def _listening_address(pid: int, port: int) -> str | None:
    """The address ``pid`` listens on at TCP ``port`` (from /proc), e.g. '127.0.0.1', '0.0.0.0' or '::'."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            inodes.add(os.readlink(fd))
        except OSError:
            pass  # closed meanwhile
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].split(":")
            if int(port_hex, 16) == port and fields[3] == "0A" and f"socket:[{fields[9]}]" in inodes:
                # /proc prints the address as 32-bit words in host (little-endian) order
                packed = b"".join(bytes.fromhex(address[i:i + 8])[::-1] for i in range(0, len(address), 8))
                return socket.inet_ntop(family, packed)
    return None


@pytest.mark.parametrize("metrics_host", [None, "0.0.0.0"], ids=["default", "told"])
def test_metrics_bind_loopback_whatever_host_says(tmp_path, metrics_host):
    port, metrics_port = free_port(), free_port()
    command = [Path(sys.executable).parent / "protoserve", "serve", "--model-store", tmp_path, "--host", "0.0.0.0",
               "--port", str(port), "--metrics-port", str(metrics_port)]
    if metrics_host:
        command += ["--metrics-host", metrics_host]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        end = time.monotonic() + 120
        address = None
        while address is None and time.monotonic() < end and process.poll() is None:
            time.sleep(0.2)
            address = _listening_address(process.pid, metrics_port)
        assert address == (metrics_host or "127.0.0.1")
        assert _listening_address(process.pid, port) in ("0.0.0.0", "::")  # gRPC is where --host says
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    if metrics_host:
        assert "metrics on 0.0.0.0 without a token" in output


def test_the_metrics_settings_are_checked(tmp_path):
    for bad in ({"metrics_timeout_s": 0}, {"metrics_max_connections": 0}, {"max_stream_outstanding": 0}):
        with pytest.raises(ValueError):
            Settings(model_store=tmp_path, **bad)
