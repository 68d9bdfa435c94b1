"""Soak test: a real `protoserve serve` on loopback under bounded, mixed traffic.

    python tools/soak.py [--store model_store] [--requests 3000] [--duration 120] [--concurrency 64]

Starts the server as a subprocess on 127.0.0.1 (a free port; nothing else is ever addressed),
then sends, at the given concurrency, until ``--requests`` were sent or ``--duration`` seconds
passed, whichever comes first, a seeded mix of

* good Explain (every method of the model, heatmaps on or off, one intervention) and Predict
  requests on real MNIST test digits, each answer compared with the same archive run in this
  process (``handlers.runtime.ModelRuntime``): logits, contributions, target and intervened
  logits within 1e-4 (relative to values above 1);
* bad requests, each with the status it must get (INVALID_ARGUMENT or NOT_FOUND);
* expiring requests (deadlines of 1-50 ms): DEADLINE_EXCEEDED, or OK with the right answer;
* unauthenticated 16 MiB messages: UNAUTHENTICATED (the server runs with bearer tokens, for gRPC
  and for its metrics, and every other request carries one).

Meanwhile one ExplainStream client sends ``--stream-requests`` requests and reads nothing until the
traffic is over: the server must have read no more than its backpressure bound of them, then answer
every one right. And ``metrics_max_connections`` + 8 idle connections sit on the metrics port: each
must be closed by the server, and a scrape must still work (and get 401 without the token).

It samples the server's RSS from /proc/<pid>/status, reads its metrics endpoint, stops it with
SIGTERM while 8 clients keep sending (each must get OK or UNAVAILABLE, never CANCELLED), and prints
a summary. It exits 1 on any UNKNOWN or INTERNAL status, any wrong answer, any status other than
the expected ones, RSS growth after warm-up beyond ``--max-rss-growth-mib``, a stream read past its
bound, an idle metrics connection left open, or a non-zero server exit code. ``--json PATH`` also
writes the summary as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import math
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import numpy as np  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from protoserve_client import pb, pb_grpc, to_tensor  # noqa: E402

from server.settings import Settings  # noqa: E402

HOST = "127.0.0.1"  # loopback only, by construction
EXPLAINER = "protoserve.v1.Explainer"
TOLERANCE = 1e-4
N_IMAGES = 256
GOOD_TIMEOUT_S = 120.0
FORBIDDEN = {"UNKNOWN", "INTERNAL"}
DEFAULTS = Settings(model_store=Path("."))
# The stream client's HTTP/2 receive window: 64 KiB with bandwidth-delay probing off.
STREAM_CLIENT_OPTIONS = [("grpc.http2.bdp_probe", 0)]
STREAM_CLIENT_WINDOW = 65535


# ----------------------------------------------------------------------------- reference answers

@dataclass
class Reference:
    """In-process answers for the image pool: logits per image, explanations per (method, image)."""

    name: str
    version: str
    methods: list[str]
    images: np.ndarray                   # (N, 1, 28, 28) float32
    logits: np.ndarray                   # (N, K)
    suppress: dict[str, list[str]]       # method -> the component id suppressed for image i (i % len)
    explain: dict[str, list[dict]] = field(default_factory=dict)  # method -> per image


def build_reference(archive_path: Path, methods: str) -> Reference:
    import torch

    from handlers.archive import read_archive
    from handlers.runtime import ExplainItem, ModelRuntime
    from model_store.recipes.mnist import load_mnist

    served = ModelRuntime(read_archive(archive_path))
    images = load_mnist(seed=0)["x_test"][:N_IMAGES].float()
    chosen = list(served.explainers) if methods == "all" else [served.default_method]
    logits = torch.cat([served.predict(images[i:i + 64]) for i in range(0, len(images), 64)])
    reference = Reference(served.name, served.version, chosen, images.numpy(), logits.numpy(), {})
    for method in chosen:
        explainer = served.explainers[method]
        ids = [c.id for c in explainer.components]
        reference.suppress[method] = ids
        rows = []
        for start in range(0, len(images), 32):
            items = [ExplainItem(images[i], None, [[i % len(ids)]]) for i in range(start, min(start + 32, len(images)))]
            batch_logits, explanation, _ = served.explain(method, items, "none")
            for b in range(len(items)):
                valid = explanation.component_index[b] >= 0
                rows.append({
                    "logits": batch_logits[b].numpy(),
                    "target_class": int(explanation.target_class[b]),
                    "target_logit": float(explanation.target_logit[b]),
                    "components": {ids[int(j)]: float(c) for j, c, ok in zip(
                        explanation.component_index[b].tolist(), explanation.contribution[b].tolist(),
                        valid.tolist()) if ok},
                    "intervened": float(explanation.intervened_logits[b][0][int(explanation.target_class[b])]),
                })
        reference.explain[method] = rows
    return reference


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= TOLERANCE * max(1.0, abs(a), abs(b))


def check_predict(response: pb.PredictResponse, expected: np.ndarray) -> str:
    got = {s.class_index: s.logit for s in response.prediction}
    if sorted(got) != list(range(len(expected))):
        return f"prediction covers classes {sorted(got)}"
    bad = [k for k in got if not _close(got[k], float(expected[k]))]
    return f"logits differ at classes {bad}" if bad else ""


def check_explain(response: pb.ExplainResponse, expected: dict, heatmaps: bool) -> str:
    problem = check_predict(response, expected["logits"])
    if problem:
        return problem
    if response.target_class != expected["target_class"]:
        return f"target class {response.target_class} != {expected['target_class']}"
    if not _close(response.target_logit, expected["target_logit"]):
        return f"target logit {response.target_logit} != {expected['target_logit']}"
    got = {c.id: c.contribution for c in response.components}
    if set(got) != set(expected["components"]):
        return f"components {sorted(got)} != {sorted(expected['components'])}"
    bad = [k for k in got if not _close(got[k], expected["components"][k])]
    if bad:
        return f"contributions differ for {bad}"
    if len(response.interventions) != 1 or not _close(response.interventions[0].target_logit, expected["intervened"]):
        return "intervened target logit differs"
    if heatmaps and [h.component_id for h in response.heatmaps] != [c.id for c in response.components]:
        return "heatmaps do not match the components"
    return ""


# ----------------------------------------------------------------------------- traffic

@dataclass
class Plan:
    """One request: what to send and what may come back."""

    kind: str                  # explain, predict, bad:<what>, expiring-explain, expiring-predict
    rpc: str                   # Explain, Predict
    request: object            # a message, or bytes (sent without serialization)
    timeout: float
    allowed: frozenset[str]    # acceptable status codes (names)
    check: object = None       # callable(response) -> problem ("" if right), for OK answers
    anonymous: bool = False    # sent without the bearer token


def good_explain(ref: Reference, i: int, method: str, heatmaps: bool,
                 request_id: str) -> tuple[pb.ExplainRequest, object]:
    """An Explain request on image ``i`` (one intervention) and the check of its answer."""
    ids = ref.suppress[method]
    request = pb.ExplainRequest(model=ref.name, version=ref.version, method=method, top_k=10,
                                input=to_tensor(ref.images[i]),
                                interventions=[pb.Intervention(suppress=[ids[i % len(ids)]])],
                                heatmaps=pb.HEATMAP_MODE_FEATURE_GRID if heatmaps else pb.HEATMAP_MODE_NONE,
                                request_id=request_id)
    return request, lambda r, e=ref.explain[method][i]: check_explain(r, e, heatmaps)


def make_plan(rng: random.Random, ref: Reference) -> Plan:
    i = rng.randrange(len(ref.images))
    x = ref.images[i]
    roll = rng.random()
    expiring = 0.85 <= roll
    if roll < 0.45 or (expiring and roll < 0.93):
        request, check = good_explain(ref, i, rng.choice(ref.methods), rng.random() < 0.5, f"e{i}")
        kind, rpc = "explain", "Explain"
    elif roll < 0.65 or expiring:
        request = pb.PredictRequest(model=ref.name, version=ref.version, top_k=10, input=to_tensor(x),
                                    request_id=f"p{i}")
        check = lambda r, e=ref.logits[i]: check_predict(r, e)  # noqa: E731
        kind, rpc = "predict", "Predict"
    else:
        return bad_plan(rng, ref, x)
    if expiring:
        return Plan(f"expiring-{kind}", rpc, request, rng.uniform(0.001, 0.05),
                    frozenset({"OK", "DEADLINE_EXCEEDED"}), check)
    # RESOURCE_EXHAUSTED: admission control at work (a full queue), acceptable for a good request.
    return Plan(kind, rpc, request, GOOD_TIMEOUT_S, frozenset({"OK", "RESOURCE_EXHAUSTED"}), check)


def bad_plan(rng: random.Random, ref: Reference, x: np.ndarray) -> Plan:
    good = to_tensor(x)
    invalid, not_found = frozenset({"INVALID_ARGUMENT"}), frozenset({"NOT_FOUND"})
    method = rng.choice(ref.methods)
    cases = [
        ("shape", "Explain", pb.ExplainRequest(model=ref.name, input=pb.Tensor(dtype="float32", shape=[28, 28],
                                                                                 data=good.data)), invalid),
        ("nan", "Predict", pb.PredictRequest(model=ref.name, input=to_tensor(np.full_like(x, np.nan))), invalid),
        ("dtype", "Predict", pb.PredictRequest(model=ref.name, input=pb.Tensor(dtype="int7", shape=good.shape,
                                                                                 data=good.data)), invalid),
        ("data-length", "Explain", pb.ExplainRequest(model=ref.name, input=pb.Tensor(
            dtype="float32", shape=good.shape, data=good.data[:rng.randrange(len(good.data))])), invalid),
        ("image", "Explain", pb.ExplainRequest(model=ref.name, image=b"\x89PNG\r\n\x1a\n" + rng.randbytes(64)),
         invalid),
        ("target", "Explain", pb.ExplainRequest(model=ref.name, input=good, target_class=len(ref.logits[0]) + 3),
         invalid),
        ("top-k", "Predict", pb.PredictRequest(model=ref.name, input=good, top_k=-1), invalid),
        ("undecodable", rng.choice(["Explain", "Predict"]), b"\xff\xff" + rng.randbytes(16), invalid),
        ("model", "Predict", pb.PredictRequest(model="no-such-model", input=good), not_found),
        ("version", "Explain", pb.ExplainRequest(model=ref.name, version="999", input=good), not_found),
        ("method", "Explain", pb.ExplainRequest(model=ref.name, method="no-such-method", input=good), not_found),
        ("component", "Explain", pb.ExplainRequest(model=ref.name, method=method, input=good, interventions=[
            pb.Intervention(suppress=["no-such-component"])]), not_found),
    ]
    if rng.random() < 1 / (len(cases) + 1):  # a large message without a token: refused from its headers
        return Plan("unauthenticated", "Predict", unauthenticated_body(), GOOD_TIMEOUT_S,
                    frozenset({"UNAUTHENTICATED"}), anonymous=True)
    what, rpc, request, allowed = rng.choice(cases)
    return Plan(f"bad:{what}", rpc, request, GOOD_TIMEOUT_S, allowed)


@functools.cache
def unauthenticated_body() -> bytes:
    return random.Random(1).randbytes(16 << 20)


@dataclass
class Outcome:
    kind: str
    code: str
    seconds: float
    problem: str = ""   # a wrong answer, or an unexpected status


async def send(channels: list[grpc.aio.Channel], index: int, plan: Plan, auth: tuple) -> Outcome:
    channel = channels[index % len(channels)]
    path = f"/{EXPLAINER}/{plan.rpc}"
    response_type = pb.ExplainResponse if plan.rpc == "Explain" else pb.PredictResponse
    if isinstance(plan.request, bytes):
        call = channel.unary_unary(path, response_deserializer=response_type.FromString)
    else:
        call = channel.unary_unary(path, request_serializer=type(plan.request).SerializeToString,
                                   response_deserializer=response_type.FromString)
    start = time.perf_counter()
    try:
        response = await call(plan.request, timeout=plan.timeout, metadata=() if plan.anonymous else auth)
        code, details = "OK", ""
    except grpc.aio.AioRpcError as error:
        response, code, details = None, error.code().name, error.details() or ""
    seconds = time.perf_counter() - start
    problem = ""
    if code not in plan.allowed:
        problem = f"{plan.kind}: status {code} ({details[:200]}), expected one of {sorted(plan.allowed)}"
    elif code == "OK" and plan.check is not None:
        wrong = plan.check(response)
        if wrong:
            problem = f"{plan.kind}: wrong answer: {wrong}"
    return Outcome(plan.kind, code, seconds, problem)


# ----------------------------------------------------------------------------- server process

def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass
class Secrets:
    """The bearer tokens the server is started with, in files beside its log."""

    grpc: str
    metrics: str
    grpc_file: Path
    metrics_file: Path

    @classmethod
    def create(cls, folder: Path) -> Secrets:
        grpc_token, metrics_token = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        (folder / "tokens").write_text(grpc_token + "\n")
        (folder / "metrics-tokens").write_text(metrics_token + "\n")
        return cls(grpc_token, metrics_token, folder / "tokens", folder / "metrics-tokens")

    @property
    def metadata(self) -> tuple:
        return (("authorization", f"Bearer {self.grpc}"),)


def start_server(store: Path, port: int, metrics_port: int, log_path: Path, tokens: Secrets) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--model-store", str(store),
                                 "--host", HOST, "--port", str(port), "--metrics-port", str(metrics_port),
                                 "--http-port", "0",  # the soak drives gRPC; port 8000 may be a running server's
                                 "--auth-token-file", str(tokens.grpc_file),
                                 "--metrics-token-file", str(tokens.metrics_file),
                                 "--grace", "5"], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)


def wait_serving(process: subprocess.Popen, address: str, timeout: float, log_path: Path) -> None:
    end = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        while time.monotonic() < end:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                reply = check(health_pb2.HealthCheckRequest(service=EXPLAINER), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise RuntimeError(f"the server was not SERVING after {timeout:.0f} s:\n{log_path.read_text()[-4000:]}")


def scrape(metrics_port: int, token: str) -> dict[str, dict[tuple, float]]:
    """The server's protoserve_requests_total and protoserve_dropped_requests_total samples."""
    from prometheus_client.parser import text_string_to_metric_families

    request = urllib.request.Request(f"http://{HOST}:{metrics_port}/metrics",
                                     headers={"Authorization": f"Bearer {token}"})
    end = time.monotonic() + 4 * DEFAULTS.metrics_timeout_s
    while True:  # idle connections may hold every slot until they time out
        try:
            with urllib.request.urlopen(request, timeout=10) as reply:
                text = reply.read().decode()
            break
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > end:
                raise
            time.sleep(0.2)
    out: dict[str, dict[tuple, float]] = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("protoserve_requests_total", "protoserve_dropped_requests_total"):
                out[sample.name][tuple(sorted(sample.labels.items()))] = sample.value
    return out


# ----------------------------------------------------------------------------- the run

def stream_answered(metrics: dict) -> int:
    return int(sum(value for labels, value in metrics.get("protoserve_requests_total", {}).items()
                   if dict(labels)["rpc"] == "ExplainStream"))


class StalledStream:
    """An ExplainStream client that sends ``n`` good requests and reads nothing until :meth:`finish`."""

    def __init__(self, address: str, ref: Reference, n: int, auth: tuple, timeout: float):
        self.channel = grpc.aio.insecure_channel(address, options=STREAM_CLIENT_OPTIONS)
        self.call = pb_grpc.ExplainerStub(self.channel).ExplainStream(metadata=auth, timeout=timeout)
        self.requests, self.checks = [], {}
        for j in range(n):
            request, check = good_explain(ref, j % len(ref.images), ref.methods[j % len(ref.methods)], False, f"s{j}")
            self.requests.append(request)
            self.checks[request.request_id] = check
        self.sent = 0
        self.writer = asyncio.create_task(self._write())

    async def _write(self) -> None:
        for request in self.requests:
            await self.call.write(request)  # waits while HTTP/2 flow control holds the stream back
            self.sent += 1
        await self.call.done_writing()

    async def finish(self, read_by_server: int) -> dict:
        """Read every answer; ``read_by_server``: requests the server had answered while nothing was read."""
        sent_while_stalled = self.sent
        answered, wrong, smallest = set(), [], None
        while (answer := await self.call.read()) is not grpc.aio.EOF:
            smallest = min(smallest or answer.ByteSize(), answer.ByteSize())
            answered.add(answer.request_id)
            if answer.WhichOneof("result") != "response":
                wrong.append(f"stream {answer.request_id}: {answer.error.code} {answer.error.message[:200]}")
            elif problem := self.checks[answer.request_id](answer.response):
                wrong.append(f"stream {answer.request_id}: wrong answer: {problem}")
        await self.writer
        code = (await self.call.code()).name
        await self.channel.close()
        # Outstanding answers, those the client's window took, and one on its way.
        bound = DEFAULTS.max_stream_outstanding + math.ceil(STREAM_CLIENT_WINDOW / (smallest or 1)) + 1
        return {"sent": len(self.requests), "sent_while_stalled": sent_while_stalled,
                "read_by_server_while_stalled": read_by_server, "bound": bound, "code": code,
                "unanswered": len(self.requests) - len(answered & set(self.checks)), "wrong": wrong}


async def run_traffic(address: str, ref: Reference, args, pid: int, tokens: Secrets,
                      metrics_port: int) -> tuple[list[Outcome], dict, float, dict]:
    rng = random.Random(args.seed)
    plans = [make_plan(rng, ref) for _ in range(args.requests)]
    channels = [grpc.aio.insecure_channel(address) for _ in range(4)]
    stream = StalledStream(address, ref, args.stream_requests, tokens.metadata, args.duration + 600)
    outcomes: list[Outcome] = []
    next_index = 0
    end = time.monotonic() + args.duration
    rss = {"start": rss_bytes(pid), "warm": None, "peak_after_warmup": 0, "peak": 0, "end": 0}
    warmup = min(args.warmup, len(plans) // 5)
    done = asyncio.Event()

    async def worker() -> None:
        nonlocal next_index
        while next_index < len(plans) and time.monotonic() < end:
            index = next_index
            next_index += 1
            outcomes.append(await send(channels, index, plans[index], tokens.metadata))

    async def sample_rss() -> None:
        while not done.is_set():
            value = rss_bytes(pid)
            rss["peak"] = max(rss["peak"], value)
            if rss["warm"] is None and len(outcomes) >= warmup:
                rss["warm"] = value
            if rss["warm"] is not None:
                rss["peak_after_warmup"] = max(rss["peak_after_warmup"], value)
            try:
                await asyncio.wait_for(done.wait(), 0.2)
            except TimeoutError:
                pass

    sampler = asyncio.create_task(sample_rss())
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    elapsed = time.perf_counter() - start
    done.set()
    await sampler
    rss["end"] = rss_bytes(pid)
    if rss["warm"] is None:
        rss["warm"] = rss["end"]
    rss["peak_after_warmup"] = max(rss["peak_after_warmup"], rss["end"])
    for channel in channels:
        await channel.close()
    read_by_server = stream_answered(await asyncio.to_thread(scrape, metrics_port, tokens.metrics))
    return outcomes, rss, elapsed, await stream.finish(read_by_server)


def idle_metrics_connections(metrics_port: int) -> list[socket.socket]:
    """More idle connections than the metrics endpoint serves at once; it must close every one."""
    return [socket.create_connection((HOST, metrics_port), timeout=10)
            for _ in range(DEFAULTS.metrics_max_connections + 8)]


def check_metrics_endpoint(idle: list[socket.socket], metrics_port: int) -> dict:
    """Wait (at most 3 timeouts) for the server to close each idle connection; try a scrape without the token."""
    end = time.monotonic() + 3 * DEFAULTS.metrics_timeout_s
    still_open = 0
    for connection in idle:
        connection.settimeout(max(0.01, end - time.monotonic()))
        try:
            while connection.recv(4096):
                pass
        except TimeoutError:
            still_open += 1
        except ConnectionError:
            pass
        connection.close()
    try:
        urllib.request.urlopen(f"http://{HOST}:{metrics_port}/metrics", timeout=10)
        anonymous = 200
    except urllib.error.HTTPError as error:
        anonymous = error.code
    return {"idle_connections": len(idle), "left_open": still_open, "status_without_token": anonymous}


async def shutdown_under_traffic(address: str, ref: Reference, tokens: Secrets, process: subprocess.Popen,
                                 senders: int = 8) -> dict:
    """SIGTERM while ``senders`` clients, each on its own connection, keep sending Predict: each answer
    must be OK (and right) or UNAVAILABLE."""
    codes: Counter = Counter()
    wrong: list[str] = []
    stop = asyncio.Event()

    async def keep_sending(k: int) -> None:
        async with grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            predict = pb_grpc.ExplainerStub(channel).Predict
            i = k
            while not stop.is_set():
                j = i % len(ref.images)
                request = pb.PredictRequest(model=ref.name, version=ref.version, top_k=10,
                                            input=to_tensor(ref.images[j]))
                try:
                    response = await predict(request, timeout=30, metadata=tokens.metadata)
                    codes["OK"] += 1
                    if problem := check_predict(response, ref.logits[j]):
                        wrong.append(f"predict during shutdown: wrong answer: {problem}")
                except grpc.aio.AioRpcError as error:
                    codes[error.code().name] += 1
                i += senders

    tasks = [asyncio.create_task(keep_sending(k)) for k in range(senders)]
    while codes["OK"] < 10 * senders and not any(task.done() for task in tasks):
        await asyncio.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    exit_code = await asyncio.to_thread(process.wait, 90)
    await asyncio.sleep(0.5)  # and a little after the process is gone
    stop.set()
    await asyncio.gather(*tasks)
    return {"codes": dict(codes), "wrong": wrong, "exit_code": exit_code}


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


def summarize(outcomes: list[Outcome], rss: dict, elapsed: float, metrics: dict, stream: dict, endpoint: dict,
              shutdown: dict, args) -> dict:
    by_kind: dict[str, Counter] = defaultdict(Counter)
    for o in outcomes:
        by_kind[o.kind.split(":")[0]][o.code] += 1
    codes = Counter(o.code for o in outcomes)
    ok_latency = [o.seconds for o in outcomes if o.code == "OK"]
    all_latency = [o.seconds for o in outcomes]
    wrong = [o.problem for o in outcomes if "wrong answer" in o.problem] + stream["wrong"] + shutdown["wrong"]
    unexpected = [o.problem for o in outcomes if o.problem and "wrong answer" not in o.problem]
    server_codes = Counter()
    for labels, value in metrics.get("protoserve_requests_total", {}).items():
        server_codes[dict(labels)["code"]] += int(value)
    dropped = Counter()
    for labels, value in metrics.get("protoserve_dropped_requests_total", {}).items():
        dropped[dict(labels)["reason"]] += int(value)
    mib = 1 << 20
    growth = (rss["peak_after_warmup"] - rss["warm"]) / mib
    failures = []
    forbidden = sum(codes[c] for c in FORBIDDEN) + sum(server_codes[c] for c in FORBIDDEN)
    if forbidden:
        failures.append(f"{forbidden} UNKNOWN/INTERNAL statuses")
    if wrong:
        failures.append(f"{len(wrong)} wrong answers")
    if unexpected:
        failures.append(f"{len(unexpected)} unexpected statuses")
    if growth > args.max_rss_growth_mib:
        failures.append(f"RSS grew {growth:.0f} MiB after warm-up (limit {args.max_rss_growth_mib})")
    if stream["read_by_server_while_stalled"] > stream["bound"] or stream["unanswered"] or stream["code"] != "OK":
        failures.append(f"stream: {stream['read_by_server_while_stalled']} requests read while the client read "
                        f"nothing (bound {stream['bound']}), {stream['unanswered']} unanswered, ended {stream['code']}")
    if endpoint["left_open"] or endpoint["status_without_token"] != 401:
        failures.append(f"metrics endpoint: {endpoint['left_open']} idle connections left open, "
                        f"{endpoint['status_without_token']} without the token")
    if set(shutdown["codes"]) - {"OK", "UNAVAILABLE"}:
        failures.append(f"during shutdown: codes {shutdown['codes']}, only OK and UNAVAILABLE allowed")
    exit_code = shutdown["exit_code"]
    if exit_code != 0:
        failures.append(f"server exit code {exit_code} after SIGTERM")
    if not outcomes:
        failures.append("no request was sent")
    return {
        "requests_sent": len(outcomes), "seconds": elapsed, "concurrency": args.concurrency,
        "requests_per_second": len(outcomes) / elapsed if elapsed else 0.0,
        "codes": dict(codes), "codes_by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "server_codes": dict(server_codes), "dropped_before_compute": dict(dropped),
        "latency_ms": {"ok_p50": percentile(ok_latency, 50), "ok_p99": percentile(ok_latency, 99),
                       "all_p50": percentile(all_latency, 50), "all_p99": percentile(all_latency, 99)},
        "rss_mib": {"start": rss["start"] / mib, "after_warmup": rss["warm"] / mib, "peak": rss["peak"] / mib,
                    "end": rss["end"] / mib, "growth_after_warmup": growth, "limit": args.max_rss_growth_mib},
        "wrong_answers": len(wrong), "unexpected_statuses": len(unexpected),
        "examples": (wrong + unexpected)[:10], "server_exit_code": exit_code,
        "stream": {k: v for k, v in stream.items() if k != "wrong"}, "metrics_endpoint": endpoint,
        "shutdown_codes": shutdown["codes"],
        "failures": failures, "passed": not failures,
    }


def print_summary(s: dict, methods: list[str]) -> None:
    codes = sorted({c for row in s["codes_by_kind"].values() for c in row}, key=lambda c: (c != "OK", c))
    print(f"\nprotoserve soak: {s['requests_sent']} requests in {s['seconds']:.1f} s "
          f"({s['requests_per_second']:.1f}/s), concurrency {s['concurrency']}, loopback; methods {', '.join(methods)}")
    width = max(8, *(len(c) for c in codes))
    print("  " + "kind".ljust(18) + "sent".rjust(7) + "".join(c.rjust(width + 2) for c in codes))
    rows = list(s["codes_by_kind"].items()) + [("total", s["codes"])]
    for kind, row in rows:
        print("  " + kind.ljust(18) + str(sum(row.values())).rjust(7)
              + "".join(str(row.get(c, 0)).rjust(width + 2) for c in codes))
    lat = s["latency_ms"]
    print(f"  latency OK   p50 {lat['ok_p50']:.1f} ms   p99 {lat['ok_p99']:.1f} ms")
    print(f"  latency all  p50 {lat['all_p50']:.1f} ms   p99 {lat['all_p99']:.1f} ms")
    r = s["rss_mib"]
    print(f"  server RSS   start {r['start']:.0f} MiB, after warm-up {r['after_warmup']:.0f}, peak {r['peak']:.0f}, "
          f"end {r['end']:.0f}; growth after warm-up {r['growth_after_warmup']:.1f} MiB (limit {r['limit']})")
    print(f"  server-side codes {s['server_codes']}; dropped before compute {s['dropped_before_compute'] or {}}")
    st = s["stream"]
    print(f"  stalled stream: the server read {st['read_by_server_while_stalled']} of {st['sent']} requests while "
          f"the client read nothing (bound {st['bound']}; the client could send {st['sent_while_stalled']}); "
          f"then {st['sent'] - st['unanswered']} answered, stream {st['code']}")
    m = s["metrics_endpoint"]
    print(f"  metrics: {m['idle_connections']} idle connections, {m['left_open']} left open; "
          f"{m['status_without_token']} without the token")
    print(f"  8 clients sending through SIGTERM: {s['shutdown_codes']}")
    print(f"  wrong answers {s['wrong_answers']}, unexpected statuses {s['unexpected_statuses']}, "
          f"server exit code after SIGTERM {s['server_exit_code']}")
    for example in s["examples"]:
        print(f"    e.g. {example}")
    print("  PASS" if s["passed"] else "  FAIL: " + "; ".join(s["failures"]))


def find_archive(store: Path, model: str) -> Path:
    from handlers.archive import ARCHIVE_SUFFIX

    candidates = sorted(store.glob(f"{model}-*{ARCHIVE_SUFFIX}"))
    if not candidates:
        raise SystemExit(f"no {model}-*{ARCHIVE_SUFFIX} archive in {store}")
    return candidates[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=ROOT / "model_store",
                        help="model store; the demo archive is built there if it holds none")
    parser.add_argument("--model", default="mnist")
    parser.add_argument("--requests", type=int, default=3000, help="at most this many requests")
    parser.add_argument("--duration", type=float, default=120.0, help="at most this many seconds of traffic")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--stream-requests", type=int, default=2000,
                        help="requests of the ExplainStream client that reads nothing until the traffic is over")
    parser.add_argument("--warmup", type=int, default=200, help="requests before the RSS baseline is taken")
    parser.add_argument("--max-rss-growth-mib", type=float, default=200.0)
    parser.add_argument("--methods", choices=["all", "default"], default="all",
                        help="explain with every method of the model, or only its default one")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or args.duration <= 0:
        parser.error("--requests, --concurrency and --duration must be positive")

    if not any(args.store.glob(f"{args.model}-*.psar")):
        print(f"no archive in {args.store}; building the demo store (this takes minutes)", flush=True)
        subprocess.run([sys.executable, "-m", "model_store.build_demo", "--store", str(args.store),
                        "--work", str(ROOT / "build" / "demo")], check=True, cwd=ROOT)
    archive = find_archive(args.store, args.model)

    port, metrics_port = free_port(), free_port()
    log_path = Path(tempfile.mkdtemp(prefix="protoserve-soak-")) / "server.log"
    tokens = Secrets.create(log_path.parent)
    process = start_server(args.store, port, metrics_port, log_path, tokens)
    try:
        print(f"server pid {process.pid} on {HOST}:{port} (log {log_path}); computing in-process answers", flush=True)
        ref = build_reference(archive, args.methods)
        wait_serving(process, f"{HOST}:{port}", 300, log_path)
        print(f"sending up to {args.requests} requests for up to {args.duration:.0f} s at concurrency "
              f"{args.concurrency}", flush=True)
        idle = idle_metrics_connections(metrics_port)
        outcomes, rss, elapsed, stream = asyncio.run(run_traffic(f"{HOST}:{port}", ref, args, process.pid, tokens,
                                                                 metrics_port))
        endpoint = check_metrics_endpoint(idle, metrics_port)
        metrics = scrape(metrics_port, tokens.metrics)
        shutdown = asyncio.run(shutdown_under_traffic(f"{HOST}:{port}", ref, tokens, process))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    summary = summarize(outcomes, rss, elapsed, metrics, stream, endpoint, shutdown, args)
    print_summary(summary, ref.methods)
    if summary["passed"]:
        shutil.rmtree(log_path.parent, ignore_errors=True)
    else:
        summary["server_log"] = str(log_path)
        print(f"  server log kept in {log_path}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2, default=float))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
