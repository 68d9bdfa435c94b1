"""The contract every registered method keeps, on a small fit of each (tests/test_<method>.py hold the rest).

Each method is fitted once, small: on the fully connected problem of conftest (a 1x1 feature grid)
when it accepts one, else (gradcam_rules, which needs an image input and a convolutional layer) on
a subset of MNIST. For every method: its config round-trips and refuses what it does not know, old
archives' hyperparameters read back typed, the explanation's invariants hold (additivity, or the
removal identity), a batch explains as its examples do alone, factors of another layer or shape are
refused, the explainer moves to a device whole, and a live server on loopback answers what the
method computes in process.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from conftest import RunningServer, fully_connected_problem
from torch import nn

from handlers.archive import read_archive, write_archive
from handlers.base import ExplainBatch, FitData
from handlers.methods import METHODS
from handlers.model import InputSpec, ModelParts
from handlers.runtime import ExplainItem, ModelRuntime

# method -> (problem, config of a small fit)
CASES = {
    "protonmf": ("mlp", {"n_prototypes": 2}),
    "coupled_nmf": ("mlp", {"n_concepts": 3, "max_iter": 20}),
    "srae": ("mlp", {"n_xfeatures": 3, "epochs": 3}),
    "protofac": ("mlp", {"n_prototypes": 4, "epochs": 1, "eval_size": 40, "nmf_max_iter": 10, "k_sweep": []}),
    "gradcam_rules": ("mnist", {}),
}
NAMES = sorted(CASES)
BATCH = 12

# Notes that archives written before the configs carried beside the hyperparameters (not configuration).
OLD_NOTES = {
    "protonmf": {"feature_clipping": "negative features set to zero"},
    "protofac": {"optimizer": "adam", "solver": "active_set_simplex",
                 "simplex": "Euclidean projection of each row of W after every step",
                 "intervention": "suppressed weights set to zero, not renormalized",
                 "feature_clipping": "negative features set to zero"},
    "coupled_nmf": {"neurons": "channels, each example's activation pooled by the spatial mean; negatives clipped to 0",
                    "view_normalization": "each view divided by its RMS example norm over the probe set"},
    "srae": {"optimizer": "Adam", "xfeature_bias_init": 0.5, "layer_z": "spatial mean of the explained layer",
             "standardization": "Z per dimension and each class's logit over its training set while training "
                                "(folded into the stored weights)"},
    "gradcam_rules": {"grid_window": [3, 3], "class_score": "logit of the predicted class",
                      "perturbation": "patch pixels set to zero"},
}

# Notes that became fields, as they read: coupled NMF's note on its neurons says they were pooled (the
# fully connected layer of the MLP case has no grid, so its explanations are the same).
OLD_NOTES_READ = {"coupled_nmf": {"neurons": "pooled"}}


class _WiderMLP(nn.Module):
    """The conftest MLP with 20 hidden units: its layer `relu` has another shape."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 20)
        self.fc2 = nn.Linear(20, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


@pytest.fixture(scope="module")
def problems(mnist_parts, mnist_fit_data) -> dict[str, tuple[ModelParts, FitData]]:
    d = mnist_fit_data
    return {"mlp": fully_connected_problem(200, 40),
            "mnist": (mnist_parts, FitData(d.x_train[::20], d.y_train[::20], d.x_test[::10], d.y_test[::10]))}


@pytest.fixture(scope="module")
def fits(problems) -> dict:
    """method -> (parts, data, fitted, explainer)"""
    out = {}
    for name, (problem, params) in CASES.items():
        parts, data = problems[problem]
        method = METHODS[name]
        fitted = method.fit(parts, data, method.config.from_dict(params), log=lambda *_: None)
        out[name] = parts, data, fitted, method.explainer(parts, fitted)
    return out


def _explain(explainer, parts, x, suppress=None, targets=None, heatmaps=True):
    """Explain ``x`` as the runtime does: under inference_mode, or with features that require grad."""
    grad = explainer.needs_grad
    with torch.no_grad() if grad else torch.inference_mode():
        features = parts.upstream(x)
    with torch.enable_grad() if grad else torch.inference_mode():
        if grad:
            features.requires_grad_(True)
        logits = parts.downstream(features)
        t = logits.argmax(1) if targets is None else targets
        if suppress is None:
            suppress = torch.zeros(len(x), 0, len(explainer.components), dtype=torch.bool)
        e = explainer.explain(ExplainBatch(x, features, logits, t, suppress, heatmaps))
    return logits.detach(), e


def _random_sets(n_examples: int, n_components: int, seed: int = 0) -> torch.Tensor:
    """(B, 3, N): a random set, nothing, everything."""
    sets = torch.rand(n_examples, 3, n_components, generator=torch.Generator().manual_seed(seed)) < 0.3
    sets[:, 1], sets[:, 2] = False, True
    return sets


def _tensors(e) -> dict[str, torch.Tensor]:
    return {k: v for k, v in vars(e).items() if v is not None}


def test_every_registered_method_is_covered():
    assert set(CASES) == set(METHODS) == set(OLD_NOTES)
    for name, method in METHODS.items():
        assert method.name == method.explainer.name == method.config.method == name
        assert method.explainer.config_class is method.config


# ---------------------------------------------------------------- configuration

@pytest.mark.parametrize("name", NAMES)
def test_config_is_stored_and_read_back_typed(name, fits):
    _, _, fitted, explainer = fits[name]
    config = METHODS[name].config
    stored = json.loads(json.dumps(fitted.hyperparameters))  # as an archive's manifest holds it
    assert dataclasses.asdict(explainer.config) == fitted.hyperparameters == dataclasses.asdict(config(**stored))
    assert config.from_hyperparameters(stored) == explainer.config
    assert config.from_hyperparameters({}) == config()  # missing keys take their defaults
    with pytest.raises(dataclasses.FrozenInstanceError):
        explainer.config.random_state = 1


@pytest.mark.parametrize("name", NAMES)
def test_config_refuses_unknown_keys_and_bad_values(name):
    config = METHODS[name].config
    with pytest.raises(ValueError, match=f"no parameter 'nonsense'; its parameters are {', '.join(config.keys())}$"):
        config.from_dict({"nonsense": 1})
    for key in config.keys():
        with pytest.raises(ValueError, match=f"^{name}: {key}=\\[\\[\\]\\] is not"):
            config.from_dict({key: [[]]})


def test_config_validates_ranges_and_choices():
    protonmf, coupled = METHODS["protonmf"].config, METHODS["coupled_nmf"].config
    assert protonmf.from_dict({"n_prototypes": 5, "tol": 1}).tol == 1.0  # an int where a float goes
    with pytest.raises(ValueError, match="^protonmf: n_prototypes=0 must be at least 1$"):
        protonmf.from_dict({"n_prototypes": 0})
    with pytest.raises(ValueError, match="^protonmf: solver='als' must be one of hals, rhals, mu$"):
        protonmf.from_dict({"solver": "als"})
    with pytest.raises(ValueError, match="n_prototypes=True is not int"):
        protonmf.from_dict({"n_prototypes": True})
    typed = coupled.from_dict({"layers": ["a", "b"], "class_groups": {"even": [0, 2], "odd": [1]}})
    assert typed.layers == ("a", "b") and typed.class_groups == {"even": (0, 2), "odd": (1,)}


def test_protoserve_param_is_checked_against_the_config():
    from server.cli import UserError, _methods

    keys = "n_prototypes, solver, init, max_iter, tol, random_state, head_reads, p_sweep"
    args = argparse.Namespace(method=["protonmf"], param=["protonmf.n_prototypes=5", "protonmf.tol=1e-3"])
    assert _methods(args) == {"protonmf": {"n_prototypes": 5, "tol": 1e-3}}
    for param, problem in (("n_protos=2", "--param protonmf.n_protos: protonmf has no parameter 'n_protos'"),
                           ("n_prototypes=0", "--param protonmf: n_prototypes=0 must be at least 1"),
                           ("solver=3", "--param protonmf: solver=3 is not str")):
        with pytest.raises(UserError) as refused:
            _methods(argparse.Namespace(method=["protonmf"], param=[f"protonmf.{param}"]))
        assert str(refused.value).startswith(f"{problem} — ") and str(refused.value).endswith(keys)


@pytest.mark.parametrize("name", NAMES)
def test_hyperparameters_of_archives_written_before_the_configs(name, fits):
    """Older archives carry notes beside the hyperparameters, as JSON: they read back typed, and explain the same."""
    parts, data, fitted, explainer = fits[name]
    old = json.loads(json.dumps({**fitted.hyperparameters, **OLD_NOTES[name]}))
    older = METHODS[name].explainer(parts, dataclasses.replace(fitted, hyperparameters=old))
    assert older.config == dataclasses.replace(explainer.config, **OLD_NOTES_READ.get(name, {}))
    x = data.x_test[:4]
    _, expected = _explain(explainer, parts, x)
    _, got = _explain(older, parts, x)
    for key, value in _tensors(expected).items():
        assert torch.equal(getattr(got, key), value), key


def test_old_protonmf_hyperparameters_read_back_typed():
    old = {"n_prototypes": 3, "solver": "rhals", "init": "nndsvda", "max_iter": 500, "tol": 0.0001,
           "random_state": 0, "feature_clipping": "negative features set to zero"}
    config = METHODS["protonmf"].config
    assert config.from_hyperparameters(old) == config(n_prototypes=3, solver="rhals", init="nndsvda", max_iter=500,
                                                      tol=1e-4, random_state=0)


# ---------------------------------------------------------------- the explanation

@pytest.mark.parametrize("name", NAMES)
def test_shapes_ranges_and_additivity(name, fits):
    parts, data, _, explainer = fits[name]
    x = data.x_test[:BATCH]
    n = len(explainer.components)
    suppress = _random_sets(BATCH, n)
    logits, e = _explain(explainer, parts, x, suppress)
    b, c = e.component_index.shape
    k = logits.shape[1]
    assert b == BATCH and e.weight.shape == e.contribution.shape == (b, c)
    for key in ("bias", "residual_contribution", "residual_share", "target_logit", "target_class"):
        assert getattr(e, key).shape == (b,), key
    assert e.intervened_logits.shape == (b, 3, k)
    assert e.heatmaps is None or e.heatmaps.shape[:2] == (b, c) and e.heatmaps.dim() == 4
    assert torch.equal(e.target_class, logits.argmax(1))
    assert torch.equal(e.target_logit, logits[torch.arange(b), e.target_class])
    assert ((e.component_index >= -1) & (e.component_index < n)).all()
    padding = e.component_index < 0
    assert (e.weight[padding] == 0).all() and (e.contribution[padding] == 0).all()
    assert ((e.residual_share >= 0) & (e.residual_share <= 1)).all()
    if explainer.additive:
        total = e.contribution.sum(1) + e.residual_contribution + e.bias
        assert ((total - e.target_logit).abs() <= 1e-4 * e.target_logit.abs().clamp_min(1)).all()
        gap = e.residual_contribution.abs()
        share = gap / (gap + e.contribution.abs().sum(1))
        assert torch.allclose(e.residual_share, torch.where(share.isnan(), 0.0, share), atol=1e-6)
        assert torch.equal(e.intervened_logits[:, 1], logits)  # nothing suppressed: the logits exactly


@pytest.mark.parametrize("name", NAMES)
def test_suppressing_a_component_lowers_the_target_logit_by_its_contribution(name, fits):
    """The removal identity: intervened_t(nothing) − intervened_t({i}) = contribution_i, for every
    reported component; for an additive method intervened_t(nothing) is the target logit."""
    parts, data, _, explainer = fits[name]
    x = data.x_test[:BATCH]
    _, first = _explain(explainer, parts, x, heatmaps=False)
    index = first.component_index
    c, n = index.shape[1], len(explainer.components)
    suppress = torch.zeros(BATCH, 1 + c, n, dtype=torch.bool)
    for b, j in (index >= 0).nonzero().tolist():
        suppress[b, 1 + j, index[b, j]] = True
    _, e = _explain(explainer, parts, x, suppress, heatmaps=False)
    assert torch.equal(e.component_index, index)
    rows = torch.arange(BATCH)
    at_target = e.intervened_logits[rows, :, e.target_class]  # (B, 1 + C)
    drop = at_target[:, :1] - at_target[:, 1:]
    reported = index >= 0
    assert reported.any()
    assert torch.allclose(drop[reported], e.contribution[reported], atol=1e-5)
    if explainer.additive:
        assert torch.equal(at_target[:, 0], e.target_logit)


@pytest.mark.parametrize("name", NAMES)
def test_a_batch_explains_as_its_examples_alone(name, fits):
    parts, data, _, explainer = fits[name]
    x = data.x_test[:6]
    suppress = _random_sets(6, len(explainer.components), seed=1)
    targets = torch.tensor([0, 1, 2, 0, 1, 2])
    _, whole = _explain(explainer, parts, x, suppress, targets)
    for i in range(6):
        _, alone = _explain(explainer, parts, x[i:i + 1], suppress[i:i + 1], targets[i:i + 1])
        for key, value in _tensors(whole).items():
            assert torch.allclose(getattr(alone, key)[0].float(), value[i].float(), atol=1e-5), (key, i)


# ---------------------------------------------------------------- loading and moving

@pytest.mark.parametrize("name", NAMES)
def test_factors_of_another_layer_or_shape_are_refused(name, fits, mnist_model):
    parts, _, fitted, explainer = fits[name]
    explainer_class = METHODS[name].explainer
    for factor, (_, shape) in explainer.declared_factors().items():
        missing = {k: v for k, v in fitted.factors.items() if k != factor}
        with pytest.raises(ValueError, match=f"^{name} has no factor {factor}$"):
            explainer_class(parts, dataclasses.replace(fitted, factors=missing))
        tensor = fitted.factors[factor]
        if tensor.dim() == 0:
            continue
        shorter = {**fitted.factors, factor: tensor[:-1] if len(tensor) > 1 else torch.cat([tensor, tensor])}
        with pytest.raises(ValueError, match=f"^{name} factor \\w+ has shape .* expected"):
            explainer_class(parts, dataclasses.replace(fitted, factors=shorter))
    if CASES[name][0] == "mlp":
        torch.manual_seed(0)
        other = ModelParts.from_model(_WiderMLP(), "relu", InputSpec(shape=[1, 12]), parts.labels)
    else:
        other = ModelParts.from_model(mnist_model, "features_6", parts.input_spec, parts.labels)
    with pytest.raises(ValueError, match=f"^{name}"):
        explainer_class(other, fitted)


@pytest.mark.parametrize("name", NAMES)
def test_the_explainer_moves_to_a_device_whole(name, fits):
    parts, data, _, explainer = fits[name]
    moved = copy.copy(explainer).to("meta")
    tensors = {k: v for k, v in vars(moved).items() if isinstance(v, torch.Tensor)}
    assert set(explainer.declared_factors()) <= set(tensors)
    assert {k: v.device.type for k, v in tensors.items()} == dict.fromkeys(tensors, "meta")
    assert all(getattr(explainer, k).device.type == "cpu" for k in tensors)  # the original stayed
    x, suppress = data.x_test[:4], _random_sets(4, len(explainer.components))
    _, before = _explain(explainer, parts, x, suppress)
    _, after = _explain(copy.copy(explainer).to("cpu"), parts, x, suppress)
    for key, value in _tensors(before).items():
        assert torch.equal(getattr(after, key), value), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", NAMES)
def test_on_a_cuda_device_it_explains_as_on_the_cpu(name, fits):
    parts, data, fitted, explainer = fits[name]
    gpu_parts = copy.deepcopy(parts).to("cuda")
    on_gpu = METHODS[name].explainer(gpu_parts, fitted).to("cuda")
    assert all(v.device.type == "cuda" for v in vars(on_gpu).values() if isinstance(v, torch.Tensor))
    x, suppress = data.x_test[:4], _random_sets(4, len(explainer.components))
    _, expected = _explain(explainer, parts, x, suppress)
    _, got = _explain(on_gpu, gpu_parts, x.cuda(), suppress.cuda())
    for key, value in _tensors(expected).items():
        assert torch.allclose(getattr(got, key).cpu().float(), value.float(), atol=1e-4, rtol=1e-4), key


# ---------------------------------------------------------------- through a live server

@pytest.fixture(scope="module")
def live(fits, tmp_path_factory):
    """A server on loopback over two archives: the fully connected problem's methods, and gradcam_rules on MNIST."""
    from server.settings import Settings

    store = tmp_path_factory.mktemp("contract-store")
    for problem in ("mlp", "mnist"):
        names = [name for name in NAMES if CASES[name][0] == problem]
        write_archive(store, problem, "1", fits[names[0]][0], [fits[name][2] for name in names])
    running = RunningServer(Settings(model_store=store, port=0, metrics_port=0, max_delay_ms=1.0))
    yield store, running
    running.stop()


@pytest.mark.parametrize("name", NAMES)
def test_a_live_server_answers_what_the_method_computes(name, fits, live):
    from protoserve_client import ExplainerClient

    store, running = live
    problem = CASES[name][0]
    _, data, _, explainer = fits[name]
    served = ModelRuntime(read_archive(store / f"{problem}-1.psar"))
    x = data.x_test[0]
    _, first, _ = served.explain(name, [ExplainItem(x, None, [])], "none")
    reported = [int(i) for i in first.component_index[0] if i >= 0]
    suppressed = [explainer.components[reported[0]].id] if reported else []
    logits, e, _ = served.explain(name, [ExplainItem(x, None, [reported[:1]])], "feature_grid")
    with ExplainerClient(running.address, timeout=60) as client:
        info = next(m for m in client.get_model(problem).methods if m.name == name)
        response = client.explain(x.numpy(), model=problem, method=name, interventions=[suppressed])
    assert info.additive == explainer.additive and info.residual_share_definition
    assert [c.id for c in info.components] == [c.id for c in explainer.components]
    assert response.method == name and response.target_class == int(e.target_class[0])
    assert response.target_logit == pytest.approx(float(e.target_logit[0]), abs=1e-5)
    assert [c.id for c in response.components] == [explainer.components[i].id for i in reported]
    assert np.allclose([c.weight for c in response.components], e.weight[0, :len(reported)], atol=1e-5)
    assert np.allclose([c.contribution for c in response.components], e.contribution[0, :len(reported)], atol=1e-5)
    assert response.residual_share == pytest.approx(float(e.residual_share[0]), abs=1e-6)
    assert response.interventions[0].target_logit == pytest.approx(
        float(e.intervened_logits[0, 0, e.target_class[0]]), abs=1e-5)
    if explainer.additive:
        total = math.fsum([c.contribution for c in response.components]
                          + [response.residual_contribution, response.bias])
        assert abs(total - response.target_logit) <= 1e-4 * max(1.0, abs(response.target_logit))
    assert logits.shape[1] == len(served.labels)
