"""Property-based fuzzing of request decoding against the live server (hypothesis).

Whatever a client sends, well-formed protobuf with hostile field values or bytes that are not
a message at all, to protoserve.v1 or to OIP's ModelInfer, the answer is never UNKNOWN or INTERNAL
(nor RESOURCE_EXHAUSTED: one request at a time fills no queue, and a 16 KB name must still get its
NOT_FOUND), and the server keeps answering.
"""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from protoserve_client import pb
from protoserve_client.stubs.inference import grpc_service_pb2 as oip

from test_images import _png_header

FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.RESOURCE_EXHAUSTED}
TIMEOUT = 60
FUZZ = settings(max_examples=150, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example])
SERVICE = "/protoserve.v1.Explainer"
COMPONENT_IDS = ["c0.p0", "c9.p2", "concept0", "c3.x1", "c10.p0", "", "c0.p0 "]


def _png(width: int = 28, height: int = 28, mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), 128).save(buffer, format="PNG")
    return buffer.getvalue()


REAL_PNG = _png()

int64 = st.integers(-(2 ** 63), 2 ** 63 - 1)
int32 = st.integers(-(2 ** 31), 2 ** 31 - 1)
# Text a client can send: protobuf strings are UTF-8, which has no surrogates (the message would not serialize).
some_text = st.text(st.characters(codec="utf-8"), max_size=24)
# Long strings: echoed in an error message unclipped, they would pass the client's header limit.
long_text = st.builds(lambda char, n: char * n, st.characters(codec="utf-8"), st.integers(5000, 20000))

dtypes = st.sampled_from(["float32", "float16", "uint8", "", "float64", "int8", "bfloat16", "FLOAT32"]) | some_text
dims = st.sampled_from([0, 1, 28, -1, 2 ** 31, 2 ** 62, 2 ** 63 - 1, -(2 ** 63)]) | st.integers(-3, 40) | int64
shapes = (st.lists(dims, max_size=6) | st.sampled_from([[1, 28, 28], [28, 28], [1, 1, 28, 28], [784]])
          | st.integers(30, 100).map(lambda n: [1] * n))  # more dimensions than NumPy holds
floats = st.floats(width=32, allow_nan=True, allow_infinity=True)


@st.composite
def tensors(draw) -> pb.Tensor:
    kind = draw(st.sampled_from(["random", "float32", "float16", "uint8"]))
    if kind == "random":
        return pb.Tensor(dtype=draw(dtypes), shape=draw(shapes), data=draw(st.binary(max_size=4096)))
    shape = draw(st.sampled_from([[1, 28, 28], [28, 28], [784]]))
    n = int(np.prod(shape))
    if kind == "uint8":
        return pb.Tensor(dtype="uint8", shape=shape, data=draw(st.binary(min_size=n, max_size=n)))
    fill = draw(floats)
    values = np.full(n, fill, np.float32)
    for index, value in draw(st.lists(st.tuples(st.integers(0, n - 1), floats), max_size=8)):
        values[index] = value  # a few NaN / inf / huge values among ordinary ones
    dtype = np.float32 if kind == "float32" else np.float16
    with np.errstate(over="ignore"):
        data = values.astype(dtype).tobytes()
    return pb.Tensor(dtype=kind, shape=shape, data=data)


images = st.one_of(
    st.binary(max_size=2048),
    st.binary(max_size=512).map(lambda tail: b"\x89PNG\r\n\x1a\n" + tail),
    st.integers(0, len(REAL_PNG)).map(lambda n: REAL_PNG[:n]),
    st.tuples(st.integers(1, 64), st.integers(1, 64), st.sampled_from(["L", "RGB", "RGBA", "1", "I;16", "P", "LA"])).map(
        lambda a: _png(*a)),
    st.builds(lambda data, at, byte: data[:at] + bytes([byte]) + data[at + 1:],
              st.just(REAL_PNG), st.integers(0, len(REAL_PNG) - 1), st.integers(0, 255)),
    st.tuples(st.integers(0, 2 ** 31 - 1), st.integers(0, 2 ** 31 - 1)).map(lambda size: _png_header(*size)),
)


def mostly(usual: st.SearchStrategy, *rare: st.SearchStrategy) -> st.SearchStrategy:
    """``usual`` about four times in five, else one of ``rare``: most requests then get past the
    model, version and method checks and as far as decoding the input."""
    return st.sampled_from([usual] * (4 * len(rare)) + list(rare)).flatmap(lambda strategy: strategy)


models = mostly(st.just("mnist"), st.sampled_from(["", "MNIST", "mnist "]), some_text, long_text)
versions = mostly(st.sampled_from(["", "1"]), st.sampled_from(["9", "01", "1.0"]), some_text, long_text)
methods = mostly(st.sampled_from(["", "protonmf", "srae", "coupled_nmf"]), st.just("nope"), some_text, long_text)
hostile_interventions = st.lists(st.builds(pb.Intervention, suppress=st.lists(
    st.sampled_from(COMPONENT_IDS) | some_text | long_text, max_size=5)), max_size=3) | st.integers(60, 70).map(
    lambda n: [pb.Intervention(suppress=["c0.p0"])] * n)
interventions = mostly(st.just([]), hostile_interventions)


@st.composite
def inputs(draw) -> dict:
    """Mostly exactly one of the two fields; sometimes both or neither."""
    which = draw(mostly(st.sampled_from(["input", "image"]), st.sampled_from(["both", "neither"])))
    fields = {}
    if which in ("input", "both"):
        fields["input"] = draw(tensors())
    if which in ("image", "both"):
        fields["image"] = draw(images)
    return fields


@st.composite
def explain_requests(draw) -> pb.ExplainRequest:
    request = pb.ExplainRequest(model=draw(models), version=draw(versions), method=draw(methods),
                                top_k=draw(mostly(st.sampled_from([0, 1, 5, 10]), st.sampled_from([11, 1000, 1001, -1]),
                                                  int32)),
                                heatmaps=draw(mostly(st.integers(0, 2), st.integers(-3, 5), int32)), interventions=draw(interventions),
                                request_id=draw(some_text), **draw(inputs()))
    target = draw(mostly(st.none() | st.integers(0, 9), st.sampled_from([-1, 10]), int32))
    if target is not None:
        request.target_class = target
    return request


@st.composite
def predict_requests(draw) -> pb.PredictRequest:
    return pb.PredictRequest(model=draw(models), version=draw(versions),
                             top_k=draw(mostly(st.sampled_from([0, 1, 10]), st.sampled_from([11, -1]), int32)),
                             request_id=draw(some_text), **draw(inputs()))


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.address) as channel:
        yield channel


def _code(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as error:
        assert error.code() not in FORBIDDEN, f"{error.code()}: {error.details()}"
        return error.code()
    return grpc.StatusCode.OK


def _assert_still_serving(channel) -> None:
    good = pb.PredictRequest(model="mnist", input=pb.Tensor(dtype="float32", shape=[1, 28, 28],
                                                            data=np.zeros((1, 28, 28), np.float32).tobytes()))
    response = channel.unary_unary(f"{SERVICE}/Predict", request_serializer=pb.PredictRequest.SerializeToString,
                                   response_deserializer=pb.PredictResponse.FromString)(good, timeout=TIMEOUT)
    assert response.prediction


@FUZZ
@given(request=explain_requests())
def test_explain_requests_never_fail_as_a_bug(channel, request):
    rpc = channel.unary_unary(f"{SERVICE}/Explain", request_serializer=pb.ExplainRequest.SerializeToString,
                              response_deserializer=pb.ExplainResponse.FromString)
    _code(lambda: rpc(request, timeout=TIMEOUT))


@FUZZ
@given(request=predict_requests())
def test_predict_requests_never_fail_as_a_bug(channel, request):
    rpc = channel.unary_unary(f"{SERVICE}/Predict", request_serializer=pb.PredictRequest.SerializeToString,
                              response_deserializer=pb.PredictResponse.FromString)
    _code(lambda: rpc(request, timeout=TIMEOUT))


def _mutations(draw_bytes=st.binary(max_size=64)):
    """Raw bytes: random, or a valid request with bytes flipped, cut or appended."""
    valid = pb.ExplainRequest(model="mnist", top_k=3, input=pb.Tensor(dtype="uint8", shape=[1, 28, 28],
                                                                      data=bytes(784))).SerializeToString()
    return st.one_of(
        st.binary(max_size=1024),
        st.tuples(st.integers(0, len(valid) - 1), st.integers(0, 255)).map(
            lambda a: valid[:a[0]] + bytes([a[1]]) + valid[a[0] + 1:]),
        st.integers(0, len(valid)).map(lambda n: valid[:n]),
        draw_bytes.map(lambda tail: valid + tail),
    )


@FUZZ
@given(data=_mutations(), method=st.sampled_from(["Explain", "Predict", "GetModel", "ListModels"]))
def test_undecodable_bytes_are_invalid_argument_not_unknown(channel, data, method):
    _code(lambda: channel.unary_unary(f"{SERVICE}/{method}")(data, timeout=TIMEOUT))


@pytest.mark.parametrize("method", [f"{SERVICE}/Explain", f"{SERVICE}/Predict", f"{SERVICE}/GetModel",
                                    "/inference.GRPCInferenceService/ModelInfer"])
def test_undecodable_bytes_name_the_request_in_the_field_trailer(channel, method):
    with pytest.raises(grpc.RpcError) as refused:
        channel.unary_unary(method)(b"\xff\xfe", timeout=TIMEOUT)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details().startswith(f"request: cannot decode the message of {method}")
    assert dict(refused.value.trailing_metadata())["protoserve-field"] == "request"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=st.lists(_mutations(), min_size=1, max_size=4))
def test_a_stream_of_raw_bytes_ends_with_a_status_not_a_hang(channel, messages):
    stream = channel.stream_stream(f"{SERVICE}/ExplainStream")

    def call():
        for _ in stream(iter(messages), timeout=TIMEOUT):
            pass

    assert _code(call) != grpc.StatusCode.DEADLINE_EXCEEDED


OIP_DATATYPES = ["FP32", "UINT8", "FP16"]
parameter_names = st.sampled_from(["method", "target_class", "suppress", "heatmaps", "explain", "priority",
                                   "timeout"]) | some_text | long_text
parameter_values = st.one_of(
    st.builds(lambda v: oip.InferParameter(bool_param=v), st.booleans()),
    st.builds(lambda v: oip.InferParameter(int64_param=v), st.integers(-3, 12) | int64),
    st.builds(lambda v: oip.InferParameter(uint64_param=v), st.integers(0, 12) | st.integers(0, 2 ** 64 - 1)),
    st.builds(lambda v: oip.InferParameter(double_param=v), st.floats()),
    st.builds(lambda v: oip.InferParameter(string_param=v), st.sampled_from(
        ["", "protonmf", "srae", "none", "input", "feature_grid", "c0.p0", "c0.p0;c1.p0", "c0.p0,zz"])
        | some_text | long_text),
    st.just(oip.InferParameter()),
)
output_names = st.sampled_from(["logits", "target_class", "component_ids", "heatmaps", "intervened_logits"]) | some_text


@st.composite
def infer_requests(draw) -> oip.ModelInferRequest:
    """Mostly a well-formed batch of 1-3 examples with hostile parameters; sometimes hostile tensors."""
    datatype = draw(mostly(st.sampled_from(OIP_DATATYPES), some_text | long_text))
    n = draw(st.integers(1, 3))
    shape = draw(mostly(st.just([n, 1, 28, 28]), shapes, st.sampled_from([[0, 1, 28, 28], [257, 1, 28, 28]])))
    tensor = oip.ModelInferRequest.InferInputTensor(name=draw(mostly(st.just("input"), some_text | long_text)),
                                                    datatype=datatype, shape=shape)
    request = oip.ModelInferRequest(model_name=draw(models), model_version=draw(versions), id=draw(some_text),
                                    inputs=[tensor] * draw(mostly(st.just(1), st.sampled_from([0, 2]))))
    itemsize = {"FP32": 4, "FP16": 2}.get(datatype, 1)
    size = n * 784 * itemsize if shape == [n, 1, 28, 28] else draw(st.integers(0, 4096))
    request.raw_input_contents.extend([draw(mostly(st.just(bytes(size)), st.binary(max_size=4096)))])
    for name, value in draw(st.lists(st.tuples(parameter_names, parameter_values), max_size=4)):
        request.parameters[name].CopyFrom(value)
    for name in draw(mostly(st.just([]), st.lists(output_names, max_size=3))):
        request.outputs.add(name=name)
    return request


@FUZZ
@given(request=infer_requests())
def test_oip_infer_requests_never_fail_as_a_bug(channel, request):
    rpc = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                              request_serializer=oip.ModelInferRequest.SerializeToString,
                              response_deserializer=oip.ModelInferResponse.FromString)
    _code(lambda: rpc(request, timeout=TIMEOUT))


def test_the_server_still_answers_after_fuzzing(channel):
    _assert_still_serving(channel)
