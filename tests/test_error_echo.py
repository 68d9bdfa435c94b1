"""Bounded error echoes (issue 15, item 6; docs/limits.md, "What an error echoes").

A client's string in an error (model, version, method, component id, parameter name, dtype,
datatype, input and output name) is echoed clipped, so a 16 KB name still gets its NOT_FOUND or
INVALID_ARGUMENT (unclipped, the message passes the client's 8 KiB header limit and the call ends
RESOURCE_EXHAUSTED); the field trailer is a valid metadata value whatever characters it names.
"""

from __future__ import annotations

import grpc
import pytest
from protoserve_client import pb, pb_grpc
from protoserve_client.stubs.inference import grpc_service_pb2 as oip
from protoserve_client.stubs.inference import grpc_service_pb2_grpc as oip_grpc

from handlers.errors import InvalidInputError, NotFoundError
from server.errors import MAX_FIELD_CHARS, MAX_MESSAGE_BYTES, field_of, message_of

LONG = "m" * 16384
CLIPPED = "'" + "m" * 64 + "...'"  # how LONG is echoed in a message
ODD = "a\nb\x00é€" + "z" * 200      # a control character, a NUL and non-ASCII in a parameter name
DIGIT = pb.Tensor(dtype="uint8", shape=[1, 28, 28], data=bytes(784))
NOT_FOUND, INVALID = grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.address) as channel:
        yield channel


def _refusal(call, request) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=60)
    error = caught.value
    return error.code(), error.details(), dict(error.trailing_metadata() or ()).get("protoserve-field", "")


@pytest.mark.parametrize("rpc, message, code, field, starts", [
    ("Predict", pb.PredictRequest(model=LONG, input=DIGIT), NOT_FOUND, "", f"model {CLIPPED} not found; known: "),
    ("GetModel", pb.GetModelRequest(model=LONG), NOT_FOUND, "", f"model {CLIPPED} not found"),
    ("GetModel", pb.GetModelRequest(model="mnist", version=LONG), NOT_FOUND, "",
     f"version of model 'mnist' {CLIPPED} not found; known: 1"),
    ("Explain", pb.ExplainRequest(model="mnist", method=LONG, input=DIGIT), NOT_FOUND, "",
     f"method of model 'mnist' {CLIPPED} not found; known: "),
    ("Explain", pb.ExplainRequest(model="mnist", input=DIGIT, interventions=[pb.Intervention(suppress=[LONG])]),
     NOT_FOUND, "", f"component of method 'protonmf' {CLIPPED} not found"),
    ("Predict", pb.PredictRequest(model="mnist", input=pb.Tensor(dtype=LONG, shape=[1, 28, 28], data=bytes(784))),
     INVALID, "input.dtype", "input.dtype: input.dtype '" + "m" * 32 + "...' is not supported"),
])
def test_a_16_kb_string_is_echoed_clipped_with_its_status(channel, rpc, message, code, field, starts):
    response_type = {"Predict": pb.PredictResponse, "GetModel": pb.ModelInfo, "Explain": pb.ExplainResponse}[rpc]
    call = channel.unary_unary(f"/protoserve.v1.Explainer/{rpc}", request_serializer=type(message).SerializeToString,
                               response_deserializer=response_type.FromString)
    got_code, details, got_field = _refusal(call, message)
    assert (got_code, got_field) == (code, field), details[:200]
    assert details.startswith(starts), details[:200]
    assert len(details) < 300


def test_a_stream_error_echoes_clipped(channel):
    stub = pb_grpc.ExplainerStub(channel)
    answers = list(stub.ExplainStream(iter([pb.ExplainRequest(model="mnist", method=LONG, input=DIGIT,
                                                              request_id="long")]), timeout=60))
    assert [a.WhichOneof("result") for a in answers] == ["error"]
    error = answers[0].error
    assert (error.code, error.field) == ("NOT_FOUND", "")
    assert error.message.startswith(f"method of model 'mnist' {CLIPPED} not found") and len(error.message) < 300


def _infer(**parameters) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name="mnist", inputs=[oip.ModelInferRequest.InferInputTensor(
        name="input", datatype="UINT8", shape=[1, 1, 28, 28])], raw_input_contents=[bytes(784)])
    for name, value in parameters.items():
        request.parameters[name].string_param = value
    return request


def _oip_cases():
    long_name, long_datatype, long_output, long_version = _infer(), _infer(), _infer(), _infer()
    long_name.inputs[0].name = LONG
    long_datatype.inputs[0].datatype = LONG
    long_output.outputs.add(name=LONG)
    long_version.model_version = LONG
    unknown_long, unknown_odd = _infer(), _infer()
    unknown_long.parameters[LONG].bool_param = True
    unknown_odd.parameters[ODD].bool_param = True
    odd_field = r"parameters.a\nb\x00\xe9\u20ac" + "z" * 58 + "..."
    return [
        (oip.ModelInferRequest(model_name=LONG), NOT_FOUND, "", f"model {CLIPPED} not found"),
        (long_version, NOT_FOUND, "", f"version of model 'mnist' {CLIPPED} not found"),
        (_infer(method=LONG), NOT_FOUND, "", f"method of model 'mnist' {CLIPPED} not found"),
        (_infer(suppress=LONG), NOT_FOUND, "", f"component of method 'protonmf' {CLIPPED} not found"),
        (_infer(heatmaps=LONG), INVALID, "parameters.heatmaps", f"parameters.heatmaps: {CLIPPED} is not one of"),
        (long_name, INVALID, "inputs[0].name", f"inputs[0].name: expected 'input', got {CLIPPED}"),
        (long_datatype, INVALID, "inputs[0].datatype", f"inputs[0].datatype: {CLIPPED} is not one of"),
        (long_output, INVALID, "outputs[0].name", f"outputs[0].name: {CLIPPED} is not an output"),
        (unknown_long, INVALID, "parameters." + "m" * 64 + "...",
         "parameters." + "m" * 64 + "...: unknown parameter; known: "),
        (unknown_odd, INVALID, odd_field, "parameters.a\nb\x00é€"),
    ]


@pytest.mark.parametrize("message, code, field, starts", _oip_cases())
def test_oip_errors_echo_clipped_and_name_a_printable_field(channel, message, code, field, starts):
    got_code, details, got_field = _refusal(oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer, message)
    assert (got_code, got_field) == (code, field), details[:200]
    assert details.startswith(starts), details[:200]
    assert len(details) < 400  # the echo clipped to 64 characters, then the known names


def test_every_message_and_field_is_capped_centrally():
    huge = InvalidInputError("x" * 5000, "é" * 5000)  # built without clipping: the central caps still hold
    message = message_of(huge)
    assert len(message.encode()) <= MAX_MESSAGE_BYTES and message.endswith("...")
    assert message == str(huge).encode()[:MAX_MESSAGE_BYTES - 3].decode(errors="ignore") + "..."
    assert field_of(huge) == "x" * MAX_FIELD_CHARS + "..."
    assert field_of(InvalidInputError("p.\u20ac\n", "bad")) == r"p.\u20ac\n"
    small = NotFoundError("model", "nope", ["mnist"])
    assert message_of(small) == "model 'nope' not found; known: mnist" and field_of(small) == ""


def test_the_server_still_serves_after_long_strings(channel):
    reply = pb_grpc.ExplainerStub(channel).Predict(pb.PredictRequest(model="mnist", input=DIGIT), timeout=60)
    assert len(reply.prediction) == 5
