"""Offline: the fit's work on a Ray cluster (``--engine ray``), the same two calls as
:class:`handlers.fitting.engine.LocalEngine`.

* ``featurize``: a Ray Data pipeline over the example indices. Actors (one GPU each where the
  cluster has GPUs) hold the upstream part and the dataset, decode and preprocess a batch of
  examples and compute its features; the driver streams the finished batches into the feature
  cache. Ray Data's streaming executor applies backpressure, so the driver holds a few batches,
  never the split.
* ``map``: each item is a Ray task (results in the items' order); per-method and per-class fits.

Where the work runs is all that changes: the actors and tasks run the same code as the local
engine, on the same float32 inputs, so features agree to float rounding and fits to the
tolerance ``tests/test_ray_engine.py`` states. On a cluster of several machines the data
source's files and ``--cache-dir`` must be on storage every node reads (docs/deploy.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

import numpy as np
import ray
import torch
from torch.utils.data import Dataset, default_collate

from handlers.fitting.engine import progress, upstream_on
from handlers.fitting.feature_cache import FeatureCache
from handlers.model import ModelParts

T = TypeVar("T")
R = TypeVar("R")

# Batches a featurizing actor may have queued ahead of the driver: bounds the object store's share.
ACTOR_QUEUE = 2


class _Featurizer:
    """A Ray Data actor: example indices in, ``{"index", "features"}`` out.

    upstream : the model up to the explained layer, (B, *input_shape) -> (B, *feature_shape)
    dataset  : map-style, ``dataset[i] = (x, y)``
    """

    def __init__(self, upstream: torch.nn.Module, dataset: Dataset, use_gpu: bool):
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.upstream = upstream.to(self.device).eval()
        self.dataset = dataset

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        index = batch["id"]
        x, _ = default_collate([self.dataset[int(i)] for i in index])
        with torch.inference_mode():
            features = self.upstream(x.to(self.device)).float().cpu().numpy()
        return {"index": index, "features": features}


class RayEngine:
    """The fit's work on a Ray cluster.

    Parameters
    ----------
    address : str, optional
        The cluster (``ray://host:10001``, ``host:6379`` or ``auto``); None starts a local Ray on
        this machine. A Ray already initialised in this process is used as it is.
    num_actors : int, optional
        Featurizing actors; default: one per GPU where the cluster has GPUs, else one per two CPUs.
    """

    name = "ray"

    def __init__(self, address: str | None = None, num_actors: int | None = None):
        self.address = address
        self.num_actors = num_actors

    def _connect(self) -> None:
        # Lazily, and not in __init__: the engine travels to tasks inside fit data, where Ray runs.
        if not ray.is_initialized():
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False  # ours shows rate and ETA

    def featurize(self, parts: ModelParts, dataset: Dataset, cache: FeatureCache, split: str, *,
                  batch_size: int, num_workers: int) -> None:
        # num_workers is the local engine's decoding processes; here the actors decode.
        self._connect()
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        actors = self.num_actors or (gpus if gpus else max(1, int(resources.get("CPU", 1)) // 2))
        upstream = upstream_on(parts, torch.device("cpu"))
        featurized = ray.data.range(len(dataset)).map_batches(
            _Featurizer, fn_constructor_kwargs={"upstream": upstream, "dataset": dataset, "use_gpu": gpus > 0},
            batch_size=batch_size, batch_format="numpy", num_gpus=1 if gpus else 0,
            compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=ACTOR_QUEUE))
        with progress(len(dataset), f"featurize {split} (ray, {actors} actors)") as bar:
            for batch in featurized.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
                cache.write(split, batch["index"], batch["features"])
                bar.update(len(batch["index"]))

    def map(self, fn: Callable[[T], R], items: Iterable[T], *, desc: str = "") -> list[R]:
        self._connect()
        task = ray.remote(fn)
        refs = [task.remote(item) for item in items]
        with progress(len(refs), f"{desc or getattr(fn, '__name__', 'map')} (ray)", unit="task") as bar:
            waiting = list(refs)
            while waiting:
                done, waiting = ray.wait(waiting, num_returns=1)
                bar.update(len(done))
        return ray.get(refs)
