"""Offline half of gradcam_rules: the fit and its report (the online explainer is handlers/explainers/gradcam_rules.py).

Grad-CAM rules: class-specific and class-shared filter sets mined from Grad-CAM explanations.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch
import torch.nn.functional as F

from handlers.base import Component, ExplainBatch, FitData, FittedMethod
from handlers.exemplars import crops_png
from handlers.explainers.gradcam_rules import NAME, GradCAMRulesConfig, GradCAMRulesExplainer, gradcam_weights
from handlers.model import ModelParts
from handlers.solvers.eclat import eclat, tidsets

EXEMPLAR_PATCHES = 3  # strongest supporting patches drawn after a rule's filter averages


SHARED_PATCHES_PER_CLASS = 2


MAX_TILES = 12


def _window_masks(corner: torch.Tensor, size: int, hw: tuple[int, int]) -> torch.Tensor:
    """(N, 2) top-left corners -> (N, H, W) bool masks of ``size``×``size`` windows."""
    rows = torch.arange(hw[0], device=corner.device)
    cols = torch.arange(hw[1], device=corner.device)
    in_rows = (rows >= corner[:, :1]) & (rows < corner[:, :1] + size)
    in_cols = (cols >= corner[:, 1:]) & (cols < corner[:, 1:] + size)
    return in_rows[:, :, None] & in_cols[:, None, :]


def _crops(x: torch.Tensor, index: torch.Tensor, corner: torch.Tensor, size: int) -> torch.Tensor:
    """Pixel patches: images ``x[index]`` (T,) cut at ``corner`` (T, 2) -> (T, C, size, size)."""
    offset = torch.arange(size)
    rows = (corner[:, 0:1] + offset)[:, :, None]
    cols = (corner[:, 1:2] + offset)[:, None, :]
    return x[index[:, None, None], :, rows, cols].permute(0, 3, 1, 2)


def _gradcam_all(parts: ModelParts, x: torch.Tensor, batch_size: int = 500):
    """Features, logits, predicted classes and Grad-CAM weights for many inputs, in chunks."""
    features, logits, alphas = [], [], []
    for i in range(0, len(x), batch_size):
        with torch.no_grad():
            f = parts.upstream(x[i:i + batch_size].to(parts.device))
        f.requires_grad_(True)
        with torch.enable_grad():
            z = parts.downstream(f)
            alphas.append(gradcam_weights(f, z, z.argmax(1)))
        features.append(f.detach())
        logits.append(z.detach())
    return torch.cat(features), torch.cat(logits), torch.cat(alphas)


def fit(parts: ModelParts, data: FitData, config: GradCAMRulesConfig = GradCAMRulesConfig(),
        log=print) -> FittedMethod:
    """Mine Grad-CAM filter rules on ``data.x_train``; Table 1 on ``data.x_test``.

    Returns
    -------
    FittedMethod with tensors ``component_filters_`` (R, D) (1 where the component's filter set
    holds the channel), ``class_components_`` (K, C) int64 (the components that are rules of the
    class, best first, −1 padding) and ``filter_reference_`` (D,) (θ_d).
    """
    start = time.perf_counter()
    if len(parts.feature_shape) != 3 or len(parts.input_spec.shape) != 3:
        raise ValueError(f"gradcam_rules needs an image input and a convolutional layer, got input "
                         f"{parts.input_spec.shape} and features {parts.feature_shape}")
    dim, *grid = parts.feature_shape
    input_hw = tuple(parts.input_spec.shape[1:])
    q, patch_size, n_candidates = config.q, config.patch_size, config.n_candidates
    if patch_size > min(input_hw):
        raise ValueError(f"patch_size={patch_size} does not fit the {input_hw} input")
    if config.n_filters > dim:
        raise ValueError(f"n_filters={config.n_filters} must be in [1, {dim}]")
    generator = torch.Generator().manual_seed(config.random_state)
    x = data.x_train.float()
    features, logits, alpha = _gradcam_all(parts, x)
    features, logits, alpha = features.float().cpu(), logits.float().cpu(), alpha.cpu()
    predicted = logits.argmax(1)
    n = len(x)

    # 2. Candidate patches on the upsampled Grad-CAM map.
    cam = torch.einsum("nd,ndhw->nhw", alpha, features).relu()
    heat = F.interpolate(cam[:, None], size=input_hw, mode="bilinear", align_corners=False)[:, 0]
    span = (input_hw[0] - patch_size + 1, input_hw[1] - patch_size + 1)
    corners = torch.zeros(n, n_candidates, 2, dtype=torch.long)
    for j in range(n_candidates):
        mass = F.avg_pool2d(heat[:, None], patch_size, stride=1).flatten(1)  # (N, span_h·span_w)
        where = torch.randint(0, span[0] * span[1], (n, config.n_locations), generator=generator)
        best = where.gather(1, mass.gather(1, where).argmax(1, keepdim=True))[:, 0]
        corners[:, j, 0], corners[:, j, 1] = best // span[1], best % span[1]
        heat = heat * ~_window_masks(corners[:, j], patch_size, input_hw)

    # 3. Relevant patches: incremental perturbation of the image, best candidate first.
    rows = torch.arange(n)
    score0 = logits[rows, predicted]
    previous, perturbed = score0.clone(), x.clone()
    relevant = torch.zeros(n, n_candidates, dtype=torch.bool)
    still = torch.ones(n, dtype=torch.bool)
    for j in range(n_candidates):
        perturbed = perturbed * ~_window_masks(corners[:, j], patch_size, input_hw)[:, None]
        live = still.nonzero().flatten()  # images whose earlier patches were all relevant
        if len(live) == 0:
            break
        score = parts.logits(perturbed[live]).float().cpu()[torch.arange(len(live)), predicted[live]]
        still[live] = (previous[live] - score) / score0[live].abs().clamp_min(1e-6) >= config.tau_prt
        relevant[:, j] = still
        previous[live] = score

    # 4. Transactions: the top filters by mean activation inside each relevant patch window.
    masks = torch.stack([_window_masks(corners[:, j], patch_size, input_hw) for j in range(n_candidates)], 1)
    cover = F.adaptive_avg_pool2d(masks.float().flatten(0, 1)[:, None], grid).reshape(n, n_candidates, *grid)
    activation = torch.einsum("nkhw,ndhw->nkd", cover, features) / cover.sum((2, 3))[..., None].clamp_min(1e-12)
    ranked = activation.topk(config.n_filters, dim=2).indices  # (N, k, n_filters)
    image_of, patch_of = relevant.nonzero(as_tuple=True)
    t_filters, t_class = ranked[image_of, patch_of], predicted[image_of]
    t_activation = activation[image_of, patch_of]  # (T, D)
    n_trans = len(image_of)
    if n_trans == 0:
        raise ValueError(f"no relevant patches at tau_prt={config.tau_prt}: no transactions to mine")
    log(f"gradcam_rules: {n_trans} transactions from {int(relevant.any(1).sum())}/{n} images "
        f"({time.perf_counter() - start:.1f}s)")
    member = torch.zeros(n_trans, dim, dtype=torch.bool)
    member[torch.arange(n_trans)[:, None], t_filters] = True
    reference = ((t_activation * member).sum(0) / member.sum(0).clamp_min(1)).clamp_min(1e-6)

    # 5-6. Hierarchical eclat, rules, the top q per class, class-shared groups.
    rules = _mine_rules(t_filters.tolist(), t_class.tolist(), parts.num_classes, config.tau_support,
                        config.max_rule_len)
    shared = _shared_groups(rules, q)
    components, sets, owners, class_components, component_filters = _components(rules, shared, parts.labels,
                                                                              dim, q)
    top = {c: found[:q] for c, found in rules.items()}
    factors = {
        "component_filters_": component_filters,
        "class_components_": class_components,
        "filter_reference_": reference.contiguous(),
    }
    crops = _crops(x, image_of, corners[image_of, patch_of], patch_size)
    exemplars = _exemplars(components, owners, component_filters, crops, t_class, member, t_activation)
    rule_filters = {c: sorted({d for r in found for d in r["filters"]}) for c, found in top.items()}
    owners_of, support_of = _owners(rules)

    def described(r: dict) -> dict:
        return {"class": parts.labels[r["class"]], "filters": list(r["filters"]), "support": round(r["support"], 6),
                "confidence": round(r["confidence"], 6), "class_support": round(r["class_support"], 6),
                "component": components[r["component"]].id}

    report = {
        "perturbation_accuracy": _table1(parts, data, rule_filters, config.random_trials, generator),
        "rules": [described(r) for c in sorted(top) for r in top[c]],
        # A filter is class-specific when it is frequent in that class only.
        "class_specific_filters": {parts.labels[c]: [d for d in rule_filters.get(c, []) if owners_of[(d,)] == {c}]
                                   for c in range(parts.num_classes)},
        "class_shared_filter_groups": [
            {"filters": list(filter_set), "classes": [parts.labels[c] for c in owners[i]],
             "support": round(support_of[filter_set], 6), "component": components[i].id}
            for i, filter_set in enumerate(sets) if components[i].class_index == -1],
        "transactions": n_trans,
        "images_with_relevant_patches": round(float(relevant.any(1).double().mean()), 6),
        "relevant_patches_per_image": round(float(relevant.sum(1).double().mean()), 6),
        "n_train": n,
        "n_test": len(data.x_test),
    }
    fitted = FittedMethod(NAME, factors, components, dataclasses.asdict(config), report, exemplars)
    report["held_out_matches"] = _held_out_matches(parts, data, fitted)
    n_shared = len(report["class_shared_filter_groups"])
    log(f"gradcam_rules: {sum(map(len, top.values()))} top rules, {len(components)} components "
        f"({n_shared} class-shared), fit in {time.perf_counter() - start:.1f}s")
    return fitted


def _mine_rules(transactions: list[list[int]], classes: list[int], num_classes: int, tau_support: float,
                max_len: int) -> dict[int, list[dict]]:
    """Hierarchical eclat: every filter set frequent within a class, as a rule X → c scored over all transactions.

    Returns, per class with transactions, its rules best first by support × confidence, each a
    dict with ``class``, ``filters`` (sorted tuple), ``class_support`` (within the class),
    ``support`` = #(X ∪ {c}) / #T and ``confidence`` = #(X ∪ {c}) / #(X).
    """
    everywhere = tidsets(transactions)
    n_trans = len(transactions)
    rules = {}
    for c in range(num_classes):
        mine = [t for t, k in zip(transactions, classes) if k == c]
        if not mine:
            continue
        frequent = eclat(mine, max(1, math.ceil(tau_support * len(mine) - 1e-9)), max_len=max_len)
        found = []
        for itemset, count in frequent.items():
            tids = -1  # all bits set: the intersection over the itemset's items starts from everything
            for item in itemset:
                tids &= everywhere[item]
            found.append({"class": c, "filters": tuple(sorted(itemset)), "class_support": count / len(mine),
                          "support": count / n_trans, "confidence": count / tids.bit_count()})
        found.sort(key=lambda r: (-r["support"] * r["confidence"], len(r["filters"]), r["filters"]))
        rules[c] = found
    return rules


def _owners(rules: dict[int, list[dict]]) -> tuple[dict[tuple[int, ...], set[int]], dict[tuple[int, ...], float]]:
    """Per frequent filter set: the classes where it is frequent, and its support summed over them."""
    owners: dict[tuple[int, ...], set[int]] = {}
    support: dict[tuple[int, ...], float] = {}
    for found in rules.values():
        for r in found:
            owners.setdefault(r["filters"], set()).add(r["class"])
            support[r["filters"]] = support.get(r["filters"], 0.0) + r["support"]
    return owners, support


def _shared_groups(rules: dict[int, list[dict]], q: int) -> list[tuple[int, ...]]:
    """Class-shared filter groups: the maximal filter sets frequent in two or more classes (no shared
    superset is frequent in all their classes), the ``q`` with the highest support over those classes."""
    owners, support = _owners(rules)
    shared = {s: o for s, o in owners.items() if len(o) > 1}
    # Frequent sets are closed under subsets, so a set with a superset frequent in the same classes
    # also has such a superset one filter larger: checking those suffices.
    covered = {t[:i] + t[i + 1:] for t, o in shared.items() if len(t) > 1 for i in range(len(t))
               if owners[t[:i] + t[i + 1:]] == o}
    maximal = [s for s in shared if s not in covered]
    maximal.sort(key=lambda s: (-support[s], len(s), s))
    return maximal[:q]


def _components(rules: dict[int, list[dict]], shared: list[tuple[int, ...]], labels: list[str], dim: int,
                q: int):
    """The components: each class's top ``q`` rules and the class-shared groups, one per distinct filter set.

    A set frequent in one class only is class-specific (class_index c); a set frequent in several
    is class-shared (class_index −1). A class's row lists every component that is a rule of the
    class (its set is frequent there), best first.

    Returns the components, their filter sets, their owner classes (sorted), the (K, width) table
    and the (R, D) filter masks; each rule of a chosen set gets its component index (``component``).
    """
    owners = {s: sorted(o) for s, o in _owners(rules)[0].items()}
    chosen = list(dict.fromkeys([r["filters"] for c in sorted(rules) for r in rules[c][:q]] + shared))
    index = {s: i for i, s in enumerate(chosen)}
    components = []
    for s in chosen:
        name, listed = "-".join(map(str, s)), "+".join(map(str, s))
        if len(owners[s]) == 1:
            c = owners[s][0]
            components.append(Component(f"c{c}.f{name}", f"{labels[c]}: filters {listed}", c))
        else:
            classes = ", ".join(labels[c] for c in owners[s])
            components.append(Component(f"s.f{name}", f"shared by {classes}: filters {listed}", -1))
    rows = {c: [r for r in rules[c] if r["filters"] in index] for c in rules}
    width = max([len(found) for found in rows.values()], default=0)
    table = torch.full((len(labels), max(1, width)), -1, dtype=torch.long)
    for c, found in rows.items():
        for j, r in enumerate(found):
            r["component"] = index[r["filters"]]
            table[c, j] = r["component"]
    filters = torch.zeros(len(chosen), dim)
    for i, s in enumerate(chosen):
        filters[i, list(s)] = 1.0
    return components, chosen, [owners[s] for s in chosen], table, filters


def _exemplars(components: list[Component], owners: list[list[int]], component_filters: torch.Tensor,
               crops: torch.Tensor, t_class: torch.Tensor, member: torch.Tensor,
               t_activation: torch.Tensor) -> dict[str, bytes]:
    """Visual patterns of the components from the relevant patches (crops (T, C, s, s)).

    A class-specific rule X → c: per filter d ∈ X the average of class c's patches whose
    transaction holds d, weighted by d's activation in the patch; then the rule's strongest
    supporting patches. A class-shared filter group: its patch group, the strongest supporting
    patches of each class that shares it.
    """
    size = crops.shape[-1]
    flat = crops.flatten(1)  # (T, C·s·s)
    # Per class c and filter d: the average of c's patches holding d, weighted by d's activation.
    averages = {}
    for c in t_class.unique().tolist():
        weight = t_activation * (member & (t_class == c)[:, None])  # (T, D)
        averages[c] = ((weight.T @ flat) / weight.sum(0)[:, None].clamp_min(1e-12)).reshape(-1, *crops.shape[1:])
    exemplars = {}
    for i, component in enumerate(components):
        filters = component_filters[i].nonzero().flatten()
        supports = member[:, filters].all(1)
        strength = t_activation[:, filters].sum(1)
        if component.class_index >= 0:
            c = component.class_index
            tiles = [averages[c][d] for d in filters.tolist()]
            groups, per_group = [(t_class == c) & supports], EXEMPLAR_PATCHES
        else:
            tiles = []
            groups, per_group = [(t_class == c) & supports for c in owners[i]], SHARED_PATCHES_PER_CLASS
        for group in groups:
            ranked = torch.where(group, strength, torch.full_like(strength, -math.inf))
            best = ranked.topk(min(per_group, int(group.sum()))).indices
            tiles.extend(crops[j] for j in best.tolist())
        tiles = tiles[:MAX_TILES]
        exemplars[component.id] = crops_png(tiles, [(0, 0, size, size)] * len(tiles))
    return exemplars


def _table1(parts: ModelParts, data: FitData, rule_filters: dict[int, list[int]], trials: int,
            generator: torch.Generator) -> dict:
    """The paper's Table 1 on held-out data: per-class accuracy with the filters of the class's top
    rules zeroed, with as many random filters zeroed (mean of ``trials`` draws), and unperturbed."""
    features = parts.features(data.x_test)
    y = data.y_test.to(features.device)
    dim = features.shape[1]

    def accuracy(members: torch.Tensor, c: int, keep: torch.Tensor) -> torch.Tensor:
        """Accuracy on ``members`` with each row of ``keep`` (S, D) masking the channels -> (S,)."""
        masked = features[members][None] * keep.to(features)[:, None, :, None, None]
        with torch.inference_mode():
            predicted = parts.downstream(masked.flatten(0, 1)).argmax(1).reshape(len(keep), -1)
        return (predicted == c).double().mean(1).cpu()

    table = {"baseline": {}, "rule_filters": {}, "random_filters": {}, "n_filters": {}}
    for c, label in enumerate(parts.labels):
        members = (y == c).nonzero().flatten()
        if len(members) == 0:
            continue
        chosen = rule_filters.get(c, [])
        keep = torch.ones(trials + 2, dim)  # unperturbed, rule filters zeroed, random filters zeroed
        keep[1, chosen] = 0
        for r in range(trials):
            keep[2 + r, torch.randperm(dim, generator=generator)[:len(chosen)]] = 0
        acc = accuracy(members, c, keep)
        table["n_filters"][label] = len(chosen)
        table["baseline"][label] = float(acc[0])
        table["rule_filters"][label] = float(acc[1])
        table["random_filters"][label] = float(acc[2:].mean())
    for key in ("baseline", "rule_filters", "random_filters"):
        values = list(table[key].values())
        table[key] = {k: round(v, 6) for k, v in table[key].items()}
        table[key]["mean"] = round(sum(values) / max(1, len(values)), 6)
    table["random_trials"] = trials
    table["split"] = "held-out test set; accuracy = share of the class's images predicted as the class"
    return table


def _held_out_matches(parts: ModelParts, data: FitData, fitted: FittedMethod, batch_size: int = 500) -> dict:
    """How the served explanation behaves on held-out images: the rules that match when the predicted
    class is explained, against when the next class ((t + 1) mod K) is."""
    explainer = GradCAMRulesExplainer(parts, fitted).to(parts.device)
    counts = {"predicted_class": [], "next_class": []}
    shares = {"predicted_class": [], "next_class": []}
    for i in range(0, len(data.x_test), batch_size):
        x = data.x_test[i:i + batch_size].to(parts.device)
        with torch.no_grad():
            upstream = parts.upstream(x)
        none = torch.zeros(len(x), 0, len(fitted.components), dtype=torch.bool, device=parts.device)
        for key, shift in (("predicted_class", 0), ("next_class", 1)):
            with torch.enable_grad():
                features = upstream.detach().requires_grad_(True)
                logits = parts.downstream(features)
                targets = (logits.argmax(1) + shift) % parts.num_classes
                out = explainer.explain(ExplainBatch(x, features, logits, targets, none, False))
            counts[key].append((out.component_index >= 0).sum(1).cpu())
            shares[key].append(out.residual_share.cpu())
    report = {}
    for key in counts:
        n, share = torch.cat(counts[key]).double(), torch.cat(shares[key]).double()
        report[key] = {"images_with_active_rule": round(float((n > 0).double().mean()), 6),
                       "active_rules_per_image": round(float(n.mean()), 6),
                       "residual_share_mean": round(float(share.mean()), 6)}
    return report

