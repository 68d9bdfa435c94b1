"""The Open Inference Protocol (KServe v2) whatever its binding: what gRPC (server/oip.py) and HTTP/REST
(server/oip_rest.py) share.

Each binding converts its request into an :class:`InferRequest` of plain values (parameters as Python
``str``/``bool``/``int``/``float``, the input tensor as raw little-endian bytes or a flat sequence of
numbers), calls :func:`infer`, and converts the :class:`InferOutputs` back. Here: the parameters'
types, the input tensor's layout, the outputs, and the call to the data plane; the data plane
validates the rest, in its field names, which this protocol renames (``FIELD_NAMES``).

Input: one tensor named ``input`` of shape ``[N, *input_shape]`` (N >= 1), datatype FP32, FP16 or
UINT8 (UINT8 is scaled like image pixels).

Request parameters (all optional):

================  ==============  =====================================================
name              type            meaning
================  ==============  =====================================================
``method``        string          explanation method (default: the model's default)
``target_class``  int64           class to explain (default: each example's prediction)
``suppress``      string          component ids to suppress, comma-separated: one
                                  intervention set; several sets separated by ``;``
``heatmaps``      string          ``none`` (default), ``feature_grid`` or ``input``
                                  (contribution densities), ``presence_feature_grid``
                                  or ``presence_input`` (presence maps)
``explain``       bool            ``false``: the bare prediction (``logits`` only)
================  ==============  =====================================================

Outputs (N examples, K classes, C components reported per example, M intervention sets):

===========================  ========  ==============  ===================================
name                         datatype  shape           holds
===========================  ========  ==============  ===================================
``logits``                   FP32      [N, K]          the model's logits
``target_class``             INT64     [N]             the explained class
``target_logit``             FP32      [N]             the logit of the target class
``component_ids``            BYTES     [N, C]          component ids ("" pads)
``component_weights``        FP32      [N, C]          per-input weights (0 pads)
``component_contributions``  FP32      [N, C]          contributions to the target logit
``bias``                     FP32      [N]             additive bias
``residual_contribution``    FP32      [N]             what the components do not carry
``residual_share``           FP32      [N]             in [0, 1]
``heatmaps``                 FP32      [N, C, H, W]    only when ``heatmaps`` is not none
``residual_heatmap``         FP32      [N, H, W]       the residual's map, only with the
                                                       presence modes
``intervened_logits``        FP32      [N, M, K]       only when ``suppress`` is given
``additivity_gap``           FP32      [N]             |sum(contributions) + residual +
                                                       bias - target_logit|; 0 for a
                                                       method that is not additive
===========================  ========  ==============  ===================================

For an additive method, ``sum(component_contributions) + residual_contribution + bias ==
target_logit`` per example: the server checks it on every answer, and a gap beyond float32
rounding is counted in ``protoserve_additivity_violations_total``. ``outputs`` in the request
selects a subset.
"""

from __future__ import annotations

import importlib.metadata
import math
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from handlers.errors import InvalidInputError, clip, echo
from handlers.runtime import ModelRuntime
from server.dataplane import DataPlane, Example, ExplainCall, ExplainResult, PredictCall, PredictResult
from server.settings import Settings

SERVER_NAME = "protoserve"
PLATFORM = "pytorch"
INPUT_NAME = "input"

# OIP datatype -> little-endian numpy dtype, for inputs.
INPUT_DATATYPES: dict[str, np.dtype] = {"FP32": np.dtype("<f4"), "FP16": np.dtype("<f2"), "UINT8": np.dtype("u1")}
# An archive's input dtype -> the OIP datatype its metadata advertises.
DATATYPE_OF = {"float32": "FP32", "float16": "FP16", "uint8": "UINT8"}
OUTPUT_DTYPES = {"FP32": np.dtype("<f4"), "INT64": np.dtype("<i8")}  # and BYTES: strings

# Parameters ModelInfer reads, and the protocol-level ones clients may send (ignored here; a binding
# may read some of them itself, as HTTP does binary_data_output).
KNOWN_PARAMETERS = ("method", "target_class", "suppress", "heatmaps", "explain")
IGNORED_PARAMETERS = frozenset({"priority", "timeout", "sequence_id", "sequence_start", "sequence_end",
                                "content_type", "headers", "binary_data_output"})
# The data plane's request fields in this protocol's words (server/errors.py renames a field's first
# part): the one input tensor of N examples, and the request parameters. This module's own errors
# use these words already, and none of their fields starts with a name renamed here.
FIELD_NAMES = {"input": "inputs[0]", "target_class": "parameters.target_class", "heatmaps": "parameters.heatmaps",
               "interventions": "parameters.suppress"}
# A parameter's Python type -> its type in the protocol's words (gRPC's InferParameter kinds).
PARAMETER_TYPES = {str: "string", bool: "bool", int: "int64", float: "double"}


def server_version() -> str:
    try:
        return importlib.metadata.version("protoserve")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def output_metadata(runtime: ModelRuntime) -> list[tuple[str, str, list[int]]]:
    """Every output ModelInfer can return for ``runtime``: (name, datatype, shape), -1 = variable."""
    k = len(runtime.labels)
    return [
        ("logits", "FP32", [-1, k]),
        ("target_class", "INT64", [-1]),
        ("target_logit", "FP32", [-1]),
        ("component_ids", "BYTES", [-1, -1]),
        ("component_weights", "FP32", [-1, -1]),
        ("component_contributions", "FP32", [-1, -1]),
        ("bias", "FP32", [-1]),
        ("residual_contribution", "FP32", [-1]),
        ("residual_share", "FP32", [-1]),
        ("heatmaps", "FP32", [-1, -1, -1, -1]),
        ("residual_heatmap", "FP32", [-1, -1, -1]),
        ("intervened_logits", "FP32", [-1, -1, k]),
        ("additivity_gap", "FP32", [-1]),
    ]


def input_metadata(runtime: ModelRuntime) -> tuple[str, str, list[int]]:
    """The one input: (name, datatype, shape), -1 = the number of examples."""
    spec = runtime.parts.input_spec
    return INPUT_NAME, DATATYPE_OF.get(spec.dtype, "FP32"), [-1, *spec.shape]


# ------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class InputTensor:
    """One input tensor as a binding received it: its contents are ``raw`` (little-endian bytes) or
    ``values`` (a flat array of numbers, or a sequence NumPy reads as one, e.g. a protobuf repeated
    field), at most one of them; ``field`` names where the contents are (e.g. ``raw_input_contents[0]``,
    ``inputs[0].data``), and ``absent`` says why there are none."""

    name: str
    datatype: str
    shape: Sequence[int]
    raw: bytes | None = None
    values: Sequence | None = None
    field: str = ""
    absent: str = "no contents"


@dataclass(frozen=True)
class InferRequest:
    """A ModelInfer request in plain values. ``outputs``: the names asked for (empty: every output
    the request produces); ``parameters``: name -> str, bool, int or float."""

    model: str
    version: str
    id: str
    inputs: Sequence[InputTensor]
    parameters: Mapping[str, object] = field(default_factory=dict)
    outputs: Sequence[str] = ()


class InferOptions:
    """The request parameters of ModelInfer, type-checked; ``suppress`` longer than ``max_suppress_chars``
    is refused before it is split (32 MiB of ";" would be millions of lists, built on the event loop)."""

    def __init__(self, parameters: Mapping[str, object], max_suppress_chars: int) -> None:
        unknown = sorted(set(parameters) - set(KNOWN_PARAMETERS) - IGNORED_PARAMETERS)
        if unknown:
            raise InvalidInputError(f"parameters.{clip(unknown[0])}",
                                    f"unknown parameter; known: {', '.join(KNOWN_PARAMETERS)}")
        self.method = _param(parameters, "method", str, "")
        self.heatmaps = _param(parameters, "heatmaps", str, "none")
        self.explain = _param(parameters, "explain", bool, True)
        suppress = _param(parameters, "suppress", str, "")
        if len(suppress) > max_suppress_chars:
            raise InvalidInputError("parameters.suppress", f"{len(suppress)} characters, more than every allowed "
                                                           f"intervention naming every component takes "
                                                           f"({max_suppress_chars})")
        self.suppress = [ids for part in suppress.split(";")
                         if (ids := [i.strip() for i in part.split(",") if i.strip()])]
        self.target_class: int | None = _param(parameters, "target_class", int, None)
        if self.target_class is not None and not 0 <= self.target_class < 2 ** 31:
            # a class index, as protoserve.v1's int32 target_class
            raise InvalidInputError("parameters.target_class", f"must be a class index, got {self.target_class}")


def _type_name(value: object) -> str:
    return PARAMETER_TYPES.get(type(value), {list: "array", dict: "object", type(None): "null"}.get(
        type(value), type(value).__name__))


def _param(parameters: Mapping[str, object], name: str, kind: type, default):
    if name not in parameters:
        return default
    value = parameters[name]
    if type(value) is not kind:  # not isinstance: a bool is no int64
        raise InvalidInputError(f"parameters.{name}",
                                f"must be a {PARAMETER_TYPES[kind]} parameter, got {_type_name(value)}")
    return value


def decode_batch(inputs: Sequence[InputTensor], runtime: ModelRuntime, settings: Settings) -> np.ndarray:
    """The request's one input tensor -> an array (N, *input_shape) of its wire dtype."""
    spec = runtime.parts.input_spec
    if len(inputs) != 1:
        raise InvalidInputError("inputs", f"expected exactly one input tensor named {INPUT_NAME!r}, "
                                          f"got {len(inputs)}")
    tensor = inputs[0]
    if tensor.name != INPUT_NAME:
        raise InvalidInputError("inputs[0].name", f"expected {INPUT_NAME!r}, got {echo(tensor.name)}")
    if tensor.datatype not in INPUT_DATATYPES:
        raise InvalidInputError("inputs[0].datatype", f"{echo(tensor.datatype)} is not one of "
                                                      f"{', '.join(INPUT_DATATYPES)}")
    dtype = INPUT_DATATYPES[tensor.datatype]
    if len(tensor.shape) != len(spec.shape) + 1:  # before the shape is echoed: it may have millions of dims
        raise InvalidInputError("inputs[0].shape", f"expected {len(spec.shape) + 1} dimensions [N, "
                                                   f"{', '.join(map(str, spec.shape))}], got {len(tensor.shape)}")
    shape = list(tensor.shape)
    if shape[1:] != list(spec.shape) or shape[0] < 1:
        raise InvalidInputError("inputs[0].shape", f"expected [N, {', '.join(map(str, spec.shape))}] with N >= 1 "
                                                   f"(a batch of examples), got {shape}")
    if shape[0] > settings.max_queue_size:
        raise InvalidInputError("inputs[0].shape", f"at most {settings.max_queue_size} examples per request, "
                                                   f"got {shape[0]}")
    count = math.prod(shape)
    example_bytes = count // shape[0] * dtype.itemsize
    if example_bytes > settings.max_input_bytes:
        raise InvalidInputError("inputs[0]", f"{example_bytes} bytes per example is more than the limit of "
                                             f"{settings.max_input_bytes}")
    if tensor.raw is not None:
        if len(tensor.raw) != count * dtype.itemsize:
            raise InvalidInputError(tensor.field, f"has {len(tensor.raw)} bytes, shape {shape} "
                                                  f"{tensor.datatype} needs {count * dtype.itemsize}")
        return np.frombuffer(tensor.raw, dtype=dtype).reshape(shape)
    values = tensor.values
    if values is None:
        raise InvalidInputError(tensor.field, tensor.absent)
    if len(values) != count:
        raise InvalidInputError(tensor.field, f"has {len(values)} values, shape {shape} needs {count}")
    array = np.asarray(values)  # a protobuf repeated field reads at once, not number by number
    if dtype == np.uint8 and array.size and array.max() > 255:
        raise InvalidInputError(tensor.field, "UINT8 values must be at most 255")
    with np.errstate(over="ignore"):  # a number beyond float32 becomes inf, which the data plane refuses
        return array.astype(dtype).reshape(shape)


def max_suppress_chars(runtime: ModelRuntime, max_interventions: int) -> int:
    """The longest ``suppress`` worth reading: each allowed set naming every component of the model's
    largest method, with as much again for spaces."""
    widest = max((sum(len(i) + 1 for i in explainer.component_ids) for explainer in runtime.explainers.values()),
                 default=0)
    return 2 * max_interventions * widest


def requested_outputs(names: Sequence[str], runtime: ModelRuntime) -> list[str] | None:
    """The output names a request asks for (None: all it produces), each checked, each at most once
    (a name asked for 2000 times would be an answer 2000 times the size)."""
    if not names:
        return None
    known = [name for name, _, _ in output_metadata(runtime)]
    for i, name in enumerate(names):
        if name not in known:
            raise InvalidInputError(f"outputs[{i}].name", f"{echo(name)} is not an output; "
                                                          f"known: {', '.join(known)}")
        if name in names[:i]:
            raise InvalidInputError(f"outputs[{i}].name", f"{echo(name)} is asked for twice")
    return list(names)


# ------------------------------------------------------------------------ responses


@dataclass(frozen=True)
class InferOutput:
    """One output tensor: ``array`` has the datatype's dtype (BYTES: an object array of str)."""

    name: str
    datatype: str
    array: np.ndarray

    def raw(self) -> bytes:
        """Little-endian row-major bytes; BYTES as 4-byte little-endian length-prefixed strings (Triton's)."""
        if self.datatype == "BYTES":
            items = [s.encode() for s in self.array.reshape(-1)]
            return b"".join(struct.pack("<I", len(item)) + item for item in items)
        return np.ascontiguousarray(self.array, dtype=OUTPUT_DTYPES[self.datatype]).tobytes()


@dataclass(frozen=True)
class InferOutputs:
    """What a binding encodes: the model version that answered, the method ("" for a bare
    prediction), the outputs in order."""

    runtime: ModelRuntime
    method: str
    outputs: list[InferOutput]


def prediction_arrays(result: PredictResult) -> dict[str, np.ndarray]:
    return {"logits": np.stack([scores.logits for scores in result.rows])}


def explanation_arrays(result: ExplainResult) -> dict[str, np.ndarray]:
    """Stack the per-example rows of an explanation into named arrays."""
    rows = result.rows
    components = result.runtime.explainers[result.method].components
    index = np.stack([row.component_index for row in rows])  # (N, C)
    valid = index >= 0
    arrays = {
        "logits": np.stack([row.scores.logits for row in rows]),
        "target_class": np.array([row.target_class for row in rows], dtype=np.int64),
        "target_logit": np.array([row.target_logit for row in rows], dtype=np.float32),
        "component_ids": np.array([[components[j].id if j >= 0 else "" for j in line] for line in index.tolist()],
                                  dtype=object).reshape(index.shape),
        "component_weights": np.where(valid, np.stack([row.weight for row in rows]), np.float32(0)),
        "component_contributions": np.where(valid, np.stack([row.contribution for row in rows]), np.float32(0)),
        "bias": np.array([row.bias for row in rows], dtype=np.float32),
        "residual_contribution": np.array([row.residual_contribution for row in rows], dtype=np.float32),
        "residual_share": np.array([row.residual_share for row in rows], dtype=np.float32),
    }
    if rows[0].heatmaps is not None:
        arrays["heatmaps"] = np.stack([row.heatmaps for row in rows])
    if rows[0].residual_heatmap is not None:
        arrays["residual_heatmap"] = np.stack([row.residual_heatmap for row in rows])
    if rows[0].intervened:
        arrays["intervened_logits"] = np.stack([np.stack([s.logits for s in row.intervened]) for row in rows])
    arrays["additivity_gap"] = np.array([row.additivity_gap for row in rows], dtype=np.float32)
    return arrays


def infer_outputs(wanted: list[str] | None, result: PredictResult | ExplainResult) -> InferOutputs:
    """The outputs of ``result`` (``wanted``: those the request names, None: all), in order."""
    runtime = result.runtime
    explained = isinstance(result, ExplainResult)
    arrays = explanation_arrays(result) if explained else prediction_arrays(result)
    datatypes = {name: datatype for name, datatype, _ in output_metadata(runtime)}
    outputs = []
    for name in wanted or list(arrays):
        if name not in arrays:
            raise InvalidInputError("outputs", f"{name!r} is not produced by this request (heatmaps need the "
                                               f"heatmaps parameter, intervened_logits the suppress parameter, "
                                               f"explanation outputs explain=true)")
        outputs.append(InferOutput(name, datatypes[name], arrays[name]))
    return InferOutputs(runtime, result.method if explained else "", outputs)


Answer = TypeVar("Answer")


async def infer(plane: DataPlane, settings: Settings, request: InferRequest, deadline: float | None,
                encode: Callable[[InferOutputs], Answer]) -> Answer:
    """Validate ``request``, predict or explain its examples (together), and return ``encode(outputs)``."""
    runtime = plane.model(request.model, request.version)  # its input shape and outputs
    options = InferOptions(request.parameters, max_suppress_chars(runtime, settings.max_interventions))
    wanted = requested_outputs(request.outputs, runtime)
    examples = [Example(tensor=array) for array in decode_batch(request.inputs, runtime, settings)]

    def encoded(result: PredictResult | ExplainResult) -> Answer:
        return encode(infer_outputs(wanted, result))

    if not options.explain:
        return await plane.predict(PredictCall(request.model, request.version, examples, deadline=deadline), encoded)
    call = ExplainCall(request.model, request.version, examples, method=options.method,
                       target_class=options.target_class, heatmaps=options.heatmaps,
                       interventions=options.suppress, deadline=deadline)
    return await plane.explain(call, encoded)
