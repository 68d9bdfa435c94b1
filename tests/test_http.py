"""The HTTP port on a live server: the Open Inference Protocol's REST binding (JSON and binary tensors)
against the gRPC OIP service bitwise, protoserve.v1 in JSON against gRPC, errors, metrics, and the
bounds a stranger meets (attack payloads over TLS with bearer tokens)."""

from __future__ import annotations

import gc
import http.client
import json
import logging
import socket
import ssl
import struct
import threading
import time

import grpc
import numpy as np
import pytest
from google.protobuf import json_format
from prometheus_client.parser import text_string_to_metric_families
from protoserve_client import pb
from protoserve_client.stubs.inference import grpc_service_pb2 as oip
from protoserve_client.stubs.inference import grpc_service_pb2_grpc as oip_grpc

from conftest import RunningServer, free_port
from server.settings import Settings
from test_oip import decode, infer_request
from test_security import TOKEN, pki, token_file  # noqa: F401 (fixtures)

SUPPRESS = ["c1.p0", "c7.p2"]


def call(address: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
         context: ssl.SSLContext | None = None) -> tuple[int, http.client.HTTPMessage, bytes]:
    host, port = address.rsplit(":", 1)
    connection = (http.client.HTTPSConnection(host, int(port), timeout=60, context=context) if context
                  else http.client.HTTPConnection(host, int(port), timeout=60))
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def exchange(address: str, sent: bytes) -> bytes:
    """What the server answers to the bytes ``sent`` on a plain connection, until it closes it."""
    host, port = address.rsplit(":", 1)
    answer = b""
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(sent)
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def infer_body(x: np.ndarray, *, binary: bool = False, outputs=(), binary_output: bool = False, **parameters):
    """An infer request body (and its headers): ``x`` as JSON data, or as binary data after the JSON."""
    tensor = {"name": "input", "datatype": "FP32", "shape": list(x.shape)}
    if binary:
        tensor["parameters"] = {"binary_data_size": x.nbytes}
    else:
        tensor["data"] = x.reshape(-1).tolist()
    document = {"id": "h-1", "inputs": [tensor], "parameters": dict(parameters)}
    if binary_output:
        document["parameters"]["binary_data_output"] = True
    if outputs:
        document["outputs"] = [{"name": name, "parameters": {"binary_data": True}} if binary_output is None
                               else {"name": name} for name in outputs]
    head = json.dumps(document).encode()
    if not binary:
        return head, {"Content-Type": "application/json"}
    return head + x.astype("<f4").tobytes(), {"Inference-Header-Content-Length": str(len(head))}


def assert_same_arrays(arrays: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    """Each expected array came back with its shape, dtype and bytes (strings: their values)."""
    for name, array in expected.items():
        assert arrays[name].shape == array.shape, name
        if array.dtype == object:
            assert arrays[name].tolist() == array.tolist(), name
        else:
            assert arrays[name].dtype == array.dtype and arrays[name].tobytes() == array.tobytes(), name


def rest_arrays(headers: http.client.HTTPMessage, body: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    """A REST infer response -> its JSON and its outputs as arrays (binary ones read after the JSON)."""
    split = int(headers.get("Inference-Header-Content-Length", len(body)))
    document = json.loads(body[:split])
    offset, arrays = split, {}
    for output in document["outputs"]:
        shape, datatype = output["shape"], output["datatype"]
        if "data" in output:
            values = output["data"]
            arrays[output["name"]] = (np.array(values, dtype=object) if datatype == "BYTES" else
                                      np.array(values, dtype={"FP32": "<f4", "INT64": "<i8"}[datatype])).reshape(shape)
            continue
        size = output["parameters"]["binary_data_size"]
        raw = body[offset:offset + size]
        offset += size
        if datatype == "BYTES":
            items, at = [], 0
            while at < len(raw):
                (n,) = struct.unpack_from("<I", raw, at)
                items.append(raw[at + 4:at + 4 + n].decode())
                at += 4 + n
            arrays[output["name"]] = np.array(items, dtype=object).reshape(shape)
        else:
            arrays[output["name"]] = np.frombuffer(raw, {"FP32": "<f4", "INT64": "<i8"}[datatype]).reshape(shape)
    assert offset == len(body)
    return document, arrays


@pytest.fixture(scope="module")
def digits(mnist_split) -> np.ndarray:
    return mnist_split["x_test"][:4].numpy()


@pytest.fixture(scope="module")
def oip_stub(server):
    channel = grpc.insecure_channel(server.address)
    yield oip_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


# ------------------------------------------------------------------------------ the protocol


def test_health_server_and_model_metadata_match_grpc(server, oip_stub):
    address = server.http_address
    assert call(address, "GET", "/v2/health/live")[::2] == (200, b'{"live":true}')
    assert call(address, "GET", "/v2/health/ready")[::2] == (200, b'{"ready":true}')
    status, _, body = call(address, "GET", "/v2")
    assert status == 200 and json.loads(body) == {"name": "protoserve", "version": oip_stub.ServerMetadata(
        oip.ServerMetadataRequest()).version, "extensions": ["parameters", "binary_tensor_data"]}
    expected = json_format.MessageToDict(oip_stub.ModelMetadata(oip.ModelMetadataRequest(name="mnist")))
    for entry in expected["inputs"] + expected["outputs"]:
        entry["shape"] = [int(n) for n in entry["shape"]]  # int64 is a string in protobuf's JSON
    for path in ("/v2/models/mnist", "/v2/models/mnist/versions/1"):
        status, headers, body = call(address, "GET", path)
        assert (status, headers["Content-Type"], json.loads(body)) == (200, "application/json", expected)
    assert call(address, "GET", "/v2/models/mnist/ready")[0] == 200
    assert call(address, "GET", "/v2/models/mnist/versions/1/ready")[0] == 200
    for path in ("/v2/models/mnist/versions/9/ready", "/v2/models/no-such-model/ready"):
        status, _, body = call(address, "GET", path)
        assert status == 503 and json.loads(body)["ready"] is False
    status, _, body = call(address, "GET", "/v2/models/no-such-model")
    assert status == 404 and "no-such-model" in json.loads(body)["error"]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_equals_the_grpc_service_bitwise(server, oip_stub, digits, binary):
    parameters = {"method": "protonmf", "suppress": ",".join(SUPPRESS), "heatmaps": "feature_grid"}
    expected = decode(oip_stub.ModelInfer(infer_request(digits, **parameters), timeout=60))
    body, headers = infer_body(digits, binary=binary, binary_output=binary, **parameters)
    status, answer_headers, answer = call(server.http_address, "POST", "/v2/models/mnist/infer", body, headers)
    assert status == 200, answer[:500]
    assert answer_headers["Content-Type"] == ("application/octet-stream" if binary else "application/json")
    document, arrays = rest_arrays(answer_headers, answer)
    assert (document["id"], document["model_name"], document["model_version"]) == ("h-1", "mnist", "1")
    assert document["parameters"] == {"method": "protonmf"}
    assert list(arrays) == list(expected)
    assert_same_arrays(arrays, expected)


def test_nested_data_uint8_target_class_outputs_and_the_bare_prediction(server, oip_stub, digits):
    address = server.http_address
    flat, headers = infer_body(digits[:2], target_class=3, outputs=["target_class", "logits"])
    nested = json.loads(flat)
    nested["inputs"][0]["data"] = digits[:2].tolist()
    answers = [rest_arrays(*call(address, "POST", "/v2/models/mnist/infer", body, headers)[1:])
               for body in (flat, json.dumps(nested).encode())]
    for document, arrays in answers:
        assert [o["name"] for o in document["outputs"]] == ["target_class", "logits"]
        assert arrays["target_class"].tolist() == [3, 3]
    assert answers[0][1]["logits"].tobytes() == answers[1][1]["logits"].tobytes()
    pixels = np.arange(784, dtype=np.uint8).reshape(1, 1, 28, 28)
    document = {"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1, 1, 28, 28],
                            "data": pixels.reshape(-1).tolist()}], "parameters": {"explain": False}}
    status, answer_headers, answer = call(address, "POST", "/v2/models/mnist/infer", json.dumps(document).encode())
    assert status == 200
    request = oip.ModelInferRequest(model_name="mnist", inputs=[oip.ModelInferRequest.InferInputTensor(
        name="input", datatype="UINT8", shape=[1, 1, 28, 28])], raw_input_contents=[pixels.tobytes()])
    request.parameters["explain"].bool_param = False
    expected = decode(oip_stub.ModelInfer(request, timeout=60))
    _, arrays = rest_arrays(answer_headers, answer)
    assert list(arrays) == ["logits"] and arrays["logits"].tobytes() == expected["logits"].tobytes()
    # Per output: logits in binary, target_class in JSON.
    body, headers = infer_body(digits[:1])
    document = json.loads(body)
    document["outputs"] = [{"name": "logits", "parameters": {"binary_data": True}}, {"name": "target_class"}]
    status, answer_headers, answer = call(address, "POST", "/v2/models/mnist/infer", json.dumps(document).encode())
    head, arrays = rest_arrays(answer_headers, answer)
    assert [("data" in o, o.get("parameters")) for o in head["outputs"]] == [(False, {"binary_data_size": 40}),
                                                                             (True, None)]


def _edit(body: bytes, edit) -> bytes:
    document = json.loads(body)
    edit(document)
    return json.dumps(document).encode()


def _set(path: str, value):
    def edit(document):
        *parents, last = path.split(".")
        target = document
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target.setdefault(part, {})
        target[last] = value
    return edit


# (edit of a good JSON body, HTTP status, field at fault)
BAD_REQUESTS = {
    "wrong shape": (_set("inputs.0.shape", [1, 28, 28]), 400, "inputs[0].shape"),
    "huge shape": (_set("inputs.0.shape", [2 ** 63, 1, 28, 28]), 400, "inputs[0].shape"),
    "shape of strings": (_set("inputs.0.shape", ["1", 1, 28, 28]), 400, "inputs[0].shape"),
    "wrong datatype": (_set("inputs.0.datatype", "INT32"), 400, "inputs[0].datatype"),
    "wrong name": (_set("inputs.0.name", "x"), 400, "inputs[0].name"),
    "too few values": (_set("inputs.0.data", [0.0] * 783), 400, "inputs[0].data"),
    "strings": (_set("inputs.0.data", ["0.5"] * 784), 400, "inputs[0].data"),
    "bools": (_set("inputs.0.data", [True] * 784), 400, "inputs[0].data"),
    "nulls": (_set("inputs.0.data", [None] * 784), 400, "inputs[0].data"),
    "a number past any float": (_set("inputs.0.data", [10 ** 400] * 784), 400, "inputs[0].data"),
    "an integer that rounds past any float": (_set("inputs.0.data", [2 ** 1024 - 2 ** 970] * 784), 400,
                                              "inputs[0].data"),
    "overflowing float32": (_set("inputs.0.data", [1e39] * 784), 400, "inputs[0].data"),
    "no data": (_set("inputs.0.data", None), 400, "inputs[0].data"),
    "no inputs": (_set("inputs", []), 400, "inputs"),
    "unknown parameter": (_set("parameters.supress", "c1.p0"), 400, "parameters.supress"),
    "target class as a float": (_set("parameters.target_class", 3.0), 400, "parameters.target_class"),
    "target class as a bool": (_set("parameters.target_class", True), 400, "parameters.target_class"),
    "target class out of range": (_set("parameters.target_class", 10), 400, "parameters.target_class"),
    "parameter object": (_set("parameters.method", {"x": 1}), 400, "parameters.method"),
    "unknown method": (_set("parameters.method", "no-such-method"), 404, ""),
    "unknown component": (_set("parameters.suppress", "c1.p0,zz"), 404, ""),
    "unknown output": (_set("outputs", [{"name": "nope"}]), 400, "outputs[0].name"),
    "output not produced": (_set("outputs", [{"name": "heatmaps"}]), 400, "outputs"),
    "id not a string": (_set("id", 7), 400, "id"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_the_status_of_their_error_kind_and_the_field(server, digits, case):
    edit, code, field = BAD_REQUESTS[case]
    body, headers = infer_body(digits[:1])
    status, answer_headers, answer = call(server.http_address, "POST", "/v2/models/mnist/infer", _edit(body, edit),
                                          headers)
    assert status == code, answer
    document = json.loads(answer)
    assert document.get("field", "") == field and document["error"] and len(answer) < 1200
    assert answer_headers["Content-Type"] == "application/json"


@pytest.mark.parametrize("body, header, field", [
    (b"{", None, "request"),
    (b"[1, 2]", None, "request"),
    (b"\xff\xfe", None, "request"),
    (b"[" * 100_000, None, "request"),
    # binary data: lengths that lie
    (b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,1,28,28],"parameters":{"binary_data_size":3136}}]}'
     + b"\0" * 100, "len", "inputs[0].parameters.binary_data_size"),
    (b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,1,28,28],"parameters":{"binary_data_size":12}}]}'
     + b"\0" * 12, "len", "inputs[0].parameters.binary_data_size"),
    (b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,1,28,28],"parameters":{"binary_data_size":-1}}]}',
     "len", "inputs[0].parameters.binary_data_size"),
    (b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,1,28,28],"parameters":{"binary_data_size":3136}}]}'
     + b"\0" * 3140, "len", "Inference-Header-Content-Length"),
    (b'{"inputs":[]}', "999", "Inference-Header-Content-Length"),
    (b'{"inputs":[]}', "-1", "Inference-Header-Content-Length"),
    (b'{"inputs":[]}', "5", "request"),
    (b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,1,28,28],"parameters":{"binary_data_size":3136}}]}'
     + np.full(784, np.nan, "<f4").tobytes(), "len", "inputs[0].data"),
])
def test_bad_json_and_binary_length_lies_are_invalid(server, body, header, field):
    headers = {}
    if header == "len":
        headers["Inference-Header-Content-Length"] = str(body.index(b"}]}") + 3)
    elif header is not None:
        headers["Inference-Header-Content-Length"] = header
    status, _, answer = call(server.http_address, "POST", "/v2/models/mnist/infer", body, headers)
    assert status == 400, answer
    assert json.loads(answer)["field"] == field


@pytest.mark.parametrize("length", [b"\xb2", b"\xb9", b"1\xb3", b"\xd9\xa3"],
                         ids=["superscript-2", "superscript-1", "1-superscript-3", "arabic-indic-3-in-utf-8"])
def test_a_content_length_of_other_digits_than_ascii_is_400(server, length):
    """str.isdigit takes "²", which int() refuses: it was a 500 and a traceback."""
    answer = exchange(server.http_address, b"POST /v2/models/mnist/infer HTTP/1.1\r\nContent-Length: " + length
                      + b"\r\n\r\n{}")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n") and b"\r\nConnection: close" in head
    assert body == b'{"error": "Content-Length is not a number of bytes"}'


def test_large_json_is_parsed_on_the_few_json_threads_and_small_json_on_the_loop(server, mnist_split, monkeypatch):
    """Parsed JSON takes many times its bytes: at most JSON_THREADS bodies are parsed at once, whatever
    the connections, with the garbage collector paused (it would walk every parsed list again and again),
    and the event loop parses none but small ones."""
    from server import http_api, oip_rest

    parse_infer, lock = oip_rest.parse_infer, threading.Lock()
    threads, parsing = [], [0, 0]  # the threads that parsed; bodies being parsed now, and the most at once
    collecting = []  # whether the garbage collector ran, at each parse

    def watched_parse_infer(*args):
        with lock:
            threads.append(threading.current_thread().name)
            collecting.append(gc.isenabled())
            parsing[0] += 1
            parsing[1] = max(parsing)
        try:
            time.sleep(0.1)  # so that the other bodies arrive meanwhile
            return parse_infer(*args)
        finally:
            with lock:
                parsing[0] -= 1

    monkeypatch.setattr(oip_rest, "parse_infer", watched_parse_infer)
    large, headers = infer_body(mnist_split["x_test"][:32].numpy())
    assert len(large) > http_api.ON_LOOP_JSON_BYTES
    statuses = []
    senders = [threading.Thread(target=lambda: statuses.append(
        call(server.http_address, "POST", "/v2/models/mnist/infer", large, headers)[0])) for _ in range(6)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(120)
    small, headers = infer_body(mnist_split["x_test"][:1].numpy())
    assert call(server.http_address, "POST", "/v2/models/mnist/infer", small, headers)[0] == 200
    assert statuses == [200] * 6
    json_threads = {f"protoserve-http-json_{i}" for i in range(http_api.JSON_THREADS)}
    assert set(threads[:6]) <= json_threads and threads[6] == server.thread.name
    assert parsing[0] == 0 and parsing[1] <= http_api.JSON_THREADS
    assert collecting == [False] * 6 + [True] and gc.isenabled()


def _watched(function, calls: list):
    """``function``, noting in ``calls`` its name and the thread that runs it, each time."""
    def watched(*args):
        calls.append((function.__name__, threading.current_thread().name))
        return function(*args)
    return watched


def test_large_json_answers_are_written_on_the_json_threads_and_equal_grpc(server, oip_stub, client, mnist_split,
                                                                             monkeypatch):
    """A 256-example answer with heatmaps took the event loop about a second; json.dumps holds the GIL
    throughout a call, so the numbers are written a chunk at a time."""
    from server import http_api, oip_rest

    writers = []
    monkeypatch.setattr(oip_rest, "infer_response", _watched(oip_rest.infer_response, writers))
    monkeypatch.setattr(http_api, "_message_json", _watched(http_api._message_json, writers))
    digits = mnist_split["x_test"][:32].numpy()
    parameters = {"method": "protonmf", "heatmaps": "input"}
    expected = decode(oip_stub.ModelInfer(infer_request(digits, **parameters), timeout=120))
    body, headers = infer_body(digits, **parameters)
    status, answer_headers, answer = call(server.http_address, "POST", "/v2/models/mnist/infer", body, headers)
    assert status == 200, answer[:500]
    _, arrays = rest_arrays(answer_headers, answer)
    assert list(arrays) == list(expected) and arrays["heatmaps"].size > oip_rest.JSON_CHUNK_NUMBERS
    assert_same_arrays(arrays, expected)
    body, headers = infer_body(digits[:1], explain=False)
    assert call(server.http_address, "POST", "/v2/models/mnist/infer", body, headers)[0] == 200
    # protoserve.v1's answers take the same way (here every one is large).
    monkeypatch.setattr(http_api, "ON_LOOP_JSON_BYTES", 0)
    request = pb.PredictRequest(model="mnist", top_k=3)
    request.input.CopyFrom(client.get_model("mnist").samples[0].input)
    status, _, body = call(server.http_address, "POST", "/protoserve.v1.Explainer/Predict",
                           json_format.MessageToJson(request).encode())
    assert status == 200 and json_format.Parse(body, pb.PredictResponse()) == client.stub.Predict(request, timeout=60)
    assert [name for name, _ in writers] == ["infer_response", "infer_response", "_message_json"]
    threads = [thread for _, thread in writers]
    assert threads[1] == server.thread.name  # the small answer, on the event loop
    assert threads[0].startswith("protoserve-http-json_") and threads[2].startswith("protoserve-http-json_")


def _requests_total(server, **labels) -> float:
    text = call(f"127.0.0.1:{server.app.settings.metrics_port}", "GET", "/metrics")[2].decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "protoserve_requests_total" and all(sample.labels.get(k) == v
                                                                  for k, v in labels.items()):
                return sample.value
    return 0.0


@pytest.mark.parametrize("length", ["\xb2", "\xb9", "1" * 5000], ids=["superscript-2", "superscript-1", "5000-digits"])
def test_an_inference_header_content_length_that_is_no_number_is_400_not_internal(server, length):
    """int() refused it inside the rpc: a 500, counted INTERNAL (the ProtoserveInternalErrors alert)."""
    counts = {code: {"rpc": "http:ModelInfer", "model": "mnist", "code": code} for code in ("INVALID_ARGUMENT",
                                                                                          "INTERNAL")}
    before = {code: _requests_total(server, **labels) for code, labels in counts.items()}
    status, _, answer = call(server.http_address, "POST", "/v2/models/mnist/infer", b'{"inputs":[]}',
                             {"Inference-Header-Content-Length": length})
    assert (status, json.loads(answer)) == (400, {
        "error": "Inference-Header-Content-Length: must be a number of bytes of at most the body's 13",
        "field": "Inference-Header-Content-Length"})
    after = {code: _requests_total(server, **labels) for code, labels in counts.items()}
    assert after == {"INVALID_ARGUMENT": before["INVALID_ARGUMENT"] + 1, "INTERNAL": before["INTERNAL"]}


def test_requests_are_counted_as_grpc_counts_them_with_an_http_rpc_label(server, digits):
    ok = {"rpc": "http:ModelInfer", "model": "mnist", "code": "OK"}
    bad = {"rpc": "http:ModelInfer", "model": "mnist", "code": "INVALID_ARGUMENT"}
    before = _requests_total(server, **ok), _requests_total(server, **bad)
    body, headers = infer_body(digits[:1])
    assert call(server.http_address, "POST", "/v2/models/mnist/infer", body, headers)[0] == 200
    assert call(server.http_address, "POST", "/v2/models/mnist/infer", b'{"inputs":[]}')[0] == 400
    assert (_requests_total(server, **ok), _requests_total(server, **bad)) == (before[0] + 1, before[1] + 1)


def test_protoserve_v1_in_json_equals_grpc(server, client, digits):
    """Explain, Predict, GetModel and ListModels in protobuf's JSON mapping, as the explorer page calls them."""
    request = pb.ExplainRequest(model="mnist", method="protonmf", top_k=10, heatmaps=pb.HEATMAP_MODE_INPUT,
                                interventions=[pb.Intervention(suppress=SUPPRESS)], request_id="j-1")
    request.input.CopyFrom(client.get_model("mnist").samples[3].input)
    status, _, body = call(server.http_address, "POST", "/protoserve.v1.Explainer/Explain",
                           json_format.MessageToJson(request).encode())
    assert status == 200
    over_http = json_format.Parse(body, pb.ExplainResponse())
    assert over_http == client.stub.Explain(request, timeout=60)
    status, _, body = call(server.http_address, "POST", "/protoserve.v1.Explainer/GetModel", b'{"model": "mnist"}')
    info = json_format.Parse(body, pb.ModelInfo())
    assert info == client.get_model("mnist")
    status, _, body = call(server.http_address, "POST", "/protoserve.v1.Explainer/ListModels", b"{}")
    assert json_format.Parse(body, pb.ListModelsResponse()) == client.list_models()
    status, _, body = call(server.http_address, "POST", "/protoserve.v1.Explainer/Explain",
                           b'{"model": "mnist", "topK": -1, "image": "AAAA"}')
    assert (status, json.loads(body)["field"]) == (400, "top_k")
    status, _, body = call(server.http_address, "POST", "/protoserve.v1.Explainer/Explain", b'{"modle": "mnist"}')
    assert (status, json.loads(body)["field"]) == (400, "request")


def test_get_model_lists_the_held_out_samples_with_their_labels(client, demo_store):
    from handlers.archive import read_archive

    info = client.get_model("mnist")
    samples = read_archive(demo_store / "mnist-1.psar").samples
    assert [(s.index, s.class_index, s.label) for s in info.samples] == [
        (i, label, info.labels[label]) for i, label in enumerate(samples.labels.tolist())]
    assert info.samples[3].input.shape == [1, 28, 28]
    assert np.frombuffer(info.samples[3].input.data, "<f4").tobytes() == samples.inputs[3].numpy().tobytes()
    assert info.image_mode == "L"
    assert not client.list_models().models[0].samples  # ListModels leaves them out


def test_paths_methods_and_the_page(server):
    address = server.http_address
    assert call(address, "POST", "/v2/health/live")[0] == 405
    assert call(address, "GET", "/v2/models/mnist/infer")[0] == 405
    assert call(address, "GET", "/nope")[0] == 404
    assert call(address, "GET", "/protoserve.v1.Explainer/Nope")[0] == 405
    assert call(address, "POST", "/protoserve.v1.Explainer/Nope", b"{}")[0] == 404
    status, headers, body = call(address, "GET", "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html") and b"explorer.js" in body
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    for path, kind in (("/explorer.js", "text/javascript"), ("/explorer.css", "text/css")):
        status, headers, body = call(address, "GET", path)
        assert status == 200 and headers["Content-Type"].startswith(kind) and body
    status, headers, body = call(address, "HEAD", "/")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0


# ------------------------------------------------------------------------------ the bounds

TIMEOUT_S = 1.0
MAX_BODY = 64 << 10


@pytest.fixture(scope="module")
def secured(demo_store, pki, token_file):  # noqa: F811 (fixtures imported above)
    """A server with HTTPS (the gRPC side's certificate), bearer tokens and small HTTP limits."""
    running = RunningServer(Settings(
        model_store=demo_store, port=0, metrics_port=0, http_port=free_port(), shutdown_grace_s=2.0,
        tls_cert=pki["server.crt"], tls_key=pki["server.key"], auth_token_file=token_file,
        http_timeout_s=TIMEOUT_S, http_max_connections=4, http_max_body_bytes=MAX_BODY,
        http_max_buffered_bytes=2 * MAX_BODY))
    context = ssl.create_default_context(cafile=str(pki["ca.crt"]))
    yield running, context
    running.stop()


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _socket(secured) -> socket.socket:
    running, context = secured
    host, port = running.http_address.rsplit(":", 1)
    raw = socket.create_connection((host, int(port)), timeout=10)
    return context.wrap_socket(raw, server_hostname=host)


def _read_all(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and when it closed (monotonic)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            chunk = b""
        if not chunk:
            return data, time.monotonic()
        data += chunk


def test_https_with_the_grpc_certificate_and_bearer_tokens(secured, digits):
    running, context = secured
    address = running.http_address
    assert call(address, "GET", "/v2/health/ready", context=context)[0] == 200  # open, as gRPC health is
    assert call(address, "GET", "/", context=context)[0] == 200  # the page asks for a token itself
    status, headers, body = call(address, "GET", "/v2/models/mnist", context=context)
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert call(address, "GET", "/v2/models/mnist", headers={"Authorization": "Bearer wrong-token-0123456789"},
                context=context)[0] == 401
    assert call(address, "GET", "/v2/models/mnist", headers=AUTH, context=context)[0] == 200
    body, headers = infer_body(digits[:1])
    assert call(address, "POST", "/v2/models/mnist/infer", body, {**headers, **AUTH}, context=context)[0] == 200
    assert call(address, "POST", "/protoserve.v1.Explainer/ListModels", b"{}", context=context)[0] == 401
    with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):  # plain HTTP to HTTPS
        call(address, "GET", "/v2/health/live")


@pytest.mark.parametrize("authorization", ["Bearer", "Bearer \t", "bearer " + "\xe9" * 20, "Basic dXNlcjpwYXNz",
                                           "\x00", f"Bearer {TOKEN}\xe9", f"Bearer {TOKEN} {TOKEN}"])
def test_a_malformed_authorization_is_401(secured, caplog, authorization):
    running, context = secured
    status, headers, answer = call(running.http_address, "GET", "/v2/models/mnist",
                                   headers={"Authorization": authorization}, context=context)
    assert (status, headers["WWW-Authenticate"], json.loads(answer)) == (401, 'Bearer realm="protoserve"', {
        "error": "missing or invalid bearer token (header `Authorization: Bearer <token>`)"})
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


def test_a_refused_request_is_answered_before_its_body_is_read(secured):
    token = f"Authorization: Bearer {TOKEN}\r\n".encode()
    for head, status in ((b"POST /v2/models/mnist/infer HTTP/1.1\r\nContent-Length: 60000\r\n\r\n", 401),
                         (b"POST /v2/models/mnist/infer HTTP/1.1\r\n" + token
                          + b"Content-Length: 1000000000000000000\r\n\r\n", 413),
                         (b"POST /v2/models/mnist/infer HTTP/1.1\r\n" + token
                          + b"Content-Length: 99999999999999999999999\r\n\r\n", 400),
                         (b"POST /v2/models/mnist/infer HTTP/1.1\r\n" + token
                          + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", 411)):
        with _socket(secured) as sock:
            start = time.monotonic()
            sock.sendall(head)
            answer, closed = _read_all(sock)
        assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer
        assert closed - start < TIMEOUT_S / 2, "answered at once, without waiting for the body"
        assert b"Connection: close" in answer


@pytest.mark.parametrize("sent", [
    b"GET /v2/models/mnist HTTP/1.1\r\nHost: x\r\n",  # a head that never ends
    b"POST /v2/models/mnist/infer HTTP/1.1\r\nAuthorization: Bearer " + TOKEN.encode()
    + b"\r\nContent-Length: 4000\r\n\r\n{\"inputs\":",  # a body that never ends
    b"",  # nothing at all
])
def test_slow_or_silent_clients_are_closed_within_the_timeout(secured, sent):
    with _socket(secured) as sock:
        start = time.monotonic()
        for byte in range(0, len(sent), 8):  # a trickle, slowloris-style
            sock.sendall(sent[byte:byte + 8])
            time.sleep(0.01)
        answer, closed = _read_all(sock)
    assert answer == b"" and TIMEOUT_S * 0.9 <= closed - start <= TIMEOUT_S + 2.0


def test_a_long_head_is_refused(secured):
    with _socket(secured) as sock:
        sock.sendall(b"GET /v2 HTTP/1.1\r\nX-Padding: " + b"a" * (20 << 10) + b"\r\n\r\n")
        answer, _ = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 431 ")


def test_connections_and_buffered_bodies_are_bounded(secured):
    held = [_socket(secured) for _ in range(2)]
    try:
        for sock in held:  # two bodies of the largest size, half sent: the budget of bodies held is spent
            sock.sendall(f"POST /v2/models/mnist/infer HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n"
                         f"Content-Length: {MAX_BODY}\r\n\r\n".encode() + b" " * 100)
        time.sleep(0.2)
        with _socket(secured) as sock:
            sock.sendall(f"POST /v2/models/mnist/infer HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n"
                         f"Content-Length: 100\r\n\r\n".encode())
            assert _read_all(sock)[0].startswith(b"HTTP/1.1 503 ")
        held += [_socket(secured) for _ in range(2)]  # 4 connections open: the limit
        time.sleep(0.1)
        running, _ = secured
        host, port = running.http_address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as sock:  # the 5th: closed at once
            start = time.monotonic()
            answer, closed = _read_all(sock)
            assert answer == b"" and closed - start < TIMEOUT_S / 2
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.3)
    assert call(secured[0].http_address, "GET", "/v2/health/live", context=secured[1])[0] == 200


def test_keep_alive_connections_serve_several_requests_then_close_when_idle(secured):
    running, context = secured
    host, port = running.http_address.rsplit(":", 1)
    connection = http.client.HTTPSConnection(host, int(port), timeout=10, context=context)
    for _ in range(3):
        connection.request("GET", "/v2/models/mnist/ready", headers=AUTH)
        response = connection.getresponse()
        assert response.status == 200 and response.read() == b'{"name":"mnist","ready":true}'
    sock = connection.sock
    start = time.monotonic()
    answer, closed = _read_all(sock)
    assert answer == b"" and TIMEOUT_S * 0.9 <= closed - start <= TIMEOUT_S + 2.0
    connection.close()


def test_many_concurrent_attackers_leave_the_server_answering(secured, digits):
    """Slow heads, huge announced bodies and garbage at once; the server still answers a good request."""
    def attack(i):
        try:
            with _socket(secured) as sock:
                sock.sendall([b"GET / HTTP/1.1\r\n", b"POST /v2 HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n",
                              b"\x16\x03\x01garbage\r\n\r\n"][i % 3])
                _read_all(sock)
        except OSError:
            pass  # refused at the connection limit
    threads = [threading.Thread(target=attack, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    running, context = secured
    body, headers = infer_body(digits[:1])
    assert call(running.http_address, "POST", "/v2/models/mnist/infer", body, {**headers, **AUTH},
                context=context)[0] == 200


def test_shutdown_answers_the_requests_in_flight_then_closes_the_port(demo_store, digits):
    running = RunningServer(Settings(model_store=demo_store, port=0, metrics_port=0, http_port=free_port(),
                                     max_delay_ms=500.0, shutdown_grace_s=5.0))
    body, headers = infer_body(digits[:1])
    answers = []
    request = threading.Thread(target=lambda: answers.append(
        call(running.http_address, "POST", "/v2/models/mnist/infer", body, headers)[0]))
    request.start()
    time.sleep(0.2)  # the request waits in its batch (max_delay_ms) while the server is told to stop
    running.stop()
    request.join(10)
    assert answers == [200]
    with pytest.raises(RuntimeError):  # its JSON threads stopped with it
        running.app.http_api.json_threads.submit(int)
    host, port = running.http_address.rsplit(":", 1)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, int(port)), timeout=5)


MAX_JSON = 32 << 10


@pytest.fixture(scope="module")
def json_limited(demo_store):
    """A server whose requests may hold at most MAX_JSON bytes of JSON."""
    running = RunningServer(Settings(model_store=demo_store, port=0, metrics_port=0, http_port=free_port(),
                                     http_max_json_bytes=MAX_JSON))
    yield running
    running.stop()


def _too_much_json(size: int) -> bytes:
    return json.dumps({"error": f"a JSON part of {size} bytes is over the limit of {MAX_JSON} (protoserve serve "
                                "--http-max-json-bytes); send large tensors in binary "
                                "(Inference-Header-Content-Length), or over gRPC"}).encode()


@pytest.mark.parametrize("path, headers, size", [
    ("/v2/models/mnist/infer", "", 4 * MAX_JSON),
    ("/v2/models/mnist/infer", f"Inference-Header-Content-Length: {MAX_JSON + 1}\r\n", MAX_JSON + 1),
    # protoserve.v1 in JSON has no binary part: the header does not split its body
    ("/protoserve.v1.Explainer/Explain", "Inference-Header-Content-Length: 2\r\n", 4 * MAX_JSON),
], ids=["json", "json-part-before-binary", "protoserve-v1"])
def test_too_much_json_is_refused_from_the_head_before_the_body_is_read(json_limited, path, headers, size):
    """A JSON body's numbers take many times its bytes while they are parsed: it has its own limit."""
    answer = exchange(json_limited.http_address, f"POST {path} HTTP/1.1\r\n{headers}"
                                                 f"Content-Length: {4 * MAX_JSON}\r\n\r\n".encode())
    head, _, body = answer.partition(b"\r\n\r\n")  # answered and closed without a byte of the body
    assert head.startswith(b"HTTP/1.1 413 Request Entity Too Large\r\n") and b"\r\nConnection: close" in head
    assert body == _too_much_json(size)


def test_json_up_to_the_limit_and_binary_data_beyond_it_are_served(json_limited, mnist_split):
    digits = mnist_split["x_test"][:16].numpy()
    body, headers = infer_body(digits[:1])
    padded = body + b" " * (MAX_JSON - len(body))
    assert call(json_limited.http_address, "POST", "/v2/models/mnist/infer", padded, headers)[0] == 200
    status, _, answer = call(json_limited.http_address, "POST", "/v2/models/mnist/infer", padded + b" ", headers)
    assert (status, answer) == (413, _too_much_json(MAX_JSON + 1))
    body, headers = infer_body(digits, binary=True)  # 16 examples of 3136 bytes after a short JSON part
    assert len(body) > MAX_JSON
    status, _, answer = call(json_limited.http_address, "POST", "/v2/models/mnist/infer", body, headers)
    assert status == 200 and json.loads(answer)["outputs"][0]["shape"][0] == 16


# ------------------------------------------------------------------------------ other sites' pages


def test_other_host_names_and_pages_of_other_origins_are_refused_from_the_head(server, digits):
    """Bound to loopback, the port answers only for loopback names (a DNS-rebinding page sends its own
    name in Host: 421), and a request that a page of another origin sends is refused (403), before
    any body is read or any compute spent."""
    port = server.http_address.rsplit(":", 1)[1]
    body, _ = infer_body(digits[:1])
    before = _requests_total(server, rpc="http:ModelInfer", model="mnist", code="OK")
    for host in (f"rebinding.example:{port}", "rebinding.example", f"127.0.0.2:{port}", f"[::2]:{port}"):
        status, _, answer = call(server.http_address, "POST", "/v2/models/mnist/infer", body, {"Host": host})
        assert status == 421, host
        assert json.loads(answer)["field"] == "host" and "is not served here" in json.loads(answer)["error"]
    for origin in ("http://attacker.example", f"http://localhost:{port}", "null"):
        status, _, answer = call(server.http_address, "POST", "/v2/models/mnist/infer", body, {"Origin": origin})
        assert (status, json.loads(answer)["field"]) == (403, "origin"), origin
    assert _requests_total(server, rpc="http:ModelInfer", model="mnist", code="OK") == before
    for host in (f"localhost:{port}", f"LOCALHOST:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):
        assert call(server.http_address, "GET", "/v2/health/live", headers={"Host": host})[0] == 200, host
    # The explorer's own requests: Origin is the page's, the same as Host.
    status, _, _ = call(server.http_address, "POST", "/v2/models/mnist/infer", body,
                        {"Origin": f"http://127.0.0.1:{port}"})
    assert status == 200
    assert _requests_total(server, rpc="http:ModelInfer", model="mnist", code="OK") == before + 1


@pytest.mark.parametrize("origin", ["http://[::1", "http://[", "http://]", "http://[x]"])
def test_a_malformed_origin_is_refused_as_another_origin_is(server, digits, caplog, origin):
    """urlsplit raises on these: every request, the open /v2/health/live too, was a 500 and a logged traceback."""
    port = server.http_address.rsplit(":", 1)[1]
    body, headers = infer_body(digits[:1])
    for method, path, sent in (("GET", "/v2/health/live", None), ("POST", "/v2/models/mnist/infer", body)):
        status, _, answer = call(server.http_address, method, path, sent, {**headers, "Origin": origin})
        assert (status, json.loads(answer)) == (403, {
            "error": f"requests from pages of other origins are refused (Origin {origin!r}, Host '127.0.0.1:{port}')",
            "field": "origin"}), path
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


@pytest.mark.parametrize("host", ["[", "[::1", "]", ":", "[]:1", "\xe9"])
def test_a_malformed_host_is_421_as_another_name_is(server, caplog, host):
    status, _, answer = call(server.http_address, "GET", "/v2/health/live", headers={"Host": host})
    assert (status, json.loads(answer)) == (421, {
        "error": f"host {host!r} is not served here; served: 127.0.0.1, ::1, localhost "
                 "(protoserve serve --http-allowed-host)", "field": "host"})
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


def test_allowed_host_names_replace_the_loopback_names(demo_store):
    running = RunningServer(Settings(model_store=demo_store, port=0, metrics_port=0, http_port=free_port(),
                                     http_allowed_hosts=("Explain.Internal",)))
    try:
        port = running.http_address.rsplit(":", 1)[1]
        assert call(running.http_address, "GET", "/v2/health/live", headers={"Host": f"explain.internal:{port}"})[0] \
            == 200
        assert call(running.http_address, "GET", "/v2/health/live")[0] == 421  # Host 127.0.0.1:port
    finally:
        running.stop()


@pytest.mark.parametrize("which", ["--port", "--http-port"])
def test_a_port_in_use_is_a_one_line_error(tmp_path, which):
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        ports = {"--port": "0", "--http-port": "0", "--metrics-port": "0", which: port}
        result = subprocess.run([Path(sys.executable).parent / "protoserve", "serve", "--model-store", str(tmp_path),
                                 *(x for item in ports.items() for x in item)],
                                capture_output=True, text=True, timeout=120)
    ours = [line for line in result.stderr.splitlines() if line.startswith("protoserve serve:")]
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(ours) == 1 and f"127.0.0.1:{port}" in ours[0] and f"choose another {which}" in ours[0], result.stderr
