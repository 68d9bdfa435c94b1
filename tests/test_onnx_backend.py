"""The ONNX Runtime backend gives the torch backend's results within 1e-4, and says where it runs."""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path

import pytest
import torch

from conftest import RunningServer, rewrite_archive
from handlers.archive import read_archive, write_archive
from handlers.errors import ArchiveError
from handlers.onnx_backend import choose_providers
from handlers.runtime import ExplainItem, ModelRuntime


@pytest.fixture(scope="module")
def onnx_store(demo_store, tmp_path_factory):
    """A model store holding the demo MNIST archive again, preferring ONNX Runtime."""
    archive = read_archive(demo_store / "mnist-1.psar")
    store = tmp_path_factory.mktemp("onnx")
    write_archive(store, "mnist", "1", archive.parts, list(archive.methods.values()),
                  default_method=archive.default_method, backend="onnx")
    return store


@pytest.fixture(scope="module")
def onnx_archive(onnx_store):
    return read_archive(onnx_store / "mnist-1.psar")


def test_onnx_and_torch_backends_agree(onnx_archive, mnist_split):
    x = mnist_split["x_test"][:16]
    torch_model = ModelRuntime(onnx_archive, backend="torch")
    onnx_model = ModelRuntime(onnx_archive)  # the archive prefers ONNX
    assert onnx_model.backend == "onnx" and torch_model.backend == "torch"
    assert torch.allclose(onnx_model.predict(x), torch_model.predict(x), atol=1e-4)
    items = [ExplainItem(x[i], None, [[0, 4]]) for i in range(len(x))]
    for method in onnx_model.explainers:
        _, a, _ = onnx_model.explain(method, items, "feature_grid")
        _, b, _ = torch_model.explain(method, items, "feature_grid")
        for field in ("contribution", "weight", "residual_contribution", "residual_share", "intervened_logits"):
            assert torch.allclose(getattr(a, field), getattr(b, field), atol=1e-4), (method, field)


def test_onnx_backend_needs_onnx_parts(demo_store):
    with pytest.raises(ArchiveError, match="no ONNX parts"):
        ModelRuntime(read_archive(demo_store / "mnist-1.psar"), backend="onnx")


def test_the_cuda_provider_is_chosen_when_onnx_runtime_has_it(caplog):
    gpu_build = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    cpu_build = ["AzureExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(torch.device("cuda:1"), gpu_build) == [("CUDAExecutionProvider", {"device_id": 1}),
                                                                   "CPUExecutionProvider"]
    assert choose_providers(torch.device("cuda"), gpu_build)[0] == ("CUDAExecutionProvider", {"device_id": 0})
    assert choose_providers(torch.device("cpu"), gpu_build) == ["CPUExecutionProvider"]
    with caplog.at_level(logging.WARNING, logger="handlers.onnx_backend"):
        assert choose_providers(torch.device("cuda:0"), cpu_build) == ["CPUExecutionProvider"]
    assert [r.getMessage() for r in caplog.records] == [
        "ONNX Runtime has no CUDAExecutionProvider (available: AzureExecutionProvider, CPUExecutionProvider): the "
        "forward pass runs on the CPU; install protoserve[gpu] (onnxruntime-gpu) to run it on cuda:0"]


def test_the_onnx_backend_logs_the_provider_it_runs_on(onnx_archive, caplog):
    with caplog.at_level(logging.INFO, logger="handlers.onnx_backend"):
        served = ModelRuntime(onnx_archive)
    assert served.execution_provider == "CPUExecutionProvider"
    assert [r.getMessage() for r in caplog.records if r.name == "handlers.onnx_backend"] == [
        "ONNX Runtime runs a part on CPUExecutionProvider (device cpu, chosen CPUExecutionProvider)"] * 2


def test_get_model_names_the_backend_and_where_it_runs(onnx_store, client):
    from protoserve_client import ExplainerClient
    from server.settings import Settings

    torch_info = client.get_model("mnist")
    assert (torch_info.backend, torch_info.execution_provider) == ("torch", "cpu")
    running = RunningServer(Settings(model_store=onnx_store, port=0, metrics_port=0))
    try:
        with ExplainerClient(running.address, timeout=30) as onnx_client:
            onnx_info = onnx_client.get_model("mnist")
            listed = onnx_client.list_models().models[0]
    finally:
        running.stop()
    assert (onnx_info.backend, onnx_info.execution_provider) == ("onnxruntime", "CPUExecutionProvider")
    assert (listed.backend, listed.execution_provider) == ("onnxruntime", "CPUExecutionProvider")


def test_the_gpu_extra_is_the_cpu_one_built_for_cuda_and_the_image_installs_it():
    root = Path(__file__).resolve().parent.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert extras["cpu"] == ["onnxruntime==1.31.1"] and extras["gpu"] == ["onnxruntime-gpu==1.31.1"]
    # Both provide the module onnxruntime: a plain dependency on one would clash with the other.
    assert not [d for d in project["dependencies"] if d.startswith("onnxruntime")]
    assert '".[test,cpu]"' in (root / "Makefile").read_text()
    assert '".[gpu]"' in (root / "Dockerfile").read_text()


def _external(tensor, location: str) -> None:
    """Make ``tensor`` read its data from file ``location`` (ONNX external data)."""
    from onnx import TensorProto

    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "4")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _in_subgraph(model, location: str) -> None:
    """Add a node whose subgraph holds a constant read from file ``location``."""
    from onnx import TensorProto, helper

    constant = helper.make_tensor("hidden", TensorProto.FLOAT, [1], [0.0])
    _external(constant, location)
    branch = helper.make_graph([helper.make_node("Constant", [], ["c"], value=constant)], "branch", [],
                               [helper.make_tensor_value_info("c", TensorProto.FLOAT, [1])])
    model.graph.node.append(helper.make_node("If", ["cond"], ["unused"], then_branch=branch, else_branch=branch))


@pytest.mark.parametrize("plant, tensor", [
    (lambda model, location: _external(model.graph.initializer[0], location), None),
    (_in_subgraph, "hidden"),
])
def test_an_onnx_part_reading_external_data_is_refused(onnx_store, tmp_path, monkeypatch, plant, tensor):
    """ONNX Runtime would read the file, relative to the server's working directory, into the weights."""
    import onnx

    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"1234" * 1024)
    monkeypatch.chdir(tmp_path)
    names = {}

    def edit(members, manifest):
        model = onnx.ModelProto.FromString(members["model/upstream.onnx"])
        names["tensor"] = tensor or model.graph.initializer[0].name
        plant(model, secret.name)
        members["model/upstream.onnx"] = model.SerializeToString()

    bad = rewrite_archive(onnx_store / "mnist-1.psar", tmp_path / "external.psar", edit)
    with pytest.raises(ArchiveError, match=rf"model/upstream.onnx: tensor '{names['tensor']}' keeps its data outside "
                                           r"the archive \(ONNX external data\)"):
        read_archive(bad)


def test_onnx_parts_that_compute_something_else_are_refused(onnx_store, tmp_path):
    """The weight hash binds the torch parts; the ONNX parts are run against them at load."""
    import onnx
    from onnx import numpy_helper

    def edit(members, manifest):
        model = onnx.ModelProto.FromString(members["model/downstream.onnx"])
        weight = max(model.graph.initializer, key=lambda t: numpy_helper.to_array(t).size)
        weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 2, weight.name))
        members["model/downstream.onnx"] = model.SerializeToString()

    archive = read_archive(rewrite_archive(onnx_store / "mnist-1.psar", tmp_path / "other.psar", edit))
    with pytest.raises(ArchiveError, match=r"mnist-1: the ONNX downstream part differs from the torch part by [\d.e+-]+, "
                                           r"more than 0.01 of its largest magnitude"):
        ModelRuntime(archive)
