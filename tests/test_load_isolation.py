"""Loading the model store: whatever is wrong with one archive refuses that archive alone.

The hostile archives below are written as an attacker would: every checksum recomputed, so
only the content is wrong. The server starts, the good archives serve, and each refusal is
logged and kept in ``ModelRegistry.load_errors``.
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import RunningServer, free_port, fully_connected_problem, rewrite_archive
from protoserve_client import ExplainerClient
from torch import nn

from handlers.archive import write_archive
from handlers.base import FitData
from handlers.model import InputSpec, ModelParts
from handlers.packaging import fit_methods, held_out_samples
from server.settings import Settings


class _TinyCNN(nn.Module):
    """conv 1->4 channels, ReLU (the explained layer), average pool, linear: 8x8 inputs, 3 classes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


def _cnn_archive(directory: Path) -> Path:
    torch.manual_seed(0)
    parts = ModelParts.from_model(_TinyCNN(), "relu", InputSpec(shape=[1, 8, 8]), ["a", "b", "c"])
    x = torch.rand(90, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(90) % 3
    data = FitData(x[:60], y[:60], x[60:], y[60:])
    fitted = fit_methods(parts, data, {"protonmf": {"n_prototypes": 2, "max_iter": 50}}, log=lambda _: None)
    return write_archive(directory, "cnn", "1", parts, fitted, samples=held_out_samples(data))


def _mlp_archive(directory: Path, name: str) -> Path:
    parts, data = fully_connected_problem(200, 60)
    fitted = fit_methods(parts, data, {"protonmf": {"n_prototypes": 2, "max_iter": 50}}, log=lambda _: None)
    return write_archive(directory, name, "1", parts, fitted, samples=held_out_samples(data))


def _renamed(name: str, edit):
    def both(members, manifest):
        manifest["name"] = name
        edit(members, manifest)
    return both


def _wrong_factors(members, manifest):
    from safetensors.torch import load, save

    factors = load(members["methods/protonmf/factors.safetensors"])
    factors["prototypes_"] = torch.rand(3, 2, 17)  # 17 channels; the layer has 16
    members["methods/protonmf/factors.safetensors"] = save(factors)


# file name -> what its refusal must say
REFUSALS = {
    "shape-1.psar": "does not take inputs of the manifest's shape [1, 13]",
    "channels-1.psar": "does not take inputs of the manifest's shape [3, 8, 8]",
    "labels-1.psar": "logits of shape [3] for the manifest's 4 labels",
    "factors-1.psar": "method 'protonmf' does not fit the model",
    "listed-1.psar": "manifest.json holds a list",
    "garbage-1.psar": "not a readable archive",
    "dup-1.psar": "model 'dup' version '1' is in two archives, dup-1.psar and dup-copy.psar",
    "dup-copy.psar": "model 'dup' version '1' is in two archives, dup-1.psar and dup-copy.psar",
}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("isolation-store")
    work = tmp_path_factory.mktemp("isolation-work")
    mlp = _mlp_archive(store, "good")
    cnn = _cnn_archive(store)
    rewrite_archive(mlp, store / "shape-1.psar", _renamed("shape", lambda m, man: man["input"].update(shape=[1, 13])))
    rewrite_archive(cnn, store / "channels-1.psar",
             _renamed("channels", lambda m, man: man["input"].update(shape=[3, 8, 8])))
    rewrite_archive(mlp, store / "labels-1.psar", _renamed("labels", lambda m, man: man["labels"].append("d")))
    rewrite_archive(mlp, store / "factors-1.psar", _renamed("factors", _wrong_factors))
    with zipfile.ZipFile(store / "listed-1.psar", "w") as zf:
        zf.writestr("manifest.json", "[]")
    (store / "garbage-1.psar").write_bytes(b"PK\x03\x04" + bytes(100))
    dup = _mlp_archive(work, "dup")
    shutil.copy(dup, store / "dup-1.psar")
    shutil.copy(dup, store / "dup-copy.psar")
    return store


@pytest.fixture(scope="module")
def server(store):
    running = RunningServer(Settings(model_store=store, port=0, metrics_port=free_port()))
    yield running
    running.stop()


def test_each_bad_archive_is_refused_alone_and_the_good_ones_serve(server):
    registry = server.app.registry
    assert sorted(registry.models) == ["cnn", "good"]
    assert set(registry.load_errors) == set(REFUSALS)
    for file_name, message in REFUSALS.items():
        assert message in registry.load_errors[file_name], (file_name, registry.load_errors[file_name])
    with ExplainerClient(server.address, timeout=30) as client:
        assert [m.name for m in client.list_models().models] == ["cnn", "good"]
        x = np.linspace(-1, 1, 12, dtype=np.float32).reshape(1, 12)
        answer = client.explain(x, model="good")
        assert answer.additive and len(answer.components) == 2
        assert client.explain(np.full((1, 8, 8), 0.5, np.float32), model="cnn").additive


def test_refusals_are_logged_with_their_reasons(store, caplog):
    from server.metrics import Metrics
    from server.registry import ModelRegistry

    registry = ModelRegistry(Settings(model_store=store), Metrics())
    with caplog.at_level("ERROR", logger="server.registry"):
        registry.load_store(torch.device("cpu"))
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for file_name, message in REFUSALS.items():
        assert f"refusing {file_name}: " in logged and message in logged
    assert sorted(registry.models) == ["cnn", "good"]


def test_versions_are_ordered_numerically_and_the_newest_answers_by_default(tmp_path):
    from handlers.errors import NotFoundError
    from server.metrics import Metrics
    from server.registry import ModelRegistry

    parts, data = fully_connected_problem(200, 60)
    fitted = fit_methods(parts, data, {"protonmf": {"n_prototypes": 2, "max_iter": 50}}, log=lambda _: None)
    for version in ("9", "10", "2", "1.10", "1.9"):  # "10" after "9": numeric parts compare as numbers
        write_archive(tmp_path, "mlp", version, parts, fitted)
    registry = ModelRegistry(Settings(model_store=tmp_path), Metrics())
    registry.load_store(torch.device("cpu"))
    assert list(registry.models["mlp"]) == ["1.9", "1.10", "2", "9", "10"]
    assert registry.get("mlp").runtime.version == "10"
    assert registry.get("mlp", "9").runtime.version == "9"
    assert [model.runtime.version for model in registry.all()] == ["1.9", "1.10", "2", "9", "10"]
    with pytest.raises(NotFoundError, match="known: 1.9, 1.10, 2, 9, 10"):
        registry.get("mlp", "3")
