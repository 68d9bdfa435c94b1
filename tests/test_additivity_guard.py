"""What is served is checked: an additive method adds up, and nothing non-finite is answered OK.

* At load, every additive method explains the archive's held-out samples (seeded synthetic
  inputs for archives written before samples were stored); one that does not add up is refused
  alone. The scenario of issue 15: ProtoNMF packaged at a signed layer (a Linear without ReLU)
  that feeds a linear head directly, as a LeNet-5 without its last ReLU split at its first
  linear layer, by the code before issue 18 (whose archives say nothing of ``head_reads``); since
  then such a fit adds up (tests/test_protonmf_paper.py) and serves.
* On every answer the server checks completeness again, says so in ``additive`` and
  ``additivity_gap``, and counts violations in ``protoserve_additivity_violations_total``.
* An input whose forward pass overflows float32 is refused alone, with INVALID_ARGUMENT.
"""

from __future__ import annotations

import hashlib
import json
import math
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from conftest import (
    RunningServer,
    SignedMLP,
    free_port,
    fully_connected_problem,
    rewrite_archive,
)
from prometheus_client.parser import text_string_to_metric_families
from protoserve_client import ExplainerClient, ExplainerError
from protoserve_client.stubs.inference import grpc_service_pb2 as oip
from protoserve_client.stubs.inference import grpc_service_pb2_grpc as oip_grpc

from handlers.archive import SAMPLES, read_archive, write_archive
from handlers.model import InputSpec
from handlers.packaging import fit_methods, held_out_samples, package
from server.metrics import Metrics
from server.registry import ModelRegistry
from server.settings import Settings

LABELS = ["a", "b", "c"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("additivity-store")
    parts, data = fully_connected_problem(200, 60)
    torch.manual_seed(0)
    package(SignedMLP(), layer="fc1", input_spec=InputSpec(shape=[1, 12]), labels=LABELS, data=data,
            methods={"protonmf": {"n_prototypes": 2, "max_iter": 50},
                     "srae": {"n_xfeatures": 2, "hidden": 8, "epochs": 1}},
            name="signed", version="1", out_dir=store, log=lambda message: None)
    # The same fit as written before issue 18: its residual counted the clipped features only.
    written = store / "signed-1.psar"
    rewrite_archive(written, store.parent / "signed-before-18.psar",
                    lambda members, manifest: manifest["methods"]["protonmf"]["hyperparameters"].pop("head_reads"))
    (store.parent / "signed-before-18.psar").replace(written)
    good = fit_methods(parts, data, {"protonmf": {"n_prototypes": 2, "max_iter": 50}}, log=lambda _: None)
    write_archive(store, "good", "1", parts, good, samples=held_out_samples(data))  # after a ReLU: adds up
    return store


@pytest.fixture(scope="module")
def server(store):
    # A batch delay, so that concurrent requests share batches.
    running = RunningServer(Settings(model_store=store, port=0, metrics_port=free_port(), max_delay_ms=100))
    yield running
    running.stop()


@pytest.fixture()
def client(server):
    with ExplainerClient(server.address, timeout=30) as c:
        yield c


def _x(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 12)).astype(np.float32)


def _violations(server, model: str, method: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.app.settings.metrics_port}/metrics", timeout=10).read()
    families = {f.name: f for f in text_string_to_metric_families(text.decode())}
    if "protoserve_additivity_violations" not in families:
        return 0.0
    return sum(s.value for s in families["protoserve_additivity_violations"].samples
               if s.name == "protoserve_additivity_violations_total"
               and s.labels == {"model": model, "method": method})


def _residual_share_sum(server) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.app.settings.metrics_port}/metrics", timeout=10).read()
    return sum(s.value for f in text_string_to_metric_families(text.decode()) for s in f.samples
               if s.name == "protoserve_residual_share_sum")


def test_packaging_writes_held_out_samples_with_their_labels(store):
    archive = read_archive(store / "signed-1.psar")
    assert archive.samples.labels.bincount(minlength=3).tolist() == [2, 2, 2]
    assert archive.manifest["members"][SAMPLES] == hashlib.sha256(
        zipfile.ZipFile(store / "signed-1.psar").read(SAMPLES)).hexdigest()


def test_a_method_that_does_not_add_up_is_refused_at_load_and_the_rest_serve(server, client):
    errors = server.app.registry.load_errors
    assert set(errors) == {"signed-1.psar:protonmf"}
    reason = errors["signed-1.psar:protonmf"]
    assert "method 'protonmf' is additive, but on 6 of 6 held-out samples its contributions + residual + bias " \
           "miss the target logit" in reason
    assert "cause: the explained layer 'fc1' is signed" in reason and "package the method at a layer after a " \
                                                                      "ReLU" in reason
    info = client.get_model("signed")
    assert [m.name for m in info.methods] == ["srae"] and info.default_method == "srae"
    with pytest.raises(ExplainerError) as refused:
        client.explain(_x(0), model="signed", method="protonmf")
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    for model, method in (("signed", "srae"), ("good", "protonmf")):
        answer = client.explain(_x(0), model=model)
        assert answer.method == method and answer.additive
        total = sum(c.contribution for c in answer.components) + answer.residual_contribution + answer.bias
        assert abs(total - answer.target_logit) <= 1e-4 and answer.additivity_gap <= 1e-4


def test_an_answer_that_does_not_add_up_says_so_and_is_counted(server, client):
    explainer = server.app.registry.get("good").runtime.explainers["protonmf"]
    fitted_bias = explainer.bias_
    before = _violations(server, "good", "protonmf")
    explainer.bias_ = fitted_bias + 0.5  # the fitted state goes wrong after load
    try:
        answer = client.explain(_x(1), model="good")
        assert not answer.additive and answer.additivity_gap == pytest.approx(0.5, abs=1e-4)
        total = sum(c.contribution for c in answer.components) + answer.residual_contribution + answer.bias
        assert total - answer.target_logit == pytest.approx(0.5, abs=1e-4)  # what a client can check itself
        assert _violations(server, "good", "protonmf") == before + 1
        with grpc.insecure_channel(server.address) as channel:
            x = np.concatenate([_x(2), _x(3), _x(4)])[:, None]
            request = oip.ModelInferRequest(model_name="good", inputs=[oip.ModelInferRequest.InferInputTensor(
                name="input", datatype="FP32", shape=x.shape)], raw_input_contents=[x.tobytes()])
            response = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
        [index] = [i for i, o in enumerate(response.outputs) if o.name == "additivity_gap"]
        gaps = np.frombuffer(response.raw_output_contents[index], "<f4")
        np.testing.assert_allclose(gaps, [0.5] * 3, atol=1e-4)
        assert _violations(server, "good", "protonmf") == before + 4
    finally:
        explainer.bias_ = fitted_bias
    assert client.explain(_x(1), model="good").additive
    assert _violations(server, "good", "protonmf") == before + 4


def test_an_archive_without_held_out_samples_is_checked_on_synthetic_inputs(store, tmp_path, caplog):
    """Archives written before samples were stored load; the check says what it ran on."""
    old_store = tmp_path / "old-store"
    old_store.mkdir()
    for name in ("signed-1.psar", "good-1.psar"):
        with zipfile.ZipFile(store / name) as zf:
            members = {n: zf.read(n) for n in zf.namelist() if n != SAMPLES}
        manifest = json.loads(members.pop("manifest.json"))
        del manifest["members"][SAMPLES]
        with zipfile.ZipFile(old_store / name, "w") as zf:
            zf.writestr("manifest.json", json.dumps(manifest))
            for member, data in members.items():
                zf.writestr(member, data)
        assert read_archive(old_store / name).samples is None
    registry = ModelRegistry(Settings(model_store=old_store), Metrics())
    with caplog.at_level("INFO", logger="server.registry"):
        registry.load_store(torch.device("cpu"))
    assert sorted(registry.models) == ["good", "signed"]
    assert list(registry.get("signed").runtime.explainers) == ["srae"]
    assert list(registry.get("good").runtime.explainers) == ["protonmf"]
    synthetic = "8 synthetic inputs (seeded; the archive has no held-out samples)"
    assert f"on 8 of {synthetic}" in registry.load_errors["signed-1.psar:protonmf"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"good-1.psar: additive methods checked on {synthetic}" in warnings


def test_an_input_that_overflows_is_refused_alone(server, client):
    runtime = server.app.registry.get("good").runtime
    weight = next(p for p in runtime.parts.upstream.parameters() if p.dim() == 2)  # fc1 (16, 12)
    extreme = (3e38 * weight[weight.abs().sum(1).argmax()].sign()).reshape(1, 12).detach().numpy()  # finite
    assert not runtime.predict(torch.from_numpy(extreme)[None]).isfinite().all()  # but the forward overflows
    normal = [_x(seed) for seed in range(5, 9)]
    alone = [client.explain(x, model="good") for x in normal]
    with ThreadPoolExecutor(8) as pool:  # at once, so they share batches (max_delay_ms)
        explained = [pool.submit(client.explain, x, model="good") for x in [extreme, *normal]]
        predicted = [pool.submit(client.predict, x, model="good") for x in [extreme, *normal]]
        for futures in (explained, predicted):
            with pytest.raises(ExplainerError) as refused:
                futures[0].result()
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and refused.value.field() == "input"
            assert "overflows float32" in refused.value.details()
        for future, expected in zip(explained[1:], alone):
            answer = future.result()
            assert answer.additive and answer.target_logit == pytest.approx(expected.target_logit, abs=1e-5)
        for future in predicted[1:]:
            assert all(math.isfinite(score.logit) for score in future.result().prediction)
    assert math.isfinite(_residual_share_sum(server))
