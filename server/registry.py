"""The models a server holds: archives loaded from the model store, each with its batcher.

Only archives already in the store directory are ever loaded; no rpc names a path or URL.
"""

from __future__ import annotations

import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from prometheus_client import Counter, Histogram

from handlers.archive import ARCHIVE_SUFFIX, read_archive
from handlers.device_graphs import bucket_sizes
from handlers.errors import ArchiveError, NotFoundError
from handlers.rows import ExplainedRow
from handlers.runtime import ModelRuntime
from server.batcher import DynamicBatcher
from server.decode import ImageDecoder
from server.metrics import BatcherMetrics, Metrics
from server.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictKey:
    pass


@dataclass(frozen=True)
class ExplainKey:
    method: str
    heatmaps: str  # "none", "feature_grid", "input"


class BatchedModel:
    """A model version being served: its runtime, the one batcher that owns its queue, and the one
    compute thread its batches run on."""

    def __init__(self, runtime: ModelRuntime, settings: Settings, metrics: Metrics):
        self.runtime = runtime
        self.metrics = metrics
        self.label = f"{runtime.name}:{runtime.version}"
        # Label lookups cost microseconds each: the stages of a request are resolved once,
        self.stages = {stage: metrics.stage_duration.labels(runtime.name, stage)
                       for stage in ("preprocess", "forward", "explain", "rows", "encode")}
        # and the series of the explanations' quality on first use: method -> residual share histogram,
        # (method, component index) -> top component counter.
        self._residual_shares: dict[str, Histogram] = {}
        self._top_components: dict[tuple[str, int], Counter] = {}
        # One compute thread per model: batches of a model run one after another.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"compute-{runtime.name}")
        self.batcher = DynamicBatcher(
            self._run_batch, max_batch_size=settings.max_batch_size, max_delay_s=settings.max_delay_ms / 1000,
            max_queue_size=settings.max_queue_size, executor=self._executor,
            observer=BatcherMetrics(metrics, runtime.name), name=self.label)

    def _run_batch(self, key, payloads: list) -> list:
        # ``process`` is looked up per batch, so tests can wrap it (fault injection, a busy worker).
        return self.process(key, payloads)

    def process(self, key, payloads: list) -> list:
        """Runs in the compute thread: one batch -> one host row (or error) per payload. Records the
        compute stages, and of explanations the residual shares, the top components and the additivity
        violations."""
        if isinstance(key, PredictKey):
            rows, timings = self.runtime.predict_rows(payloads)
        else:
            rows, timings = self.runtime.explain_rows(key.method, payloads, key.heatmaps)
            self._observe_explained(key.method, [row for row in rows if isinstance(row, ExplainedRow)])
        for stage_name, seconds in timings.items():
            self.stages[stage_name].observe(seconds)
        return rows

    def _observe_explained(self, method: str, answered: list[ExplainedRow]) -> None:
        residual_metric = self._residual_shares.get(method)
        if residual_metric is None:
            residual_metric = self._residual_shares[method] = self.metrics.residual_share.labels(self.runtime.name,
                                                                                                  method)
        for row in answered:
            residual_metric.observe(row.residual_share)
            if row.top_component is not None:
                self._top_component(method, row.top_component).inc()
        violations = sum(not row.additive for row in answered) if self.runtime.explainers[method].additive else 0
        if violations:
            self.metrics.additivity_violations.labels(self.runtime.name, method).inc(violations)

    def _top_component(self, method: str, index: int) -> Counter:
        counter = self._top_components.get((method, index))
        if counter is None:
            component = self.runtime.explainers[method].components[index].id
            counter = self._top_components[method, index] = self.metrics.component_uses.labels(
                self.runtime.name, method, component)
        return counter

    async def close(self, grace_s: float) -> None:
        await self.batcher.close(grace_s)
        self._executor.shutdown(wait=False)


class ModelRegistry:
    """Model versions by name, oldest to newest (``models``); the newest version answers when a request
    names none. Also owns the pool that decodes request images for every model (``images``)."""

    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings = settings
        self.metrics = metrics
        self.models: dict[str, dict[str, BatchedModel]] = {}
        self.load_errors: dict[str, str] = {}
        self.images = ImageDecoder(settings)

    def load_store(self, device: torch.device) -> None:
        """Load every archive in the store. Whatever goes wrong loading one archive refuses that
        archive alone (logged, and kept in ``load_errors``); so do two archives of one name and version."""
        store = Path(self.settings.model_store)
        if not store.is_dir():
            raise FileNotFoundError(f"model store {store} is not a directory")
        loaded: dict[tuple[str, str], list[tuple[Path, ModelRuntime]]] = {}
        for path in sorted(store.glob(f"*{ARCHIVE_SUFFIX}")):
            try:
                runtime = ModelRuntime(read_archive(path), device, self.settings.backend, self.settings.autocast,
                                       graph_batch_sizes=self._graph_batch_sizes())
            except ArchiveError as exc:
                self._refuse(path.name, str(exc))
                continue
            except Exception as exc:  # a bug or an unforeseen fault in one archive must not stop the others
                log.exception("loading %s failed", path.name)
                self._refuse(path.name, f"{path.name}: cannot be loaded ({type(exc).__name__}): {exc}")
                continue
            loaded.setdefault((runtime.name, runtime.version), []).append((path, runtime))
        for (name, version), copies in loaded.items():
            if len(copies) > 1:
                files = " and ".join(path.name for path, _ in copies)
                for path, _ in copies:
                    self._refuse(path.name, f"model {name!r} version {version!r} is in two archives, {files}; "
                                            "both are refused: remove or renumber one")
                continue
            path, runtime = copies[0]
            self._log_checks(path, runtime)
            self.models.setdefault(name, {})[version] = BatchedModel(runtime, self.settings, self.metrics)
            log.info("loaded %s version %s (%s) on %s", name, version, ", ".join(runtime.explainers), device)
        # Ordered once here, so that a request finds its model's newest version without sorting.
        self.models = {name: {v: self.models[name][v] for v in sorted(self.models[name], key=_version_order)}
                       for name in sorted(self.models)}

    def _graph_batch_sizes(self) -> tuple[int, ...]:
        """The batch sizes to capture graphs for (on a GPU: the runtime captures none on the CPU): every bucket
        up to the largest batch, none with graphs off."""
        return bucket_sizes(self.settings.max_batch_size) if self.settings.cuda_graphs else ()

    def _refuse(self, key: str, message: str) -> None:
        self.load_errors[key] = message
        log.error("refusing %s: %s", key, message)

    def _log_checks(self, path: Path, runtime: ModelRuntime) -> None:
        for method, report in runtime.graph_reports.items():
            log.info("%s: %s's graphs captured for batch sizes %s in %.2f s%s", path.name, method,
                     ", ".join(map(str, report.captured)) or "none", report.seconds,
                     f" (dropped, not reproducing the eager result: {', '.join(map(str, report.dropped))})"
                     if report.dropped else "")
        if not runtime.additivity_inputs:
            return
        log.log(logging.INFO if runtime.archive.samples is not None else logging.WARNING,
                "%s: additive methods checked on %s", path.name, runtime.additivity_inputs)
        for method, reason in runtime.refused_methods.items():
            self._refuse(f"{path.name}:{method}", reason)
        if runtime.default_method != runtime.archive.default_method:
            log.warning("%s: default method %r is refused; %r answers requests that name no method", path.name,
                        runtime.archive.default_method, runtime.default_method)

    def start(self) -> None:
        for versions in self.models.values():
            for model in versions.values():
                model.batcher.start()

    async def close(self, grace_s: float) -> None:
        for versions in self.models.values():
            for model in versions.values():
                await model.close(grace_s)
        self.images.close()

    def get(self, name: str, version: str = "") -> BatchedModel:
        versions = self.models.get(name)
        if versions is None:
            raise NotFoundError("model", name, sorted(self.models))
        if not version:
            return versions[next(reversed(versions))]
        if version not in versions:
            raise NotFoundError(f"version of model {name!r}", version, list(versions))
        return versions[version]

    def all(self) -> list[BatchedModel]:
        return [model for versions in self.models.values() for model in versions.values()]


def _version_order(version: str) -> tuple:
    """"10" after "9"; numeric parts compare as numbers."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[.\-_]", version))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
