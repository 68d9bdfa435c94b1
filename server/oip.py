"""inference.GRPCInferenceService: the Open Inference Protocol (KServe v2) beside protoserve.v1.

A thin servicer over the same :class:`~server.dataplane.DataPlane` as ``protoserve.v1.Explainer``:
it converts the input tensor and the request parameters into a call of N examples (the data plane
validates it and submits the examples together, so they batch with each other and with other
clients' requests), and the result into named output tensors. It checks only what is this
protocol's (the tensor's layout, the parameters' types); the data plane validates the rest, in its
field names, which this protocol renames (``FIELD_NAMES``). No model logic here.

ModelInfer
----------
Input: one tensor named ``input`` of shape ``[N, *input_shape]`` (N >= 1), datatype FP32,
FP16 or UINT8 (UINT8 is scaled like image pixels), in ``raw_input_contents`` or in the typed
``contents`` (``fp32_contents``; ``uint_contents`` for UINT8; FP16 only raw).

Request parameters (all optional):

================  ==============  =====================================================
name              type            meaning
================  ==============  =====================================================
``method``        string          explanation method (default: the model's default)
``target_class``  int64           class to explain (default: each example's prediction)
``suppress``      string          component ids to suppress, comma-separated: one
                                  intervention set; several sets separated by ``;``
``heatmaps``      string          ``none`` (default), ``feature_grid`` or ``input``
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
``intervened_logits``        FP32      [N, M, K]       only when ``suppress`` is given
``additivity_gap``           FP32      [N]             |sum(contributions) + residual +
                                                       bias - target_logit|; 0 for a
                                                       method that is not additive
===========================  ========  ==============  ===================================

For an additive method, ``sum(component_contributions) + residual_contribution + bias ==
target_logit`` per example: the server checks it on every answer, and a gap beyond float32
rounding is counted in ``protoserve_additivity_violations_total``. Outputs are returned in
``raw_output_contents`` (BYTES as 4-byte little-endian length-prefixed strings), as Triton
does; ``outputs`` in the request selects a subset.
"""

from __future__ import annotations

import importlib.metadata
import math
import struct
from functools import partial

import numpy as np
from protoserve_client.stubs.inference import grpc_service_pb2 as oip
from protoserve_client.stubs.inference import grpc_service_pb2_grpc as oip_grpc

from handlers.errors import InvalidInputError, clip, echo
from handlers.runtime import ModelRuntime
from server import rpc
from server.dataplane import DataPlane, Example, ExplainCall, ExplainResult, PredictCall, PredictResult
from server.rpc import Rpcs
from server.settings import Settings

OIP_SERVICE = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "protoserve"
PLATFORM = "pytorch"
INPUT_NAME = "input"

# OIP datatype -> (little-endian numpy dtype, typed contents field or None if raw only).
INPUT_DATATYPES: dict[str, tuple[np.dtype, str | None]] = {
    "FP32": (np.dtype("<f4"), "fp32_contents"),
    "FP16": (np.dtype("<f2"), None),
    "UINT8": (np.dtype("u1"), "uint_contents"),
}
# An archive's input dtype -> the OIP datatype its metadata advertises.
DATATYPE_OF = {"float32": "FP32", "float16": "FP16", "uint8": "UINT8"}

# Parameters this servicer reads, and the protocol-level ones clients may send (ignored here).
KNOWN_PARAMETERS = ("method", "target_class", "suppress", "heatmaps", "explain")
IGNORED_PARAMETERS = frozenset({"priority", "timeout", "sequence_id", "sequence_start", "sequence_end",
                                "content_type", "headers", "binary_data_output"})
# The data plane's request fields in this protocol's words (server/errors.py renames a field's first
# part): the one input tensor of N examples, and the request parameters. This servicer's own errors
# use these words already, and none of their fields starts with a name renamed here.
FIELD_NAMES = {"input": "inputs[0]", "target_class": "parameters.target_class", "heatmaps": "parameters.heatmaps",
               "interventions": "parameters.suppress"}


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
        ("intervened_logits", "FP32", [-1, -1, k]),
        ("additivity_gap", "FP32", [-1]),
    ]


# ------------------------------------------------------------------------- requests


class InferOptions:
    """The request parameters of ModelInfer, type-checked."""

    def __init__(self, parameters) -> None:
        unknown = sorted(set(parameters) - set(KNOWN_PARAMETERS) - IGNORED_PARAMETERS)
        if unknown:
            raise InvalidInputError(f"parameters.{clip(unknown[0])}",
                                    f"unknown parameter; known: {', '.join(KNOWN_PARAMETERS)}")
        self.method = _param(parameters, "method", "string_param", "")
        self.heatmaps = _param(parameters, "heatmaps", "string_param", "none")
        self.explain = _param(parameters, "explain", "bool_param", True)
        suppress = _param(parameters, "suppress", "string_param", "")
        self.suppress = [ids for part in suppress.split(";")
                         if (ids := [i.strip() for i in part.split(",") if i.strip()])]
        self.target_class: int | None = None
        if "target_class" in parameters:
            value = parameters["target_class"]
            kind = value.WhichOneof("parameter_choice")
            if kind not in ("int64_param", "uint64_param"):
                raise InvalidInputError("parameters.target_class", f"must be an int64 parameter, got {kind}")
            self.target_class = getattr(value, kind)
            if not 0 <= self.target_class < 2 ** 31:  # a class index, as protoserve.v1's int32 target_class
                raise InvalidInputError("parameters.target_class", f"must be a class index, got {self.target_class}")


def _param(parameters, name: str, kind: str, default):
    if name not in parameters:
        return default
    got = parameters[name].WhichOneof("parameter_choice")
    if got != kind:
        raise InvalidInputError(f"parameters.{name}", f"must be a {kind.removesuffix('_param')} parameter, got {got}")
    return getattr(parameters[name], kind)


def decode_batch(request: oip.ModelInferRequest, runtime: ModelRuntime, settings: Settings) -> np.ndarray:
    """The request's one input tensor -> an array (N, *input_shape) of its wire dtype."""
    spec = runtime.parts.input_spec
    if len(request.inputs) != 1:
        raise InvalidInputError("inputs", f"expected exactly one input tensor named {INPUT_NAME!r}, "
                                          f"got {len(request.inputs)}")
    tensor = request.inputs[0]
    if tensor.name != INPUT_NAME:
        raise InvalidInputError("inputs[0].name", f"expected {INPUT_NAME!r}, got {echo(tensor.name)}")
    if tensor.datatype not in INPUT_DATATYPES:
        raise InvalidInputError("inputs[0].datatype", f"{echo(tensor.datatype)} is not one of "
                                                      f"{', '.join(INPUT_DATATYPES)}")
    dtype, typed_field = INPUT_DATATYPES[tensor.datatype]
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
    if request.raw_input_contents:
        if len(request.raw_input_contents) != len(request.inputs):
            raise InvalidInputError("raw_input_contents", f"has {len(request.raw_input_contents)} entries for "
                                                          f"{len(request.inputs)} input(s)")
        if tensor.HasField("contents"):
            raise InvalidInputError("inputs[0].contents", "set raw_input_contents or contents, not both")
        data = request.raw_input_contents[0]
        if len(data) != count * dtype.itemsize:
            raise InvalidInputError("raw_input_contents[0]", f"has {len(data)} bytes, shape {shape} "
                                                             f"{tensor.datatype} needs {count * dtype.itemsize}")
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    if typed_field is None:
        raise InvalidInputError("inputs[0].contents", f"{tensor.datatype} has no typed contents; "
                                                      f"send it in raw_input_contents")
    values = getattr(tensor.contents, typed_field)
    if len(values) != count:
        raise InvalidInputError(f"inputs[0].contents.{typed_field}",
                                f"has {len(values)} values, shape {shape} needs {count}")
    if dtype == np.uint8:
        array = np.fromiter(values, dtype=np.uint32, count=count)
        if array.size and array.max() > 255:
            raise InvalidInputError(f"inputs[0].contents.{typed_field}", "UINT8 values must be at most 255")
        return array.astype(np.uint8).reshape(shape)
    return np.fromiter(values, dtype=dtype, count=count).reshape(shape)


def requested_outputs(request: oip.ModelInferRequest, runtime: ModelRuntime) -> list[str] | None:
    if not request.outputs:
        return None
    known = [name for name, _, _ in output_metadata(runtime)]
    names = []
    for i, output in enumerate(request.outputs):
        if output.name not in known:
            raise InvalidInputError(f"outputs[{i}].name", f"{echo(output.name)} is not an output; "
                                                          f"known: {', '.join(known)}")
        names.append(output.name)
    return names


# ------------------------------------------------------------------------ responses


def prediction_outputs(result: PredictResult) -> dict[str, np.ndarray]:
    return {"logits": np.stack([scores.logits for scores in result.rows])}


def explanation_outputs(result: ExplainResult) -> dict[str, np.ndarray]:
    """Stack the per-example rows of an explanation into named arrays."""
    rows = result.rows
    components = result.runtime.explainers[result.method].components
    index = np.stack([row.component_index for row in rows])  # (N, C)
    valid = index >= 0
    outputs = {
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
        outputs["heatmaps"] = np.stack([row.heatmaps for row in rows])
    if rows[0].intervened:
        outputs["intervened_logits"] = np.stack([np.stack([s.logits for s in row.intervened]) for row in rows])
    outputs["additivity_gap"] = np.array([row.additivity_gap for row in rows], dtype=np.float32)
    return outputs


def _raw(datatype: str, array: np.ndarray) -> bytes:
    if datatype == "BYTES":
        items = [s.encode() if isinstance(s, str) else bytes(s) for s in array.reshape(-1)]
        return b"".join(struct.pack("<I", len(item)) + item for item in items)
    dtype = {"FP32": "<f4", "INT64": "<i8"}[datatype]
    return np.ascontiguousarray(array, dtype=dtype).tobytes()


def encode_response(request: oip.ModelInferRequest, wanted: list[str] | None,
                    result: PredictResult | ExplainResult) -> oip.ModelInferResponse:
    """The outputs of ``result`` (``wanted``: those the request names, None: all) as a response."""
    runtime = result.runtime
    explained = isinstance(result, ExplainResult)
    outputs = explanation_outputs(result) if explained else prediction_outputs(result)
    datatypes = {name: datatype for name, datatype, _ in output_metadata(runtime)}
    response = oip.ModelInferResponse(model_name=runtime.name, model_version=runtime.version, id=request.id)
    if explained:
        response.parameters["method"].string_param = result.method
    for name in wanted or list(outputs):
        if name not in outputs:
            raise InvalidInputError("outputs", f"{name!r} is not produced by this request (heatmaps need the "
                                               f"heatmaps parameter, intervened_logits the suppress parameter, "
                                               f"explanation outputs explain=true)")
        array = outputs[name]
        response.outputs.add(name=name, datatype=datatypes[name], shape=array.shape)
        response.raw_output_contents.append(_raw(datatypes[name], array))
    return response


# ------------------------------------------------------------------------- servicer


class InferenceServicer(oip_grpc.GRPCInferenceServiceServicer):
    def __init__(self, plane: DataPlane, settings: Settings):
        self.plane = plane
        self.settings = settings
        self.rpcs = Rpcs(plane.registry, plane.metrics, FIELD_NAMES)
        try:
            self.version = importlib.metadata.version("protoserve")
        except importlib.metadata.PackageNotFoundError:
            self.version = "0+unknown"

    async def ServerLive(self, request, context) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=self.plane.ready())

    async def ModelReady(self, request: oip.ModelReadyRequest, context) -> oip.ModelReadyResponse:
        # Unknown models are simply not ready (as Triton answers), not an error.
        return oip.ModelReadyResponse(ready=self.plane.ready(request.name, request.version))

    async def ServerMetadata(self, request, context) -> oip.ServerMetadataResponse:
        return oip.ServerMetadataResponse(name=SERVER_NAME, version=self.version, extensions=["parameters"])

    async def ModelMetadata(self, request: oip.ModelMetadataRequest, context) -> oip.ModelMetadataResponse:
        async with self.rpcs.scope("ModelMetadata", request.name, context):
            runtime = self.plane.model(request.name, request.version)
            spec = runtime.parts.input_spec
            response = oip.ModelMetadataResponse(
                name=runtime.name, versions=[r.version for r in self.plane.models() if r.name == runtime.name],
                platform=PLATFORM)
            response.inputs.add(name=INPUT_NAME, datatype=DATATYPE_OF.get(spec.dtype, "FP32"), shape=[-1, *spec.shape])
            for name, datatype, shape in output_metadata(runtime):
                response.outputs.add(name=name, datatype=datatype, shape=shape)
            return response

    async def ModelInfer(self, request: oip.ModelInferRequest, context) -> oip.ModelInferResponse:
        async with self.rpcs.scope("ModelInfer", request.model_name, context):
            runtime = self.plane.model(request.model_name, request.model_version)  # its input shape and outputs
            options = InferOptions(request.parameters)
            encode = partial(encode_response, request, requested_outputs(request, runtime))
            examples = [Example(tensor=array) for array in decode_batch(request, runtime, self.settings)]
            model, version, deadline = request.model_name, request.model_version, rpc.deadline(context)
            if not options.explain:
                return await self.plane.predict(PredictCall(model, version, examples, deadline=deadline), encode)
            call = ExplainCall(model, version, examples, method=options.method, target_class=options.target_class,
                               heatmaps=options.heatmaps, interventions=options.suppress, deadline=deadline)
            return await self.plane.explain(call, encode)
