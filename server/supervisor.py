"""Batch worker supervision: a crashed worker is restarted, and health says so meanwhile.

A batcher's worker task stops when something it cannot handle escapes ``process`` (a
BaseException from a native extension, a bug in the batcher). Its waiters then get
UNAVAILABLE and new submits are refused at once. The supervisor polls every model's
``batcher.alive``; while any worker is down it sets the served services NOT_SERVING (so a
load balancer routes elsewhere), restarts the worker after a backoff (doubling while the
worker keeps crashing soon after each restart, up to ``max_backoff_s``), counts the restart
in ``protoserve_worker_restarts_total{model}``, and sets SERVING again once all are up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from server.batcher import BatcherClosedError
from server.health import NOT_SERVING, SERVING, HealthServicer
from server.metrics import Metrics
from server.registry import ModelRegistry

log = logging.getLogger(__name__)


class WorkerSupervisor:
    """Watches the registry's batchers from the event loop that runs them."""

    def __init__(self, registry: ModelRegistry, health_servicer: HealthServicer,
                 services: Sequence[str], metrics: Metrics, *, interval_s: float = 0.1,
                 backoff_s: float = 0.5, max_backoff_s: float = 30.0):
        self.registry = registry
        self.health = health_servicer
        self.services = tuple(services)
        self.metrics = metrics
        self.interval_s = interval_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._down_since: dict[str, float] = {}    # model label -> when its crash was seen
        self._backoff: dict[str, float] = {}       # model label -> current backoff
        self._restarted_at: dict[str, float] = {}  # model label -> last restart
        self._serving = True
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="worker-supervisor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                self.check()
            except Exception:  # the supervisor itself must outlive any surprise
                log.exception("worker supervisor check failed")
            await asyncio.sleep(self.interval_s)

    def check(self) -> None:
        """One round: note crashed workers, restart those whose backoff passed, update health."""
        now = time.monotonic()
        down = []
        for model in self.registry.all():
            if model.batcher.alive:
                continue
            label = model.label
            if label not in self._down_since:
                self._down_since[label] = now
                # A crash soon after the last restart doubles the wait; otherwise start again.
                recent = now - self._restarted_at.get(label, -1e9) < 10 * self._backoff.get(label, self.backoff_s)
                self._backoff[label] = (min(2 * self._backoff[label], self.max_backoff_s)
                                        if recent and label in self._backoff else self.backoff_s)
                log.error("batch worker of %s is down; restarting in %.1f s", label, self._backoff[label])
            down.append(model)
        if down and self._serving:
            self._set(NOT_SERVING)
        for model in down:
            label = model.label
            if now - self._down_since[label] < self._backoff[label]:
                continue
            try:
                model.batcher.start()
            except BatcherClosedError:
                continue  # closed on purpose (shutdown): nothing to restart
            del self._down_since[label]
            self._restarted_at[label] = now
            self.metrics.worker_restarts.labels(model.runtime.name).inc()
            log.warning("batch worker of %s restarted", label)
        if not self._serving and all(m.batcher.alive for m in self.registry.all()):
            self._set(SERVING)

    def _set(self, status) -> None:
        # After enter_graceful_shutdown the health servicer ignores this: shutdown wins.
        for service in self.services:
            self.health.set(service, status)
        self._serving = status == SERVING
