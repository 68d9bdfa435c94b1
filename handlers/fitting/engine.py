"""Offline: where a fit's work runs. The in-process engine is the default; a Ray engine
(``handlers/fitting/ray_engine.py``, ``RayEngine``) implements the same two calls on a cluster.

An engine does two things for :mod:`handlers.packaging`:

* ``featurize(parts, dataset, cache, split, *, batch_size, num_workers)``: compute the explained
  layer's features of every example of ``dataset`` (a map-style torch Dataset of ``(x, y)``,
  x float32 ``(*input_shape)``, in the split's order) and store them with
  ``cache.write(split, index, features)`` (:class:`handlers.fitting.feature_cache.FeatureCache`;
  rows in any order, each index once or more). It does not mark the cache complete.
* ``map(fn, items, *, desc)``: ``[fn(item) for item in items]``. ``fn`` is a module-level
  function and every item picklable, so each call can run as a task elsewhere; results come
  back in the items' order. Per-method and per-class fits go through it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from handlers.fitting.feature_cache import FeatureCache
from handlers.model import ModelParts

T = TypeVar("T")
R = TypeVar("R")

ENGINES = ("local", "ray")


class Engine(Protocol):
    name: str

    def featurize(self, parts: ModelParts, dataset: Dataset, cache: FeatureCache, split: str, *,
                  batch_size: int, num_workers: int) -> None: ...

    def map(self, fn: Callable[[T], R], items: Iterable[T], *, desc: str = "") -> list[R]: ...


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def one_intraop_thread(_worker_id: int) -> None:
    # Decoding workers each get one intra-op thread: the forward pass keeps the cores.
    torch.set_num_threads(1)


def upstream_on(parts: ModelParts, device: torch.device) -> torch.nn.Module:
    """The upstream part on ``device`` (a copy when the parts are elsewhere, so they stay put)."""
    return parts.upstream if parts.device == device else copy.deepcopy(parts.upstream).to(device)


def progress(total: int, desc: str, unit: str = "ex") -> tqdm:
    """The progress bar every phase shows (with its rate and ETA), on stderr where it is a terminal."""
    return tqdm(total=total, desc=desc, unit=unit, disable=None, dynamic_ncols=True)


class LocalEngine:
    """Everything in this process: decoding in ``num_workers`` DataLoader workers, the forward
    pass on ``device`` (the GPU when there is one), fits one after another.

    Parameters
    ----------
    device : torch.device or str, optional
        Where featurization runs; default: CUDA when available, else the CPU.
    """

    name = "local"

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else default_device()

    def featurize(self, parts: ModelParts, dataset: Dataset, cache: FeatureCache, split: str, *,
                  batch_size: int, num_workers: int) -> None:
        upstream = upstream_on(parts, self.device)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                            worker_init_fn=one_intraop_thread if num_workers else None,
                            pin_memory=self.device.type == "cuda")
        # Disk writes overlap the next batch's forward pass; one at a time bounds what waits.
        with ThreadPoolExecutor(1) as writer, progress(len(dataset), f"featurize {split}") as bar:
            pending, start = None, 0
            for x, _ in loader:
                with torch.inference_mode():
                    features = upstream(x.to(self.device, non_blocking=True)).float().cpu().numpy()
                if pending is not None:
                    pending.result()
                pending = writer.submit(cache.write, split, np.arange(start, start + len(x)), features)
                start += len(x)
                bar.update(len(x))
            if pending is not None:
                pending.result()

    def map(self, fn: Callable[[T], R], items: Iterable[T], *, desc: str = "") -> list[R]:
        items = list(items)
        results = []
        with progress(len(items), desc or getattr(fn, "__name__", "map"), unit="task") as bar:
            for item in items:
                results.append(fn(item))
                bar.update(1)
        return results


def make_engine(name: str, *, ray_address: str | None = None) -> Engine:
    """The engine called ``name`` ("local" or "ray"); ValueError for another, or for Ray where it is not installed."""
    if name == "local":
        return LocalEngine()
    if name == "ray":
        try:
            from handlers.fitting.ray_engine import RayEngine
        except ModuleNotFoundError as error:
            if error.name != "ray":
                raise
            raise ValueError("--engine ray needs Ray: install the `ray` extra (pip install 'protoserve[ray]')") from None
        return RayEngine(address=ray_address)
    raise ValueError(f"unknown engine {name!r}; expected one of {', '.join(ENGINES)}")
