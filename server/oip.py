"""inference.GRPCInferenceService: the Open Inference Protocol (KServe v2) beside protoserve.v1.

A thin servicer over the same :class:`~server.dataplane.DataPlane` as ``protoserve.v1.Explainer``: it
converts a ModelInferRequest into server/oip_infer.py's plain :class:`~server.oip_infer.InferRequest`
(the protocol's parameters, input tensor and outputs, shared with the HTTP/REST binding), and the
outputs into a ModelInferResponse. No model logic here.

The input tensor comes in ``raw_input_contents`` or in the typed ``contents`` (``fp32_contents``;
``uint_contents`` for UINT8; FP16 only raw). Outputs are returned in ``raw_output_contents`` (BYTES
as 4-byte little-endian length-prefixed strings), as Triton does. server/oip_infer.py lists the
parameters and outputs.
"""

from __future__ import annotations

from functools import partial

from protoserve_client.stubs.inference import grpc_service_pb2 as oip
from protoserve_client.stubs.inference import grpc_service_pb2_grpc as oip_grpc

from handlers.errors import InvalidInputError
from server import oip_infer, rpc
from server.dataplane import DataPlane
from server.oip_infer import FIELD_NAMES, PLATFORM, SERVER_NAME, InferOutputs, InferRequest, InputTensor
from server.rpc import Rpcs
from server.settings import Settings

OIP_SERVICE = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
# OIP datatype -> its typed contents field (FP16 has none: raw only).
TYPED_CONTENTS = {"FP32": "fp32_contents", "UINT8": "uint_contents"}
# InferParameter kinds -> their value as a plain Python value (uint64 and int64 are both ints).
PARAMETER_KINDS = ("bool_param", "int64_param", "string_param", "double_param", "uint64_param")


# ------------------------------------------------------------------------- requests


def infer_request(request: oip.ModelInferRequest) -> InferRequest:
    """A ModelInferRequest in the plain values server/oip_infer.py reads."""
    parameters = {}
    for name, parameter in request.parameters.items():
        kind = parameter.WhichOneof("parameter_choice")
        parameters[name] = getattr(parameter, kind) if kind in PARAMETER_KINDS else None
    return InferRequest(request.model_name, request.model_version, request.id,
                        [_input_tensor(request, i) for i in range(len(request.inputs))], parameters,
                        [output.name for output in request.outputs])


def _input_tensor(request: oip.ModelInferRequest, i: int) -> InputTensor:
    tensor = request.inputs[i]
    common = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
    if request.raw_input_contents:
        if len(request.raw_input_contents) != len(request.inputs):
            raise InvalidInputError("raw_input_contents", f"has {len(request.raw_input_contents)} entries for "
                                                          f"{len(request.inputs)} input(s)")
        if tensor.HasField("contents"):
            raise InvalidInputError(f"inputs[{i}].contents", "set raw_input_contents or contents, not both")
        return InputTensor(**common, raw=request.raw_input_contents[i], field=f"raw_input_contents[{i}]")
    typed_field = TYPED_CONTENTS.get(tensor.datatype)
    if typed_field is None:
        return InputTensor(**common, field=f"inputs[{i}].contents",
                           absent=f"{tensor.datatype} has no typed contents; send it in raw_input_contents")
    return InputTensor(**common, values=getattr(tensor.contents, typed_field),
                       field=f"inputs[{i}].contents.{typed_field}")


# ------------------------------------------------------------------------ responses


def encode_response(request: oip.ModelInferRequest, result: InferOutputs) -> oip.ModelInferResponse:
    runtime = result.runtime
    response = oip.ModelInferResponse(model_name=runtime.name, model_version=runtime.version, id=request.id)
    if result.method:
        response.parameters["method"].string_param = result.method
    for output in result.outputs:
        response.outputs.add(name=output.name, datatype=output.datatype, shape=output.array.shape)
        response.raw_output_contents.append(output.raw())
    return response


# ------------------------------------------------------------------------- servicer


class InferenceServicer(oip_grpc.GRPCInferenceServiceServicer):
    def __init__(self, plane: DataPlane, settings: Settings):
        self.plane = plane
        self.settings = settings
        self.rpcs = Rpcs(plane.registry, plane.metrics, FIELD_NAMES)
        self.version = oip_infer.server_version()

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
            response = oip.ModelMetadataResponse(
                name=runtime.name, versions=[r.version for r in self.plane.models() if r.name == runtime.name],
                platform=PLATFORM)
            name, datatype, shape = oip_infer.input_metadata(runtime)
            response.inputs.add(name=name, datatype=datatype, shape=shape)
            for name, datatype, shape in oip_infer.output_metadata(runtime):
                response.outputs.add(name=name, datatype=datatype, shape=shape)
            return response

    async def ModelInfer(self, request: oip.ModelInferRequest, context) -> oip.ModelInferResponse:
        async with self.rpcs.scope("ModelInfer", request.model_name, context):
            return await oip_infer.infer(self.plane, self.settings, infer_request(request), rpc.deadline(context),
                                         partial(encode_response, request))
