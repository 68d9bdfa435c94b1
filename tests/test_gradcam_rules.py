"""gradcam_rules: eclat against brute force, the mined rules, Table 1, the explainer's rules recomputed by hand.

The invariants every method keeps are in tests/test_contract.py."""

from __future__ import annotations

import json
import math
from itertools import combinations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from handlers.archive import read_archive
from handlers.base import ExplainBatch, FitData
from handlers.explainers.gradcam_rules import NAME, GradCAMRulesExplainer
from handlers.fitting.gradcam_rules import _mine_rules, _shared_groups, fit
from handlers.methods import METHODS
from handlers.model import pooled_linear_head
from handlers.runtime import ExplainItem, ModelRuntime
from handlers.solvers.eclat import eclat

# ---------------------------------------------------------------- eclat and rule mining

def brute_force(transactions, min_count, max_len=None):
    sets = [frozenset(t) for t in transactions]
    items = sorted(set().union(*sets)) if sets else []
    top = len(items) if max_len is None else min(max_len, len(items))
    found = {}
    for size in range(1, top + 1):
        for candidate in combinations(items, size):
            count = sum(1 for t in sets if t.issuperset(candidate))
            if count >= min_count:
                found[frozenset(candidate)] = count
    return found


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(st.integers(0, 7), max_size=6), max_size=25), st.integers(1, 6),
       st.one_of(st.none(), st.integers(1, 4)))
def test_eclat_matches_brute_force(transactions, min_count, max_len):
    assert eclat(transactions, min_count, max_len) == brute_force(transactions, min_count, max_len)


def test_eclat_known_example():
    transactions = [[1, 2, 3], [1, 2], [2, 3], [1, 2, 3, 3]]
    assert eclat(transactions, 3) == {frozenset({1}): 3, frozenset({2}): 4, frozenset({3}): 3,
                                      frozenset({1, 2}): 3, frozenset({2, 3}): 3}
    with pytest.raises(ValueError):
        eclat(transactions, 0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(0, 6), min_size=1, max_size=4), st.integers(0, 2)),
                min_size=1, max_size=30),
       st.sampled_from([0.3, 0.5, 0.7]))
def test_rules_match_brute_force(rows, tau):
    transactions, classes = [t for t, _ in rows], [c for _, c in rows]
    rules = _mine_rules(transactions, classes, 3, tau, max_len=4)
    everywhere = [frozenset(t) for t in transactions]
    expected = {}
    for c in range(3):
        mine = [t for t, k in zip(transactions, classes) if k == c]
        if not mine:
            continue
        found = []
        for itemset, count in brute_force(mine, max(1, math.ceil(tau * len(mine) - 1e-9)), 4).items():
            covering = sum(1 for t in everywhere if t >= itemset)
            found.append((c, tuple(sorted(itemset)), count / len(mine), count / len(transactions), count / covering))
        found.sort(key=lambda r: (-r[3] * r[4], len(r[1]), r[1]))
        expected[c] = found
    got = {c: [(r["class"], r["filters"], r["class_support"], r["support"], r["confidence"]) for r in found]
           for c, found in rules.items()}
    assert got == expected


def test_shared_groups_are_maximal_and_ranked():
    def rule(c, filters, support):
        return {"class": c, "filters": filters, "support": support}

    rules = {0: [rule(0, (1,), 0.3), rule(0, (2,), 0.2), rule(0, (1, 2), 0.2), rule(0, (5,), 0.1)],
             1: [rule(1, (1,), 0.1), rule(1, (2,), 0.1), rule(1, (1, 2), 0.05), rule(1, (3,), 0.3)],
             2: [rule(2, (2,), 0.4), rule(2, (3,), 0.1)]}
    # (1,) lies inside (1, 2), frequent in the same classes; (2,) stays: class 2 holds it without 1.
    assert _shared_groups(rules, 10) == [(2,), (3,), (1, 2)]
    assert _shared_groups(rules, 1) == [(2,)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(0, 5), min_size=1, max_size=4), st.integers(0, 3)),
                min_size=1, max_size=30))
def test_shared_groups_match_brute_force(rows):
    rules = _mine_rules([t for t, _ in rows], [c for _, c in rows], 4, 0.4, max_len=4)
    owners, support = {}, {}
    for found in rules.values():
        for r in found:
            owners.setdefault(frozenset(r["filters"]), set()).add(r["class"])
            support[r["filters"]] = support.get(r["filters"], 0) + r["support"]
    shared = {s: o for s, o in owners.items() if len(o) > 1}
    maximal = [tuple(sorted(s)) for s, o in shared.items() if not any(s < t and o == p for t, p in shared.items())]
    maximal.sort(key=lambda s: (-support[s], len(s), s))
    assert _shared_groups(rules, 5) == maximal[:5]


# ---------------------------------------------------------------- a fit on a subset

def subset(data: FitData, train_step: int, test_step: int) -> FitData:
    """Every ``step``-th image: the splits are sorted by class, so this keeps every class."""
    return FitData(data.x_train[::train_step], data.y_train[::train_step], data.x_test[::test_step],
                   data.y_test[::test_step])


@pytest.fixture(scope="module")
def fitted(mnist_parts, mnist_fit_data):
    return fit(mnist_parts, subset(mnist_fit_data, 4, 1), log=lambda *_: None)


@pytest.fixture(scope="module")
def explainer(mnist_parts, fitted):
    return GradCAMRulesExplainer(mnist_parts, fitted)


@pytest.fixture(scope="module")
def gradient_explainer(mnist_parts, fitted):
    """The same rules through autograd and the downstream, as for a head that is not linear."""
    explainer = GradCAMRulesExplainer(mnist_parts, fitted)
    explainer.head_weight_, explainer.needs_grad = None, True
    return explainer


def explain(parts, explainer, x, targets=None, suppress=None, heatmaps=True):
    with torch.enable_grad():
        features = parts.upstream(x)
        logits = parts.downstream(features)
        t = logits.argmax(1) if targets is None else targets
        if suppress is None:
            suppress = torch.zeros(len(x), 0, len(explainer.components), dtype=torch.bool)
        out = explainer.explain(ExplainBatch(x, features, logits, t, suppress, heatmaps))
    return features.detach(), logits.detach(), out


def test_registered():
    assert METHODS[NAME].fit is fit and METHODS[NAME].explainer is GradCAMRulesExplainer


def test_fit_report_and_components(fitted, mnist_parts):
    report = fitted.fit_report
    json.dumps(report)
    q = fitted.hyperparameters["q"]
    assert 0 < len(fitted.components) <= 11 * q  # the top q rules per class and at most q shared groups
    ids = [c.id for c in fitted.components]
    assert len(set(ids)) == len(ids) and set(fitted.exemplars) == set(ids)
    assert all(png.startswith(b"\x89PNG") for png in fitted.exemplars.values())
    filters = fitted.factors["component_filters_"]
    table = fitted.factors["class_components_"]
    assert table.shape[0] == 10 and table.shape[1] >= q
    assert sum(1 for r in report["rules"] if r["class"] == "3") == q
    for rule in report["rules"]:
        c = mnist_parts.labels.index(rule["class"])
        i = ids.index(rule["component"])
        assert rule["class_support"] >= fitted.hyperparameters["tau_support"]
        assert 0 < rule["support"] <= rule["confidence"] <= 1
        assert filters[i].nonzero().flatten().tolist() == rule["filters"]
        assert i in table[c].tolist()
        assert fitted.components[i].class_index in (c, -1)
    # A component is class-shared exactly when it is a rule (frequent set) of several classes.
    for i, component in enumerate(fitted.components):
        owners = (table == i).any(1).nonzero().flatten().tolist()
        assert (component.class_index == -1) == (len(owners) > 1)
        assert component.class_index == -1 or owners == [component.class_index]
    matches = report["held_out_matches"]
    assert matches["predicted_class"]["images_with_active_rule"] > matches["next_class"]["images_with_active_rule"]
    shared = {g["component"] for g in report["class_shared_filter_groups"]}
    assert shared == {c.id for c in fitted.components if c.class_index == -1}


def test_table1_rule_filters_cut_accuracy_more_than_random(fitted, mnist_parts, mnist_fit_data):
    table = fitted.fit_report["perturbation_accuracy"]
    assert table["rule_filters"]["mean"] < table["random_filters"]["mean"] <= table["baseline"]["mean"] + 1e-6
    # Independent recomputation of one class's figures on the held-out set.
    c = 3
    chosen = torch.zeros(128, dtype=torch.bool)
    for rule in fitted.fit_report["rules"]:
        if rule["class"] == "3":
            chosen[rule["filters"]] = True
    x = mnist_fit_data.x_test[mnist_fit_data.y_test == c]
    with torch.no_grad():
        features = mnist_parts.upstream(x)
        base = (mnist_parts.downstream(features).argmax(1) == c).double().mean().item()
        cut = (mnist_parts.downstream(features * (~chosen).float()[:, None, None]).argmax(1) == c).double().mean()
    assert table["n_filters"]["3"] == int(chosen.sum())
    assert table["baseline"]["3"] == pytest.approx(base, abs=1e-6)
    assert table["rule_filters"]["3"] == pytest.approx(cut.item(), abs=1e-6)


def test_fit_is_deterministic(mnist_parts, mnist_fit_data):
    small = subset(mnist_fit_data, 20, 10)
    a = fit(mnist_parts, small, log=lambda *_: None)
    b = fit(mnist_parts, small, log=lambda *_: None)
    assert a.components == b.components and a.fit_report == b.fit_report and a.exemplars == b.exemplars
    for key in a.factors:
        assert torch.equal(a.factors[key], b.factors[key])


# ---------------------------------------------------------------- the explainer

def test_explain_invariants(mnist_parts, explainer, fitted, mnist_fit_data):
    x = mnist_fit_data.x_test[:24]
    # Half the batch explains its predicted class, half another class.
    with torch.no_grad():
        predicted = mnist_parts.downstream(mnist_parts.upstream(x)).argmax(1)
    targets = torch.where(torch.arange(24) % 2 == 0, predicted, (predicted + 3) % 10)
    features, logits, out = explain(mnist_parts, explainer, x, targets)
    width = fitted.factors["class_components_"].shape[1]
    b = len(x)
    assert out.component_index.shape == (b, width) and out.heatmaps.shape == (b, width, 7, 7)
    assert torch.all(out.bias == 0) and torch.all(out.residual_contribution == 0)

    filters = fitted.factors["component_filters_"]
    table = fitted.factors["class_components_"]
    reference = fitted.factors["filter_reference_"]
    ratio = fitted.hyperparameters["activation_ratio"]
    wh, ww = explainer.window
    assert explainer.window == (3, 3)  # the 12-pixel patch on the 7x7 grid of a 28x28 input
    head_weight, _ = pooled_linear_head(mnist_parts)
    alpha = head_weight[targets] / 49  # Grad-CAM weights of a pooled linear head, by hand
    n_returned = 0
    for i in range(b):
        t = int(targets[i])
        index = out.component_index[i]
        valid = index >= 0
        n_valid = int(valid.sum())
        n_returned += n_valid
        assert torch.all(valid[:n_valid]) and not torch.any(valid[n_valid:])  # padding last
        assert torch.all(out.weight[i, ~valid] == 0) and torch.all(out.contribution[i, ~valid] == 0)
        assert torch.all(out.heatmaps[i, ~valid] == 0)
        assert torch.all(out.weight[i, :n_valid][:-1] >= out.weight[i, :n_valid][1:])  # strongest first
        # Every rule of the target class is returned exactly when it matches.
        for k in table[t][table[t] >= 0].tolist():
            members = filters[k].nonzero().flatten()
            strength = max(
                min(features[i, d, r:r + wh, c:c + ww].mean().item() / reference[d].item() for d in members.tolist())
                for r in range(7 - wh + 1) for c in range(7 - ww + 1))
            where = (index == k).nonzero().flatten()
            if strength >= ratio + 1e-4:
                assert len(where) == 1
                j = int(where[0])
                assert out.weight[i, j].item() == pytest.approx(strength, rel=1e-4)
                keep = 1 - filters[k]
                with torch.no_grad():
                    zeroed = mnist_parts.downstream(features[i:i + 1] * keep[:, None, None])[0, t]
                assert out.contribution[i, j].item() == pytest.approx((logits[i, t] - zeroed).item(), abs=1e-4)
                expected_map = torch.einsum("d,dhw->hw", alpha[i] * filters[k], features[i]).relu()
                assert torch.allclose(out.heatmaps[i, j], expected_map, atol=1e-5)
            elif strength < ratio - 1e-4:
                assert len(where) == 0
        assert set(index[valid].tolist()) <= set(table[t].tolist())
        # Residual share: positive Grad-CAM evidence outside the active rules' filters.
        evidence = (alpha[i][:, None, None] * features[i]).relu().sum((1, 2))
        union = filters[index[valid]].amax(0) if n_valid else torch.zeros(len(evidence))
        expected_share = ((evidence * (1 - union)).sum() / evidence.sum()).item()
        assert out.residual_share[i].item() == pytest.approx(expected_share, abs=1e-5)
    assert n_returned > 0


def test_rules_match_most_held_out_predictions(mnist_parts, explainer, mnist_fit_data):
    _, _, out = explain(mnist_parts, explainer, mnist_fit_data.x_test[:200], heatmaps=False)
    assert out.heatmaps is None
    assert (out.component_index >= 0).any(1).double().mean().item() > 0.5


def test_interventions_zero_the_rules_filters(mnist_parts, explainer, fitted, mnist_fit_data):
    x = mnist_fit_data.x_test[:16]
    n = len(explainer.components)
    generator = torch.Generator().manual_seed(1)
    suppress = torch.rand(16, 3, n, generator=generator) < 0.05
    suppress[:, 0] = False  # an empty intervention reproduces the logits
    suppress[:, 2] = True  # every component at once
    features, logits, out = explain(mnist_parts, explainer, x, suppress=suppress)
    filters = fitted.factors["component_filters_"]
    assert out.intervened_logits.shape == (16, 3, 10)
    for i in range(16):
        for m in range(3):
            keep = 1 - (filters[suppress[i, m]].amax(0) if suppress[i, m].any() else torch.zeros(filters.shape[1]))
            with torch.no_grad():
                expected = mnist_parts.downstream(features[i:i + 1] * keep[:, None, None])[0]
            assert torch.allclose(out.intervened_logits[i, m], expected, atol=1e-4)
    assert torch.allclose(out.intervened_logits[:, 0], logits, atol=1e-4)


def test_linear_head_in_closed_form_equals_autograd_and_the_downstream(explainer, gradient_explainer, mnist_parts,
                                                                        mnist_fit_data):
    """The MNIST head is average pooling + linear after a ReLU: Grad-CAM's weights and the zeroed
    logits come in closed form, and agree with the gradient and downstream passes."""
    assert explainer.head_weight_ is not None and not explainer.needs_grad
    x = mnist_fit_data.x_test[:16]
    suppress = torch.rand(16, 2, len(explainer.components), generator=torch.Generator().manual_seed(3)) < 0.1
    _, _, closed = explain(mnist_parts, explainer, x, suppress=suppress)
    _, _, by_gradient = explain(mnist_parts, gradient_explainer, x, suppress=suppress)
    assert torch.equal(closed.component_index, by_gradient.component_index)
    for name in ("weight", "contribution", "residual_share", "heatmaps", "intervened_logits"):
        assert torch.allclose(getattr(closed, name), getattr(by_gradient, name), atol=1e-5), name


def test_explain_rebuilds_a_missing_graph(mnist_parts, gradient_explainer, mnist_fit_data):
    x = mnist_fit_data.x_test[::100]
    suppress = torch.ones(len(x), 1, len(gradient_explainer.components), dtype=torch.bool)
    _, _, expected = explain(mnist_parts, gradient_explainer, x, suppress=suppress)
    with torch.no_grad():  # as with frozen parameters: features without a graph
        features = mnist_parts.upstream(x)
        logits = mnist_parts.downstream(features)
    out = gradient_explainer.explain(ExplainBatch(x, features, logits, logits.argmax(1), suppress, True))
    for name in ("component_index", "weight", "contribution", "residual_share", "heatmaps", "intervened_logits"):
        assert torch.allclose(getattr(out, name).float(), getattr(expected, name).float(), atol=1e-5), name


def test_runtime_gradient_path_starts_at_the_layer(demo_store, mnist_fit_data):
    """Through the runtime, a gradient explainer gets features that require grad (the upstream
    records no graph) and gives what the closed form gives."""
    served = ModelRuntime(read_archive(demo_store / "mnist-1.psar"))
    items = [ExplainItem(x, None, [[0, 1]]) for x in mnist_fit_data.x_test[:8]]
    logits, closed, _ = served.explain(NAME, items, "feature_grid")
    explainer = served.explainers[NAME]
    explainer.head_weight_, explainer.needs_grad = None, True
    seen, original = [], explainer.explain

    def recording(batch):
        seen.append(batch.features.is_leaf and batch.features.requires_grad)
        return original(batch)

    explainer.explain = recording
    gradient_logits, by_gradient, _ = served.explain(NAME, items, "feature_grid")
    assert seen == [True] and torch.equal(logits, gradient_logits)
    for name in ("weight", "contribution", "heatmaps", "intervened_logits"):
        assert torch.allclose(getattr(closed, name), getattr(by_gradient, name), atol=1e-5), name


# ---------------------------------------------------------------- through the live server

def test_served(client, mnist_fit_data):
    info = client.get_model("mnist")
    method = next(m for m in info.methods if m.name == NAME)
    assert not method.additive and method.residual_share_definition
    report = json.loads(method.fit_report_json)
    table = report["perturbation_accuracy"]
    assert table["rule_filters"]["mean"] < table["random_filters"]["mean"]
    assert all(c.exemplar_png.startswith(b"\x89PNG") for c in method.components)
    x = mnist_fit_data.x_test[0].numpy()
    first = client.explain(x, model="mnist", method=NAME)
    assert first.components, "the first test digit should match a rule of its class"
    chosen = first.components[0].id
    response = client.explain(x, model="mnist", method=NAME, interventions=[[chosen]])
    assert response.method == NAME and 0 <= response.residual_share <= 1
    by_id = {c.id: c for c in method.components}
    for component in response.components:
        assert by_id[component.id].class_index in (response.target_class, -1)
    assert [h.component_id for h in response.heatmaps] == [c.id for c in response.components]
    assert response.interventions[0].target_logit == pytest.approx(
        response.target_logit - response.components[0].contribution, abs=1e-3)
    assert np.isfinite(response.target_logit)
