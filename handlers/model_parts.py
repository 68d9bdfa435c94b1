"""Split a model at a layer, and store the parts without pickle.

A model is traced with ``torch.fx`` and cut at one node of the traced graph (a module's
output or a functional op such as ``relu``):

* ``upstream``: input -> features at the layer, ``(B, *input_shape) -> (B, *feature_shape)``;
* ``downstream``: features -> logits, ``(B, *feature_shape) -> (B, K)``.

Archives must never execute code when loaded, so a part is stored as a JSON description of
its graph whose every operation comes from a fixed allow-list (standard ``torch.nn``
layers rebuilt from their constructor arguments, a few torch functions and tensor
methods), plus its weights in safetensors. ``torch.export``'s own loader is not used
because it falls back to ``pickle`` for some members.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import operator

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import fx, nn

GRAPH_FORMAT_VERSION = 1

# Leaf modules a stored graph may contain, rebuilt from their constructor arguments.
SAFE_MODULES: dict[str, type[nn.Module]] = {
    cls.__name__: cls
    for cls in (
        nn.Conv1d, nn.Conv2d, nn.Linear, nn.Bilinear,
        nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm,
        nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.ELU,
        nn.Softmax, nn.LogSoftmax,
        nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
        nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
        nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity,
    )
}

# Free functions a stored graph may call, by their qualified name.
SAFE_FUNCTIONS: dict[str, object] = {
    "operator.add": operator.add,
    "operator.sub": operator.sub,
    "operator.mul": operator.mul,
    "operator.truediv": operator.truediv,
    "operator.getitem": operator.getitem,
    "operator.neg": operator.neg,
    "torch.flatten": torch.flatten,
    "torch.cat": torch.cat,
    "torch.stack": torch.stack,
    "torch.relu": torch.relu,
    "torch.sigmoid": torch.sigmoid,
    "torch.tanh": torch.tanh,
    "torch.mean": torch.mean,
    "torch.sum": torch.sum,
    "torch.add": torch.add,
    "torch.mul": torch.mul,
    "torch.matmul": torch.matmul,
    "torch.reshape": torch.reshape,
    "torch.nn.functional.relu": F.relu,
    "torch.nn.functional.gelu": F.gelu,
    "torch.nn.functional.silu": F.silu,
    "torch.nn.functional.linear": F.linear,
    "torch.nn.functional.max_pool1d": F.max_pool1d,
    "torch.nn.functional.max_pool2d": F.max_pool2d,
    "torch.nn.functional.avg_pool1d": F.avg_pool1d,
    "torch.nn.functional.avg_pool2d": F.avg_pool2d,
    "torch.nn.functional.adaptive_avg_pool1d": F.adaptive_avg_pool1d,
    "torch.nn.functional.adaptive_avg_pool2d": F.adaptive_avg_pool2d,
    "torch.nn.functional.dropout": F.dropout,
    "torch.nn.functional.softmax": F.softmax,
}
_FUNCTION_NAMES = {id(fn): name for name, fn in SAFE_FUNCTIONS.items()}

# Tensor methods a stored graph may call.
SAFE_METHODS = frozenset({
    "view", "reshape", "flatten", "relu", "mean", "sum", "size", "squeeze", "unsqueeze",
    "contiguous", "add", "mul", "permute", "transpose", "sigmoid", "tanh", "clamp", "max",
})

_CONSTRUCTOR_SKIP = {"self", "device", "dtype"}


class UnsafeGraphError(ValueError):
    """A graph uses an operation outside the allow-list, or its description is malformed."""


def trace(model: nn.Module) -> fx.GraphModule:
    """Trace ``model`` (in eval mode) into an ``fx.GraphModule``."""
    model.eval()
    return fx.symbolic_trace(model)


def layer_names(model: nn.Module) -> list[str]:
    """Names of the traced graph's nodes that can be chosen as the explained layer."""
    return [n.name for n in trace(model).graph.nodes if n.op in ("call_module", "call_function", "call_method")]


_NON_NEGATIVE_MODULES = (nn.ReLU, nn.ReLU6)
_NON_NEGATIVE_FUNCTIONS = {torch.relu, F.relu}


def non_negative_layers(upstream: nn.Module) -> list[str]:
    """Names of the upstream's ReLU nodes (whose outputs are never negative), in graph order."""
    gm = upstream if isinstance(upstream, fx.GraphModule) else trace(upstream)
    names = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), _NON_NEGATIVE_MODULES):
            names.append(node.name)
        elif node.op == "call_function" and node.target in _NON_NEGATIVE_FUNCTIONS:
            names.append(node.name)
        elif node.op == "call_method" and node.target == "relu":
            names.append(node.name)
    return names


def split(model: nn.Module, layer: str) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Cut ``model`` at the node named ``layer``.

    Returns
    -------
    upstream : fx.GraphModule
        ``(B, *input_shape) -> (B, *feature_shape)``.
    downstream : fx.GraphModule
        ``(B, *feature_shape) -> (B, K)``.

    Raises
    ------
    ValueError
        If no node has that name, or the downstream reads any value computed before the
        layer other than the layer itself (a skip connection around it), so the layer
        does not separate the graph.
    """
    gm = trace(model)
    nodes = {n.name: n for n in gm.graph.nodes}
    if layer not in nodes or nodes[layer].op in ("placeholder", "output", "get_attr"):
        raise ValueError(f"layer {layer!r} is not an operation of the traced graph; choose one of {layer_names(model)}")
    cut = nodes[layer]
    if len([n for n in gm.graph.nodes if n.op == "placeholder"]) != 1:
        raise ValueError("only models with a single tensor input can be split")

    upstream_nodes = _ancestors(cut)
    upstream_graph = fx.Graph()
    copied: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node in upstream_nodes:
            copied[node] = upstream_graph.node_copy(node, lambda n: copied[n])
    upstream_graph.output(copied[cut])

    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    needed = _ancestors(output_node) - upstream_nodes
    downstream_graph = fx.Graph()
    features = downstream_graph.placeholder("features")
    mapped: dict[fx.Node, fx.Node] = {cut: features}
    for node in gm.graph.nodes:
        if node not in needed:
            continue
        for arg in node.all_input_nodes:
            if arg not in mapped and arg.op != "get_attr":
                raise ValueError(
                    f"layer {layer!r} does not separate the graph: {node.name!r} also reads {arg.name!r}, "
                    "computed before the layer (a skip connection around it); choose a later layer"
                )
        if node.op == "output":
            downstream_graph.output(mapped[node.args[0]] if isinstance(node.args[0], fx.Node) else
                                    fx.map_arg(node.args[0], lambda n: mapped[n]))
        else:
            mapped[node] = downstream_graph.node_copy(node, lambda n: mapped[n] if n in mapped else _copy_attr(n, downstream_graph, mapped))

    upstream = fx.GraphModule(gm, upstream_graph, class_name="Upstream")
    downstream = fx.GraphModule(gm, downstream_graph, class_name="Downstream")
    for part in (upstream, downstream):
        part.delete_all_unused_submodules()
        part.eval()
    return upstream, downstream


def _copy_attr(node: fx.Node, graph: fx.Graph, mapped: dict[fx.Node, fx.Node]) -> fx.Node:
    mapped[node] = graph.node_copy(node)
    return mapped[node]


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(current.all_input_nodes)
    return seen


# --------------------------------------------------------------------------- storage

def weights_sha256(*parts: nn.Module) -> str:
    """A hash of the parts' parameters and buffers (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for i, part in enumerate(parts):
        for name, tensor in sorted(part.state_dict().items()):
            t = tensor.detach().to("cpu").contiguous()
            digest.update(f"{i}/{name}/{t.dtype}/{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def dump_graph_module(gm: fx.GraphModule) -> tuple[bytes, bytes]:
    """Describe ``gm`` as (graph JSON, safetensors weights); raise UnsafeGraphError if it
    uses anything a loader would refuse."""
    modules: dict[str, dict] = {}
    nodes: list[dict] = []
    for node in gm.graph.nodes:
        entry = {"name": node.name, "op": node.op, "args": _encode(node.args), "kwargs": _encode(node.kwargs)}
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            modules[node.target] = _describe_module(module, node.target)
            entry["target"] = node.target
        elif node.op == "call_function":
            name = _FUNCTION_NAMES.get(id(node.target))
            if name is None:
                raise UnsafeGraphError(f"node {node.name!r} calls {node.target!r}, which archives do not allow")
            entry["target"] = name
        elif node.op == "call_method":
            if node.target not in SAFE_METHODS:
                raise UnsafeGraphError(f"node {node.name!r} calls method {node.target!r}, which archives do not allow")
            entry["target"] = node.target
        else:  # placeholder, get_attr, output
            entry["target"] = str(node.target)
        nodes.append(entry)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in gm.state_dict().items()}
    graph = {"format_version": GRAPH_FORMAT_VERSION, "modules": modules, "nodes": nodes}
    return json.dumps(graph, sort_keys=True).encode(), save_safetensors(tensors)


def load_graph_module(graph_json: bytes, weights: bytes) -> fx.GraphModule:
    """Rebuild a part from :func:`dump_graph_module`'s output, executing nothing from it.

    Every module type, function and method is looked up in the allow-lists; constructor
    arguments must be JSON scalars or lists; the weights must match the rebuilt modules'
    names and shapes exactly.
    """
    try:
        spec = json.loads(graph_json)
        if spec.get("format_version") != GRAPH_FORMAT_VERSION:
            raise UnsafeGraphError(f"graph format version {spec.get('format_version')!r} is not {GRAPH_FORMAT_VERSION}")
        root = nn.Module()
        for qualname, desc in spec["modules"].items():
            cls = SAFE_MODULES.get(desc["type"])
            if cls is None:
                raise UnsafeGraphError(f"module type {desc['type']!r} is not allowed in archives")
            _check_plain(desc["kwargs"], f"module {qualname}")
            _set_submodule(root, qualname, cls(**desc["kwargs"]))
        tensors = load_safetensors(weights)
        attr_names = [n["target"] for n in spec["nodes"] if n["op"] == "get_attr"]
        for name in attr_names:
            if name not in tensors:
                raise UnsafeGraphError(f"weights lack the attribute {name!r}")
            owner, _, leaf = name.rpartition(".")
            parent = root.get_submodule(owner) if owner else root
            parent.register_buffer(leaf, tensors[name])
        missing, unexpected = root.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise UnsafeGraphError(f"weights do not match the graph: missing {missing}, unexpected {unexpected}")
        graph = fx.Graph()
        env: dict[str, fx.Node] = {}
        for entry in spec["nodes"]:
            op, target = entry["op"], entry["target"]
            args = _decode(entry["args"], env)
            kwargs = _decode(entry["kwargs"], env)
            if op == "placeholder":
                node = graph.placeholder(target)
            elif op == "output":
                graph.output(args[0])
                continue
            elif op == "get_attr":
                node = graph.get_attr(target)
            elif op == "call_module":
                if target not in spec["modules"]:
                    raise UnsafeGraphError(f"node {entry['name']!r} calls an undeclared module {target!r}")
                node = graph.call_module(target, tuple(args), kwargs)
            elif op == "call_function":
                if target not in SAFE_FUNCTIONS:
                    raise UnsafeGraphError(f"function {target!r} is not allowed in archives")
                node = graph.call_function(SAFE_FUNCTIONS[target], tuple(args), kwargs)
            elif op == "call_method":
                if target not in SAFE_METHODS:
                    raise UnsafeGraphError(f"method {target!r} is not allowed in archives")
                node = graph.call_method(target, tuple(args), kwargs)
            else:
                raise UnsafeGraphError(f"unknown node op {op!r}")
            env[entry["name"]] = node
        gm = fx.GraphModule(root, graph)
    except UnsafeGraphError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise UnsafeGraphError(f"malformed graph description: {exc}") from exc
    gm.eval()
    return gm


def _describe_module(module: nn.Module, qualname: str) -> dict:
    cls_name = type(module).__name__
    if SAFE_MODULES.get(cls_name) is not type(module):
        raise UnsafeGraphError(f"module {qualname!r} of type {type(module).__qualname__} is not allowed in archives")
    kwargs = {}
    for param in inspect.signature(type(module).__init__).parameters.values():
        if param.name in _CONSTRUCTOR_SKIP or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if param.name == "bias":
            value = getattr(module, "bias", None) is not None
        elif hasattr(module, param.name):
            value = getattr(module, param.name)
        else:
            continue
        if isinstance(value, tuple):
            value = list(value)
        kwargs[param.name] = value
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
        kwargs["elementwise_affine" if isinstance(module, nn.LayerNorm) else "affine"] = module.weight is not None
    _check_plain(kwargs, f"module {qualname}")
    return {"type": cls_name, "kwargs": kwargs}


def _check_plain(value, where: str) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise UnsafeGraphError(f"{where}: non-string key {k!r}")
            _check_plain(v, where)
    elif isinstance(value, list):
        for v in value:
            _check_plain(v, where)
    elif not (value is None or isinstance(value, (bool, int, float, str))):
        raise UnsafeGraphError(f"{where}: argument {value!r} is not a JSON scalar")


def _set_submodule(root: nn.Module, qualname: str, module: nn.Module) -> None:
    *path, leaf = qualname.split(".")
    parent = root
    for part in path:
        if not hasattr(parent, part):
            parent.add_module(part, nn.Module())
        parent = getattr(parent, part)
    parent.add_module(leaf, module)


def _encode(value):
    """fx node arguments as JSON: nodes by name, tuples, slices, dtypes, Ellipsis tagged."""
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {"dict": {k: _encode(v) for k, v in value.items()}}
    if isinstance(value, slice):
        return {"slice": [_encode(value.start), _encode(value.stop), _encode(value.step)]}
    if value is Ellipsis:
        return {"ellipsis": True}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise UnsafeGraphError(f"cannot store the argument {value!r} of type {type(value).__name__}")


_DTYPES = {name: getattr(torch, name) for name in ("float32", "float16", "bfloat16", "float64", "int64", "int32", "uint8", "bool")}


def _decode(value, env: dict[str, fx.Node]):
    if isinstance(value, list):
        return [_decode(v, env) for v in value]
    if isinstance(value, dict):
        if "node" in value:
            if value["node"] not in env:
                raise UnsafeGraphError(f"argument refers to unknown node {value['node']!r}")
            return env[value["node"]]
        if "tuple" in value:
            return tuple(_decode(v, env) for v in value["tuple"])
        if "dict" in value:
            return {k: _decode(v, env) for k, v in value["dict"].items()}
        if "slice" in value:
            return slice(*(_decode(v, env) for v in value["slice"]))
        if "ellipsis" in value:
            return Ellipsis
        if "dtype" in value:
            if value["dtype"] not in _DTYPES:
                raise UnsafeGraphError(f"dtype {value['dtype']!r} is not allowed")
            return _DTYPES[value["dtype"]]
        raise UnsafeGraphError(f"unknown argument encoding {sorted(value)}")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise UnsafeGraphError(f"unknown argument {value!r}")
