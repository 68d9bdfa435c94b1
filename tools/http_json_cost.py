"""What JSON costs the HTTP port: the figures of docs/limits.md ("HTTP"), measured on a real server.

    python tools/http_json_cost.py [--store model_store] [--json-bytes N]

Each case runs against a fresh `protoserve serve` on 127.0.0.1 (free ports; nothing else is ever
addressed), with the default limits:

* ``one body``: a JSON body of ``--json-bytes`` (default: the --http-max-json-bytes default) whose
  data is ``1e0,1e0,...`` (the audit's), or ``[0],[0],...``, the costliest JSON per byte found (to parse
  and to hold: a list of one number); the server parses it all, then refuses it (the data does not
  fit the shape): 400;
* ``4 bodies at once``: four such bodies on four connections, more than the JSON threads;
* ``64 KiB body``: the largest body parsed on the event loop;
* ``256-example answer``: 256 MNIST digits in binary, explained with heatmaps=input, the answer in JSON.

For each it prints the seconds until the (last) answer, the growth of the server's peak RSS over its
RSS before the case (VmHWM, reset through /proc/<pid>/clear_refs), and the longest gRPC health
check sent every 5 ms meanwhile: how long the event loop stalled (the median check takes about 1 ms).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from server.settings import Settings  # noqa: E402

HOST = "127.0.0.1"  # loopback only, by construction
DEFAULTS = Settings(model_store=Path("."))


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(key))


@contextmanager
def serving(store: Path):
    """A fresh server: (its pid, its gRPC address, its HTTP address)."""
    port, http_port = free_port(), free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    process = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--model-store", str(store),
                                "--host", HOST, "--port", str(port), "--http-port", str(http_port),
                                "--metrics-port", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               cwd=ROOT, env=env)
    try:
        with grpc.insecure_channel(f"{HOST}:{port}") as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            for _ in range(600):
                try:
                    reply = check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    time.sleep(0.2)
            else:
                raise RuntimeError("the server did not start")
        yield process.pid, f"{HOST}:{port}", http_port
    finally:
        process.terminate()
        process.wait(60)


def post(http_port: int, body: bytes, headers: dict) -> int:
    connection = http.client.HTTPConnection(HOST, http_port, timeout=600)
    try:
        connection.request("POST", "/v2/models/mnist/infer", body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def measure(store: Path, requests: list[tuple[bytes, dict]]) -> dict:
    """Send ``requests`` at once to a fresh server while its gRPC health is checked every 5 ms."""
    with serving(store) as (pid, address, http_port):
        post(http_port, *small_request())  # warm: the first request loads what every request uses
        checks: list[float] = []
        done = threading.Event()

        def check_health() -> None:
            with grpc.insecure_channel(address) as channel:
                check = health_pb2_grpc.HealthStub(channel).Check
                while not done.is_set():
                    start = time.perf_counter()
                    check(health_pb2.HealthCheckRequest(), timeout=60)
                    checks.append(time.perf_counter() - start)
                    time.sleep(0.005)

        checker = threading.Thread(target=check_health)
        checker.start()
        time.sleep(0.5)
        with open(f"/proc/{pid}/clear_refs", "w") as clear:
            clear.write("5")  # VmHWM := VmRSS
        before = status_kib(pid, "VmRSS:")
        start = time.perf_counter()
        statuses: list[int] = []
        senders = [threading.Thread(target=lambda r=r: statuses.append(post(http_port, *r))) for r in requests]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        seconds = time.perf_counter() - start
        peak = status_kib(pid, "VmHWM:")
        done.set()
        checker.join()
    return {"statuses": sorted(statuses), "seconds": round(seconds, 2),
            "peak_rss_growth_mib": round((peak - before) / 1024), "longest_health_check_s": round(max(checks), 3),
            "median_health_check_s": round(statistics.median(checks), 4)}


def numbers_body(size: int, item: bytes) -> tuple[bytes, dict]:
    """A JSON body of ``size`` bytes: one input whose data is ``item,item,...`` (far more than its shape)."""
    head, tail = b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,1,28,28],"data":[' + item, b"]}]}"
    count = (size - len(head) - len(tail)) // (len(item) + 1)
    body = head + (b"," + item) * count + tail
    return body + b" " * (size - len(body)), {"Content-Type": "application/json"}


def small_request() -> tuple[bytes, dict]:
    document = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [0.0] * 784}],
                "parameters": {"explain": False}}
    return json.dumps(document).encode(), {"Content-Type": "application/json"}


def heatmap_request(examples: int) -> tuple[bytes, dict]:
    """``examples`` MNIST digits in binary, explained with input-sized heatmaps, the answer in JSON."""
    from model_store.recipes.mnist import load_mnist

    x = load_mnist(seed=0)["x_test"][:examples].numpy()
    head = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "parameters": {"method": "protonmf", "heatmaps": "input"}}).encode()
    return head + x.astype("<f4").tobytes(), {"Inference-Header-Content-Length": str(len(head))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=str(ROOT / "model_store"))
    parser.add_argument("--json-bytes", type=int, default=DEFAULTS.http_max_json_bytes)
    args = parser.parse_args()
    store = Path(args.store)
    cases = {f"one body of {args.json_bytes} bytes of 1e0": [numbers_body(args.json_bytes, b"1e0")],
             f"one body of {args.json_bytes} bytes of [0]": [numbers_body(args.json_bytes, b"[0]")],
             f"4 bodies of {args.json_bytes} bytes of [0] at once": [numbers_body(args.json_bytes, b"[0]")] * 4,
             "one 64 KiB body of [0] (parsed on the event loop)": [numbers_body(64 << 10, b"[0]")],
             "256-example heatmaps=input answer in JSON": [heatmap_request(256)]}
    for name, requests in cases.items():
        print(json.dumps({"case": name, **measure(store, requests)}), flush=True)


if __name__ == "__main__":
    main()
