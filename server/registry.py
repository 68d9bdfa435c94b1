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
from handlers.runtime import ModelRuntime
from server.batcher import DynamicBatcher
from server.decode import ImageDecoder
from server.metrics import BatcherMetrics, Metrics
from server.results import ExplainedRow, explained_rows, predicted_rows
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
        # Label lookups cost microseconds each; the compute stages are resolved once.
        self._stages = {stage: metrics.stage_duration.labels(runtime.name, stage) for stage in ("forward", "explain")}
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
        """Runs in the compute thread: one batch -> one result per payload."""
        if isinstance(key, PredictKey):
            start = time.perf_counter()
            logits = self.runtime.predict(torch.stack(payloads))
            self._stages["forward"].observe(time.perf_counter() - start)
            return predicted_rows(logits)
        logits, explanation, timings = self.runtime.explain(key.method, payloads, key.heatmaps)
        for stage_name, seconds in timings.items():
            self._stages[stage_name].observe(seconds)
        additive = self.runtime.explainers[key.method].additive
        rows = explained_rows(logits, explanation, [len(item.suppress) for item in payloads], additive)
        answered = [row for row in rows if isinstance(row, ExplainedRow)]
        residual_metric = self.metrics.residual_share.labels(self.runtime.name, key.method)
        for row in answered:
            residual_metric.observe(row.residual_share)
        violations = sum(not row.additive for row in answered) if additive else 0
        if violations:
            self.metrics.additivity_violations.labels(self.runtime.name, key.method).inc(violations)
        return rows

    async def close(self, grace_s: float) -> None:
        await self.batcher.close(grace_s)
        self._executor.shutdown(wait=False)


class ModelRegistry:
    """Model versions by name; the newest version answers when a request names none. Also owns the
    pool that decodes request images for every model (``images``)."""

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
                served = ModelRuntime(read_archive(path), device, self.settings.backend, self.settings.autocast)
            except ArchiveError as exc:
                self._refuse(path.name, str(exc))
                continue
            except Exception as exc:  # a bug or an unforeseen fault in one archive must not stop the others
                log.exception("loading %s failed", path.name)
                self._refuse(path.name, f"{path.name}: cannot be loaded ({type(exc).__name__}): {exc}")
                continue
            loaded.setdefault((served.name, served.version), []).append((path, served))
        for (name, version), copies in loaded.items():
            if len(copies) > 1:
                files = " and ".join(path.name for path, _ in copies)
                for path, _ in copies:
                    self._refuse(path.name, f"model {name!r} version {version!r} is in two archives, {files}; "
                                            "both are refused: remove or renumber one")
                continue
            path, served = copies[0]
            self._log_checks(path, served)
            self.models.setdefault(name, {})[version] = BatchedModel(served, self.settings, self.metrics)
            log.info("loaded %s version %s (%s) on %s", name, version, ", ".join(served.explainers), device)

    def _refuse(self, key: str, message: str) -> None:
        self.load_errors[key] = message
        log.error("refusing %s: %s", key, message)

    def _log_checks(self, path: Path, served: ModelRuntime) -> None:
        if not served.additivity_inputs:
            return
        log.log(logging.INFO if served.archive.samples is not None else logging.WARNING,
                "%s: additive methods checked on %s", path.name, served.additivity_inputs)
        for method, reason in served.refused_methods.items():
            self._refuse(f"{path.name}:{method}", reason)
        if served.default_method != served.archive.default_method:
            log.warning("%s: default method %r is refused; %r answers requests that name no method", path.name,
                        served.archive.default_method, served.default_method)

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
            return versions[max(versions, key=_version_order)]
        if version not in versions:
            raise NotFoundError(f"version of model {name!r}", version, sorted(versions, key=_version_order))
        return versions[version]

    def all(self) -> list[BatchedModel]:
        return [versions[v] for name in sorted(self.models)
                for versions in [self.models[name]] for v in sorted(versions, key=_version_order)]


def _version_order(version: str) -> tuple:
    """"10" after "9"; numeric parts compare as numbers."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[.\-_]", version))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
