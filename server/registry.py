"""The models a server holds: archives loaded from the model store, each with its batcher.

Only archives already in the store directory are ever loaded; no rpc names a path or URL.
"""

from __future__ import annotations

import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from handlers.archive import ARCHIVE_SUFFIX, read_archive
from handlers.errors import ArchiveError, NotFoundError
from handlers.runtime import ServedModel
from server.batcher import DynamicBatcher
from server.decode import ImageDecoder
from server.metrics import BatcherMetrics, Metrics
from server.results import explained_rows, ranked_scores
from server.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictKey:
    pass


@dataclass(frozen=True)
class ExplainKey:
    method: str
    heatmaps: str  # "none", "feature_grid", "input"


class LoadedModel:
    """A served model version and the one batcher that owns its queue."""

    def __init__(self, served: ServedModel, settings: Settings, metrics: Metrics):
        self.served = served
        self.metrics = metrics
        self.label = f"{served.name}:{served.version}"
        # Label lookups cost microseconds each; the compute stages are resolved once.
        self._stages = {stage: metrics.stage_duration.labels(served.name, stage) for stage in ("forward", "explain")}
        # One compute thread per model: batches of a model run one after another.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"compute-{served.name}")
        self.batcher = DynamicBatcher(
            self._run_batch, max_batch_size=settings.max_batch_size, max_delay_s=settings.max_delay_ms / 1000,
            max_queue_size=settings.max_queue_size, executor=self._executor,
            observer=BatcherMetrics(metrics, served.name), name=self.label)

    def _run_batch(self, key, payloads: list) -> list:
        # ``process`` is looked up per batch, so tests can wrap it (fault injection, a busy worker).
        return self.process(key, payloads)

    def process(self, key, payloads: list) -> list:
        """Runs in the compute thread: one batch -> one result per payload."""
        if isinstance(key, PredictKey):
            start = time.perf_counter()
            logits = self.served.predict(torch.stack(payloads))
            self._stages["forward"].observe(time.perf_counter() - start)
            return ranked_scores(logits)
        logits, explanation, timings = self.served.explain(key.method, payloads, key.heatmaps)
        for stage_name, seconds in timings.items():
            self._stages[stage_name].observe(seconds)
        residual_metric = self.metrics.residual_share.labels(self.served.name, key.method)
        for share in explanation.residual_share.tolist():
            residual_metric.observe(share)
        return explained_rows(logits, explanation)

    async def close(self, grace_s: float) -> None:
        await self.batcher.close(grace_s)
        self._executor.shutdown(wait=False)


class ModelRegistry:
    """Model versions by name; the newest version answers when a request names none. Also owns the
    pool that decodes request images for every model (``images``)."""

    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings = settings
        self.metrics = metrics
        self.models: dict[str, dict[str, LoadedModel]] = {}
        self.load_errors: dict[str, str] = {}
        self.images = ImageDecoder(settings)

    def load_store(self, device: torch.device) -> None:
        """Load every archive in the store; a broken one is logged and skipped."""
        store = Path(self.settings.model_store)
        if not store.is_dir():
            raise FileNotFoundError(f"model store {store} is not a directory")
        for path in sorted(store.glob(f"*{ARCHIVE_SUFFIX}")):
            try:
                served = ServedModel(read_archive(path), device, self.settings.backend, self.settings.autocast)
            except ArchiveError as exc:
                self.load_errors[path.name] = str(exc)
                log.error("refusing archive %s: %s", path.name, exc)
                continue
            self.models.setdefault(served.name, {})[served.version] = LoadedModel(served, self.settings, self.metrics)
            log.info("loaded %s version %s (%s) on %s", served.name, served.version,
                     ", ".join(served.explainers), device)

    def start(self) -> None:
        for versions in self.models.values():
            for model in versions.values():
                model.batcher.start()

    async def close(self, grace_s: float) -> None:
        for versions in self.models.values():
            for model in versions.values():
                await model.close(grace_s)
        self.images.close()

    def get(self, name: str, version: str = "") -> LoadedModel:
        versions = self.models.get(name)
        if versions is None:
            raise NotFoundError("model", name, sorted(self.models))
        if not version:
            return versions[max(versions, key=_version_order)]
        if version not in versions:
            raise NotFoundError(f"version of model {name!r}", version, sorted(versions, key=_version_order))
        return versions[version]

    def all(self) -> list[LoadedModel]:
        return [versions[v] for name in sorted(self.models)
                for versions in [self.models[name]] for v in sorted(versions, key=_version_order)]


def _version_order(version: str) -> tuple:
    """"10" after "9"; numeric parts compare as numbers."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[.\-_]", version))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
