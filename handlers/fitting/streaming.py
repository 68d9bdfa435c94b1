"""Offline: fit data from a source of any size, within a memory budget.

:func:`streamed_fit_data` featurizes the whole source once into the on-disk feature cache (or
reuses a complete one: a fit interrupted after featurization resumes there), then gives the
methods a :class:`~handlers.base.FitData` whose ``stream`` reaches the whole training set and
whose tensors are uniform samples of each class, as large as the budget allows, for the methods that need
their rows in memory. A method whose fitting module sets ``STREAMS = True`` reads
``data.stream`` instead (ProtoNMF: online NMF over the cached features of each class).
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass

import numpy as np
import psutil
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from handlers.base import FitData
from handlers.fitting.engine import Engine, progress
from handlers.fitting.feature_cache import FeatureCache, cache_key
from handlers.fitting.sources import DataSource, open_source
from handlers.methods import METHODS
from handlers.model import ModelParts

# Copies of a row's features that the in-memory fits hold at once (raw, clipped, derived, workspace):
# the sample's size is computed from it.
IN_MEMORY_FEATURE_COPIES = 4
# Of the memory left once the model is loaded: what the in-memory samples may take, and what a
# streaming method may hold for one batch; the rest is headroom (allocator, fit state, reports).
SAMPLE_SHARE, BATCH_SHARE = 0.5, 0.2
# A streaming method's batch when no budget is set.
DEFAULT_BATCH_BYTES = 256 << 20
# The held-out sample's share of the sampled rows (the fit reports' data).
TEST_SHARE = 0.2
# Held-out examples kept in memory when every method streams: enough for the archive's own few
# (handlers.packaging.held_out_samples keeps up to 32).
STREAMED_TEST_ROWS = 64


@dataclass
class StreamedSource:
    """``--data`` that is not an ``.npz`` and how to read it: opened once the model's preprocessing
    and labels are known (:meth:`fit_data`).

    path           : a directory of .npy files, an image folder, or a CSV/Parquet table of series
    cache_dir      : the feature cache (and a table's converted rows)
    label_column   : a table's label column
    test_fraction  : the held-out share of a folder or table without a test split
    max_memory_mib : the bound on the fitting process's memory (None: none)
    batch_size     : examples per featurization batch
    num_workers    : DataLoader workers decoding inputs
    seed           : of the split and the samples
    """

    path: str
    cache_dir: str
    label_column: str | None = None
    test_fraction: float | None = None
    max_memory_mib: int | None = None
    batch_size: int = 64
    num_workers: int = 0
    seed: int = 0

    def fit_data(self, parts: ModelParts, methods: list[str], engine: Engine, log=print) -> FitData:
        source = open_source(self.path, parts.input_spec, parts.labels, work_dir=self.cache_dir,
                             label_column=self.label_column, test_fraction=self.test_fraction, seed=self.seed)
        return streamed_fit_data(parts, source, methods, engine=engine, cache_dir=self.cache_dir,
                                 max_memory_mib=self.max_memory_mib, batch_size=self.batch_size,
                                 num_workers=self.num_workers, seed=self.seed, log=log)


@dataclass
class StreamedData:
    """The whole training set behind a :class:`~handlers.base.FitData`.

    cache       : the layer's features of both splits, by class (complete)
    train       : the training inputs by index, ``(x, y)`` (exemplar images)
    engine      : where per-class work runs (``engine.map``)
    batch_bytes : what a streaming method may hold for one batch of features
    """

    cache: FeatureCache
    train: Dataset
    engine: Engine
    batch_bytes: int


def streams(method: str) -> bool:
    """Whether the method fits from ``data.stream`` rather than rows in memory."""
    return getattr(importlib.import_module(METHODS[method].fitting_module), "STREAMS", False)


def process_rss() -> int:
    """This process's resident memory, bytes."""
    return psutil.Process().memory_info().rss


def streamed_fit_data(parts: ModelParts, source: DataSource, methods: list[str], *, engine: Engine,
                      cache_dir, max_memory_mib: int | None = None, batch_size: int = 64, num_workers: int = 0,
                      seed: int = 0, log=print) -> FitData:
    """Featurize ``source`` at ``parts``' layer into ``cache_dir`` (unless a complete cache is there) and
    return the fit data for ``methods`` within ``max_memory_mib`` (None: no bound, no sampling).

    Raises
    ------
    ValueError
        If the budget is below what the process already holds.
    """
    key = cache_key(source.fingerprint, parts.layer, parts.weights_sha256, parts.feature_shape)
    cache = FeatureCache.open(cache_dir, key, source.labels, parts.num_classes)
    if cache.complete:
        log(f"reusing the complete feature cache {cache.directory}")
    else:
        log(f"featurizing {source.description} into {cache.directory}")
        for split, dataset in (("train", source.train), ("test", source.test)):
            engine.featurize(parts, dataset, cache, split, batch_size=batch_size, num_workers=num_workers)
        cache.mark_complete()

    n_train, n_test = len(source.labels["train"]), len(source.labels["test"])
    in_memory = [m for m in methods if not streams(m)]
    test_cap = n_test if in_memory else min(n_test, STREAMED_TEST_ROWS)
    if max_memory_mib is None:
        sample = None
        train_rows = n_train if in_memory else 0
        test_rows, batch_bytes = test_cap, DEFAULT_BATCH_BYTES
    else:
        held = process_rss()
        available = max_memory_mib * 2 ** 20 - held
        if available <= 0:
            raise ValueError(f"--max-memory-mib {max_memory_mib} is below what the process already holds "
                             f"({held / 2 ** 20:.0f} MiB: the libraries and the model)")
        row_bytes = 4 * (math.prod(parts.input_spec.shape) + IN_MEMORY_FEATURE_COPIES * math.prod(parts.feature_shape))
        rows = max(2, int(available * SAMPLE_SHARE // row_bytes))
        test_rows = min(test_cap, max(1, int(rows * TEST_SHARE)))
        train_rows = min(n_train, rows - test_rows) if in_memory else 0
        batch_bytes = int(available * BATCH_SHARE)
        sample = {"n": train_rows, "of": n_train, "test_n": test_rows, "test_of": n_test, "seed": seed,
                  "max_memory_mib": max_memory_mib}
        log(f"memory: {held / 2 ** 20:.0f} MiB held of {max_memory_mib} MiB; in-memory samples of about {train_rows} "
            f"of {n_train} training and {test_rows} of {n_test} held-out examples (seed {seed}); batches of "
            f"{batch_bytes / 2 ** 20:.1f} MiB")
    generator = torch.Generator().manual_seed(seed)
    train_index = _stratified(source.labels["train"], train_rows, generator) if train_rows else np.arange(0)
    test_index = _stratified(source.labels["test"], test_rows, generator)
    if sample is not None:
        sample.update(n=len(train_index), test_n=len(test_index))
    x_train, y_train = _load(source.train, train_index, parts, batch_size, num_workers, "load train sample")
    x_test, y_test = _load(source.test, test_index, parts, batch_size, num_workers, "load test sample")
    return FitData(x_train, y_train, x_test, y_test, sample=sample,
                   stream=StreamedData(cache, source.train, engine, batch_bytes))


def _stratified(labels: np.ndarray, n: int, generator: torch.Generator) -> np.ndarray:
    """About ``n`` indices into ``labels``, sorted: a uniform sample of each class in proportion to its
    size, at least one of every class present (a small uniform sample could miss a class, which the
    per-class fits refuse); all of them when ``n`` is."""
    if n >= len(labels):
        return np.arange(len(labels))
    chosen = []
    for c, count in enumerate(np.bincount(labels).tolist()):
        if count:
            members = np.flatnonzero(labels == c)
            take = min(count, max(1, round(count * n / len(labels))))
            chosen.append(members[torch.randperm(count, generator=generator)[:take].numpy()])
    return np.sort(np.concatenate(chosen))


def _load(dataset: Dataset, index: np.ndarray, parts: ModelParts, batch_size: int, num_workers: int,
          desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The examples ``index`` of ``dataset`` as tensors (N, *input_shape) float32 and (N,) int64."""
    x = torch.empty(len(index), *parts.input_spec.shape)
    y = torch.empty(len(index), dtype=torch.int64)
    if len(index):
        loader = DataLoader(Subset(dataset, index.tolist()), batch_size=batch_size, num_workers=num_workers)
        start = 0
        with progress(len(index), desc) as bar:
            for xb, yb in loader:
                x[start:start + len(xb)], y[start:start + len(xb)] = xb, yb
                start += len(xb)
                bar.update(len(xb))
    return x, y
