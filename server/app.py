"""The grpc.aio application: the data plane behind both services (and the HTTP port's), health, reflection,
metrics, shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
import time

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from protoserve_client import pb, pb_grpc

from server import security
from server.dataplane import DataPlane
from server.drain import DrainInterceptor, close_sockets
from server.health import SERVING, HealthServicer
from server.http_api import HttpApi, error_response
from server.http_server import HttpServer, ListenError, tls_context
from server.memory import keep_freed_memory
from server.metrics import Metrics
from server.metrics_http import MetricsServer, metrics_tokens
from server.oip import OIP_SERVICE, InferenceServicer, oip_grpc
from server.registry import ModelRegistry, resolve_device
from server.servicer import ExplainerServicer
from server.settings import Settings
from server.supervisor import WorkerSupervisor

log = logging.getLogger(__name__)

EXPLAINER_SERVICE = pb.DESCRIPTOR.services_by_name["Explainer"].full_name


class App:
    """Owns the registry, the grpc server and the metrics endpoint of one process."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None):
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.registry = ModelRegistry(settings, self.metrics)
        self.health = HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port = settings.port
        self.metrics_server: MetricsServer | None = None
        self.http_api: HttpApi | None = None
        self.http_server: HttpServer | None = None
        self.http_port = 0
        self.supervisor: WorkerSupervisor | None = None
        self.drain = DrainInterceptor()
        self.interceptors: list[grpc.aio.ServerInterceptor] = []  # outermost first; set by start

    async def start(self) -> None:
        # Security settings fail fast, before any model is loaded.
        credentials = security.server_credentials(self.settings)
        self.interceptors = [self.drain, *security.interceptors(self.settings)]
        scrape_tokens = metrics_tokens(self.settings) if self.settings.metrics_port else None
        tokens = security.bearer_tokens(self.settings)
        http_tls = tls_context(self.settings) if self.settings.http_port else None
        device = resolve_device(self.settings.device)
        keep_freed_memory(self.settings.keep_freed_mib)  # before the compute threads start
        if self.settings.intra_op_threads:
            torch.set_num_threads(self.settings.intra_op_threads)  # process-wide, compute threads included
        # Loading (and CUDA initialisation) is blocking work: keep it off the event loop.
        await asyncio.to_thread(self.registry.load_store, device)
        self.registry.start()
        options = [("grpc.max_receive_message_length", self.settings.max_message_bytes),
                   ("grpc.max_send_message_length", self.settings.max_message_bytes),
                   # Each connection holds a file descriptor and buffers: idle sockets must not take them all.
                   ("grpc.max_allowed_incoming_connections", self.settings.max_connections),
                   ("grpc.server_handshake_timeout_ms", round(self.settings.handshake_timeout_s * 1000))]
        self.server = grpc.aio.server(options=options, interceptors=self.interceptors,
                                      maximum_concurrent_rpcs=self.settings.max_concurrent_rpcs)
        plane = DataPlane(self.registry, self.settings, self.metrics)
        pb_grpc.add_ExplainerServicer_to_server(ExplainerServicer(plane, self.settings), self.server)
        oip_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(plane, self.settings), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [EXPLAINER_SERVICE, OIP_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME], self.server)
        address = f"{self.settings.host}:{self.settings.port}"
        try:
            if credentials is None:
                self.port = self.server.add_insecure_port(address)
            else:
                self.port = self.server.add_secure_port(address, credentials)
        except RuntimeError:  # grpc says only "Failed to bind": the port in use, the address not this machine's
            await self.registry.close(0)
            raise ListenError(f"cannot serve gRPC on {address}; choose another --port") from None
        await self.server.start()
        if self.settings.http_port:
            self.http_api = HttpApi(plane, self.settings, tokens)
            self.http_server = HttpServer(self.http_api.handle, self.http_api.admit, error_response, self.settings,
                                          http_tls)
            try:
                self.http_port = await self.http_server.start(self.settings.host, self.settings.http_port)
            except ListenError:
                self.http_api.close()
                await self.server.stop(0)
                await self.registry.close(0)
                raise
        if self.settings.metrics_port:
            self.metrics_server = MetricsServer.from_settings(self.metrics.registry, self.settings, scrape_tokens)
        for service in ("", EXPLAINER_SERVICE, OIP_SERVICE):
            self.health.set(service, SERVING)
        # While a batch worker is down (and being restarted) the services that use it are NOT_SERVING.
        self.supervisor = WorkerSupervisor(self.registry, self.health, (EXPLAINER_SERVICE, OIP_SERVICE),
                                           self.metrics, backoff_s=self.settings.restart_backoff_s)
        self.supervisor.start()
        log.info("serving %d model(s) on %s:%d (device %s%s%s)%s", len(self.registry.models), self.settings.host,
                 self.port, device, ", TLS" if credentials is not None else "",
                 ", bearer tokens" if self.settings.auth_token_file is not None else "",
                 f"; HTTP (OIP REST, explorer page) on port {self.http_port}" if self.http_server else "")

    async def stop(self) -> None:
        """Drain: health NOT_SERVING, refuse new rpcs, let in-flight ones finish within the grace period.

        Every rpc that arrives from now on is refused with UNAVAILABLE. Once the rpcs in flight have
        finished and none has arrived for ``drain_quiet_s`` (or the grace period is over), the
        connections are closed and the grpc server stops, so that no call is cancelled: a call it
        had received but not handed over would be (see server/drain.py).
        """
        self.health.enter_graceful_shutdown()
        self.drain.start()
        # The HTTP port drains beside gRPC: it stops accepting, its requests in flight finish within the grace.
        http_closed = asyncio.ensure_future(self.http_server.close(self.settings.shutdown_grace_s)
                                            if self.http_server is not None else asyncio.sleep(0))
        if self.supervisor is not None:
            await self.supervisor.stop()
        if self.server is not None:
            grace = self.settings.shutdown_grace_s
            end = time.monotonic() + grace
            drained = await self.drain.wait_drained(self.settings.drain_quiet_s, max_s=grace)
            outcome = "drained" if drained else f"grace period over ({self.drain.in_flight} rpc(s) in flight)"
            closed = close_sockets(self.port)
            await self.server.stop(max(0.0, end - time.monotonic()))
            log.info("refused %d rpc(s) while draining; %s; closed %d connection(s)", self.drain.refused, outcome,
                     closed)
        await http_closed
        if self.http_api is not None:
            self.http_api.close()
        await self.registry.close(self.settings.shutdown_grace_s)
        if self.metrics_server is not None:
            self.metrics_server.close()

    async def run_until_signal(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):  # before start: a signal while loading still drains
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        await stop.wait()
        log.info("shutting down")
        await self.stop()
