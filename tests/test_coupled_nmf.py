"""Coupled NMF on the demo model: the fit report, the fold-in, and contributions that are
exactly the target logit's change when a concept is removed, recomputed by hand.

The invariants every method keeps are in tests/test_contract.py."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import fully_connected_problem
from scipy.optimize import nnls

from handlers.archive import read_archive
from handlers.base import ExplainBatch
from handlers.device_graphs import eager_replay
from handlers.explainers.coupled_nmf import CoupledNMFConfig, CoupledNMFExplainer
from handlers.fitting import coupled_nmf
from handlers.runtime import ExplainItem, ModelRuntime
from handlers.solvers import compiled_rows

D = 6  # concepts in the small test fit
FAST = CoupledNMFConfig(n_concepts=D, n_probe=500, max_iter=40)
QUIET = {"log": lambda *_: None}


@pytest.fixture(scope="module")
def fitted(mnist_parts, mnist_fit_data):
    return coupled_nmf.fit(mnist_parts, mnist_fit_data, FAST, **QUIET)


@pytest.fixture(scope="module")
def explainer(mnist_parts, fitted):
    return CoupledNMFExplainer(mnist_parts, fitted)


@pytest.fixture(scope="module")
def batch(mnist_parts, mnist_split):
    x = mnist_split["x_test"][:32]
    with torch.inference_mode():
        features = mnist_parts.upstream(x)
        logits = mnist_parts.downstream(features)
    return x, features, logits


def _explain(explainer, batch, sets=(), targets=None, heatmaps=True):
    x, features, logits = batch
    suppress = torch.zeros(len(x), len(sets), D, dtype=torch.bool)
    for m, chosen in enumerate(sets):
        suppress[:, m, list(chosen)] = True
    targets = logits.argmax(1) if targets is None else targets
    with torch.inference_mode():
        return explainer.explain(ExplainBatch(x, features, logits, targets, suppress, heatmaps))


def _removed_by_hand(parts, fitted, features, f, chosen):
    """a − max(a, 0)·r, recomputed from the stored factors: per unit of the maps
    r[c, h, w] = min(1, Σ_S O[(c, h, w), d] f_d / max(a, 0)[c, h, w]) (neurons "maps"), per channel
    r[c] = min(1, Σ_S O[c, d] f_d / mean_hw(max(a, 0))[c]) (the explained layer pooled); 0 where the
    denominator is 0."""
    O = fitted.factors[f"neuron_factors_{len(fitted.hyperparameters['layers']) - 1}_"]
    removed = sum(f[:, d:d + 1] * O[:, d] for d in chosen)  # (B, U)
    positive = features.clamp_min(0)
    if O.shape[0] == features.shape[1]:  # pooled: one neuron per channel
        mean = positive.mean((2, 3))
        ratio = torch.where(mean > 0, removed / mean.clamp_min(1e-12), torch.zeros_like(mean)).clamp_max(1)
        return features - positive * ratio[:, :, None, None]
    units = positive.flatten(1)
    ratio = torch.where(units > 0, removed / units.clamp_min(1e-12), torch.zeros_like(units)).clamp_max(1)
    return features - positive * ratio.reshape(features.shape)


def test_fit_report_has_the_concepts_and_layer_similarities(fitted, mnist_fit_data):
    report = json.loads(json.dumps(fitted.fit_report))  # JSON-serializable
    assert fitted.hyperparameters["layers"] == ("features_2", "features_6", "features_10")
    assert [c["id"] for c in report["concepts"]] == [f"concept{d}" for d in range(D)]
    probe = set(fitted.factors["probe_index_"].tolist())
    for concept in report["concepts"]:
        shares = [c["share"] for c in concept["top_classes"]]
        assert len(shares) == 3 and shares == sorted(shares, reverse=True) and 0 < shares[0] <= 1
        assert concept["dominant_group"]["group"] == concept["top_classes"][0]["class"]  # groups = classes here
        assert len(concept["top_examples"]) == 8 and set(concept["top_examples"]) <= probe
    assert sum(c["mass_share"] for c in report["concepts"]) == pytest.approx(1, abs=1e-5)
    assert report["fold_in_converged"] == 1.0  # 2 x n_concepts active-set steps sufficed for every held-out code
    assert report["neurons"] == "maps" and report["pooled_layers"] == {}  # 500 x 25 088 floats: under 256 MiB
    for name, neurons in (("features_2", 32 * 28 * 28), ("features_6", 64 * 14 * 14), ("features_10", 128 * 7 * 7)):
        layer = report["layers"][name]
        s = torch.tensor(layer["similarity"])
        assert layer["neurons"] == neurons and s.shape == (D, D)
        assert torch.allclose(s, s.T) and torch.allclose(s.diagonal(), torch.ones(D), atol=1e-5)
        assert sum(layer["eigenvalues"]) == pytest.approx(D, abs=1e-4)  # the trace of a cosine matrix
        assert layer["mean_top_eigenvalues"] == pytest.approx(np.mean(layer["eigenvalues"][:3]), abs=1e-5)
    assert 0 < report["residual_share_test"]["mean"] < 1 and report["knn"]["majority_matches_label"] > 0.5
    assert set(fitted.exemplars) == {f"concept{d}" for d in range(D)}
    assert all(png.startswith(b"\x89PNG") for png in fitted.exemplars.values())


def test_factors_are_non_negative_with_unit_norm_concepts(fitted):
    f = fitted.factors
    n_layers = len(fitted.hyperparameters["layers"])
    assert f["pixel_factors_"].shape == (1, 784, D)
    assert [f[f"neuron_factors_{j}_"].shape for j in range(n_layers)] == [(32 * 784, D), (64 * 196, D), (128 * 49, D)]
    for name, value in f.items():
        assert (value >= 0).all(), name
    # "unit_norm": the stacked loadings, in the normalized units of the fit, have unit-norm columns.
    scales = f["view_scales_"]
    stacked = torch.cat([f["pixel_factors_"][0] / scales[0],
                         *(f[f"neuron_factors_{j}_"] / scales[1 + j] for j in range(n_layers))])
    assert torch.allclose(torch.linalg.vector_norm(stacked, dim=0), torch.ones(D), atol=1e-4)


def test_fit_is_deterministic(fitted, mnist_parts, mnist_fit_data):
    again = coupled_nmf.fit(mnist_parts, mnist_fit_data, FAST, **QUIET)
    assert fitted.factors.keys() == again.factors.keys()
    for name in fitted.factors:
        assert torch.equal(fitted.factors[name], again.factors[name]), name
    assert fitted.fit_report["concepts"] == again.fit_report["concepts"]


def test_weights_residual_share_and_heatmaps(explainer, batch):
    e = _explain(explainer, batch)
    x = batch[0]
    assert torch.equal(e.component_index, torch.arange(D).expand(len(x), D)) and (e.weight >= 0).all()
    assert (e.bias == 0).all() and (e.residual_contribution == 0).all()
    # Heatmaps: the concepts' pixel masks weighted by f, at input resolution; together
    # they are the pixel view's reconstruction.
    assert e.heatmaps.shape == (len(x), D, 28, 28)
    masks = explainer.pixel_factors_[0].T.reshape(D, 28, 28)
    assert torch.allclose(e.heatmaps, e.weight[:, :, None, None] * masks, atol=1e-6)
    with torch.inference_mode():
        f, share = explainer.encode(x, batch[1])
        views = explainer.stacked_views(x, batch[1])
    assert torch.equal(f, e.weight) and torch.equal(share, e.residual_share)
    reconstruction = f @ explainer.dictionary_
    assert torch.allclose(e.heatmaps.sum(1).flatten(1) / explainer.view_scales_[0], reconstruction[:, :784], atol=1e-5)
    assert torch.allclose(share, torch.linalg.vector_norm(views - reconstruction, dim=1)
                          / torch.linalg.vector_norm(views, dim=1), atol=1e-6)


def test_fold_in_solves_the_stated_least_squares(explainer, fitted, mnist_parts, batch):
    x, features, _ = batch
    with torch.inference_mode():
        f, _ = explainer.encode(x[:8], features[:8])
        views = explainer.stacked_views(x[:8], features[:8])
    assert fitted.hyperparameters["fold_in_solver"] == "active_set"
    dictionary = explainer.dictionary_.double().numpy()
    for got, view in zip(f, views):
        exact, _ = nnls(dictionary.T, view.double().numpy())
        assert np.allclose(got.numpy(), exact, atol=1e-5)
    # Archives fitted before the exact fold-in keep their 50 HALS sweeps, close to the optimum.
    hyper = {**fitted.hyperparameters, "fold_in_solver": "hals", "fold_in_iter": 50}
    older = CoupledNMFExplainer(mnist_parts, dataclasses.replace(fitted, hyperparameters=hyper))
    with torch.inference_mode():
        swept = older.encode(x[:8], features[:8])[0]
    assert not torch.equal(swept, f) and torch.allclose(swept, f, atol=1e-2)
    # Their sweeps are graphed on a GPU (fewer than eleven concepts by every support are not): the same codes
    # through the graphs' buffers, here with the eager stand-in, for a bucket, a padded batch and one beyond.
    assert explainer.capture_graphs((1, 4), eager_replay) is None and explainer.graphs_ is None
    assert older.capture_graphs((1, 4), eager_replay).captured == (1, 4)
    with torch.inference_mode():
        for n in (1, 3, 8):
            assert torch.allclose(older.encode(x[:n], features[:n])[0], swept[:n], rtol=1e-5, atol=1e-6), n


@pytest.fixture
def tensor_path(monkeypatch):
    """What a GPU runs, here on the CPU: the tensor solvers instead of the compiled row loops."""
    monkeypatch.setattr(compiled_rows, "serve_on_cpu", False)


def test_the_cpu_kernels_answer_as_the_tensor_solvers(explainer, mnist_parts, batch, request):
    """What the CPU serves (the compiled terms, fold-in and removals) against the tensor ops a GPU runs: held-out
    digits, a blank input and a 1e4x input, every concept removed alone, two sets and all at once. The cross
    terms are float32 sums in two orders (each within 1e-6 of the float64 product: test_compiled_rows), which the
    fold-in can magnify by the Gram matrix's condition: the codes, and what follows from them, agree to 5e-5 (the
    interventions' logits to 3e-6 of the row's largest logit)."""
    x = torch.cat([batch[0][:16], torch.zeros_like(batch[0][:1]), 1e4 * batch[0][:1]])
    with torch.inference_mode():
        features = mnist_parts.upstream(x)
        logits = mnist_parts.downstream(features)
    sets = [[0], [1, 3], list(range(D))]
    served = _explain(explainer, (x, features, logits), sets)
    request.getfixturevalue("tensor_path")
    reference = _explain(explainer, (x, features, logits), sets)
    assert (served.weight == 0).any() and (served.weight > 0).any()  # codes on the orthant's faces and inside
    torch.testing.assert_close(served.weight, reference.weight, rtol=5e-5, atol=1e-6)
    torch.testing.assert_close(served.residual_share, reference.residual_share, rtol=0, atol=1e-6)
    torch.testing.assert_close(served.contribution, reference.contribution, rtol=5e-5, atol=1e-4)
    # An intervention's logits are the logits less a product with the head, float32 sums in two orders: they agree
    # to the rounding of those terms, relative to the row's logits (1e5 for the 1e4x input), not to the difference.
    scale = logits.abs().amax(1)[:, None, None]
    torch.testing.assert_close(served.intervened_logits / scale, reference.intervened_logits / scale, rtol=0, atol=3e-6)
    assert not torch.equal(served.intervened_logits[:, 2], logits[:, None].expand_as(served.intervened_logits)[:, 2])


def test_removing_a_concept_changes_the_target_logit_by_its_contribution(explainer, fitted, mnist_parts, batch):
    x, features, logits = batch
    targets = torch.arange(len(x)) % 10  # predicted or not, every class
    e = _explain(explainer, batch, sets=[[d] for d in range(D)], targets=targets)
    rows = torch.arange(len(x))
    for d in range(D):
        # The intervention and the contribution are the downstream run on the activation with the concept
        # removed, by hand.
        with torch.inference_mode():
            by_hand = mnist_parts.downstream(_removed_by_hand(mnist_parts, fitted, features, e.weight, [d]))
        assert torch.allclose(e.intervened_logits[:, d], by_hand, atol=1e-5)
        assert torch.allclose(e.contribution[:, d], logits[rows, targets] - by_hand[rows, targets], atol=1e-5)
    # An absent concept (f_d = 0) contributes exactly nothing.
    assert (e.contribution[e.weight == 0] == 0).all()
    assert (e.contribution.abs() > 1e-3).any()


def test_interventions_remove_sets_of_concepts_in_one_pass(explainer, fitted, mnist_parts, batch):
    x, features, logits = batch
    sets = [[0, 2, 3], list(range(D)), []]
    e = _explain(explainer, batch, sets=sets)
    assert e.intervened_logits.shape == (len(x), 3, 10)
    for m, chosen in enumerate(sets[:2]):
        with torch.inference_mode():
            by_hand = mnist_parts.downstream(_removed_by_hand(mnist_parts, fitted, features, e.weight, chosen))
        assert torch.allclose(e.intervened_logits[:, m], by_hand, atol=1e-5)
    assert torch.allclose(e.intervened_logits[:, 2], logits, atol=1e-6)


def test_nearest_probes_of_a_probe_example_is_itself(explainer, fitted, mnist_parts, mnist_fit_data):
    index = fitted.factors["probe_index_"][:40]
    x = mnist_fit_data.x_train[index]
    with torch.inference_mode():
        f, _ = explainer.encode(x, mnist_parts.upstream(x))
    ids, distance = explainer.nearest_probes(f, 3)
    assert ids.shape == distance.shape == (40, 3)
    assert (distance[:, 0] < 1e-4).all() and (ids[:, 0] == index).float().mean() >= 0.9
    assert (distance[:, :-1] <= distance[:, 1:]).all()


@pytest.mark.parametrize("options", [{"regularization": "unit_norm"}, {"regularization": "l2", "alpha": 1e-2},
                                     {"regularization": "unit_norm", "group_sparsity": 0.1}])
def test_multiplicative_updates_decrease_the_objective(options):
    g = torch.Generator().manual_seed(0)
    X = torch.rand(60, 200, generator=g) ** 3
    groups = torch.arange(200) % 4
    lam = options.get("alpha", 0.0) if options["regularization"] == "l2" else 0.0
    objectives = [coupled_nmf._coupled_mu(X, 5, lam=lam, unit_norm=options["regularization"] == "unit_norm",
                                          mu=options.get("group_sparsity", 0.0), groups=groups, max_iter=n,
                                          inner_iter=5, tol=0.0, check_every=1, random_state=0)[3]
                  for n in (1, 5, 20)]
    assert objectives[0] > objectives[1] > objectives[2]


SMALL = CoupledNMFConfig(n_concepts=3, max_iter=20)


# --------------------------------------------------------------------------- neurons: maps, or pooled channels

@pytest.fixture(scope="module")
def guarded(mnist_parts, mnist_fit_data):
    """A fit whose memory guard pools two layers: 500 x 25 088 and 500 x 12 544 floats are over 20 MiB
    (47.9 and 23.9 MiB), 500 x 6 272 (12.0 MiB, the explained layer) is not."""
    config = dataclasses.replace(FAST, max_view_mib=20.0, tcav_random_sets=0)
    return coupled_nmf.fit(mnist_parts, mnist_fit_data, config, **QUIET)


@pytest.fixture(scope="module")
def pooled(mnist_parts, mnist_fit_data):
    """A fit on pooled channels, as archives fitted before the maps."""
    config = dataclasses.replace(FAST, neurons="pooled", tcav_random_sets=0)
    return coupled_nmf.fit(mnist_parts, mnist_fit_data, config, **QUIET)


def test_the_memory_guard_pools_layers_whose_maps_are_too_large_and_says_why(guarded, pooled):
    report = guarded.fit_report
    assert report["neurons"] == "maps" and list(report["pooled_layers"]) == ["features_2", "features_6"]
    assert "500 x 25088 neurons would take 47.9 MiB, over max_view_mib = 20" in report["pooled_layers"]["features_2"]
    assert guarded.hyperparameters["pooled_layers"] == ("features_2", "features_6")
    assert [guarded.factors[f"neuron_factors_{j}_"].shape for j in range(3)] == [(32, D), (64, D), (128 * 49, D)]
    assert [report["layers"][name]["neurons"] for name in ("features_2", "features_6", "features_10")] == [32, 64, 6272]
    assert pooled.fit_report["neurons"] == "pooled" and len(pooled.fit_report["pooled_layers"]) == 3
    assert [pooled.factors[f"neuron_factors_{j}_"].shape for j in range(3)] == [(32, D), (64, D), (128, D)]


def test_the_fold_in_reads_the_views_the_fit_read(guarded, mnist_parts, batch):
    x, features, _ = batch
    explainer = CoupledNMFExplainer(mnist_parts, guarded)
    assert explainer.pooled == [True, True, False]
    with torch.inference_mode():
        _, *taps = explainer.tapped_upstream(x)
        views = explainer.stacked_views(x, features, taps)
        a2, a6 = mnist_parts.upstream.with_taps(["features_2", "features_6"], torch.clone)(x)[1:]
    assert [t.shape for t in taps] == [(32, 32), (32, 64)]
    assert torch.allclose(taps[0], a2.mean((2, 3))) and torch.allclose(taps[1], a6.mean((2, 3)))
    scales = guarded.factors["view_scales_"]
    assert views.shape == (32, 784 + 32 + 64 + 6272)
    assert torch.allclose(views[:, -6272:], features.clamp_min(0).flatten(1) / scales[3], atol=1e-6)


def test_archives_without_the_neurons_field_read_as_pooled(pooled, mnist_parts, batch):
    old = {k: v for k, v in pooled.hyperparameters.items() if k not in ("neurons", "max_view_mib", "pooled_layers")}
    older = CoupledNMFExplainer(mnist_parts, dataclasses.replace(pooled, hyperparameters=old))
    assert older.config.neurons == "pooled" and older.pooled == [True, True, True]
    assert CoupledNMFConfig.from_hyperparameters({}).neurons == "maps"  # the default, for a new fit
    now = _explain(CoupledNMFExplainer(mnist_parts, pooled), batch, sets=[[0], [1, 2]])
    then = _explain(older, batch, sets=[[0], [1, 2]])
    assert torch.equal(now.contribution, then.contribution) and torch.equal(now.weight, then.weight)


@pytest.mark.parametrize("which", ["maps", "pooled"])
def test_removal_is_per_unit_of_the_maps_or_per_channel_where_pooled(which, guarded, pooled, mnist_parts, batch):
    """Either view of the explained layer: the interventions and contributions are the downstream run on
    the activation removed by hand, and a row's answer does not depend on its batch."""
    fitted = guarded if which == "maps" else pooled
    x, features, logits = batch
    explainer = CoupledNMFExplainer(mnist_parts, fitted)
    sets = [[0], [1, 2], list(range(D))]
    targets = torch.arange(len(x)) % 10
    e = _explain(explainer, batch, sets=sets, targets=targets)
    rows = torch.arange(len(x))
    for m, chosen in enumerate(sets):
        with torch.inference_mode():
            by_hand = mnist_parts.downstream(_removed_by_hand(mnist_parts, fitted, features, e.weight, chosen))
            removed = explainer.remove(features, e.weight, torch.zeros(len(x), 1, D).index_fill_(2, torch.tensor(chosen), 1))
        assert torch.allclose(removed[:, 0], _removed_by_hand(mnist_parts, fitted, features, e.weight, chosen), atol=1e-6)
        assert torch.allclose(e.intervened_logits[:, m], by_hand, atol=1e-5)
        if len(chosen) == 1:
            assert torch.allclose(e.contribution[:, chosen[0]], logits[rows, targets] - by_hand[rows, targets], atol=1e-5)
    one = _explain(explainer, tuple(t[3:4] for t in batch), sets=sets, targets=targets[3:4])
    assert torch.allclose(one.intervened_logits[0], e.intervened_logits[3], atol=1e-5)
    assert torch.allclose(one.contribution[0], e.contribution[3], atol=1e-5)


def test_one_dimensional_inputs_and_a_fully_connected_layer():
    parts, data = fully_connected_problem(100, 60)
    fitted = coupled_nmf.fit(parts, data, SMALL, **QUIET)
    assert fitted.hyperparameters["layers"] == ("relu",) and fitted.exemplars == {}
    assert fitted.factors["pixel_offset_"] < 0  # standard-normal inputs are shifted to be non-negative
    explainer = CoupledNMFExplainer(parts, fitted)
    with torch.inference_mode():
        features = parts.upstream(data.x_test)
        logits = parts.downstream(features)
        e = explainer.explain(ExplainBatch(data.x_test, features, logits, logits.argmax(1),
                                           torch.ones(60, 1, 3, dtype=torch.bool), True))
    assert e.heatmaps.shape == (60, 3, 1, 12)
    assert ((e.residual_share >= 0) & (e.residual_share <= 1)).all() and (e.weight >= 0).all()
    assert torch.allclose(e.intervened_logits[:, 0], parts.downstream(features - features.clamp_min(0) * torch.clamp(
        e.weight @ fitted.factors["neuron_factors_0_"].T / features.clamp_min(0), max=1).nan_to_num(0)), atol=1e-5)


def test_removals_run_the_downstream_unless_the_layer_and_head_make_them_linear():
    """At a non-negative layer before a linear head, removed logits are a product with the head's
    weight; at a layer that can be negative (the head then starts with a ReLU) the downstream runs."""
    sets = torch.tensor([[1, 0, 0], [0, 1, 1], [1, 1, 1]], dtype=torch.bool).expand(60, 3, 3)
    for layer, linear in (("relu", True), ("fc1", False)):
        parts, data = fully_connected_problem(100, 60, layer)
        explainer = CoupledNMFExplainer(parts, coupled_nmf.fit(parts, data, SMALL, **QUIET))
        assert (explainer.head_weight_ is not None) == linear
        with torch.inference_mode():
            features = parts.upstream(data.x_test)
            logits = parts.downstream(features)
            e = explainer.explain(ExplainBatch(data.x_test, features, logits, logits.argmax(1), sets, False))
            removed = explainer.remove(features, e.weight, sets)
            by_hand = torch.stack([parts.downstream(v) for v in removed.unbind(1)], 1)
        assert (features < 0).any() != linear
        assert torch.allclose(e.intervened_logits, by_hand, atol=1e-5)


def test_factors_refuse_another_layer_of_the_same_shape():
    parts, data = fully_connected_problem(100, 60)
    fitted = coupled_nmf.fit(parts, data, SMALL, **QUIET)
    before_relu, _ = fully_connected_problem(100, 60, "fc1")  # 16 features too
    with pytest.raises(ValueError, match="fitted at layer 'relu'; the model explains 'fc1'"):
        CoupledNMFExplainer(before_relu, fitted)


# --------------------------------------------------------------------------- the demo archive, served

@pytest.fixture(scope="module")
def served(demo_store) -> ModelRuntime:
    return ModelRuntime(read_archive(demo_store / "mnist-1.psar"))


def test_demo_archive_serves_coupled_nmf_with_input_size_heatmaps(served, mnist_split):
    items = [ExplainItem(mnist_split["x_test"][i], None, [[3]]) for i in range(6)]
    _, grid, _ = served.explain(coupled_nmf.NAME, items, "feature_grid")
    _, at_input, _ = served.explain(coupled_nmf.NAME, items, "input")
    # The maps are already at the input's 28x28: the runtime's resize leaves them as they are.
    assert grid.heatmaps.shape == at_input.heatmaps.shape == (6, 10, 28, 28)
    assert torch.allclose(grid.heatmaps, at_input.heatmaps, atol=1e-6)
    report = served.explainers[coupled_nmf.NAME].fit_report
    assert len(report["concepts"]) == 10 and report["fit_seconds"] > 0 and report["fold_in_converged"] == 1.0


def test_one_forward_pass_gives_the_explained_and_the_analysed_layers(served, mnist_split):
    x = mnist_split["x_test"][:6]
    items = [ExplainItem(x[i], None, [[3]]) for i in range(6)]
    first_conv = next(m for m in served.parts.upstream.modules() if isinstance(m, torch.nn.Conv2d))
    calls = []
    hook = first_conv.register_forward_hook(lambda *_: calls.append(1))
    try:
        _, e, _ = served.explain(coupled_nmf.NAME, items, "none")
    finally:
        hook.remove()
    assert len(calls) == 1
    # The same as an explainer that computes the analysed layers itself.
    explainer = served.explainers[coupled_nmf.NAME]
    suppress = torch.zeros(6, 1, 10, dtype=torch.bool)
    suppress[:, 0, 3] = True
    with torch.inference_mode():
        features = served.parts.upstream(x)
        logits = served.parts.downstream(features)
        alone = explainer.explain(ExplainBatch(x, features, logits, logits.argmax(1), suppress, False))
    assert torch.equal(alone.weight, e.weight) and torch.equal(alone.contribution, e.contribution)


def test_live_server_explains_with_coupled_nmf(client, mnist_split):
    info = client.get_model("mnist")
    method = next(m for m in info.methods if m.name == coupled_nmf.NAME)
    assert not method.additive and method.residual_share_definition and method.contribution_definition
    assert [c.id for c in method.components] == [f"concept{d}" for d in range(10)]
    assert all(c.class_index == -1 and c.exemplar_png.startswith(b"\x89PNG") for c in method.components)
    assert "concepts" in json.loads(method.fit_report_json)
    for x in mnist_split["x_test"][:4].numpy():
        r = client.explain(x, model="mnist", method=coupled_nmf.NAME, heatmaps="input",
                           interventions=[["concept3"], ["concept1", "concept5"]])
        assert [c.id for c in r.components] == [f"concept{d}" for d in range(10)]
        assert all(c.weight >= 0 for c in r.components) and 0 <= r.residual_share <= 1
        contribution = {c.id: c.contribution for c in r.components}
        assert r.interventions[0].target_logit == pytest.approx(r.target_logit - contribution["concept3"], abs=1e-4)
        assert len(r.heatmaps) == 10


# --------------------------------------------------------------------------- the neighbour view, served

def _neighbours_by_hand(explainer, parts, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The fold-in of one input solved again by scipy's NNLS on the dictionary rebuilt from the stored
    factors, and its cosine distance to every probe example's concept code: (f (d,), distance (N,))."""
    n_in = len(explainer.pixel_offset_)
    scales = explainer.view_scales_
    blocks = [*(explainer.pixel_factors_[i] / scales[i] for i in range(n_in)),
              *(getattr(explainer, f"neuron_factors_{j}_") / scales[n_in + j]
                for j in range(len(explainer.config.layers)))]
    dictionary = torch.cat(blocks).double().numpy()  # (T, d)
    with torch.inference_mode():
        view = explainer.stacked_views(x[None], parts.upstream(x[None]))[0].double().numpy()
    f, _ = nnls(dictionary, view)
    probes = explainer.probe_codes_.double().numpy()
    cosine = probes @ f / (np.linalg.norm(probes, axis=1) * np.linalg.norm(f))
    return f, 1 - cosine


def test_live_neighbours_are_the_nearest_probes_recomputed_by_hand(client, served, mnist_split):
    from protoserve_client import explain_request

    explainer = served.explainers[coupled_nmf.NAME]
    probe_index, probe_labels = explainer.probe_index_.numpy(), explainer.probe_labels_.numpy()
    top_concept = explainer.probe_codes_.argmax(1).numpy()
    k = 30
    for x in mnist_split["x_test"][:3]:
        request = explain_request(x.numpy(), model="mnist", method=coupled_nmf.NAME, heatmaps="none")
        plain = client.stub.Explain(request, timeout=30)
        request.neighbours = k
        answer = client.stub.Explain(request, timeout=30)
        f, distance = _neighbours_by_hand(explainer, served.parts, x)
        assert np.allclose([c.weight for c in answer.components], f, atol=1e-4)
        served_ids = np.array([n.probe_index for n in answer.neighbours])
        served_distance = np.array([n.distance for n in answer.neighbours])
        assert len(served_ids) == k and (np.diff(served_distance) >= 0).all()
        # The k nearest: each served neighbour at its distance recomputed here, and those the k smallest.
        position = np.searchsorted(probe_index, served_ids)
        assert np.array_equal(probe_index[position], served_ids) and len(set(served_ids)) == k
        assert np.allclose(distance[position], served_distance, atol=1e-5)
        assert np.allclose(np.sort(distance)[:k], served_distance, atol=1e-5)
        assert [n.class_index for n in answer.neighbours] == probe_labels[position].tolist()
        assert [n.label for n in answer.neighbours] == [served.labels[c] for c in probe_labels[position]]
        assert [n.component_id for n in answer.neighbours] == [f"concept{d}" for d in top_concept[position]]
        shares = np.array([s.share for s in answer.neighbour_components])
        assert [s.component_id for s in answer.neighbour_components] == [f"concept{d}" for d in range(10)]
        assert shares.sum() == pytest.approx(1, abs=1e-6)
        assert np.allclose(shares, np.bincount(top_concept[position], minlength=10) / k)
        # Without the field the answer is as before, and has no neighbours.
        assert not plain.neighbours and not plain.neighbour_components
        answer.ClearField("neighbours")
        answer.ClearField("neighbour_components")
        assert answer == plain


def _decoded(png: bytes) -> np.ndarray:
    from io import BytesIO

    from PIL import Image

    assert png.startswith(b"\x89PNG")
    return np.asarray(Image.open(BytesIO(png)))


def test_live_neighbours_carry_their_probe_examples_as_pngs(client, served, mnist_split):
    """Each neighbour's PNG decodes to its training example (looked up again by probe_index in the
    split the fit drew from), drawn as the fit draws it, which for an image is the digit itself."""
    from protoserve_client import explain_request

    from handlers.exemplars import example_png, to_uint8_image

    for x in mnist_split["x_test"][:2]:
        request = explain_request(x.numpy(), model="mnist", method=coupled_nmf.NAME, heatmaps="none")
        request.neighbours = 5
        answer = client.stub.Explain(request, timeout=30)
        assert len(answer.neighbours) == 5
        for n in answer.neighbours:
            example = mnist_split["x_train"][n.probe_index]
            assert n.class_index == int(mnist_split["y_train"][n.probe_index])
            served_image = _decoded(n.png)
            assert served_image.shape == (28, 28) and served_image.dtype == np.uint8
            assert np.array_equal(served_image, _decoded(example_png(example)))
            assert np.array_equal(served_image, to_uint8_image(example))


def test_archives_without_probe_pngs_answer_neighbours_without_them(mnist_parts, fitted, explainer, batch):
    from protoserve_client import pb

    from server.convert import add_neighbours

    assert len(fitted.factors["probe_png_offsets_"]) == len(fitted.factors["probe_index_"]) + 1
    x, features, _ = batch
    with torch.inference_mode():
        weight = explainer.encode(x[:1], features[:1])[0][0].numpy()
    index = np.arange(D)
    stored = explainer.neighbours(index, weight, 4)
    assert len(stored.png) == 4
    older = {k: v for k, v in fitted.factors.items() if not k.startswith("probe_png")}
    old = CoupledNMFExplainer(mnist_parts, dataclasses.replace(fitted, factors=older))
    found = old.neighbours(index, weight, 4)
    assert found.png is None and np.array_equal(found.probe_index, stored.probe_index)
    response = pb.ExplainResponse()
    add_neighbours(response, found, old.components, mnist_parts.labels)
    assert [n.png for n in response.neighbours] == [b""] * 4
    assert [n.probe_index for n in response.neighbours] == stored.probe_index.tolist()
    half = {k: v for k, v in fitted.factors.items() if k != "probe_png_offsets_"}
    with pytest.raises(ValueError, match="probe_png_ without probe_png_offsets_"):
        CoupledNMFExplainer(mnist_parts, dataclasses.replace(fitted, factors=half))
    cut = {**fitted.factors, "probe_png_offsets_": fitted.factors["probe_png_offsets_"][:-1]}
    with pytest.raises(ValueError, match="probe_png_offsets_"):
        CoupledNMFExplainer(mnist_parts, dataclasses.replace(fitted, factors=cut))


def test_series_probe_examples_are_drawn_as_line_plots():
    """A 1-D input's probe examples are line plots, 64 pixels high and one pixel per sample wide, the
    highest sample's pixel at the top row and the lowest's at the bottom."""
    from handlers.exemplars import CROP_DISPLAY_PX, example_png

    parts, data = fully_connected_problem(100, 60)
    fitted = coupled_nmf.fit(parts, data, SMALL, **QUIET)
    explainer = CoupledNMFExplainer(parts, fitted)
    found = explainer.neighbours(np.arange(3), np.ones(3, np.float32), 5)
    for probe, png in zip(found.probe_index.tolist(), found.png):
        series = data.x_train[probe].flatten()
        image = _decoded(png)
        assert image.shape == (CROP_DISPLAY_PX, 12, 3) and np.array_equal(image, _decoded(example_png(series[None])))
        ink = (image != 255).any(2)  # the plot's pixels: black on white
        assert ink[0, int(series.argmax())] and ink[CROP_DISPLAY_PX - 1, int(series.argmin())]
        assert ink.any(0).all()  # a line through every sample


def test_fit_report_has_the_neighbour_view(served):
    knn = served.explainers[coupled_nmf.NAME].fit_report["knn"]
    assert knn["k"] == 30 and 0 < knn["own_top_concept_share"] <= 1
    assert knn["majority_matches_label"] > 0.8 and knn["majority_matches_model"] > 0.8


# --------------------------------------------------------------------------- Fig. 4's masks and section 5's TCAV

def test_median_mask_thresholds_at_the_median_exactly(fitted):
    for d in range(D):
        latent = fitted.factors["pixel_factors_"][:, :, d].reshape(1, 28, 28)
        values = np.sort(latent.flatten().numpy())
        lower_median = values[(len(values) - 1) // 2]
        mask = coupled_nmf.median_mask(latent)
        assert mask.dtype == torch.bool and np.array_equal(mask.numpy(), latent.numpy() > lower_median)
        assert mask.sum() <= len(values) // 2
    distinct = torch.randperm(784, generator=torch.Generator().manual_seed(0)).float().reshape(1, 28, 28)
    mask = coupled_nmf.median_mask(distinct)
    assert mask.sum() == 392 and mask[distinct >= 392].all() and not mask[distinct < 392].any()


def test_tcav_report_scores_each_concept_and_class_with_p_values(fitted):
    report = json.loads(json.dumps(fitted.fit_report["tcav"]))
    # The demo's head is average pool + linear, so TCAV runs at the analysed layer before the explained one.
    assert report["layer"] == "features_6" and report["random_sets"] == 4 and report["inputs"] == 200
    assert [c["id"] for c in report["concepts"]] == [f"concept{d}" for d in range(D)]
    for concept in report["concepts"]:
        for name in ("score", "score_std", "p_value", "significant"):
            assert len(concept[name]) == 10
        assert all(0 <= s <= 1 for s in concept["score"]) and all(0 <= p <= 1 for p in concept["p_value"])
        assert concept["significant"] == [p < report["alpha"] for p in concept["p_value"]]
    assert all(0 <= s <= 1 for s in report["null_score"])


def test_tcav_finds_a_planted_concept_and_not_a_random_one():
    """Class 0's logit grows along e_0 and class 1's falls (with noise): a concept shifted along e_0
    scores high for class 0 and low for class 1, significantly apart from random-vs-random CAVs; one
    drawn like the random sets does not."""
    from handlers.fitting import tcav

    g = torch.Generator().manual_seed(0)
    n_features = 10
    classes = torch.arange(200) % 2
    direction = torch.zeros(n_features)
    direction[0] = 1
    sign = torch.where(classes[:, None] == 0, 1.0, -1.0)
    gradients = torch.randn(200, n_features, generator=g) + sign * direction
    randoms = [torch.randn(30, n_features, generator=g) for _ in range(8)]
    planted = torch.randn(30, n_features, generator=g) + 5 * direction
    unplanted = torch.randn(30, n_features, generator=g)
    scores, null, p_values = tcav.tcav_table([planted, unplanted], randoms, gradients, classes, 2)
    assert scores.shape == (2, 4, 2) and null.shape == (4, 2) and p_values.shape == (2, 2)
    assert (scores[0, :, 0] > 0.7).all() and (scores[0, :, 1] < 0.3).all() and (p_values[0] < 0.01).all()
    assert (p_values[1] > 0.5).all()


def test_layer_gradients_of_a_pooled_linear_head_are_its_weights(mnist_parts, mnist_split):
    from handlers.fitting import tcav
    from handlers.model import linear_head_weight

    x, classes = mnist_split["x_test"][:5], torch.tensor([0, 3, 3, 9, 1])
    gradients = tcav.layer_gradients(mnist_parts.upstream, mnist_parts.downstream, mnist_parts.layer, x, classes)
    weight = linear_head_weight(mnist_parts)  # (K, C); logit = weight @ mean_hw(a) + bias
    expected = (weight[classes][:, :, None] / 49).expand(5, 128, 49).flatten(1)
    assert torch.allclose(gradients, expected, atol=1e-7)


def test_welch_p_value_is_scipys_and_decides_constant_samples():
    from scipy import stats

    from handlers.fitting.tcav import welch_p_value

    rng = np.random.default_rng(0)
    for n_a, n_b in [(5, 7), (10, 10), (3, 20)]:
        a, b = rng.random(n_a), rng.random(n_b) + 0.2
        assert welch_p_value(a, b) == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-9)
    b = rng.random(6)
    assert welch_p_value(np.full(4, 0.5), b) == pytest.approx(
        2 * stats.t.sf(abs(0.5 - b.mean()) / (b.std(ddof=1) / np.sqrt(6)), 5), rel=1e-9)
    assert (welch_p_value(np.ones(4), np.ones(5)), welch_p_value(np.ones(4), np.zeros(5))) == (1.0, 0.0)
