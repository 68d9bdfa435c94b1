"""gradcam_rules: eclat against brute force, the mined rules, Table 1, the explainer's rules recomputed by hand.

The invariants every method keeps are in tests/test_contract.py."""

from __future__ import annotations

import json
import math
from itertools import combinations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from handlers.archive import read_archive
from handlers.base import ExplainBatch, FitData
from handlers.explainers import gradcam_rules
from handlers.explainers.gradcam_rules import NAME, GradCAMRulesExplainer
from handlers.fitting.gradcam_rules import _mine_rules, _shared_groups, fit
from handlers.methods import METHODS
from handlers.model import pooled_linear_head
from handlers.runtime import ExplainItem, ModelRuntime
from handlers.solvers.eclat import closed, eclat
from handlers.solvers import compiled_rows

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


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(st.integers(0, 6), max_size=5), max_size=25), st.integers(1, 5),
       st.one_of(st.none(), st.integers(1, 3)))
def test_closed_matches_brute_force(transactions, min_count, max_len):
    frequent = brute_force(transactions, min_count, max_len)
    limit = max_len or 99
    expected = {s: n for s, n in frequent.items()
                if len(s) == limit or not any(s < t and m == n for t, m in frequent.items())}
    assert closed(eclat(transactions, min_count, max_len)) == expected


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
        frequent = brute_force(mine, max(1, math.ceil(tau * len(mine) - 1e-9)), 4)
        for itemset, count in frequent.items():
            covering = sum(1 for t in everywhere if t >= itemset)
            is_closed = len(itemset) == 4 or not any(itemset < t and n == count for t, n in frequent.items())
            found.append((c, tuple(sorted(itemset)), count / len(mine), count / len(transactions), count / covering,
                          is_closed))
        found.sort(key=lambda r: (-r[3] * r[4], len(r[1]), r[1]))
        expected[c] = found
    got = {c: [(r["class"], r["filters"], r["class_support"], r["support"], r["confidence"], r["closed"])
               for r in found]
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
    assert table.shape == (10, q)
    for c, label in enumerate(mnist_parts.labels):
        rules = [r for r in report["rules"] if r["class"] == label]
        assert 0 < len(rules) <= q
        # A class's row is its rules R^c, best first by support x confidence.
        assert table[c].tolist() == [ids.index(r["component"]) for r in rules] + [-1] * (q - len(rules))
        scores = [r["support"] * r["confidence"] for r in rules]
        assert scores == sorted(scores, reverse=True)
        # Closed: no rule of the class is a subset of another with the same support.
        for a in rules:
            assert not any(set(a["filters"]) < set(b["filters"]) and a["support"] == b["support"] for b in rules)
    for rule in report["rules"]:
        i = ids.index(rule["component"])
        assert rule["class_support"] >= fitted.hyperparameters["tau_support"]
        assert 0 < rule["support"] <= rule["confidence"] <= 1
        assert filters[i].nonzero().flatten().tolist() == rule["filters"]
        assert fitted.components[i].class_index in (mnist_parts.labels.index(rule["class"]), -1)
    shared = {g["component"] for g in report["class_shared_filter_groups"]}
    assert shared == {c.id for c in fitted.components if c.class_index == -1}
    assert report["transaction_size"] == fitted.hyperparameters["n_filters"]

    per_request = report["per_request"]
    assert set(per_request) == {
        "images", "own_class_rule_share", "class_specific_rule_share", "images_with_rule", "rules_per_image",
        "images_with_relevant_patch", "residual_share_mean", "other_class_match_rate",
        "other_class_in_input_transactions_rate", "other_class_images_with_relevant_patch",
        "relevance_agreement_with_pixel_perturbation", "definitions"}
    assert per_request["images"] == report["n_test"]
    for key, value in per_request.items():
        if key not in ("images", "definitions"):
            assert isinstance(value, float) and 0 <= value <= (1 if key != "rules_per_image" else q), key
    assert per_request["own_class_rule_share"] == 1.0  # every reported rule is one of R^t
    assert per_request["images_with_rule"] > per_request["other_class_match_rate"]

    table1 = report["perturbation_table"]
    assert [row["transaction_size"] for row in table1["rows"]] == [5, 10, 25]
    labels = set(mnist_parts.labels) | {"mean"}
    assert set(table1["baseline"]) == labels
    for row in table1["rows"]:
        assert set(row) == {"transaction_size", "rule_filters", "random_filters", "perturbed_filters"}
        for key in ("rule_filters", "random_filters", "perturbed_filters"):
            assert set(row[key]) == labels and all(isinstance(v, float) for v in row[key].values())


def test_table1_rule_filters_cut_accuracy_more_than_random(fitted, mnist_parts, mnist_fit_data):
    table = fitted.fit_report["perturbation_table"]
    widest = table["rows"][-1]
    assert widest["rule_filters"]["mean"] < widest["random_filters"]["mean"] <= table["baseline"]["mean"] + 1e-6
    # Independent recomputation of one class's figures at the served size (10, a row) on the held-out set.
    row = next(r for r in table["rows"] if r["transaction_size"] == fitted.hyperparameters["n_filters"])
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
    assert row["perturbed_filters"]["3"] == int(chosen.sum())
    assert table["baseline"]["3"] == pytest.approx(base, abs=1e-6)
    assert row["rule_filters"]["3"] == pytest.approx(cut.item(), abs=1e-6)


def test_fit_is_deterministic(mnist_parts, mnist_fit_data):
    small = subset(mnist_fit_data, 20, 10)
    a = fit(mnist_parts, small, log=lambda *_: None)
    b = fit(mnist_parts, small, log=lambda *_: None)
    assert a.components == b.components and a.fit_report == b.fit_report and a.exemplars == b.exemplars
    for key in a.factors:
        assert torch.equal(a.factors[key], b.factors[key])


# ---------------------------------------------------------------- the explainer

def transaction_by_hand(parts, fitted, x, target):
    """One input's patch-transactions for ``target``, from scratch: Grad-CAM of the pooled linear head,
    eq. 1 over every window of the bilinearly upsampled map by loops, the perturbation test through the
    downstream with the removed windows' grid cells scaled down, and eq. 2 on the activation maps
    resized (nearest) to the input. Returns [(corner, relevant, sorted filters)] for the k candidates."""
    config = fitted.hyperparameters
    size, k, tau, n = config["patch_size"], config["n_candidates"], config["tau_prt"], config["n_filters"]
    head_weight, _ = pooled_linear_head(parts)
    with torch.no_grad():
        features = parts.upstream(x[None])[0]  # (D, 7, 7)
        y = parts.downstream(features[None])[0, target].item()
    alpha = head_weight[target] / 49
    cam = torch.einsum("d,dhw->hw", alpha, features).relu()
    heat = F.interpolate(cam[None, None], size=(28, 28), mode="bilinear", align_corners=False)[0, 0].double()
    up = features.repeat_interleave(4, 1).repeat_interleave(4, 2).double()  # nearest resize to 28x28
    removed = torch.zeros(28, 28, dtype=torch.bool)
    out, previous, still = [], y, True
    for _ in range(k):
        best, corner = -1.0, None
        for r in range(28 - size + 1):
            for c in range(28 - size + 1):
                mass = heat[r:r + size, c:c + size].sum().item()
                if mass > best + 1e-9 * max(1.0, abs(best)):
                    best, corner = mass, (r, c)
        r, c = corner
        heat[r:r + size, c:c + size] = 0
        removed[r:r + size, c:c + size] = True
        share = F.avg_pool2d(removed.float()[None, None], 4)[0, 0]  # (7, 7) share of each cell removed
        with torch.no_grad():
            score = parts.downstream((features * (1 - share))[None])[0, target].item()
        still = still and (previous - score) / abs(y) >= tau
        previous = score
        activation = up[:, r:r + size, c:c + size].sum((1, 2))  # eq. 2
        out.append((corner, still, sorted(activation.argsort(descending=True)[:n].tolist())))
    return out


def test_an_inputs_transaction_recomputed_by_hand(mnist_parts, explainer, fitted, mnist_fit_data):
    x = mnist_fit_data.x_test[:6]
    with torch.no_grad():
        targets = mnist_parts.downstream(mnist_parts.upstream(x)).argmax(1)
    targets[5] = (targets[5] + 1) % 10  # one explains another class than its prediction
    features = mnist_parts.upstream(x)
    logits = mnist_parts.downstream(features)
    none = torch.zeros(6, 0, len(fitted.components), dtype=torch.bool)
    members, relevant = explainer.transactions(ExplainBatch(x, features, logits, targets, none, False))
    for i in range(6):
        expected = transaction_by_hand(mnist_parts, fitted, x[i], int(targets[i]))
        assert relevant[i].tolist() == [still for _, still, _ in expected]
        for j, (_, still, filters) in enumerate(expected):
            if still:
                assert members[i, j].nonzero().flatten().tolist() == filters
    assert relevant[:, 0].any()


def test_explain_invariants(mnist_parts, explainer, fitted, mnist_fit_data):
    x = mnist_fit_data.x_test[:24]
    # Half the batch explains its predicted class, half another class.
    with torch.no_grad():
        predicted = mnist_parts.downstream(mnist_parts.upstream(x)).argmax(1)
    targets = torch.where(torch.arange(24) % 2 == 0, predicted, (predicted + 3) % 10)
    features, logits, out = explain(mnist_parts, explainer, x, targets)
    q = fitted.hyperparameters["q"]
    b = len(x)
    assert out.component_index.shape == (b, q) and out.heatmaps.shape == (b, q, 7, 7)
    assert torch.all(out.bias == 0) and torch.all(out.residual_contribution == 0)

    none = torch.zeros(b, 0, len(fitted.components), dtype=torch.bool)
    members, relevant = explainer.transactions(ExplainBatch(x, features, logits, targets, none, False))
    filters = fitted.factors["component_filters_"]
    reference = fitted.factors["filter_reference_"]
    ids = [c.id for c in fitted.components]
    head_weight, _ = pooled_linear_head(mnist_parts)
    alpha = head_weight[targets] / 49  # Grad-CAM weights of a pooled linear head, by hand
    activation = {}
    n_returned = 0
    for i in range(b):
        t = int(targets[i])
        rules = [r for r in fitted.fit_report["rules"] if r["class"] == mnist_parts.labels[t]]  # R^t, ranked
        index = out.component_index[i]
        valid = index >= 0
        n_valid = int(valid.sum())
        n_returned += n_valid
        assert torch.all(valid[:n_valid]) and not torch.any(valid[n_valid:])  # padding last
        assert torch.all(out.weight[i, ~valid] == 0) and torch.all(out.contribution[i, ~valid] == 0)
        assert torch.all(out.heatmaps[i, ~valid] == 0)
        # Reported: exactly the rules of R^t contained in a relevant patch-transaction, in R^t's order.
        held = [r for r in rules if any(relevant[i, j] and set(r["filters"]) <= set(members[i, j].nonzero()
                                                                                     .flatten().tolist())
                                        for j in range(members.shape[1]))]
        assert [ids[j] for j in index[valid].tolist()] == [r["component"] for r in held]
        # Closed: no reported rule is a subset of another reported one with the same support.
        for a in held:
            assert not any(set(a["filters"]) < set(c["filters"]) and a["support"] == c["support"] for c in held)
        if t not in activation:
            activation[t] = explainer.patches(ExplainBatch(x, features, logits, targets, none, False),
                                              alpha, features.detach()).activation
        for j, k in enumerate(index[valid].tolist()):
            members_k = filters[k].nonzero().flatten()
            strength = max((activation[t][i, p, members_k] / reference[members_k]).min().item()
                           for p in range(members.shape[1])
                           if relevant[i, p] and bool(members[i, p, members_k].all()))
            assert out.weight[i, j].item() == pytest.approx(strength, rel=1e-5)
            keep = 1 - filters[k]
            with torch.no_grad():
                zeroed = mnist_parts.downstream(features[i:i + 1] * keep[:, None, None])[0, t]
            assert out.contribution[i, j].item() == pytest.approx((logits[i, t] - zeroed).item(), abs=1e-4)
            expected_map = torch.einsum("d,dhw->hw", alpha[i] * filters[k], features[i]).relu()
            assert torch.allclose(out.heatmaps[i, j], expected_map, atol=1e-5)
        # Residual share: positive Grad-CAM evidence outside the reported rules' filters.
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


def _mixed_targets(parts, x, suppress, heatmaps):
    """A batch of ``x`` in which every third input explains another class than its prediction."""
    with torch.no_grad():
        features = parts.upstream(x)
        logits = parts.downstream(features)
    targets = logits.argmax(1)
    targets[::3] = (targets[::3] + 1) % 10
    return ExplainBatch(x, features, logits, targets, suppress, heatmaps)


@pytest.mark.parametrize("by", ["fewest_launches", "rows_then_columns", "bands"])
def test_patch_search_paths_agree(by, mnist_parts, explainer, mnist_fit_data, monkeypatch):
    """The tensor searches, a GPU's (one product per candidate, the windows' union by a running maximum), the
    CPU's former one (window sums along rows, then columns) and the band-by-band search of inputs too large for
    the position tables, find the patches, relevance and activations of the compiled search the CPU serves."""
    batch = _mixed_targets(mnist_parts, mnist_fit_data.x_test[:32],
                           torch.zeros(32, 0, len(explainer.components), dtype=torch.bool), False)
    alpha, f = explainer.gradcam(batch)
    inputs = explainer.patch_inputs(batch, torch.einsum("bd,bdhw->bhw", alpha, f), f)
    expected = gradcam_rules.scan_patches(*inputs)
    monkeypatch.setattr(compiled_rows, "serve_on_cpu", False)
    if by == "bands":
        gradcam_rules.position_tables.cache_clear()
        monkeypatch.setattr(gradcam_rules, "POSITION_TABLE_MAX_ELEMENTS", 0)
        assert gradcam_rules.position_tables(12, (28, 28), (7, 7), f.device) is None
    try:
        position, relevant, activation = gradcam_rules.scan_patches(*inputs, fewest_launches=by == "fewest_launches")
    finally:
        gradcam_rules.position_tables.cache_clear()
    assert torch.equal(position, expected[0]) and torch.equal(relevant, expected[1])
    assert relevant[:, 0].any() and not relevant.all()  # the test decides something
    assert torch.allclose(activation, expected[2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("heatmaps", [True, False])
def test_compiled_answer_is_the_tensor_answer(heatmaps, mnist_parts, explainer, mnist_fit_data, monkeypatch):
    """After the candidate search, the CPU's compiled rows report the rules and weights of the tensor matching a
    GPU runs bit for bit (the same divisions, minima and maxima), and the residual shares, heatmaps,
    contributions and interventions to float32 rounding."""
    suppress = torch.rand(48, 2, len(explainer.components), generator=torch.Generator().manual_seed(5)) < 0.2
    batch = _mixed_targets(mnist_parts, mnist_fit_data.x_test[:48], suppress, heatmaps)
    alpha, f = explainer.gradcam(batch)
    terms, cam = gradcam_rules.gradcam_terms(alpha, f)
    _, relevant, activation = gradcam_rules.scan_patches(*explainer.patch_inputs(batch, cam, f))
    top = activation.topk(explainer.config.n_filters, dim=-1).indices
    table = explainer._class_rules[batch.targets]
    index, weight, _, _ = compiled_rows.reported_rules_rows(
        top.numpy(), relevant.numpy(), table.numpy(), explainer.filter_reference_.numpy(), activation.numpy(),
        terms.numpy(), explainer._filter_index.numpy(), heatmaps)
    expected = explainer.matched_rules(top, relevant, table, activation)
    assert np.array_equal(index, expected[0].numpy()) and np.array_equal(weight, expected[1].numpy())
    with torch.inference_mode():
        served = explainer.explain(batch)
        monkeypatch.setattr(compiled_rows, "serve_on_cpu", False)
        reference = explainer.explain(batch)  # the tensor search too: activations to float32 rounding
    index = served.component_index
    assert (index >= 0).any() and (index < 0).any() and (served.weight[index < 0] == 0).all()
    assert torch.equal(index, reference.component_index)
    assert (served.heatmaps is None) == (reference.heatmaps is None) == (not heatmaps)
    names = ["weight", "contribution", "residual_share", "intervened_logits"] + ["heatmaps"] * heatmaps
    for name in names:
        torch.testing.assert_close(getattr(served, name), getattr(reference, name), rtol=1e-5, atol=1e-5)
    assert ((served.residual_share > 0) & (served.residual_share < 1)).any()


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
    table = report["perturbation_table"]
    assert table["rows"][-1]["rule_filters"]["mean"] < table["rows"][-1]["random_filters"]["mean"]
    assert report["per_request"]["own_class_rule_share"] == 1.0
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
