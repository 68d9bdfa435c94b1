"""Shared fixtures: the trained demo model, its data, a demo store and a live server.

The demo CNN is trained once per cache directory (``PROTOSERVE_TEST_CACHE``, default
``build/test-cache``) and reused; everything else is built in temporary directories.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from handlers.base import FitData
from handlers.model import InputSpec, ModelParts

CACHE = Path(os.environ.get("PROTOSERVE_TEST_CACHE", "build/test-cache"))


class _MLP(nn.Module):
    """A fully connected network: the layer `relu` has a 1x1 feature grid."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class SignedMLP(nn.Module):
    """A 12-16-3 MLP without a ReLU: the layer `fc1` has signed features, read by the linear head fc2."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(self.fc1(x.flatten(1)))


def fully_connected_problem(n_train: int, n_test: int, layer: str = "relu") -> tuple[ModelParts, FitData]:
    """An untrained 12-16-3 MLP split at its hidden ReLU (or at ``fc1``, before it), and 3-class
    data (seed 0 for both)."""
    torch.manual_seed(0)
    parts = ModelParts.from_model(_MLP(), layer, InputSpec(shape=[1, 12]), ["a", "b", "c"])
    x = torch.randn(n_train + n_test, 1, 12, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0, :4].sum(1) > 0).long() + (x[:, 0, 4:8].sum(1) > 1).long()
    return parts, FitData(x[:n_train], y[:n_train], x[n_train:], y[n_train:])


def rewrite_archive(src: Path, dst: Path, edit) -> Path:
    """Copy an archive, letting ``edit(members, manifest)`` change it, with every sha256 recomputed
    (as a hostile author would)."""
    import hashlib
    import json
    import zipfile

    with zipfile.ZipFile(src) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    manifest = json.loads(members.pop("manifest.json"))
    edit(members, manifest)
    manifest["members"] = {k: hashlib.sha256(v).hexdigest() for k, v in members.items()}
    with zipfile.ZipFile(dst, "w") as zf:
        zf.writestr("manifest.json", json.dumps(manifest))
        for name, data in members.items():
            zf.writestr(name, data)
    return dst


@pytest.fixture(scope="session")
def mnist_split():
    from model_store.recipes.mnist import load_mnist

    return load_mnist(seed=0)


@pytest.fixture(scope="session")
def mnist_fit_data(mnist_split) -> FitData:
    s = mnist_split
    return FitData(s["x_train"], s["y_train"], s["x_test"], s["y_test"])


@pytest.fixture(scope="session")
def mnist_model():
    from model_store.build_demo import mnist_model

    CACHE.mkdir(parents=True, exist_ok=True)
    model, _ = mnist_model(CACHE)
    return model


@pytest.fixture(scope="session")
def mnist_parts(mnist_model) -> ModelParts:
    from model_store.build_demo import MNIST_INPUT
    from model_store.recipes.mnist import MNIST_LABELS, MNIST_LAYER

    return ModelParts.from_model(mnist_model, MNIST_LAYER, MNIST_INPUT, MNIST_LABELS)


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory, mnist_model) -> Path:
    """A model store with the demo archive(s), every demo method fitted."""
    from model_store.build_demo import build_demo_store

    store = tmp_path_factory.mktemp("store")
    build_demo_store(store, CACHE)
    return store


class RunningServer:
    """A real protoserve App on loopback, on its own event loop in a thread."""

    def __init__(self, settings):
        from server.app import App

        self.app = App(settings)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(self.app.start())
        self.address = f"127.0.0.1:{self.app.port}"
        self.http_address = f"127.0.0.1:{self.app.http_port}"  # when settings.http_port is set

    def call(self, coroutine, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self):
        self.call(self.app.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server(demo_store):
    from server.settings import Settings

    running = RunningServer(Settings(model_store=demo_store, port=0, metrics_port=free_port(), http_port=free_port(),
                                     max_delay_ms=1.0))
    yield running
    running.stop()


@pytest.fixture()
def client(server):
    from protoserve_client import ExplainerClient

    with ExplainerClient(server.address, timeout=30) as c:
        yield c
