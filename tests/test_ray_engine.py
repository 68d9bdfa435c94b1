"""The Ray engine against the in-process one, on a real local Ray (2 CPUs): the same features,
the same task results, the same fits."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from test_fit_data import (  # noqa: F401 (fixture)
    PROTONMF,
    SRAE,
    assert_contract,
    assert_same_archive,
    package,
    work,
)
from torch.utils.data import TensorDataset

from handlers.fitting.engine import LocalEngine, make_engine
from handlers.fitting.feature_cache import FeatureCache, cache_key

ray = pytest.importorskip("ray", reason="ray is in the test extra; install it to run the Ray engine's tests")


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray of 2 CPUs for this module (the engine uses a Ray already started)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    # Ray's workers cannot import a test module by name: its functions travel by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()


def _features(engine, parts, x, y, directory) -> FeatureCache:
    key = cache_key("test", "layer", parts.weights_sha256, list(parts.feature_shape))
    cache = FeatureCache.open(directory, key, {"train": y.numpy()}, parts.num_classes)
    engine.featurize(parts, TensorDataset(x, y), cache, "train", batch_size=48, num_workers=0)
    cache.mark_complete()  # refuses a cache with a row left unwritten
    return cache


def test_featurize_gives_the_local_engines_features(local_ray, mnist_parts, mnist_fit_data, tmp_path):
    """Every row of every class, written by Ray actors in whatever order batches finish, equals the
    in-process engine's (same code, same float32 inputs: float rounding only)."""
    x, y = mnist_fit_data.x_train[:300], mnist_fit_data.y_train[:300]
    by_ray = _features(make_engine("ray"), mnist_parts, x, y, tmp_path / "ray")
    local = _features(LocalEngine(torch.device("cpu")), mnist_parts, x, y, tmp_path / "local")
    expected = mnist_parts.features(x).numpy()
    for c in range(mnist_parts.num_classes):
        n = local.count("train", c)
        assert n == by_ray.count("train", c) and n == int((y == c).sum())
        np.testing.assert_array_equal(by_ray.indices("train", c), local.indices("train", c))
        np.testing.assert_allclose(by_ray.read("train", c, 0, n), local.read("train", c, 0, n), rtol=0, atol=1e-5)
        np.testing.assert_allclose(local.read("train", c, 0, n), expected[local.indices("train", c)],
                                   rtol=0, atol=1e-5)


def _square_sum(item: tuple[int, np.ndarray]) -> tuple[int, float]:
    label, values = item
    return label, float(np.square(values).sum())


def test_map_runs_tasks_and_keeps_the_items_order(local_ray):
    items = [(i, np.arange(i * 1000, dtype=np.float64)) for i in range(7, 0, -1)]  # the slowest first
    assert make_engine("ray").map(_square_sum, items) == LocalEngine().map(_square_sum, items) \
        == [(i, float(np.square(np.arange(i * 1000, dtype=np.float64)).sum())) for i in range(7, 0, -1)]


def test_package_with_the_ray_engine_gives_the_local_engines_archive(local_ray, work, tmp_path):
    """`protoserve package --engine ray` of an ImageFolder of MNIST PNGs (features by Ray Data actors,
    fits and ProtoNMF's per-class fits as Ray tasks) writes the archive `--engine local` writes, and it
    serves with the contract's invariants."""
    archives = {}
    for engine in ("local", "ray"):
        assert package(work, work / "digits", tmp_path / engine, *PROTONMF, *SRAE, "--engine", engine,
                       "--cache-dir", str(tmp_path / f"cache-{engine}")) == 0
        archives[engine] = tmp_path / engine / "digits-1.psar"
    assert_same_archive(archives["ray"], archives["local"])
    assert_contract(archives["ray"])
