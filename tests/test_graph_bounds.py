"""A hostile archive author's graph that asks for unbounded memory or time, with allowed ops only.

Each bomb below is a few bytes of JSON that, unbounded, would take many GiB (or, for the big-int
chain, hours holding the GIL) before anything could notice. The interpreter refuses each at its
first step past a bound (see docs/limits.md, "Archives"), judged on meta tensors before the step's
memory is taken; these tests pass in seconds only because it does.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import fully_connected_problem, rewrite_archive

from handlers.archive import read_archive, write_archive
from handlers.errors import ArchiveError
from handlers.explainers.protonmf import ProtoNMFConfig
from handlers.fitting import protonmf
from handlers.graph_program import GraphLimitError, UnsafeGraphError, dump_graph_module, load_graph_module

X = {"node": "x"}


def _node(name: str, target: str, *args, op: str = "call_function", **kwargs) -> dict:
    return {"name": name, "op": op, "target": target, "args": {"tuple": list(args)}, "kwargs": {"dict": kwargs}}


def _planted(graph: dict, nodes: list[dict], modules: dict | None = None, output: list[str] = ()) -> dict:
    """``graph`` with ``nodes`` run before its output, which also returns the nodes named in ``output``."""
    out = graph["nodes"].pop()
    if output:
        out["args"] = {"tuple": [{"tuple": [out["args"]["tuple"][0], *({"node": n} for n in output)]}]}
    graph["nodes"] += [*nodes, out]
    graph["modules"].update(modules or {})
    return graph


def _method(name: str, target: str, *args, **kwargs) -> dict:
    return _node(name, target, *args, op="call_method", **kwargs)


def _program(nodes: list[dict], modules: dict | None = None, output: list[str] = (),
             weights: dict[str, torch.Tensor] | None = None):
    """The MLP's upstream, ``x (B, 1, 12) -> relu (B, 16)``, with ``nodes`` planted (and the
    planted modules' ``weights``)."""
    from safetensors.torch import load, save

    graph_json, stored = dump_graph_module(fully_connected_problem(4, 4)[0].upstream)
    graph = _planted(json.loads(graph_json), nodes, modules, output)
    return load_graph_module(json.dumps(graph).encode(), save({**load(stored), **(weights or {})}))


def _pool(output_size: int) -> dict:
    return {"pool": {"type": "AdaptiveAvgPool1d", "kwargs": {"output_size": output_size}}}


def test_an_adaptive_pool_of_600_million_outputs_is_refused_at_load():
    # Unbounded: 2.4 GB per example (19 GiB for the load-time check's batches of 8).
    with pytest.raises(UnsafeGraphError, match=r"^module 'pool' argument output_size: the integer 600000000 is "
                                               r"beyond ±16777216$"):
        _program([_node("bomb", "pool", X, op="call_module")], _pool(600_000_000))


def test_a_list_repeated_300_million_times_is_refused_at_load():
    with pytest.raises(UnsafeGraphError, match=r"^node bomb: the integer argument 300000000 is beyond ±16777216$"):
        _program([_node("bomb", "operator.mul", [0], 300_000_000)])


def test_a_list_repeated_by_an_allowed_count_is_refused_before_it_is_built():
    # Unbounded: 64 * 2**24 items, an 8 GiB list.
    program = _program([_node("bomb", "operator.mul", [0] * 64, 1 << 24)])
    with pytest.raises(GraphLimitError, match=r"^node bomb: operator.mul takes tensors and numbers only$"):
        program(torch.zeros(1, 1, 12))


def test_a_concatenation_of_4096_references_is_refused_before_it_is_made():
    # `a` is 4096 copies of x (49,152 elements per example); `b` would be 4096 copies of `a`:
    # 2**28 elements per example, 32 GiB for a batch of 32.
    program = _program([_node("a", "torch.cat", [X] * 4096, dim=1),
                        _node("b", "torch.cat", [{"node": "a"}] * 4096, dim=1)])
    with pytest.raises(GraphLimitError, match=r"^node b reads more than 67108864 tensor elements per example$"):
        program(torch.zeros(32, 1, 12))


def test_an_integer_of_4001_digits_is_refused_at_load():
    with pytest.raises(UnsafeGraphError, match=r"^node s0: the integer argument 10{79}… is beyond ±16777216$"):
        _program([_node("s0", "operator.mul", 10**4000, 10**4000)])


def test_a_squaring_chain_stops_at_its_second_step():
    # Unbounded: each squaring doubles the int; 40 of them from 2**24 would never end, holding the GIL.
    chain = [_node("s0", "operator.mul", 1 << 24, 1 << 24)]
    chain += [_node(f"s{i}", "operator.mul", {"node": f"s{i - 1}"}, {"node": f"s{i - 1}"}) for i in range(1, 40)]
    program = _program(chain)
    with pytest.raises(GraphLimitError, match=r"^node s1 makes an integer beyond ±9223372036854775808$"):
        program(torch.zeros(1, 1, 12))


def test_values_each_within_bounds_are_refused_once_the_program_would_hold_too_many():
    # Each step makes 2**24 elements per example; all are returned, so all stay held: unbounded,
    # 300 of them would be 19 GiB for one example. The fourth passes 2**26.
    nodes = [_node("p0", "pool", X, op="call_module")]
    nodes += [_node(f"p{i}", "torch.relu", {"node": "p0"}) for i in range(1, 300)]
    program = _program(nodes, _pool(1 << 24), output=[f"p{i}" for i in range(300)])
    with pytest.raises(GraphLimitError, match=r"^node p3: the program would hold more than 67108864 tensor "
                                              r"elements per example at once$"):
        program(torch.zeros(1, 1, 12))


def test_a_broadcast_outer_product_is_refused_before_it_is_made():
    # `p` is 2**20 elements per example, within bounds; `c` = a * b broadcasts to 2**40 (4 TiB per
    # example) from 2**21 read: only the shapes can tell, before the step runs.
    nodes = [_node("p", "pool", X, op="call_module"),
             _method("a", "unsqueeze", {"node": "p"}, 3), _method("b", "unsqueeze", {"node": "p"}, 2),
             _node("c", "operator.mul", {"node": "a"}, {"node": "b"})]
    program = _program(nodes, _pool(1 << 20), output=["c"])
    with pytest.raises(GraphLimitError, match=r"^node c: the program would hold more than 67108864 tensor "
                                              r"elements per example at once$"):
        program(torch.zeros(2, 1, 12))


def test_a_pool_to_a_large_output_on_many_channels_is_refused_before_it_is_made():
    # 4096 channels of 12 read; pooled to 2**24 each: 2**36 elements per example (256 GiB).
    nodes = [_node("a", "torch.cat", [X] * 4096, dim=1), _node("p", "pool", {"node": "a"}, op="call_module")]
    program = _program(nodes, _pool(1 << 24), output=["p"])
    with pytest.raises(GraphLimitError, match=r"^node p: the program would hold more than 67108864 tensor "
                                              r"elements per example at once$"):
        program(torch.zeros(1, 1, 12))


@pytest.mark.parametrize("nodes", [
    [_node("n", "torch.sum", X, dtype={"dtype": "int64"}), _node("r", "torch.reshape", X, {"tuple": [{"node": "n"}]})],
    [_node("m", "torch.sum", X, dim=1, keepdim=True, dtype={"dtype": "bool"}), _node("r", "operator.getitem", X, {"node": "m"})],
], ids=["a size read from a tensor", "a boolean mask's selection"])
def test_a_shape_that_depends_on_the_input_values_is_refused(nodes):
    program = _program(nodes, output=["r"])
    with pytest.raises(GraphLimitError, match=r"^node r: its output's shape depends on the values of its input, "
                                              r"which the interpreter cannot bound$"):
        program(torch.ones(2, 1, 12))


def test_each_input_shape_is_vetted_once_and_the_weights_are_not_copied():
    upstream = _program([])
    x = torch.randn(3, 1, 12)
    expected = upstream(x)
    assert upstream._vetted == {(torch.Size([3, 1, 12]), torch.float32, True)}
    torch.testing.assert_close(upstream(x), expected, rtol=0, atol=0)
    upstream(torch.randn(5, 1, 12))
    assert len(upstream._vetted) == 2
    twin = upstream.__dict__["_meta_twin"]
    assert {t.device.type for t in (*twin.parameters(), *twin.buffers())} == {"meta"}
    assert sorted(twin.state_dict()) == sorted(upstream.state_dict())
    assert "_meta_twin" not in dict(upstream.named_modules())


def test_a_pool_whose_kernel_would_take_hours_is_refused_before_it_runs():
    # `p` is 2**22 elements per example, within bounds; a max over 2**21 of them at each of 2**21 + 1
    # positions is 2**42 comparisons (hours of a core) with its output within bounds too.
    nodes = [_node("p", "pool", X, op="call_module"), _node("m", "slow", {"node": "p"}, op="call_module")]
    modules = {**_pool(1 << 22), "slow": {"type": "MaxPool1d", "kwargs": {"kernel_size": 1 << 21, "stride": 1}}}
    program = _program(nodes, modules, output=["m"])
    with pytest.raises(GraphLimitError, match=r"^node m: the program would take more than 68719476736 "
                                              r"multiply-adds per example$"):
        program(torch.zeros(1, 1, 12))


def _held(name: str) -> str:
    return rf"^node {name}: the program would hold more than 67108864 tensor elements per example at once$"


def test_small_views_of_released_values_count_as_the_storage_they_keep():
    # Each c_i (2**24 elements) is released once sliced, but its one-column view keeps all of it:
    # counted by the view's elements, 120 of them held 7.5 GiB.
    nodes = [_node("p", "pool", X, op="call_module"),
             _method("a", "unsqueeze", {"node": "p"}, 3), _method("b", "unsqueeze", {"node": "p"}, 2)]
    for i in range(6):
        nodes += [_node(f"c{i}", "operator.mul", {"node": "a"}, {"node": "b"}),
                  _node(f"v{i}", "operator.getitem", {"node": f"c{i}"},
                        {"tuple": [{"ellipsis": True}, {"slice": [0, 1, None]}]})]
    program = _program(nodes, _pool(1 << 12), output=[f"v{i}" for i in range(6)])
    with pytest.raises(GraphLimitError, match=_held("c3")):
        program(torch.zeros(1, 1, 12))


def test_a_batched_product_counts_its_broadcast_operands():
    # (32, 1, 1, 2**16) @ (1, 32, 2**16, 1) reads 2**22 and makes 2**10, but ATen copies both operands
    # broadcast to the (32, 32) batch: 2**27 elements.
    k = 1 << 16
    nodes = [_node("pa", "pool", X, op="call_module"), _node("a", "torch.reshape", {"node": "pa"}, {"tuple": [32, 1, 1, k]}),
             _node("pb", "pool", X, op="call_module"), _node("b", "torch.reshape", {"node": "pb"}, {"tuple": [1, 32, k, 1]}),
             _node("c", "torch.matmul", {"node": "a"}, {"node": "b"})]
    program = _program(nodes, _pool(32 * k), output=["c"])
    with pytest.raises(GraphLimitError, match=_held("c")):
        program(torch.zeros(1, 1, 12))


def test_a_convolution_counts_its_unfolded_input():
    # One 4096-wide filter over 2**15 positions of a zero-padded 12-value input: 2**27 multiply-adds,
    # within their bound, but ATen's kernel for it unfolds the input to 2**27 elements first.
    nodes = [_node("c", "conv", X, op="call_module")]
    conv = {"conv": {"type": "Conv1d", "kwargs": {"in_channels": 1, "out_channels": 1, "kernel_size": 4096,
                                                  "padding": 1 << 14, "bias": False}}}
    program = _program(nodes, conv, output=["c"], weights={"conv.weight": torch.zeros(1, 1, 4096)})
    with pytest.raises(GraphLimitError, match=_held("c")):
        program(torch.zeros(1, 1, 12))


def test_a_run_recorded_for_autograd_keeps_every_value():
    # Each sigmoid releases its input, but autograd keeps it for the backward pass (the Grad-CAM
    # downstream runs so): five values of 2**24 are held at once, not two.
    nodes = [_node("s0", "pool", X, op="call_module")]
    nodes += [_node(f"s{i}", "torch.sigmoid", {"node": f"s{i - 1}"}) for i in range(1, 5)]
    nodes.append(_node("total", "torch.sum", {"node": "s4"}))
    program = _program(nodes, _pool(1 << 24), output=["total"])
    with torch.no_grad():
        program(torch.zeros(1, 1, 12))
    with torch.enable_grad(), pytest.raises(GraphLimitError, match=_held("s3")):
        program(torch.zeros(1, 1, 12, requires_grad=True))


def test_lists_of_shared_lists_are_refused_before_they_are_walked():
    # l2 is 4096 references to one 4096-item list: the checks would visit 2**24 items (20 s), a
    # third level 2**36.
    everything = {"slice": [None, None, None]}
    nodes = [_node("l1", "operator.getitem", [0] * 4096, everything),
             _node("l2", "operator.getitem", [{"node": "l1"}] * 4096, everything),
             _node("first", "operator.getitem", {"node": "l2"}, 0)]
    program = _program(nodes, output=["first"])
    with pytest.raises(GraphLimitError, match=r"^node l2: the program would read or make more than 1048576 values$"):
        program(torch.zeros(1, 1, 12))


def test_many_steps_of_shared_lists_are_refused_before_they_are_walked():
    # Each step reads 15 references to one 4096-item list (61 440 values): 2000 of them took the
    # checks 31 s, the real run 0.01 s.
    everything = {"slice": [None, None, None]}
    nodes = [_node("l1", "operator.getitem", [0] * 4096, everything)]
    nodes += [_node(f"g{i}", "operator.getitem", [{"node": "l1"}] * 15, 0) for i in range(20)]
    program = _program(nodes, output=[f"g{i}" for i in range(20)])
    with pytest.raises(GraphLimitError, match=r"^node g15: the program would read or make more than 1048576 values$"):
        program(torch.zeros(1, 1, 12))


def test_a_2d_adaptive_pool_counts_its_windows():
    # 2**14 outputs each averaging a column of 2**22 values: 2**37 additions from small tensors.
    nodes = [_node("p", "pool", X, op="call_module"),
             _node("col", "torch.reshape", {"node": "p"}, {"tuple": [1, 1, 1 << 22, 1]}),
             _node("a", "wide", {"node": "col"}, op="call_module")]
    modules = {**_pool(1 << 22), "wide": {"type": "AdaptiveAvgPool2d", "kwargs": {"output_size": [1, 1 << 14]}}}
    program = _program(nodes, modules, output=["a"])
    with pytest.raises(GraphLimitError, match=r"^node a: the program would take more than 68719476736 "
                                              r"multiply-adds per example$"):
        program(torch.zeros(1, 1, 12))


def test_a_convolution_counts_its_padded_copy():
    # A 3-wide kernel dilated over 2**25 replicated pads: 12 outputs, but F.pad copies 2**25 + 12 values
    # (and takes twice that).
    pad = 1 << 24
    conv = {"conv": {"type": "Conv1d", "kwargs": {"in_channels": 1, "out_channels": 1, "kernel_size": 3,
                                                  "padding": pad, "dilation": pad, "padding_mode": "replicate",
                                                  "bias": False}}}
    program = _program([_node("c", "conv", X, op="call_module")], conv, output=["c"],
                       weights={"conv.weight": torch.zeros(1, 1, 3)})
    with pytest.raises(GraphLimitError, match=_held("c")):
        program(torch.zeros(1, 1, 12))


def test_advanced_indexing_counts_its_int64_indices():
    # Six int32 index tensors of 16 broadcast to 2**24 positions; ATen makes each an int64 tensor of
    # that size first (1.5 GB for a 64 MiB answer).
    nodes = [_node("one", "operator.getitem", X, {"tuple": [0, 0, {"slice": [0, 1, None]}]}),
             _method("t", "reshape", {"node": "one"}, *[1] * 6)]
    indices = []
    for m in range(6):
        shape = [1] * 6
        shape[m] = 16
        nodes += [_node(f"z{m}", "torch.cat", [X] * 16, dim=0),
                  _method(f"s{m}", "sum", {"node": f"z{m}"}, dim=[1, 2], dtype={"dtype": "int32"}),
                  _method(f"i{m}", "reshape", {"node": f"s{m}"}, *shape)]
        indices.append({"node": f"i{m}"})
    nodes.append(_node("r", "operator.getitem", {"node": "t"}, {"tuple": indices}))
    program = _program(nodes, output=["r"])
    with pytest.raises(GraphLimitError, match=_held("r")):
        program(torch.zeros(1, 1, 12))


def test_a_pools_one_kernel_size_is_every_dims():
    from handlers.graph_program import _kernel_area

    assert [_kernel_area(4096, 2), _kernel_area([4096], 2), _kernel_area((3, 5), 2), _kernel_area([7], 1)] \
        == [1 << 24, 1 << 24, 15, 7]


def test_a_module_that_cannot_be_built_is_an_unsafe_graph():
    with pytest.raises(UnsafeGraphError, match=r"^malformed graph description: 'integer modulo by zero'$"):
        _program([_node("g", "norm", X, op="call_module")],
                 {"norm": {"type": "GroupNorm", "kwargs": {"num_groups": 0, "num_channels": 4}}})


def test_the_layers_vetted_without_running_keep_their_input_shape_and_dtype():
    from torch import nn

    from handlers.graph_program import _SHAPE_PRESERVING_MODULES

    made = {nn.BatchNorm1d: nn.BatchNorm1d(4), nn.BatchNorm2d: nn.BatchNorm2d(4), nn.LayerNorm: nn.LayerNorm(5),
            nn.GroupNorm: nn.GroupNorm(2, 4), nn.Softmax: nn.Softmax(dim=1), nn.LogSoftmax: nn.LogSoftmax(dim=1)}
    for layer_type in _SHAPE_PRESERVING_MODULES:
        layer = made.get(layer_type) or layer_type()
        x = torch.randn(2, 4, 5) if layer_type in (nn.BatchNorm1d, nn.Dropout1d) else torch.randn(2, 4, 3, 5)
        y = layer.eval()(x)
        assert (y.shape, y.dtype) == (x.shape, x.dtype), layer_type


@pytest.fixture(scope="module")
def good_archive(tmp_path_factory):
    parts, data = fully_connected_problem(60, 30)
    fitted = protonmf.fit(parts, data, ProtoNMFConfig(n_prototypes=2))
    return write_archive(tmp_path_factory.mktemp("good"), "mlp", "1", parts, [fitted])


def _bomb_archive(good_archive, path, nodes, modules=None):
    def edit(members, manifest):
        graph = json.loads(members["model/upstream.graph.json"])
        members["model/upstream.graph.json"] = json.dumps(_planted(graph, nodes, modules)).encode()
    return rewrite_archive(good_archive, path, edit)


def test_an_archive_with_a_bomb_is_refused_at_load_and_the_others_load(good_archive, tmp_path):
    from server.metrics import Metrics
    from server.registry import ModelRegistry
    from server.settings import Settings

    store = tmp_path / "store"
    store.mkdir()
    (store / good_archive.name).write_bytes(good_archive.read_bytes())
    _bomb_archive(good_archive, store / "pool-1.psar", [_node("bomb", "pool", X, op="call_module")],
                  _pool(600_000_000))
    _bomb_archive(good_archive, store / "cat-1.psar", [_node("a", "torch.cat", [X] * 4096, dim=1),
                                                       _node("b", "torch.cat", [{"node": "a"}] * 4096, dim=1)])
    with pytest.raises(ArchiveError, match="node b reads more than 67108864"):
        read_archive(store / "cat-1.psar")
    registry = ModelRegistry(Settings(model_store=store, metrics_port=0), Metrics())
    registry.load_store(torch.device("cpu"))
    assert list(registry.models) == ["mlp"]
    assert registry.load_errors == {
        "cat-1.psar": "cat-1.psar: node b reads more than 67108864 tensor elements per example",
        "pool-1.psar": "pool-1.psar: invalid content (UnsafeGraphError): module 'pool' argument output_size: "
                       "the integer 600000000 is beyond ±16777216",
    }


def test_a_bound_met_on_a_request_is_the_archives_fault_not_a_bug():
    from grpc import StatusCode

    from server.errors import status_for

    assert status_for(GraphLimitError("node b reads more than 67108864 tensor elements per example")) \
        is StatusCode.FAILED_PRECONDITION
