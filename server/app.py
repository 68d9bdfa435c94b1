"""The grpc.aio application: explainer service, health, reflection, metrics, shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from protoserve_client import pb, pb_grpc

from server.metrics import Metrics
from server.registry import ModelRegistry, resolve_device
from server.servicer import ExplainerServicer
from server.settings import Settings

log = logging.getLogger(__name__)

EXPLAINER_SERVICE = pb.DESCRIPTOR.services_by_name["Explainer"].full_name


class App:
    """Owns the registry, the grpc server and the metrics endpoint of one process."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None):
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.registry = ModelRegistry(settings, self.metrics)
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port = settings.port
        self._metrics_server = None

    async def start(self) -> None:
        device = resolve_device(self.settings.device)
        # Loading (and CUDA initialisation) is blocking work: keep it off the event loop.
        await asyncio.to_thread(self.registry.load_store, device)
        self.registry.start()
        options = [("grpc.max_receive_message_length", self.settings.max_message_bytes),
                   ("grpc.max_send_message_length", self.settings.max_message_bytes)]
        self.server = grpc.aio.server(options=options)
        pb_grpc.add_ExplainerServicer_to_server(ExplainerServicer(self.registry, self.settings, self.metrics),
                                                self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [EXPLAINER_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME], self.server)
        self.port = self.server.add_insecure_port(f"{self.settings.host}:{self.settings.port}")
        await self.server.start()
        if self.settings.metrics_port:
            self._metrics_server, _ = self.metrics.serve(self.settings.host, self.settings.metrics_port)
        for service in ("", EXPLAINER_SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %d model(s) on %s:%d (device %s)", len(self.registry.models), self.settings.host,
                 self.port, device)

    async def stop(self) -> None:
        """Drain: health NOT_SERVING, refuse new rpcs, let in-flight ones finish within the grace period."""
        await self.health.enter_graceful_shutdown()
        if self.server is not None:
            await self.server.stop(self.settings.shutdown_grace_s)
        await self.registry.close(self.settings.shutdown_grace_s)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()

    async def run_until_signal(self) -> None:
        await self.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down")
        await self.stop()
