"""ProtoNMF on the demo model: heatmaps, interventions across classes, Table 3, and the layer rules it relies on.

The invariants every method keeps (additivity, batch independence, refusals, device moves, a live
round trip) are in tests/test_contract.py."""

from __future__ import annotations

import pytest
import torch
from conftest import fully_connected_problem

from handlers.archive import read_archive
from handlers.explainers.protonmf import ProtoNMFConfig, ProtoNMFExplainer
from handlers.fitting import protonmf
from handlers.model import InputSpec, ModelParts, pooled_linear_head
from handlers.runtime import ExplainItem, ModelRuntime


@pytest.fixture(scope="module")
def served(demo_store) -> ModelRuntime:
    return ModelRuntime(read_archive(demo_store / "mnist-1.psar"))


@pytest.fixture(scope="module")
def batch(mnist_split):
    return mnist_split["x_test"][:48]


def _explain(served, x, targets=None, suppress=None, heatmaps="feature_grid"):
    items = [ExplainItem(x[i], None if targets is None else int(targets[i]), [] if suppress is None else suppress[i])
             for i in range(len(x))]
    return served.explain("protonmf", items, heatmaps)


def test_feature_grid_heatmaps_sum_to_contributions(served, batch):
    _, e, _ = _explain(served, batch)
    assert e.heatmaps.shape == (len(batch), 3, 7, 7)
    assert torch.allclose(e.heatmaps.sum((2, 3)), e.contribution, atol=1e-3)
    _, e_input, _ = _explain(served, batch, heatmaps="input")
    assert e_input.heatmaps.shape == (len(batch), 3, 28, 28)
    assert torch.allclose(e_input.heatmaps.sum((2, 3)), e.contribution, atol=1e-3, rtol=1e-3)


def test_interventions_subtract_exactly_the_suppressed_contributions(served, batch):
    ids = served.explainers["protonmf"].component_ids
    sets = [["c3.p0", "c3.p2", "c8.p1"], ["c1.p1"], []]
    suppress = [[[ids[i] for i in s] for s in sets]] * len(batch)
    logits, e, _ = _explain(served, batch, suppress=suppress)
    assert e.intervened_logits.shape == (len(batch), 3, 10)
    for m, chosen in enumerate(sets):
        expected = logits.clone()
        for cls in {int(i[1]) for i in chosen}:
            _, per_class, _ = _explain(served, batch, targets=torch.full((len(batch),), cls))
            drop = sum(per_class.contribution[:, int(i.split(".p")[1])] for i in chosen if int(i[1]) == cls)
            expected[:, cls] -= drop
        assert torch.allclose(e.intervened_logits[:, m], expected, atol=1e-4)
    assert torch.equal(e.intervened_logits[:, 2], logits)


def test_fit_report_table3(served):
    report = served.explainers["protonmf"].fit_report
    assert report["acc_black_box"] >= 0.97
    assert report["acc_nmf_plus_residual"] == report["acc_black_box"]
    assert 0 < report["acc_nmf_only"] <= 1 and 0 < report["acc_residual_only"] <= 1
    assert set(report["feature_reconstruction_error"]) == set(served.labels)
    assert set(report["head_reconstruction_error"]) == set(served.labels)


def test_fully_connected_layer_is_exact():
    parts, data = fully_connected_problem(60, 60)
    assert parts.feature_shape == [16]
    fitted = protonmf.fit(parts, data, ProtoNMFConfig(n_prototypes=2), log=lambda *_: None)
    assert fitted.fit_report["acc_nmf_plus_residual"] == fitted.fit_report["acc_black_box"]
    explainer = ProtoNMFExplainer(parts, fitted)
    from handlers.base import ExplainBatch

    with torch.inference_mode():
        features = parts.upstream(data.x_test)
        logits = parts.downstream(features)
        e = explainer.explain(ExplainBatch(data.x_test, features, logits, logits.argmax(1),
                                           torch.zeros(len(features), 0, 6, dtype=torch.bool), True))
    # One position: each heatmap is its contribution.
    assert e.heatmaps.shape == (len(features), 2, 1, 1)
    assert torch.allclose(e.heatmaps[:, :, 0, 0], e.contribution, atol=1e-6)


def test_a_non_linear_head_is_refused(mnist_model):
    # After `features_8` (a conv) come BN, ReLU, pooling and the head: not pooling + linear.
    parts = ModelParts.from_model(mnist_model, "features_8", InputSpec(shape=[1, 28, 28]), [str(i) for i in range(10)])
    batches = []
    hook = parts.downstream.register_forward_pre_hook(lambda module, args: batches.append(len(args[0])))
    try:
        with pytest.raises(ValueError, match="not global average pooling"):
            pooled_linear_head(parts)
    finally:
        hook.remove()
    # Refused by the affinity probe (24 feature maps), before one pass per channel (128 more).
    assert batches == [24]
