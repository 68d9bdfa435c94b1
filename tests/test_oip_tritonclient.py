"""The Open Inference Protocol service, driven by the real `tritonclient[grpc]` client.

tritonclient pins protobuf below 7 while protoserve uses protobuf 7, and both define the
`inference.*` messages, so the client runs in its own virtual environment (created once,
cached in build/ under a name keyed by the pinned version) and in its own process: a
driver script calls the live server and prints JSON, which this test checks against the
protoserve.v1 answers for the same inputs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
TRITONCLIENT_PIN = "2.73.0"
REQUIREMENTS = [f"tritonclient[grpc]=={TRITONCLIENT_PIN}", "protobuf<7"]
VENV = Path(os.environ.get("PROTOSERVE_TRITONCLIENT_VENV",
                           REPO_ROOT / "build" / f"tritonclient-venv-{TRITONCLIENT_PIN}"))
# pip output that means the package index could not be reached (the only reason to skip).
NETWORK_ERRORS = ("NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
                  "Network is unreachable", "ConnectTimeoutError", "ProxyError", "Name or service not known",
                  "No route to host", "Connection refused")


def _python(venv: Path) -> Path:
    return venv / "bin" / "python"


def venv_with(requirements: list[str], venv: Path) -> Path:
    """The python of a venv of ``requirements`` at ``venv``, created on first use (about a minute) and
    recreated when the requirements change; skips the test where the package index is unreachable."""
    stamp = venv / ".protoserve-installed"
    if stamp.is_file() and stamp.read_text() == "\n".join(requirements):
        return _python(venv)
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    # The base interpreter, not this venv's: the new venv must not see protoserve's packages.
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
    install = subprocess.run([str(_python(venv)), "-m", "pip", "install", "--disable-pip-version-check", "-q",
                              *requirements], capture_output=True, text=True, timeout=900)
    if install.returncode != 0:
        output = install.stdout + install.stderr
        shutil.rmtree(venv, ignore_errors=True)
        if any(marker in output for marker in NETWORK_ERRORS):
            pytest.skip(f"cannot install {' '.join(requirements)}: the package index is unreachable "
                        f"(no network):\n{output[-2000:]}")
        pytest.fail(f"pip install {' '.join(requirements)} failed:\n{output[-4000:]}")
    stamp.write_text("\n".join(requirements))  # written last: a half-built venv is rebuilt next time
    return _python(venv)


@pytest.fixture(scope="session")
def tritonclient_python() -> Path:
    """The python of a venv with tritonclient[grpc]."""
    return venv_with(REQUIREMENTS, VENV)


DRIVER = textwrap.dedent('''
    """Calls protoserve's OIP service with tritonclient and prints what it got as JSON."""
    import json
    import sys

    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.grpc import service_pb2, service_pb2_grpc
    from tritonclient.utils import InferenceServerException

    args = json.load(open(sys.argv[1]))
    x = np.load(args["inputs"])
    client = grpcclient.InferenceServerClient(args["address"])
    out = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready("mnist"),
        "unknown_model_ready": client.is_model_ready("no-such-model"),
        "server_metadata": client.get_server_metadata(as_json=True),
        "model_metadata": client.get_model_metadata("mnist", as_json=True),
    }

    def infer(batch, parameters, outputs=None):
        inp = grpcclient.InferInput("input", list(batch.shape), "FP32")
        inp.set_data_from_numpy(batch)
        requested = [grpcclient.InferRequestedOutput(n) for n in outputs] if outputs else None
        return client.infer("mnist", [inp], outputs=requested, parameters=parameters, request_id="t-1")

    def arrays(result, names):
        values = {}
        for name in names:
            array = result.as_numpy(name)
            if array is None:
                continue
            values[name] = ([v.decode() for v in array.reshape(-1)] if array.dtype == object else array.tolist(),
                            list(array.shape))
        return values

    names = [o["name"] for o in out["model_metadata"]["outputs"]]
    result = infer(x, {"method": "protonmf", "suppress": ",".join(args["suppress"]), "heatmaps": "feature_grid"})
    response = result.get_response(as_json=True)
    out["raw"] = {"id": response["id"], "model_version": response["model_version"],
                  "parameters": response.get("parameters", {}), "outputs": arrays(result, names)}
    out["target3"] = arrays(infer(x[:2], {"target_class": 3}, outputs=["target_class", "target_logit"]),
                            ["target_class", "target_logit"])
    out["bare"] = arrays(infer(x[:2], {"explain": False}), names)

    # The typed path: a ModelInferRequest with contents.fp32_contents, sent with tritonclient's own stubs.
    request = service_pb2.ModelInferRequest(model_name="mnist")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    tensor.contents.fp32_contents.extend(x.reshape(-1).tolist())
    request.parameters["method"].string_param = "protonmf"
    stub = service_pb2_grpc.GRPCInferenceServiceStub(client._channel)
    out["typed"] = {"outputs": arrays(grpcclient.InferResult(stub.ModelInfer(request)), names)}

    def tensor(batch):
        inp = grpcclient.InferInput("input", list(batch.shape), "FP32")
        inp.set_data_from_numpy(batch)
        return inp

    errors = {}
    for case, call in {
        "unknown_model": lambda: client.infer("no-such-model", [tensor(x[:1])]),
        "wrong_shape": lambda: client.infer("mnist", [tensor(x[0])]),
        "unknown_component": lambda: infer(x[:1], {"suppress": "zz"}),
    }.items():
        try:
            call()
            errors[case] = "OK"
        except InferenceServerException as exc:
            errors[case] = str(exc.status())
    out["errors"] = errors

    # Wire compatibility: tritonclient's descriptors (Triton's grpc_service.proto), field by field.
    def describe(descriptor):
        fields = {}
        def walk(message):
            fields[message.full_name] = {f.name: [f.number, f.type, f.label == 3 if hasattr(f, "label") else
                                                  f.is_repeated, f.message_type.full_name if f.message_type else ""]
                                         for f in message.fields}
            for nested in message.nested_types:
                walk(nested)
        for message in descriptor.message_types_by_name.values():
            walk(message)
        service = descriptor.services_by_name["GRPCInferenceService"]
        methods = {m.name: [m.input_type.full_name, m.output_type.full_name] for m in service.methods}
        return {"messages": fields, "methods": methods}
    out["descriptor"] = describe(service_pb2.DESCRIPTOR)
    print(json.dumps(out))
''')


def _describe_ours() -> dict:
    from protoserve_client.stubs.inference import grpc_service_pb2

    fields = {}

    def walk(message):
        fields[message.full_name] = {f.name: [f.number, f.type, f.is_repeated,
                                              f.message_type.full_name if f.message_type else ""]
                                     for f in message.fields}
        for nested in message.nested_types:
            walk(nested)

    for message in grpc_service_pb2.DESCRIPTOR.message_types_by_name.values():
        walk(message)
    service = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    return {"messages": fields, "methods": {m.name: [m.input_type.full_name, m.output_type.full_name]
                                            for m in service.methods}}


@pytest.fixture(scope="module")
def triton_run(tritonclient_python, server, mnist_split, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("tritonclient")
    x = mnist_split["x_test"][:4].numpy().astype(np.float32)
    np.save(work / "inputs.npy", x)
    suppress = ["c1.p0", "c7.p2", "c3.p1"]
    (work / "args.json").write_text(json.dumps({"address": server.address, "inputs": str(work / "inputs.npy"),
                                                "suppress": suppress}))
    (work / "driver.py").write_text(DRIVER)
    run = subprocess.run([str(tritonclient_python), str(work / "driver.py"), str(work / "args.json")],
                         capture_output=True, text=True, timeout=300, cwd=work, env={"PATH": os.environ.get("PATH", "")})
    assert run.returncode == 0, run.stderr[-4000:]
    return {"out": json.loads(run.stdout), "x": x, "suppress": suppress}


def _array(outputs: dict, name: str) -> np.ndarray:
    values, shape = outputs[name]
    return np.array(values, dtype=object if values and isinstance(values[0], str) else None).reshape(shape)


def test_tritonclient_speaks_to_the_service(triton_run):
    out = triton_run["out"]
    assert out["live"] and out["ready"] and out["model_ready"] and not out["unknown_model_ready"]
    assert out["server_metadata"]["name"] == "protoserve"
    metadata = out["model_metadata"]
    assert metadata["name"] == "mnist" and metadata["versions"] == ["1"]
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "1", "28", "28"]}]


def test_protocol_descriptors_match_tritonclients_field_by_field(triton_run):
    theirs, ours = triton_run["out"]["descriptor"], _describe_ours()
    for name, fields in ours["messages"].items():
        assert theirs["messages"].get(name) == fields, name
    for name, signature in ours["methods"].items():
        assert theirs["methods"][name] == signature, name


def test_predictions_and_explanations_through_tritonclient(triton_run, client):
    out, x, suppress = triton_run["out"], triton_run["x"], triton_run["suppress"]
    raw = out["raw"]
    assert raw["id"] == "t-1" and raw["model_version"] == "1"
    assert raw["parameters"]["method"]["string_param"] == "protonmf"
    o = {name: _array(raw["outputs"], name) for name in raw["outputs"]}
    assert o["logits"].shape == (4, 10) and o["component_ids"].shape == (4, 3)
    assert o["heatmaps"].shape == (4, 3, 7, 7) and o["intervened_logits"].shape == (4, 1, 10)
    for i in range(4):
        predicted = client.predict(x[i], model="mnist", top_k=10).prediction
        logits = np.zeros(10)
        for score in predicted:
            logits[score.class_index] = score.logit
        np.testing.assert_allclose(o["logits"][i], logits, rtol=0, atol=1e-5)
        target = int(o["target_class"][i])
        assert target == int(np.argmax(logits))
        total = o["component_contributions"][i].sum() + o["residual_contribution"][i] + o["bias"][i]
        assert abs(total - o["target_logit"][i]) <= 1e-4 * max(1.0, abs(o["target_logit"][i]))
        assert all(cid.startswith(f"c{target}.") for cid in o["component_ids"][i])
        explained = client.explain(x[i], model="mnist", method="protonmf", interventions=[suppress])
        assert list(o["component_ids"][i]) == [c.id for c in explained.components]
        removed = sum(c for cid, c in zip(o["component_ids"][i], o["component_contributions"][i]) if cid in suppress)
        assert abs(o["intervened_logits"][i, 0, target] - (o["target_logit"][i] - removed)) <= 1e-4 * max(
            1.0, abs(o["target_logit"][i]))
        assert abs(o["intervened_logits"][i, 0, target] - explained.interventions[0].target_logit) <= 1e-4
        assert 0 <= o["residual_share"][i] <= 1


def test_typed_contents_and_parameters_through_tritonclient(triton_run):
    out = triton_run["out"]
    raw = {name: _array(out["raw"]["outputs"], name) for name in out["raw"]["outputs"]}
    typed = {name: _array(out["typed"]["outputs"], name) for name in out["typed"]["outputs"]}
    assert set(typed) == set(raw) - {"heatmaps", "intervened_logits"}
    for name in typed:
        assert (typed[name] == raw[name]).all(), name
    assert _array(out["target3"], "target_class").tolist() == [3, 3]
    assert set(out["bare"]) == {"logits"}
    np.testing.assert_allclose(_array(out["bare"], "logits"), raw["logits"][:2], rtol=0, atol=1e-5)


def test_errors_through_tritonclient(triton_run):
    assert triton_run["out"]["errors"] == {"unknown_model": "StatusCode.NOT_FOUND",
                                          "wrong_shape": "StatusCode.INVALID_ARGUMENT",
                                          "unknown_component": "StatusCode.NOT_FOUND"}
