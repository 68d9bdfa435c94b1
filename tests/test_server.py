"""A real server on loopback, called through the client: the contract and its errors."""

from __future__ import annotations

import base64
import io
import json

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from protoserve_client import additivity_gap, from_tensor, pb

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def digits(mnist_split) -> np.ndarray:
    return mnist_split["x_test"][:8].numpy()


def test_list_and_get_model(client):
    models = client.list_models().models
    assert "mnist" in [m.name for m in models]
    info = client.get_model("mnist")
    assert list(info.input_shape) == [1, 28, 28] and info.input_dtype == "float32"
    assert list(info.labels) == [str(i) for i in range(10)]
    assert info.default_method == "protonmf" and list(info.feature_shape) == [128, 7, 7]
    method = next(m for m in info.methods if m.name == "protonmf")
    assert method.additive and method.residual_share_definition and method.contribution_definition
    assert len(method.components) == 30
    assert all(c.exemplar_png.startswith(PNG_MAGIC) for c in method.components)
    report = json.loads(method.fit_report_json)
    assert report["acc_nmf_plus_residual"] == report["acc_black_box"] >= 0.97


def test_explain_follows_the_contract(client, digits):
    for x in digits:
        r = client.explain(x, model="mnist", method="protonmf", heatmaps="feature_grid",
                           interventions=[["c1.p0", "c7.p2"], ["c3.p1"]])
        assert r.model == "mnist" and r.version == "1" and r.method == "protonmf"
        assert r.target_class == r.prediction[0].class_index
        assert [c.class_index for c in r.components] == [r.target_class] * 3
        assert additivity_gap(r) <= 1e-4
        contributions = {c.id: c.contribution for c in r.components}
        for h in r.heatmaps:
            grid = from_tensor(h.map)
            assert grid.shape == (7, 7)
            assert abs(grid.sum() - contributions[h.component_id]) <= 1e-3
        for intervention in r.interventions:
            removed = sum(contributions.get(i, 0.0) for i in intervention.suppressed)
            assert abs(intervention.target_logit - (r.target_logit - removed)) <= 1e-4 * max(1, abs(r.target_logit))
        assert 0 <= r.residual_share <= 1


def test_predict_and_explain_agree(client, digits):
    for x in digits[:4]:
        p = client.predict(x, model="mnist", top_k=10)
        e = client.explain(x, model="mnist", top_k=10, heatmaps="none")
        assert [(s.class_index, s.logit) for s in p.prediction] == [(s.class_index, s.logit) for s in e.prediction]
        assert abs(sum(s.probability for s in p.prediction) - 1) < 1e-5


def test_target_class_and_image_input(client, digits):
    image = Image.fromarray((digits[0, 0] * 255).round().astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    by_image = client.explain(image=buffer.getvalue(), model="mnist", target_class=3, heatmaps="input")
    by_tensor = client.explain(digits[0], model="mnist", target_class=3, heatmaps="input")
    assert by_image.target_class == by_tensor.target_class == 3
    assert abs(by_image.target_logit - by_tensor.target_logit) < 1e-4
    assert from_tensor(by_image.heatmaps[0].map).shape == (28, 28)
    assert additivity_gap(by_image) <= 1e-4


def test_uint8_and_float16_inputs(client, digits):
    as_uint8 = (digits[1] * 255).round().astype(np.uint8)
    reference = client.predict((as_uint8 / np.float32(255)).astype(np.float32), model="mnist").prediction[0]
    assert client.predict(as_uint8, model="mnist").prediction[0].logit == pytest.approx(reference.logit, abs=1e-5)
    half = client.predict(digits[1].astype(np.float16), model="mnist").prediction[0]
    assert half.class_index == reference.class_index


def _raw(client, **fields):
    return client.stub.Explain(pb.ExplainRequest(**fields), timeout=10)


GOOD = np.zeros((1, 28, 28), np.float32)


@pytest.mark.parametrize("fields, code, field", [
    (dict(model="mnist", input=pb.Tensor(dtype="float32", shape=[28, 28], data=GOOD.tobytes()[:3136])),
     grpc.StatusCode.INVALID_ARGUMENT, "input.shape"),
    (dict(model="mnist", input=pb.Tensor(dtype="int7", shape=[1, 28, 28], data=GOOD.tobytes())),
     grpc.StatusCode.INVALID_ARGUMENT, "input.dtype"),
    (dict(model="mnist", input=pb.Tensor(dtype="float32", shape=[1, 28, 28], data=GOOD.tobytes()[:100])),
     grpc.StatusCode.INVALID_ARGUMENT, "input.data"),
    (dict(model="mnist", input=pb.Tensor(dtype="float32", shape=[1, 28, 28],
                                         data=np.full((1, 28, 28), np.nan, np.float32).tobytes())),
     grpc.StatusCode.INVALID_ARGUMENT, "input.data"),
    (dict(model="mnist", input=pb.Tensor(dtype="float32", shape=[0], data=b"")),
     grpc.StatusCode.INVALID_ARGUMENT, "input.shape"),
    (dict(model="mnist"), grpc.StatusCode.INVALID_ARGUMENT, "input"),
    (dict(model="mnist", image=b"not an image"), grpc.StatusCode.INVALID_ARGUMENT, "image"),
    (dict(model="nope", input=pb.Tensor(dtype="float32", shape=[1, 28, 28], data=GOOD.tobytes())),
     grpc.StatusCode.NOT_FOUND, ""),
    (dict(model="mnist", version="9", input=pb.Tensor(dtype="float32", shape=[1, 28, 28], data=GOOD.tobytes())),
     grpc.StatusCode.NOT_FOUND, ""),
    (dict(model="mnist", method="nope", input=pb.Tensor(dtype="float32", shape=[1, 28, 28], data=GOOD.tobytes())),
     grpc.StatusCode.NOT_FOUND, ""),
    (dict(model="mnist", input=pb.Tensor(dtype="float32", shape=[1, 28, 28], data=GOOD.tobytes()),
          interventions=[pb.Intervention(suppress=["c9.p9"])]), grpc.StatusCode.NOT_FOUND, ""),
    (dict(model="mnist", input=pb.Tensor(dtype="float32", shape=[1, 28, 28], data=GOOD.tobytes()), target_class=10),
     grpc.StatusCode.INVALID_ARGUMENT, "target_class"),
    (dict(model="mnist", input=pb.Tensor(dtype="float32", shape=[1, 28, 28], data=GOOD.tobytes()), top_k=-1),
     grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
])
def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(client, digits, fields, code, field):
    with pytest.raises(grpc.RpcError) as caught:
        _raw(client, **fields)
    assert caught.value.code() == code, caught.value.details()
    if field:
        assert caught.value.details().startswith(field)
        assert ("protoserve-field", field) in tuple(caught.value.trailing_metadata())
    assert client.predict(digits[0], model="mnist").prediction  # still serving


def test_explain_stream_answers_all_and_isolates_a_bad_request(client, digits):
    from protoserve_client import to_tensor

    requests = [pb.ExplainRequest(model="mnist", input=to_tensor(x), request_id=f"r{i}") for i, x in enumerate(digits)]
    requests.insert(3, pb.ExplainRequest(model="mnist", input=pb.Tensor(dtype="float32", shape=[2]), request_id="bad"))
    answers = {a.request_id: a for a in client.explain_stream(iter(requests), timeout=60)}
    assert set(answers) == {r.request_id for r in requests}
    assert answers["bad"].WhichOneof("result") == "error"
    assert answers["bad"].error.code == "INVALID_ARGUMENT" and answers["bad"].error.field == "input.data"
    for i in range(len(digits)):
        assert additivity_gap(answers[f"r{i}"].response) <= 1e-4


def test_health_reports_serving(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "protoserve.v1.Explainer"):
            status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING


def test_a_client_that_knows_only_reflection(server, digits):
    """No generated code: descriptors come from server reflection, messages are built dynamically."""
    from google.protobuf import descriptor_pool, json_format
    from google.protobuf.message_factory import GetMessageClass
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(server.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert "protoserve.v1.Explainer" in database.get_services()
        pool = descriptor_pool.DescriptorPool(database)
        service = pool.FindServiceByName("protoserve.v1.Explainer")

        def call(name, fields):
            method = service.methods_by_name[name]
            request_class, response_class = GetMessageClass(method.input_type), GetMessageClass(method.output_type)
            rpc = channel.unary_unary(f"/{service.full_name}/{name}", request_serializer=lambda m: m.SerializeToString(),
                                      response_deserializer=response_class.FromString)
            return rpc(json_format.ParseDict(fields, request_class()), timeout=30)

        models = call("ListModels", {})
        assert "mnist" in [m.name for m in models.models]
        info = call("GetModel", {"model": "mnist"})
        method = next(m for m in info.methods if m.name == "protonmf")
        assert method.components[0].exemplar_png.startswith(PNG_MAGIC)
        assert "acc_black_box" in json.loads(method.fit_report_json)
        x = digits[2]
        response = call("Explain", {"model": "mnist", "input": {"dtype": "float32", "shape": list(x.shape),
                                                                  "data": base64.b64encode(x.tobytes()).decode()},
                                    "heatmaps": "HEATMAP_MODE_FEATURE_GRID",
                                    "interventions": [{"suppress": [method.components[0].id]}]})
        total = sum(c.contribution for c in response.components) + response.residual_contribution + response.bias
        assert abs(total - response.target_logit) <= 1e-4 * max(1, abs(response.target_logit))
        for h in response.heatmaps:
            grid = np.frombuffer(h.map.data, dtype="<f4")
            contribution = next(c.contribution for c in response.components if c.id == h.component_id)
            assert abs(grid.sum() - contribution) <= 1e-3
