"""The Open Inference Protocol's HTTP/REST binding, driven by the real `tritonclient[http]` client.

As for the gRPC binding (tests/test_oip_tritonclient.py), the client runs in its own virtual
environment (created once, cached in build/) and its own process: a driver calls the live server's
HTTP port, in binary tensors and in JSON, and prints what it got; this test checks it against the
gRPC OIP service bitwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import grpc
import numpy as np
import pytest
from protoserve_client.stubs.inference import grpc_service_pb2_grpc as oip_grpc

from test_oip import decode, infer_request
from test_oip_tritonclient import REPO_ROOT, TRITONCLIENT_PIN, venv_with

REQUIREMENTS = [f"tritonclient[http]=={TRITONCLIENT_PIN}"]
VENV = Path(os.environ.get("PROTOSERVE_TRITONCLIENT_HTTP_VENV",
                           REPO_ROOT / "build" / f"tritonclient-http-venv-{TRITONCLIENT_PIN}"))
SUPPRESS = ["c1.p0", "c7.p2", "c3.p1"]
PARAMETERS = {"method": "protonmf", "suppress": ",".join(SUPPRESS), "heatmaps": "feature_grid"}

DRIVER = textwrap.dedent('''
    """Calls protoserve's OIP HTTP binding with tritonclient.http and prints what it got as JSON."""
    import json
    import sys

    import numpy as np
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    args = json.load(open(sys.argv[1]))
    x = np.load(args["inputs"])
    client = httpclient.InferenceServerClient(args["address"])
    out = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready("mnist"),
        "unknown_model_ready": client.is_model_ready("no-such-model"),
        "server_metadata": client.get_server_metadata(),
        "model_metadata": client.get_model_metadata("mnist"),
        "version_metadata": client.get_model_metadata("mnist", model_version="1"),
    }
    names = [o["name"] for o in out["model_metadata"]["outputs"]]

    def infer(batch, parameters, binary):
        inp = httpclient.InferInput("input", list(batch.shape), "FP32")
        inp.set_data_from_numpy(batch, binary_data=binary)
        outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in names
                   if n in args["produced"]]
        result = client.infer("mnist", [inp], outputs=outputs, parameters=parameters, request_id="t-1")
        response = result.get_response()
        arrays = {}
        for output in response["outputs"]:
            array = result.as_numpy(output["name"])
            if array.dtype == object:  # BYTES: bytes from binary data, str from JSON
                values = [v.decode() if isinstance(v, bytes) else v for v in array.reshape(-1)]
            else:
                values = array.reshape(-1).astype("<f8" if array.dtype.kind == "f" else "<i8").tolist()
            arrays[output["name"]] = {"dtype": str(array.dtype), "shape": list(array.shape), "values": values}
        return {"id": response["id"], "model_version": response["model_version"],
                "parameters": response.get("parameters", {}), "outputs": arrays,
                "binary": [("parameters" in o and "binary_data_size" in o["parameters"]) for o in response["outputs"]]}

    out["binary"] = infer(x, args["parameters"], True)
    out["json"] = infer(x, args["parameters"], False)
    # No outputs named: tritonclient asks for every output in binary (binary_data_output).
    inp = httpclient.InferInput("input", list(x[:2].shape), "FP32")
    inp.set_data_from_numpy(x[:2])
    bare = client.infer("mnist", [inp], parameters={"explain": False})
    out["bare"] = bare.as_numpy("logits").tolist()

    errors = {}
    def tensor(batch):
        inp = httpclient.InferInput("input", list(batch.shape), "FP32")
        inp.set_data_from_numpy(batch)
        return inp
    for case, call in {
        "unknown_model": lambda: client.infer("no-such-model", [tensor(x[:1])]),
        "wrong_shape": lambda: client.infer("mnist", [tensor(x[0])]),
        "unknown_component": lambda: client.infer("mnist", [tensor(x[:1])], parameters={"suppress": "zz"}),
        "bad_target": lambda: client.infer("mnist", [tensor(x[:1])], parameters={"target_class": 99}),
    }.items():
        try:
            call()
            errors[case] = "OK"
        except InferenceServerException as exc:
            errors[case] = [exc.status(), exc.message()]
    out["errors"] = errors
    print(json.dumps(out))
''')


@pytest.fixture(scope="session")
def tritonclient_http_python() -> Path:
    return venv_with(REQUIREMENTS, VENV)


@pytest.fixture(scope="module")
def triton_http_run(tritonclient_http_python, server, mnist_split, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("tritonclient-http")
    x = mnist_split["x_test"][:4].numpy().astype(np.float32)
    np.save(work / "inputs.npy", x)
    produced = ["logits", "target_class", "target_logit", "component_ids", "component_weights",
                "component_contributions", "bias", "residual_contribution", "residual_share", "heatmaps",
                "intervened_logits", "additivity_gap"]
    (work / "args.json").write_text(json.dumps({"address": server.http_address, "inputs": str(work / "inputs.npy"),
                                                "parameters": PARAMETERS, "produced": produced}))
    (work / "driver.py").write_text(DRIVER)
    run = subprocess.run([str(tritonclient_http_python), str(work / "driver.py"), str(work / "args.json")],
                         capture_output=True, text=True, timeout=300, cwd=work,
                         env={"PATH": os.environ.get("PATH", "")})
    assert run.returncode == 0, run.stderr[-4000:]
    return {"out": json.loads(run.stdout), "x": x}


@pytest.fixture(scope="module")
def grpc_outputs(server, triton_http_run) -> dict[str, np.ndarray]:
    with grpc.insecure_channel(server.address) as channel:
        response = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            infer_request(triton_http_run["x"], **PARAMETERS), timeout=60)
    return decode(response)


def test_health_and_metadata_through_tritonclient_http(triton_http_run):
    out = triton_http_run["out"]
    assert out["live"] and out["ready"] and out["model_ready"] and not out["unknown_model_ready"]
    assert out["server_metadata"]["name"] == "protoserve"
    assert "binary_tensor_data" in out["server_metadata"]["extensions"]
    metadata = out["model_metadata"]
    assert metadata == out["version_metadata"]
    assert metadata["name"] == "mnist" and metadata["versions"] == ["1"]
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]


@pytest.mark.parametrize("encoding", ["binary", "json"])
def test_outputs_through_tritonclient_http_equal_grpc_bitwise(triton_http_run, grpc_outputs, encoding):
    answer = triton_http_run["out"][encoding]
    assert (answer["id"], answer["model_version"], answer["parameters"]) == ("t-1", "1", {"method": "protonmf"})
    assert all(answer["binary"]) if encoding == "binary" else not any(answer["binary"])
    assert list(answer["outputs"]) == list(grpc_outputs)
    for name, expected in grpc_outputs.items():
        got = answer["outputs"][name]
        assert got["shape"] == list(expected.shape), name
        if expected.dtype == object:
            assert got["values"] == expected.reshape(-1).tolist(), name
        else:
            assert got["dtype"] == {"float32": "float32", "int64": "int64"}[str(expected.dtype)], name
            # float32 values went through float64 in JSON: exact, so the bytes are equal.
            assert np.array(got["values"], dtype=expected.dtype).tobytes() == expected.reshape(-1).tobytes(), name


def test_bare_prediction_and_errors_through_tritonclient_http(triton_http_run, grpc_outputs):
    out = triton_http_run["out"]
    assert np.array(out["bare"], np.float32).tobytes() == grpc_outputs["logits"][:2].tobytes()
    errors = out["errors"]
    assert errors["unknown_model"][0] == "404"
    assert errors["wrong_shape"] == ["400", "inputs[0].shape: expected 4 dimensions [N, 1, 28, 28], got 3"]
    assert errors["unknown_component"][0] == "404"
    assert errors["bad_target"] == ["400", "parameters.target_class: must be in [0, 10), got 99"]
