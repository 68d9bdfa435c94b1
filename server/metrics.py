"""Prometheus metrics, on their own registry (served by server/metrics_http.py). Names as in DESIGN.md."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
STAGE_BUCKETS = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SHARE_BUCKETS = tuple(i / 20 for i in range(1, 21))


class Metrics:
    """Every metric the service exports. ``stage`` is one of queue, preprocess, forward,
    explain (with its interventions), rows (the batch's host rows), encode."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.request_duration = Histogram("protoserve_request_duration_seconds", "Time to answer an rpc.",
                                          ["rpc", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.stage_duration = Histogram("protoserve_stage_duration_seconds",
                                        "Time per stage of a request (per batch for batched stages).",
                                        ["model", "stage"], buckets=STAGE_BUCKETS, registry=r)
        self.batch_size = Histogram("protoserve_batch_size", "Examples per computed batch.", ["model"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.residual_share = Histogram("protoserve_residual_share",
                                        "Share of each explanation not carried by the components; "
                                        "a rising share signals inputs unlike the fitted ones.",
                                        ["model", "method"], buckets=SHARE_BUCKETS, registry=r)
        self.requests = Counter("protoserve_requests", "Rpcs answered, by status code.",
                                ["rpc", "model", "code"], registry=r)
        self.queue_depth = Gauge("protoserve_queue_depth", "Requests waiting in a model's queue.", ["model"],
                                 registry=r)
        self.dropped = Counter("protoserve_dropped_requests", "Requests dropped before compute.",
                               ["model", "reason"], registry=r)
        self.worker_restarts = Counter("protoserve_worker_restarts", "Batch workers restarted after a crash.",
                                       ["model"], registry=r)
        self.component_uses = Counter("protoserve_component_reported",
                                      "Times a component was the top contributor of an explanation.",
                                      ["model", "method", "component"], registry=r)
        self.additivity_violations = Counter("protoserve_additivity_violations",
                                             "Answers of an additive method whose contributions + residual + "
                                             "bias missed the target logit by more than float32 rounding.",
                                             ["model", "method"], registry=r)


class BatcherMetrics:
    """Adapts the batcher's observer hooks to one model's metrics."""

    def __init__(self, metrics: Metrics, model: str):
        self._batch = metrics.batch_size.labels(model)
        self._queue = metrics.stage_duration.labels(model, "queue")
        self._depth = metrics.queue_depth.labels(model)
        self._metrics, self._model = metrics, model

    def batch_formed(self, key, size: int) -> None:
        self._batch.observe(size)

    def queue_wait(self, key, seconds: float) -> None:
        self._queue.observe(seconds)

    def queue_depth(self, depth: int) -> None:
        self._depth.set(depth)

    def dropped(self, reason: str) -> None:
        self._metrics.dropped.labels(self._model, reason).inc()
