"""SRAE explanation modules: x-features recomputed independently, Grad-CAM heatmaps, interventions, the fit report.

The invariants every method keeps (additivity, batch independence, refusals, device moves, a live
round trip) are in tests/test_contract.py."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from conftest import fully_connected_problem
from torch import nn

from handlers.archive import read_archive
from handlers.base import ExplainBatch, FitData
from handlers.explainers.srae import SRAEConfig, SRAEExplainer
from handlers.fitting import srae
from handlers.fitting.excitation_backprop import (
    RELU,
    activations,
    chain_of,
    contrast_signal,
    contrastive_mwp,
    linear_stage,
    region_operator,
    spatial_mean_stage,
    step_down,
)
from handlers.graph_program import split
from handlers.runtime import ExplainItem, ModelRuntime

NAME = srae.NAME
QUIET = {"log": lambda *_: None}


@pytest.fixture(scope="module")
def served(demo_store) -> ModelRuntime:
    return ModelRuntime(read_archive(demo_store / "mnist-1.psar"))


@pytest.fixture(scope="module")
def batch(mnist_split):
    return mnist_split["x_test"][::25][:40]  # every class


def _explain(served, x, targets=None, suppress=None, heatmaps="feature_grid"):
    items = [ExplainItem(x[i], None if targets is None else int(targets[i]), [] if suppress is None else suppress[i])
             for i in range(len(x))]
    return served.explain(NAME, items, heatmaps)


def _module(explainer, cls: int):
    """An independent nn.Sequential encoder and the readout (v, b) of class ``cls``'s module."""
    m = explainer.classes_.tolist().index(cls)
    w1, b1 = explainer.encoder_w1_[m], explainer.encoder_b1_[m]
    w2, b2 = explainer.encoder_w2_[m], explainer.encoder_b2_[m]
    encoder = nn.Sequential(nn.Linear(*w1.shape), nn.ReLU(), nn.Linear(*w2.shape), nn.ReLU())
    with torch.no_grad():
        encoder[0].weight.copy_(w1.T), encoder[0].bias.copy_(b1)
        encoder[2].weight.copy_(w2.T), encoder[2].bias.copy_(b2)
    return encoder, explainer.readout_weight_[m], explainer.readout_bias_[m]


def _features(served, x):
    with torch.inference_mode():
        features = served.parts.upstream(x)
        return features, served.parts.downstream(features)


# ---------------------------------------------------------------- the served demo modules

def test_the_target_class_modules_x_features_are_reported(served, batch):
    targets = torch.arange(len(batch)) % 10  # predicted or not, every class
    _, e, _ = _explain(served, batch, targets)
    explainer = served.explainers[NAME]
    assert e.component_index.shape == (len(batch), 5) and (e.component_index >= 0).all()
    for b in range(len(batch)):
        ids = [explainer.components[i] for i in e.component_index[b].tolist()]
        assert [c.id for c in ids] == [f"c{int(targets[b])}.x{n}" for n in range(5)]
        assert {c.class_index for c in ids} == {int(targets[b])}


def test_weights_and_contributions_recomputed_independently(served, batch):
    targets = (torch.arange(len(batch)) * 3) % 10
    _, e, _ = _explain(served, batch, targets)
    explainer = served.explainers[NAME]
    features, logits = _features(served, batch)
    z = features.mean((2, 3))
    for b in range(len(batch)):
        encoder, v, bias = _module(explainer, int(targets[b]))
        with torch.no_grad():
            x = encoder(z[b:b + 1])[0]
        readout = x @ v + bias
        assert torch.allclose(e.weight[b], x, atol=1e-5)
        assert (e.weight[b] >= 0).all()
        assert torch.allclose(e.contribution[b], v * x, atol=1e-5)
        assert e.bias[b] == bias
        # residual = ŷ − ȳ: the faithfulness gap to the model's logit
        assert torch.allclose(e.residual_contribution[b], logits[b, targets[b]] - readout, atol=1e-4)
        gap = e.residual_contribution[b].abs()
        assert torch.allclose(e.residual_share[b], gap / (gap + (v * x).abs().sum()), atol=1e-5)


def test_heatmaps_are_autograd_grad_cam_scaled_to_the_contribution(served, batch):
    _, e, _ = _explain(served, batch)
    explainer = served.explainers[NAME]
    assert e.heatmaps.shape == (len(batch), 5, 7, 7)
    features, _ = _features(served, batch)
    features = features.clone().requires_grad_()
    for b in range(len(batch)):
        encoder, _, _ = _module(explainer, int(e.target_class[b]))
        x = encoder(features[b:b + 1].mean((2, 3)))[0]
        for n in range(5):
            (grad,) = torch.autograd.grad(x[n], features, retain_graph=True)
            alpha = grad[b].mean((1, 2))  # Grad-CAM's channel weights at the pooled layer
            cam = (alpha[:, None, None] * features[b]).sum(0).relu().detach()
            expected = e.contribution[b, n] * cam / cam.sum() if cam.sum() > 0 else torch.zeros_like(cam)
            assert torch.allclose(e.heatmaps[b, n], expected, atol=1e-5, rtol=1e-4)
    has_mass = e.heatmaps.abs().sum((2, 3)) > 0
    assert has_mass.float().mean() > 0.5
    assert torch.allclose(e.heatmaps.sum((2, 3))[has_mass], e.contribution[has_mass], atol=1e-4)
    _, e_input, _ = _explain(served, batch, heatmaps="input")
    assert e_input.heatmaps.shape == (len(batch), 5, 28, 28)


def test_interventions_zero_x_features_of_their_own_class(served, batch):
    explainer = served.explainers[NAME]
    ids = explainer.component_ids
    targets = torch.full((len(batch),), 3)
    sets = [["c3.x0", "c3.x2", "c8.x1"], ["c3.x0", "c3.x1", "c3.x2", "c3.x3", "c3.x4"], [], ["c5.x4"]]
    suppress = [[[ids[i] for i in s] for s in sets]] * len(batch)
    logits, e, _ = _explain(served, batch, targets, suppress=suppress, heatmaps="none")
    assert e.intervened_logits.shape == (len(batch), len(sets), 10)
    features, _ = _features(served, batch)
    z = features.mean((2, 3))
    for m, chosen in enumerate(sets):
        expected = logits.clone()
        for cls in {int(i[1]) for i in chosen}:
            encoder, v, bias = _module(explainer, cls)
            with torch.no_grad():
                x = encoder(z)
            zeroed = x.clone()
            zeroed[:, [int(i.split(".x")[1]) for i in chosen if int(i[1]) == cls]] = 0
            # the readout with the suppressed x-features zeroed, plus the residual ŷ − ȳ
            expected[:, cls] = zeroed @ v + bias + (logits[:, cls] - (x @ v + bias))
        assert torch.allclose(e.intervened_logits[:, m], expected, atol=1e-4)
    assert torch.equal(e.intervened_logits[:, 2], logits)  # nothing suppressed: the model's logits exactly
    # Every x-feature of the target zeroed: bias plus residual is left.
    assert torch.allclose(e.intervened_logits[:, 1, 3], e.bias + e.residual_contribution, atol=1e-4)
    untouched = [k for k in range(10) if k not in (3, 8)]
    assert torch.equal(e.intervened_logits[:, 0, untouched], logits[:, untouched])


def test_fit_report_table1(served):
    explainer = served.explainers[NAME]
    assert explainer.additive and not explainer.needs_grad
    report = explainer.fit_report
    json.dumps(report)
    for key in ("f_reg_train", "f_reg_test"):
        assert set(report[key]) == {"srae", "nn", "sae"}, key
        assert all(math.isfinite(v) and v >= 0 for v in report[key].values()), key
    # Table 1's locality row, with its Z and ExcitationBP columns.
    assert set(report["locality"]) == {"srae", "nn", "sae", "z", "excitation_backprop"}
    assert all(isinstance(v, float) and 0 <= v <= math.log(9) + 1e-6 for v in report["locality"].values())
    assert set(report["locality_per_class"]) == {"srae", "nn", "sae", "excitation_backprop"}
    assert "3x3" in report["locality_definition"] and "c-MWP" in report["locality_definition"]
    # The paper's training data: 50 positives and 8000 negatives per class, capped at MNIST's 3600 others.
    assert set(report["n_train_positives_per_class"].values()) == {50}
    assert all(n == 50 + 3600 for n in report["n_train_per_class"].values())
    # The modules learned the logit: F_reg far below a constant readout's.
    for variant in ("srae", "nn", "sae"):
        assert report["f_reg_test"][variant] < 0.25 * report["f_reg_reference"]["test"], variant
    # SRAE's x-features reconstruct the layer (NN's decoder is untrained).
    assert report["reconstruction_error_test"]["srae"] < 0.5 < report["reconstruction_error_test"]["nn"]
    assert report["inactive_xfeatures"]["srae"] == 0
    assert explainer.config.n_xfeatures == 5
    assert len(explainer.components) == 50


# ---------------------------------------------------------------- excitation backprop and locality

def test_c_mwp_by_hand():
    """x = [1, 2] -> h = relu(x A) = [3, 2] -> y = h B = -1, one unit at the top."""
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[1.0], [-2.0]])
    stages = [linear_stage(a), RELU, linear_stage(b)]
    values = activations(stages, torch.tensor([[1.0, 2.0]]))
    assert values[2].tolist() == [[3.0, 2.0]] and values[3].tolist() == [[-1.0]]
    top = torch.ones(1, 1, 1)
    # MWP at h: B⁺ = [1, 0] gives h_0 all of it; the dual's (−B)⁺ = [0, 2] gives h_1 all of it.
    assert step_down(stages[2], values[2], top[0]).tolist() == [[1.0, 0.0]]
    assert step_down(stages[2], values[2], top[0], negate=True).tolist() == [[0.0, 1.0]]
    # Contrast at h: max([1, 0] − [0, 1], 0) = [1, 0]; then h_0 = x A[:, 0] splits 1·1 : 2·1 over x.
    got = contrastive_mwp(stages, values, top, negate_at=2, contrast=2)
    assert torch.allclose(got, torch.tensor([[[1 / 3, 2 / 3]]]))
    # Contrast at the input instead: the target's [1/3, 2/3] less the dual's, which h_1 = x_1 sends all to x_1.
    got = contrastive_mwp(stages, values, top, negate_at=2, contrast=0)
    assert torch.allclose(got, torch.tensor([[[1 / 3, 0.0]]]))


def _tiny_cnn():
    torch.manual_seed(0)
    features = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU(),
                             nn.MaxPool2d(2), nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()).eval()
    with torch.no_grad():
        features[1].running_mean.uniform_(-0.2, 0.2), features[1].running_var.uniform_(0.5, 2)
        features[1].weight.uniform_(-1, 1), features[1].bias.uniform_(0.2, 0.5)
        features[4].weight.abs_()  # every active input excites: the mass is kept (W⁺ x > 0)
    upstream, _ = split(nn.Sequential(features, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)), "_0_5")
    return upstream


def test_excitation_backprop_conserves_the_probability_at_every_layer():
    upstream = _tiny_cnn()
    stages = [*chain_of(upstream), spatial_mean_stage()]
    assert [s.kind for s in stages] == ["affine", "pass", "max", "affine", "pass", "pool"]  # BatchNorm folded
    x = torch.rand(3, 1, 6, 6) + 0.1  # every pixel excites
    values = activations(stages, x)
    with torch.no_grad():
        assert torch.allclose(values[5], upstream(x))
    signal = torch.zeros(3, 4)
    signal[:, 1] = 1  # channel 1's spatial mean
    for k in range(len(stages) - 1, -1, -1):
        signal = step_down(stages[k], values[k], signal)
        assert (signal >= 0).all()
        # Mass is kept wherever the unit is active (an inactive unit's signal dies at its own layer).
        alive = values[-1][:, 1] > 0
        assert torch.allclose(signal.flatten(1).sum(1)[alive], torch.ones(int(alive.sum()))), k
    # c-MWP with the dual at the last convolution (its weights negated): non-negative maps of at most the
    # unit's mass; the transposed map gives each map's mass in each region of the input.
    units = torch.eye(4).unsqueeze(1).expand(4, 3, 4)
    maps = contrastive_mwp(stages, values, units, negate_at=3, contrast=3)
    assert maps.shape == (4, 3, 1, 6, 6) and (maps >= 0).all() and (maps.sum() > 0)
    assert (maps.flatten(2).sum(2) <= 1 + 1e-5).all()
    regions = torch.zeros(4, 1, 6, 6)
    regions[0, :, :3, :3], regions[1, :, :3, 3:], regions[2, :, 3:, :3], regions[3, :, 3:, 3:] = 1, 1, 1, 1
    operator = region_operator(stages, values, regions, contrast=3)  # (B, R, 3, 3, 3)
    at_contrast = contrast_signal(stages, values, units, negate_at=3, contrast=3)
    mass = torch.einsum("brk,ubk->ubr", operator.flatten(2), at_contrast.flatten(2))
    assert torch.allclose(mass, torch.einsum("ubk,rk->ubr", maps.flatten(2), regions.flatten(1)), atol=1e-6)
    # A spatial mean's own weights are positive: its dual passes nothing on, c-MWP is plain MWP.
    plain = contrastive_mwp(stages, values, units, negate_at=5, contrast=5)
    assert torch.allclose(plain.flatten(2).sum(2)[1], torch.ones(3))


def test_locality_is_the_entropy_of_the_mean_region_histogram():
    masks = srae.region_masks((7, 7))
    assert masks.shape == (9, 7, 7) and torch.equal(masks.sum(0), torch.ones(7, 7))
    assert masks[4].sum() == 9 and masks[0].sum() == 4  # bands 2, 3, 2: the middle one the largest

    def mass(*maps):  # (U, B, 7, 7) -> (U, B, R)
        return torch.einsum("ubhw,rhw->ubr", torch.stack(maps).unsqueeze(0), masks)

    even = (masks / masks.sum((1, 2), keepdim=True)).sum(0)  # the same mass in every region
    corner, centre = torch.zeros(7, 7), torch.zeros(7, 7)
    corner[0, 0], centre[3, 3] = 1, 5
    assert torch.allclose(srae.locality(mass(even)), torch.tensor([math.log(9)]))
    assert srae.locality(mass(corner)).tolist() == [0.0]
    # Averaged over images before the entropy (the paper's S̄): one region each -> ln 2, not 0;
    # a map without mass is left out, and a unit without any is NaN.
    assert torch.allclose(srae.locality(mass(corner, centre, torch.zeros(7, 7))), torch.tensor([math.log(2)]))
    assert srae.locality(mass(torch.zeros(7, 7))).isnan().all()


def test_archives_from_before_the_paper_training_data_read_back_as_fitted():
    old = {"n_xfeatures": 5, "negative_ratio": 3.0, "epochs": 30, "layer_z": "spatial mean of the explained layer"}
    config = SRAEConfig.from_hyperparameters(old)
    assert (config.positives, config.negative_ratio, config.epochs) == (None, 3.0, 30)
    assert (SRAEConfig().positives, SRAEConfig().negatives, SRAEConfig().negative_ratio) == (50, 8000, None)


# ---------------------------------------------------------------- small fits

@pytest.fixture(scope="module")
def small_data(mnist_fit_data) -> FitData:
    d = mnist_fit_data
    return FitData(d.x_train[::8], d.y_train[::8], d.x_test[::4], d.y_test[::4])


@pytest.fixture(scope="module")
def small_fit(mnist_parts, small_data):
    return srae.fit(mnist_parts, small_data, SRAEConfig(classes=(2, 5), epochs=2), **QUIET)


def test_fit_is_deterministic(mnist_parts, small_data, small_fit):
    again = srae.fit(mnist_parts, small_data, SRAEConfig(classes=(5, 2, 5), epochs=2), **QUIET)
    assert small_fit.factors.keys() == again.factors.keys()
    for name, tensor in small_fit.factors.items():
        assert torch.equal(tensor, again.factors[name]), name
    strip = lambda r: {k: v for k, v in r.items() if k != "fit_seconds"}  # noqa: E731
    assert strip(small_fit.fit_report) == strip(again.fit_report)
    assert small_fit.exemplars == again.exemplars
    assert [c.id for c in small_fit.components] == [f"c{c}.x{n}" for c in (2, 5) for n in range(5)]
    assert small_fit.hyperparameters["classes"] == (2, 5)  # as fitted: sorted, once each
    assert all(png.startswith(b"\x89PNG") for png in small_fit.exemplars.values())
    other = srae.fit(mnist_parts, small_data, SRAEConfig(classes=(2, 5), epochs=2, random_state=1), **QUIET)
    assert not torch.equal(other.factors["encoder_w1_"], small_fit.factors["encoder_w1_"])


def test_a_class_without_module_is_all_residual(mnist_parts, small_data, small_fit):
    explainer = SRAEExplainer(mnist_parts, small_fit)
    x = small_data.x_test[:30]
    with torch.inference_mode():
        features = mnist_parts.upstream(x)
        logits = mnist_parts.downstream(features)
    targets = torch.tensor([2, 5, 7] * 10)
    suppress = torch.zeros(30, 1, 10, dtype=torch.bool)
    suppress[:, 0, 5:] = True  # every x-feature of class 5
    e = explainer.explain(ExplainBatch(x, features, logits, targets, suppress, True))
    none = targets == 7
    assert (e.component_index[none] == -1).all() and (e.component_index[~none] >= 0).all()
    assert (e.contribution[none] == 0).all() and (e.bias[none] == 0).all()
    assert torch.equal(e.residual_contribution[none], e.target_logit[none])
    assert (e.residual_share[none] == 1).all() and (e.heatmaps[none] == 0).all()
    total = e.contribution.sum(1) + e.bias + e.residual_contribution
    assert torch.allclose(total, e.target_logit, atol=1e-4)
    keep = [k for k in range(10) if k != 5]
    assert torch.equal(e.intervened_logits[:, 0, keep], logits[:, keep])
    fives = targets == 5
    assert torch.allclose(e.intervened_logits[fives, 0, 5], (e.bias + e.residual_contribution)[fives], atol=1e-4)


def test_modules_of_classes_the_model_lacks_are_refused(mnist_parts, small_fit):
    wrong = dataclasses.replace(small_fit, factors={**small_fit.factors, "classes_": torch.tensor([2, 12])})
    with pytest.raises(ValueError, match=r"srae classes \[2, 12\] do not fit a model with 10 classes"):
        SRAEExplainer(mnist_parts, wrong)


def test_fully_connected_layer():
    parts, data = fully_connected_problem(160, 80)
    fitted = srae.fit(parts, data, SRAEConfig(n_xfeatures=3, epochs=3), **QUIET)
    assert "locality" not in fitted.fit_report and not fitted.exemplars
    explainer = SRAEExplainer(parts, fitted)
    with torch.inference_mode():
        features = parts.upstream(data.x_test)
        logits = parts.downstream(features)
        e = explainer.explain(ExplainBatch(data.x_test, features, logits, logits.argmax(1),
                                           torch.zeros(len(features), 0, 9, dtype=torch.bool), True))
    assert e.heatmaps is None and e.intervened_logits.shape == (len(features), 0, 3)


# ---------------------------------------------------------------- through the live server

def test_served(client, mnist_fit_data):
    info = client.get_model("mnist")
    method = next(m for m in info.methods if m.name == NAME)
    assert method.additive and method.residual_share_definition
    report = json.loads(method.fit_report_json)
    assert {"f_reg_train", "f_reg_test", "locality"} <= set(report)
    assert len(method.components) == 50
    assert all(c.exemplar_png.startswith(b"\x89PNG") for c in method.components)
    x = mnist_fit_data.x_test[0].numpy()
    first = client.explain(x, model="mnist", method=NAME)
    chosen = f"c{first.target_class}.x0"
    response = client.explain(x, model="mnist", method=NAME, interventions=[[chosen], ["c9.x1"]])
    assert response.method == NAME and 0 <= response.residual_share <= 1
    assert [c.id for c in response.components] == [f"c{response.target_class}.x{n}" for n in range(5)]
    assert all(c.class_index == response.target_class for c in response.components)
    total = math.fsum([c.contribution for c in response.components]
                      + [response.residual_contribution, response.bias])
    assert abs(total - response.target_logit) <= 1e-4 * max(1.0, abs(response.target_logit))
    assert [h.component_id for h in response.heatmaps] == [c.id for c in response.components]
    assert response.interventions[0].target_logit == pytest.approx(
        response.target_logit - response.components[0].contribution, abs=1e-4)
    if response.target_class != 9:
        assert response.interventions[1].target_logit == pytest.approx(response.target_logit, abs=1e-6)
    assert np.isfinite(response.target_logit)
