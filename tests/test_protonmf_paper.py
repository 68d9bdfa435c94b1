"""ProtoNMF as the paper writes it (issue 18): exact at any layer, the paper's heatmaps, Fig. 5's sweep.

* Exact where features are negative: on a layer whose signed features reach a linear head (a conv,
  and a Linear, with no ReLU after them) and on one whose head starts with a ReLU, contributions +
  residual + bias = logit to 1e-4; the clipped reading alone would miss it.
* Presence maps (eq. 9) and the residual prototype's map (eq. 6) recomputed here, position by
  position, with scipy's NNLS and a projection, from the archive's factors.
* The heatmap modes over live gRPC, refused for a method without presence maps; old modes unchanged.
"""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
import torch
from conftest import RunningServer, SignedMLP, free_port, fully_connected_problem
from protoserve_client import ExplainerClient, ExplainerError, pb, pb_grpc
from protoserve_client.client import heatmap_arrays, residual_heatmap_array
from protoserve_client.overlay import top_component_heatmaps
from scipy.optimize import nnls
from torch import nn

from handlers.archive import read_archive, write_archive
from handlers.base import ExplainBatch, FitData
from handlers.explainers.protonmf import ProtoNMFConfig, ProtoNMFExplainer
from handlers.fitting import protonmf
from handlers.model import InputSpec, ModelParts, pooled_linear_head
from handlers.packaging import held_out_samples
from server.settings import Settings

LABELS = ["a", "b", "c"]


class _SignedConv(nn.Module):
    """A conv with no ReLU after it (signed features on a 6×6 grid), straight into pooling + linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.pool(self.conv(x)).flatten(1))


def _conv_problem() -> tuple[ModelParts, FitData]:
    torch.manual_seed(0)
    parts = ModelParts.from_model(_SignedConv(), "conv", InputSpec(shape=[1, 8, 8]), LABELS)
    x = torch.rand(150, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0, :4].mean((1, 2)) > 0.5).long() + (x[:, 0, :, :4].mean((1, 2)) > 0.5).long()
    return parts, FitData(x[:90], y[:90], x[90:], y[90:])


def _signed_linear_problem() -> tuple[ModelParts, FitData]:
    _, data = fully_connected_problem(120, 60)
    torch.manual_seed(0)
    return ModelParts.from_model(SignedMLP(), "fc1", InputSpec(shape=[1, 12]), LABELS), data


PROBLEMS = {
    "conv, signed into a linear head": (_conv_problem, "signed"),
    "linear, signed into a linear head": (_signed_linear_problem, "signed"),
    "linear, before the head's ReLU": (lambda: fully_connected_problem(120, 60, layer="fc1"), "clipped"),
}


@pytest.fixture(scope="module")
def conv_fit():
    parts, data = _conv_problem()
    return parts, data, protonmf.fit(parts, data, ProtoNMFConfig(n_prototypes=3), log=lambda _: None)


def _explain(explainer: ProtoNMFExplainer, parts: ModelParts, x: torch.Tensor, kind: str = "contribution"):
    with torch.inference_mode():
        features = parts.upstream(x)
        logits = parts.downstream(features)
        return features, logits, explainer.explain(ExplainBatch(
            x, features, logits, logits.argmax(1), torch.zeros(len(x), 0, len(explainer.components), dtype=torch.bool),
            heatmaps=True, heatmap_kind=kind))


@pytest.mark.parametrize("problem", PROBLEMS)
def test_exact_where_features_are_negative(problem):
    make, reads = PROBLEMS[problem]
    parts, data = make()
    fitted = protonmf.fit(parts, data, ProtoNMFConfig(n_prototypes=2), log=lambda _: None)
    assert fitted.hyperparameters["head_reads"] == fitted.fit_report["head_reads"] == reads
    assert fitted.fit_report["acc_nmf_plus_residual"] == fitted.fit_report["acc_black_box"]
    explainer = ProtoNMFExplainer(parts, fitted)
    features, logits, e = _explain(explainer, parts, data.x_test)
    assert (features < 0).float().mean() > 0.2  # the case at issue
    total = e.contribution.sum(1) + e.residual_contribution + e.bias
    assert torch.allclose(total, e.target_logit, atol=1e-4)
    assert torch.equal(e.target_logit, logits.gather(1, e.target_class.unsqueeze(1)).squeeze(1))
    # The contributions see the clipped features only (what NMF was fitted on).
    pooled = protonmf.feature_grid(features).clamp_min(0).mean(2)
    expected = torch.einsum("bpd,bd->bp", explainer.prototypes_[e.target_class], pooled)
    assert torch.allclose(e.weight, expected, atol=1e-5)
    # Reading the signed features as clipped (what archives before did) would not add up.
    other = {"signed": "clipped", "clipped": "signed"}[reads]
    fitted.hyperparameters["head_reads"] = other
    _, _, wrong = _explain(ProtoNMFExplainer(parts, fitted), parts, data.x_test)
    assert (wrong.contribution.sum(1) + wrong.residual_contribution + wrong.bias - wrong.target_logit).abs().max() > 1e-2


def test_a_head_that_reads_negative_features_otherwise_is_refused():
    class LeakyHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.leaky, self.fc2 = nn.Linear(12, 16), nn.LeakyReLU(0.1), nn.Linear(16, 3)

        def forward(self, x):
            return self.fc2(self.leaky(self.fc1(x.flatten(1))))

    _, data = fully_connected_problem(60, 30)
    parts = ModelParts.from_model(LeakyHead(), "fc1", InputSpec(shape=[1, 12]), LABELS)
    with pytest.raises(ValueError, match="reads negative ones neither as they are nor clipped at zero"):
        protonmf.fit(parts, data, ProtoNMFConfig(n_prototypes=2), log=lambda _: None)


def test_a_relu_layer_is_read_clipped():
    parts, _ = fully_connected_problem(10, 10)  # at the hidden ReLU: no negative features to read
    assert protonmf.head_reads(parts, *pooled_linear_head(parts)) == "clipped"


def test_presence_maps_are_eq_9_and_the_residual_map_eq_6(conv_fit):
    parts, data, fitted = conv_fit
    explainer = ProtoNMFExplainer(parts, fitted)
    features, _, e = _explain(explainer, parts, data.x_test[:4], kind="presence")
    assert e.heatmaps.shape == (4, 3, 6, 6) and e.residual_heatmap.shape == (4, 6, 6)
    _, _, densities = _explain(explainer, parts, data.x_test[:4])
    assert torch.equal(e.contribution, densities.contribution)  # the kind of map changes the maps only
    i = 1
    c = int(e.target_class[i])
    b = fitted.factors["prototypes_"][c].double().numpy()  # (p, D)
    a = fitted.factors["coefficients_"][c].double().numpy()
    r = fitted.factors["residual_prototypes_"][c].double().numpy()
    augmented = b + r / a.sum()  # eq. 8
    signed = features[i].double().numpy()  # (D, 6, 6); the head reads them signed here
    for h in range(6):
        for w in range(6):
            f = signed[:, h, w]
            presence, _ = nnls(augmented.T, np.maximum(f, 0))  # eq. 9 at this position
            np.testing.assert_allclose(e.heatmaps[i, :, h, w].numpy(), presence, atol=1e-4 * max(1, presence.max()))
            codes, _ = nnls(b.T, np.maximum(f, 0))  # E of eq. 1, B fixed
            residual = (f - codes @ b) @ r / (r @ r)  # eq. 6's least squares for this position
            assert e.residual_heatmap[i, h, w].item() == pytest.approx(residual, abs=1e-4 * max(1, abs(residual)))
    assert e.heatmaps.min() >= 0 and e.heatmaps.max() > 0


def test_fit_report_p_sweep(conv_fit):
    _, _, fitted = conv_fit
    rows = fitted.fit_report["p_sweep"]
    assert [row["p"] for row in rows] == [1, 3, 5]  # 10 exceeds the layer's 6 channels
    for row in rows:
        assert set(row) == {"p", "feature_reconstruction_error", "head_reconstruction_error"}
        assert 0 <= row["feature_reconstruction_error"] < 1 and 0 <= row["head_reconstruction_error"] <= 1
    # Fig. 5: more prototypes, smaller errors.
    assert rows[-1]["feature_reconstruction_error"] < rows[0]["feature_reconstruction_error"]
    assert rows[-1]["head_reconstruction_error"] < rows[0]["head_reconstruction_error"]
    json.dumps(fitted.fit_report)
    no_sweep = protonmf.fit(*_conv_problem(), ProtoNMFConfig(n_prototypes=2, p_sweep=()), log=lambda _: None)
    assert no_sweep.fit_report["p_sweep"] == []


@pytest.fixture(scope="module")
def server(conv_fit, tmp_path_factory):
    parts, data, fitted = conv_fit
    store = tmp_path_factory.mktemp("protonmf-paper-store")
    write_archive(store, "conv", "1", parts, [fitted], samples=held_out_samples(data))
    running = RunningServer(Settings(model_store=store, port=0, metrics_port=free_port()))
    yield running, read_archive(store / "conv-1.psar"), data
    running.stop()


def test_presence_heatmaps_over_grpc(server):
    running, archive, data = server
    x = data.x_test[5].numpy()
    with ExplainerClient(running.address, timeout=30) as client:
        info = client.get_model("conv")
        assert [(m.name, m.presence_maps) for m in info.methods] == [("protonmf", True)]
        answer = client.explain(x, model="conv", method="protonmf", heatmaps="presence_feature_grid", top_k=3)
        old = client.explain(x, model="conv", method="protonmf", heatmaps="feature_grid", top_k=3)
        upsampled = client.explain(x, model="conv", method="protonmf", heatmaps="presence_input", top_k=3)
    explainer = ProtoNMFExplainer(archive.parts, archive.methods["protonmf"])
    _, _, expected = _explain(explainer, archive.parts, data.x_test[5:6], kind="presence")
    maps = heatmap_arrays(answer)
    for j, component in enumerate(answer.components):
        np.testing.assert_allclose(maps[component.id], expected.heatmaps[0, j].numpy(), atol=1e-5)
    assert answer.residual_heatmap.component_id == "residual"
    np.testing.assert_allclose(residual_heatmap_array(answer), expected.residual_heatmap[0].numpy(), atol=1e-5)
    total = sum(c.contribution for c in answer.components) + answer.residual_contribution + answer.bias
    assert answer.additive and abs(total - answer.target_logit) <= 1e-4
    # The old modes answer as before: contribution densities, and no residual map.
    assert not old.HasField("residual_heatmap")
    for component in old.components:
        assert heatmap_arrays(old)[component.id].sum() == pytest.approx(component.contribution, abs=1e-4)
    assert [c.contribution for c in old.components] == [c.contribution for c in answer.components]
    assert residual_heatmap_array(upsampled).shape == (8, 8) and heatmap_arrays(upsampled)["c0.p0"].shape == (8, 8)
    titles = [title for title, _ in top_component_heatmaps(answer)]
    assert titles[-1].startswith("residual ") and len(titles) == 4


def test_a_method_without_presence_maps_refuses_the_mode(server):
    running, _, data = server
    runtime = running.app.registry.get("conv").runtime
    explainer = runtime.explainers["protonmf"]
    explainer.presence_maps = False  # as every other method's explainer says (handlers.base.Explainer)
    try:
        with ExplainerClient(running.address, timeout=30) as client:
            assert not [m for m in client.get_model("conv").methods if m.presence_maps]
            with pytest.raises(ExplainerError) as refused:
                client.explain(data.x_test[0].numpy(), model="conv", heatmaps="presence_input")
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and refused.value.field() == "heatmaps"
            assert "method 'protonmf' has no presence maps" in refused.value.details()
            assert client.explain(data.x_test[0].numpy(), model="conv", heatmaps="input").heatmaps
    finally:
        explainer.presence_maps = True
    # A mode this server does not know is refused as before.
    with grpc.insecure_channel(running.address) as channel:
        request = pb.ExplainRequest(model="conv", heatmaps=7,
                                    input=pb.Tensor(dtype="float32", shape=[1, 8, 8], data=bytes(256)))
        with pytest.raises(grpc.RpcError) as unknown:
            pb_grpc.ExplainerStub(channel).Explain(request, timeout=30)
        assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_presence_heatmaps_over_the_open_inference_protocol(server):
    running, archive, data = server
    from protoserve_client.stubs.inference import grpc_service_pb2 as oip
    from protoserve_client.stubs.inference import grpc_service_pb2_grpc as oip_grpc

    x = data.x_test[:3].numpy()
    request = oip.ModelInferRequest(model_name="conv", inputs=[oip.ModelInferRequest.InferInputTensor(
        name="input", datatype="FP32", shape=x.shape)], raw_input_contents=[x.tobytes()])
    request.parameters["heatmaps"].string_param = "presence_feature_grid"
    with grpc.insecure_channel(running.address) as channel:
        response = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    outputs = {o.name: (list(o.shape), raw) for o, raw in zip(response.outputs, response.raw_output_contents)}
    explainer = ProtoNMFExplainer(archive.parts, archive.methods["protonmf"])
    _, _, expected = _explain(explainer, archive.parts, data.x_test[:3], kind="presence")
    for name, tensor in (("heatmaps", expected.heatmaps), ("residual_heatmap", expected.residual_heatmap)):
        shape, raw = outputs[name]
        assert shape == list(tensor.shape)
        np.testing.assert_allclose(np.frombuffer(raw, "<f4").reshape(shape), tensor.numpy(), atol=1e-5)
