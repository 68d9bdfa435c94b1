"""A hostile archive author's graph: code in every string field, correct checksums, nothing runs.

torch.fx's code generation pastes a placeholder's target and the keys of a node's kwargs into
the ``forward`` it writes and executes. Archives are now run by an interpreter over an
allow-list, and every string of a stored graph is checked before anything is built: each
payload below must be refused with a clear message, and its marker file must never appear,
neither at load nor when the server starts on a store holding it (the good archive beside it
still serves).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import RunningServer, fully_connected_problem, rewrite_archive

from handlers.archive import read_archive, write_archive
from handlers.errors import ArchiveError
from handlers.explainers.protonmf import ProtoNMFConfig
from handlers.fitting import protonmf
from handlers.graph_program import UnsafeGraphError, dump_graph_module, load_graph_module, split


@pytest.fixture(scope="module")
def good_archive(tmp_path_factory) -> Path:
    parts, data = fully_connected_problem(60, 30)
    fitted = protonmf.fit(parts, data, ProtoNMFConfig(n_prototypes=2))
    return write_archive(tmp_path_factory.mktemp("good"), "mlp", "1", parts, [fitted])


def _code(marker: Path) -> str:
    """Python that, if it ever ran, would create ``marker``."""
    return f"__import__('pathlib').Path({str(marker)!r}).write_text('ran')"


def _first(graph: dict, op: str) -> dict:
    return next(node for node in graph["nodes"] if node["op"] == op)


# Each plants a payload into one string field of the downstream graph (which reads the
# features as the placeholder `features`, calls the module `fc2`, and returns its output).
def _placeholder_target(graph, code):
    _first(graph, "placeholder")["target"] = f"features=({code})"


def _node_name(graph, code):
    node = _first(graph, "call_module")
    old, node["name"] = node["name"], f"fc2 = {code}; fc2"
    for other in graph["nodes"]:
        if other["args"] == {"tuple": [{"node": old}]}:
            other["args"] = {"tuple": [{"node": node["name"]}]}


def _kwargs_key(graph, code):
    _first(graph, "call_module")["kwargs"] = {"dict": {f"x=({code}),y": 1}}


def _kwargs_value(graph, code):
    node = _first(graph, "call_module")
    node["op"], node["target"] = "call_function", "torch.nn.functional.gelu"
    node["kwargs"] = {"dict": {"approximate": code}}


def _module_path(graph, code):
    path = f'fc2"); {code}; ("'
    graph["modules"][path] = graph["modules"].pop("fc2")
    _first(graph, "call_module")["target"] = path


def _call_target(graph, code):
    _first(graph, "call_module")["target"] = f"fc2({code})"


def _function_target(graph, code):
    node = _first(graph, "call_module")
    node["op"], node["target"] = "call_function", f"builtins.exec;{code}"


def _method_target(graph, code):
    node = _first(graph, "call_module")
    node["op"], node["target"] = "call_method", "__reduce_ex__"


def _module_type(graph, code):
    graph["modules"]["fc2"]["type"] = f"Linear;{code}"


def _module_kwargs_key(graph, code):
    graph["modules"]["fc2"]["kwargs"][f"bias=({code})"] = True


def _module_kwargs_value(graph, code):
    graph["modules"]["fc2"]["kwargs"]["bias"] = code


def _get_attr_target(graph, code):
    node = _first(graph, "call_module")
    node["op"], node["target"], node["args"] = "get_attr", f"fc2.weight;{code}", {"tuple": []}


def _argument_reference(graph, code):
    _first(graph, "call_module")["args"] = {"tuple": [{"node": code}]}


def _dtype_tag(graph, code):
    _first(graph, "call_module")["args"] = {"tuple": [{"node": "features"}, {"dtype": code}]}


def _argument_tag(graph, code):
    _first(graph, "call_module")["args"] = {"tuple": [{"__reduce__": code}]}


PAYLOADS = {
    "placeholder target": (_placeholder_target, "input"),
    "node name": (_node_name, "not an identifier"),
    "kwargs key": (_kwargs_key, "identifier"),
    "kwargs value": (_kwargs_value, "not a short identifier"),
    "module path": (_module_path, "not a dotted path"),
    "call_module target": (_call_target, "not a dotted path|undeclared module"),
    "function target": (_function_target, "not allowed"),
    "method target": (_method_target, "not allowed"),
    "module type": (_module_type, "not allowed"),
    "module kwargs key": (_module_kwargs_key, "takes no argument"),
    "module kwargs value": (_module_kwargs_value, "not a short identifier"),
    "get_attr target": (_get_attr_target, "not a dotted path"),
    "argument reference": (_argument_reference, "unknown or later node"),
    "dtype": (_dtype_tag, "dtype"),
    "argument tag": (_argument_tag, "unknown argument encoding"),
}


def _poison(src: Path, dst: Path, plant, code: str) -> Path:
    """A copy of ``src`` whose downstream graph carries ``code``, every checksum made right."""
    def edit(members, manifest):
        graph = json.loads(members["model/downstream.graph.json"])
        plant(graph, code)
        members["model/downstream.graph.json"] = json.dumps(graph).encode()
    return rewrite_archive(src, dst, edit)


@pytest.mark.parametrize("field", sorted(PAYLOADS))
def test_a_payload_in_any_string_of_the_graph_is_refused_and_never_runs(field, good_archive, tmp_path):
    plant, message = PAYLOADS[field]
    marker = tmp_path / "marker"
    bad = _poison(good_archive, tmp_path / "bad.psar", plant, _code(marker))
    with pytest.raises(ArchiveError, match=message):
        read_archive(bad)
    assert not marker.exists()


def test_the_server_refuses_every_poisoned_archive_and_serves_the_good_one(good_archive, tmp_path):
    from protoserve_client import ExplainerClient

    from server.settings import Settings

    store = tmp_path / "store"
    store.mkdir()
    (store / good_archive.name).write_bytes(good_archive.read_bytes())
    markers = []
    for i, field in enumerate(sorted(PAYLOADS)):
        markers.append(tmp_path / f"marker-{i}")
        _poison(good_archive, store / f"bad{i}-1.psar", PAYLOADS[field][0], _code(markers[-1]))
    running = RunningServer(Settings(model_store=store, port=0, metrics_port=0))
    try:
        assert sorted(running.app.registry.load_errors) == sorted(f"bad{i}-1.psar" for i in range(len(PAYLOADS)))
        with ExplainerClient(running.address, timeout=30) as client:
            response = client.explain(torch.randn(1, 12).numpy(), model="mlp")
            assert response.model == "mlp"
            assert [m.name for m in client.list_models().models] == ["mlp"]
    finally:
        running.stop()
    assert not any(marker.exists() for marker in markers)


def test_the_interpreter_computes_what_the_model_computes():
    parts, _ = fully_connected_problem(4, 4)
    x = torch.randn(5, 1, 12)
    up, down = load_graph_module(*dump_graph_module(parts.upstream)), load_graph_module(
        *dump_graph_module(parts.downstream))
    with torch.inference_mode():
        assert torch.equal(down(up(x)), parts.downstream(parts.upstream(x)))


def test_a_module_named_like_the_interpreters_own_attribute_is_refused():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.program = torch.nn.Linear(3, 3)
            self.head = torch.nn.Linear(3, 2)

        def forward(self, x):
            return self.head(torch.relu(self.program(x)))

    with pytest.raises(UnsafeGraphError, match="may not be named 'program'"):
        split(Net().eval(), "relu")


def test_a_graph_with_too_many_nodes_is_refused_before_building():
    graph = {"format_version": 1, "modules": {},
             "nodes": [{"name": f"n{i}", "op": "placeholder", "target": "x", "args": [], "kwargs": {}}
                       for i in range(20_001)]}
    with pytest.raises(UnsafeGraphError, match="more than 20000"):
        load_graph_module(json.dumps(graph).encode(), dump_graph_module(
            fully_connected_problem(4, 4)[0].downstream)[1])
