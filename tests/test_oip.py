"""inference.GRPCInferenceService (Open Inference Protocol) on the live server, through the generated stubs."""

from __future__ import annotations

import struct
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from protoserve_client.stubs.inference import grpc_service_pb2 as oip
from protoserve_client.stubs.inference import grpc_service_pb2_grpc as oip_grpc

OUTPUTS = ["logits", "target_class", "target_logit", "component_ids", "component_weights",
           "component_contributions", "bias", "residual_contribution", "residual_share", "heatmaps", "residual_heatmap",
           "intervened_logits", "additivity_gap"]


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.address)
    yield oip_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def digits(mnist_split) -> np.ndarray:
    return mnist_split["x_test"][:8].numpy()


def infer_request(x: np.ndarray, *, typed: bool = False, datatype: str = "FP32", outputs=(), **parameters):
    tensor = oip.ModelInferRequest.InferInputTensor(name="input", datatype=datatype, shape=x.shape)
    request = oip.ModelInferRequest(model_name="mnist", id="req-1", inputs=[tensor],
                                    outputs=[oip.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in outputs])
    if typed:
        field = "fp32_contents" if datatype == "FP32" else "uint_contents"
        getattr(request.inputs[0].contents, field).extend(x.reshape(-1).tolist())
    else:
        request.raw_input_contents.append(x.tobytes())
    for name, value in parameters.items():
        kind = {bool: "bool_param", int: "int64_param", str: "string_param", float: "double_param"}[type(value)]
        setattr(request.parameters[name], kind, value)
    return request


def decode(response: oip.ModelInferResponse) -> dict[str, np.ndarray]:
    """Raw output contents -> arrays (BYTES: length-prefixed strings)."""
    assert len(response.raw_output_contents) == len(response.outputs)
    arrays = {}
    for output, raw in zip(response.outputs, response.raw_output_contents):
        shape = list(output.shape)
        if output.datatype == "BYTES":
            items, offset = [], 0
            while offset < len(raw):
                (n,) = struct.unpack_from("<I", raw, offset)
                items.append(raw[offset + 4:offset + 4 + n].decode())
                offset += 4 + n
            arrays[output.name] = np.array(items, dtype=object).reshape(shape)
        else:
            dtype = {"FP32": "<f4", "INT64": "<i8"}[output.datatype]
            arrays[output.name] = np.frombuffer(raw, dtype=dtype).reshape(shape)
    return arrays


def test_server_and_model_readiness(stub):
    assert stub.ServerLive(oip.ServerLiveRequest()).live
    assert stub.ServerReady(oip.ServerReadyRequest()).ready
    assert stub.ModelReady(oip.ModelReadyRequest(name="mnist")).ready
    assert stub.ModelReady(oip.ModelReadyRequest(name="mnist", version="1")).ready
    assert not stub.ModelReady(oip.ModelReadyRequest(name="mnist", version="99")).ready
    assert not stub.ModelReady(oip.ModelReadyRequest(name="no-such-model")).ready
    metadata = stub.ServerMetadata(oip.ServerMetadataRequest())
    assert metadata.name == "protoserve" and metadata.version and "parameters" in metadata.extensions


def test_health_and_reflection_name_the_service(server):
    with grpc.insecure_channel(server.address) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService"), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
        assert "inference.GRPCInferenceService" in ProtoReflectionDescriptorDatabase(channel).get_services()


def test_model_metadata(stub):
    metadata = stub.ModelMetadata(oip.ModelMetadataRequest(name="mnist"))
    assert metadata.name == "mnist" and list(metadata.versions) == ["1"] and metadata.platform
    [tensor] = metadata.inputs
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("input", "FP32", [-1, 1, 28, 28])
    outputs = {o.name: (o.datatype, list(o.shape)) for o in metadata.outputs}
    assert list(outputs) == OUTPUTS
    assert outputs["logits"] == ("FP32", [-1, 10])
    assert outputs["target_class"] == ("INT64", [-1])
    assert outputs["component_ids"] == ("BYTES", [-1, -1])
    assert outputs["intervened_logits"] == ("FP32", [-1, -1, 10])


def test_batched_infer_matches_predict_and_explain(stub, client, digits):
    x = digits[:4]
    suppress = ["c1.p0", "c7.p2"]
    response = stub.ModelInfer(infer_request(x, method="protonmf", suppress=",".join(suppress),
                                             heatmaps="feature_grid"), timeout=60)
    assert response.model_name == "mnist" and response.model_version == "1" and response.id == "req-1"
    assert response.parameters["method"].string_param == "protonmf"
    out = decode(response)
    assert list(out) == [name for name in OUTPUTS if name != "residual_heatmap"]  # presence modes only
    assert out["logits"].shape == (4, 10) and out["component_ids"].shape == (4, 3)
    assert out["heatmaps"].shape == (4, 3, 7, 7) and out["intervened_logits"].shape == (4, 1, 10)
    for i in range(4):
        predicted = client.predict(x[i], model="mnist", top_k=10).prediction
        logits = np.zeros(10, np.float32)
        for score in predicted:
            logits[score.class_index] = score.logit
        np.testing.assert_allclose(out["logits"][i], logits, rtol=1e-5, atol=1e-5)
        explained = client.explain(x[i], model="mnist", method="protonmf", interventions=[suppress])
        assert out["target_class"][i] == explained.target_class == out["logits"][i].argmax()
        assert list(out["component_ids"][i]) == [c.id for c in explained.components]
        np.testing.assert_allclose(out["component_contributions"][i],
                                   [c.contribution for c in explained.components], rtol=1e-4, atol=1e-5)
        total = out["component_contributions"][i].sum() + out["residual_contribution"][i] + out["bias"][i]
        assert abs(total - out["target_logit"][i]) <= 1e-4 * max(1.0, abs(out["target_logit"][i]))
        assert 0 <= out["residual_share"][i] <= 1
        np.testing.assert_allclose(out["heatmaps"][i].sum(axis=(1, 2)), out["component_contributions"][i],
                                   rtol=1e-3, atol=1e-3)
        removed = sum(c for cid, c in zip(out["component_ids"][i], out["component_contributions"][i])
                      if cid in suppress)
        target = out["target_class"][i]
        assert abs(out["intervened_logits"][i, 0, target] - (out["target_logit"][i] - removed)) <= 1e-4 * max(
            1.0, abs(out["target_logit"][i]))
        assert abs(out["intervened_logits"][i, 0, target] - explained.interventions[0].target_logit) <= 1e-4


def test_typed_contents_raw_contents_and_uint8_agree(stub, digits):
    x = digits[:2]
    raw = decode(stub.ModelInfer(infer_request(x), timeout=60))
    typed = decode(stub.ModelInfer(infer_request(x, typed=True), timeout=60))
    for name in raw:
        assert (raw[name] == typed[name]).all(), name
    pixels = np.clip(np.round(x * 255), 0, 255).astype(np.uint8)
    as_uint8 = decode(stub.ModelInfer(infer_request(pixels, typed=True, datatype="UINT8"), timeout=60))
    as_float = decode(stub.ModelInfer(infer_request(pixels.astype(np.float32) / 255), timeout=60))
    np.testing.assert_allclose(as_uint8["logits"], as_float["logits"], rtol=1e-5, atol=1e-5)
    as_fp16 = decode(stub.ModelInfer(infer_request(x.astype(np.float16), datatype="FP16"), timeout=60))
    np.testing.assert_allclose(as_fp16["logits"], raw["logits"], atol=0.1)


def test_parameters_select_target_outputs_and_the_bare_prediction(stub, digits):
    x = digits[:3]
    out = decode(stub.ModelInfer(infer_request(x, target_class=3, outputs=["target_class", "component_ids"]),
                                 timeout=60))
    assert list(out) == ["target_class", "component_ids"]
    assert (out["target_class"] == 3).all()
    assert all(cid.startswith("c3.") for cid in out["component_ids"].reshape(-1))
    bare = stub.ModelInfer(infer_request(x, explain=False), timeout=60)
    assert [o.name for o in bare.outputs] == ["logits"] and "method" not in bare.parameters
    full = decode(stub.ModelInfer(infer_request(x), timeout=60))
    np.testing.assert_allclose(decode(bare)["logits"], full["logits"], rtol=1e-5, atol=1e-5)
    assert "heatmaps" not in full and "intervened_logits" not in full
    two_sets = decode(stub.ModelInfer(infer_request(x, suppress="c1.p0;c2.p0,c2.p1"), timeout=60))
    assert two_sets["intervened_logits"].shape == (3, 2, 10)


def _metrics(server) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.app.settings.metrics_port}/metrics", timeout=10).read()
    return {f.name: f for f in text_string_to_metric_families(text.decode())}


def _sample(families, family, name, **labels) -> float:
    if family not in families:
        return 0.0
    return sum(s.value for s in families[family].samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_a_batched_input_is_batched_and_counted(server, stub, digits):
    before = _metrics(server)
    stub.ModelInfer(infer_request(digits[:8]), timeout=60)
    after = _metrics(server)

    def delta(family, name, **labels):
        return _sample(after, family, name, **labels) - _sample(before, family, name, **labels)

    assert delta("protoserve_batch_size", "protoserve_batch_size_sum", model="mnist") == 8
    assert delta("protoserve_batch_size", "protoserve_batch_size_count", model="mnist") < 8
    assert delta("protoserve_requests", "protoserve_requests_total", rpc="ModelInfer", model="mnist", code="OK") == 1
    assert delta("protoserve_residual_share", "protoserve_residual_share_count", model="mnist",
                 method="protonmf") == 8


def _bad(request: oip.ModelInferRequest, **changes) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest.FromString(request.SerializeToString())
    for name, value in changes.items():
        if name == "model_name":
            request.model_name = value
        elif name == "shape":
            del request.inputs[0].shape[:]
            request.inputs[0].shape.extend(value)
        elif name == "raw":
            request.raw_input_contents[0] = value
        elif name == "input_name":
            request.inputs[0].name = value
        elif name == "datatype":
            request.inputs[0].datatype = value
        elif name == "outputs":
            request.outputs.add(name=value)
        else:
            request.parameters[name].CopyFrom(value)
    return request


def _param(**kind) -> oip.InferParameter:
    return oip.InferParameter(**kind)


@pytest.mark.parametrize("changes, code, field", [
    ({"model_name": "no-such-model"}, grpc.StatusCode.NOT_FOUND, ""),
    ({"shape": [2, 28, 28]}, grpc.StatusCode.INVALID_ARGUMENT, "inputs[0].shape"),
    ({"shape": [1, 1, 28, 28]}, grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents[0]"),
    ({"raw": b"\x00" * 12}, grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents[0]"),
    ({"raw": np.full((2, 1, 28, 28), np.nan, np.float32).tobytes()}, grpc.StatusCode.INVALID_ARGUMENT,
     "inputs[0].data"),
    ({"input_name": "x"}, grpc.StatusCode.INVALID_ARGUMENT, "inputs[0].name"),
    ({"datatype": "INT32"}, grpc.StatusCode.INVALID_ARGUMENT, "inputs[0].datatype"),
    ({"outputs": "nope"}, grpc.StatusCode.INVALID_ARGUMENT, "outputs[0].name"),
    ({"outputs": "heatmaps"}, grpc.StatusCode.INVALID_ARGUMENT, "outputs"),
    ({"method": _param(string_param="no-such-method")}, grpc.StatusCode.NOT_FOUND, ""),
    ({"method": _param(int64_param=3)}, grpc.StatusCode.INVALID_ARGUMENT, "parameters.method"),
    ({"suppress": _param(string_param="c1.p0,zz")}, grpc.StatusCode.NOT_FOUND, ""),
    ({"target_class": _param(int64_param=10)}, grpc.StatusCode.INVALID_ARGUMENT, "parameters.target_class"),
    ({"target_class": _param(string_param="3")}, grpc.StatusCode.INVALID_ARGUMENT, "parameters.target_class"),
    ({"heatmaps": _param(string_param="everywhere")}, grpc.StatusCode.INVALID_ARGUMENT, "parameters.heatmaps"),
    ({"supress": _param(string_param="c1.p0")}, grpc.StatusCode.INVALID_ARGUMENT, "parameters.supress"),
])
def test_bad_requests_get_clear_errors(stub, digits, changes, code, field):
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(_bad(infer_request(digits[:2]), **changes), timeout=60)
    assert caught.value.code() == code, caught.value.details()
    trailing = dict(caught.value.trailing_metadata() or ())
    assert trailing.get("protoserve-field", "") == field, caught.value.details()
    assert stub.ServerReady(oip.ServerReadyRequest()).ready


def test_what_would_multiply_the_answer_or_the_parsing_is_refused_first(stub, client, digits):
    """An output name asked for twice (2000 times: an answer 2000 times the size), and a suppress string
    longer than every allowed set naming every component (32 MiB of ';' took 15 s on the event loop)."""
    with pytest.raises(grpc.RpcError) as twice:
        stub.ModelInfer(infer_request(digits[:1], outputs=["logits"] + ["target_class"] * 2000), timeout=60)
    assert twice.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert twice.value.details() == "outputs[2].name: 'target_class' is asked for twice"
    with pytest.raises(grpc.RpcError) as long_suppress:
        stub.ModelInfer(infer_request(digits[:1], suppress=";" * (8 << 20)), timeout=60)
    assert long_suppress.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(long_suppress.value.trailing_metadata())["protoserve-field"] == "parameters.suppress"
    assert long_suppress.value.details().startswith(f"parameters.suppress: {8 << 20} characters, more than")
    # The bound leaves room for every allowed set naming every component, with spaces.
    method, = [m for m in client.get_model("mnist").methods if m.name == "protonmf"]
    component_ids = [c.id for c in method.components]
    every = " ; ".join([" , ".join(component_ids)] * 64)
    answer = stub.ModelInfer(infer_request(digits[:1], method="protonmf", suppress=every), timeout=60)
    assert decode(answer)["intervened_logits"].shape[:2] == (1, 64)


def test_metadata_of_an_unknown_model_is_not_found(stub):
    for request in (oip.ModelMetadataRequest(name="no-such-model"), oip.ModelMetadataRequest(name="mnist", version="9")):
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelMetadata(request)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_typed_contents_errors(stub, digits):
    request = infer_request(digits[:1], typed=True)
    del request.inputs[0].contents.fp32_contents[-1]
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "fp32_contents" in caught.value.details()
    both = infer_request(digits[:1], typed=True)
    both.raw_input_contents.append(digits[:1].tobytes())
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(both)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fp16 = infer_request(digits[:1].astype(np.float16), typed=False, datatype="FP16")
    fp16.inputs[0].contents.fp32_contents.extend([0.0])
    del fp16.raw_input_contents[:]
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(fp16)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("value", [_param(int64_param=2 ** 31), _param(int64_param=2 ** 63 - 1),
                                   _param(int64_param=-(2 ** 63)), _param(int64_param=-1),
                                   _param(uint64_param=2 ** 64 - 1), _param(uint64_param=2 ** 32)])
def test_a_target_class_outside_the_class_indices_is_invalid_not_internal(stub, digits, value):
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(_bad(infer_request(digits[:1]), target_class=value), timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert dict(caught.value.trailing_metadata())["protoserve-field"] == "parameters.target_class"
    number = value.int64_param if value.WhichOneof("parameter_choice") == "int64_param" else value.uint64_param
    assert caught.value.details() == f"parameters.target_class: must be a class index, got {number}"


@pytest.mark.parametrize("shape", [[1] * 70, [1] * 100_000, [2 ** 63 - 1, 1, 28, 28], [-1, 1, 28, 28]])
def test_hostile_shapes_are_invalid_not_internal(stub, digits, shape):
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(_bad(infer_request(digits[:1]), shape=shape), timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert dict(caught.value.trailing_metadata())["protoserve-field"] == "inputs[0].shape"
    assert len(caught.value.details()) < 200


@pytest.fixture(scope="module")
def batching_server(demo_store):
    """A server whose batches wait 300 ms for more requests: concurrent requests share them."""
    from conftest import RunningServer, free_port

    from server.settings import Settings

    running = RunningServer(Settings(model_store=demo_store, port=0, metrics_port=free_port(), max_delay_ms=300))
    yield running
    running.stop()


def test_each_request_gets_its_own_interventions_whatever_it_is_batched_with(batching_server, digits):
    """Requests with 0, 1 and 2 suppress sets, sent at once so they share a batch: each answer has
    exactly its own intervention sets, the same as when sent alone."""
    suppress = {0: None, 1: "c1.p0", 2: "c1.p0;c2.p0,c2.p1"}
    with grpc.insecure_channel(batching_server.address) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)

        def request(i: int, count: int):
            parameters = {"suppress": suppress[count]} if suppress[count] else {}
            return infer_request(digits[i:i + 1], method="protonmf", **parameters)

        counts = [0, 1, 2, 0, 2, 1]
        alone = [decode(stub.ModelInfer(request(i, n), timeout=60)) for i, n in enumerate(counts)]
        batched_rounds = 0
        for _ in range(3):
            before = _metrics(batching_server)
            futures = [stub.ModelInfer.future(request(i, n), timeout=60) for i, n in enumerate(counts)]
            answers = [decode(f.result()) for f in futures]
            after = _metrics(batching_server)
            batches = (_sample(after, "protoserve_batch_size", "protoserve_batch_size_count", model="mnist")
                       - _sample(before, "protoserve_batch_size", "protoserve_batch_size_count", model="mnist"))
            batched_rounds += batches < len(counts)
            for count, answer, expected in zip(counts, answers, alone):
                if count == 0:
                    assert "intervened_logits" not in answer
                else:
                    assert answer["intervened_logits"].shape == (1, count, 10)
                    np.testing.assert_allclose(answer["intervened_logits"], expected["intervened_logits"],
                                               rtol=1e-5, atol=1e-5)
                assert answer["additivity_gap"].shape == (1,) and answer["additivity_gap"][0] <= 1e-4
    assert batched_rounds >= 1  # the mixed requests did share batches


def test_the_demo_archives_serve_every_method(batching_server):
    """Their additive methods pass the load-time check on the archives' held-out samples."""
    registry = batching_server.app.registry
    assert registry.load_errors == {}
    for model in registry.all():
        assert set(model.runtime.explainers) == set(model.runtime.archive.methods)
        assert model.runtime.additivity_inputs.endswith("held-out samples")
