"""Offline half of gradcam_rules: the fit and its report (the online explainer is handlers/explainers/gradcam_rules.py).

Grad-CAM rules: class-specific and class-shared filter sets mined from Grad-CAM explanations.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence

import torch

from handlers.base import Component, ExplainBatch, FitData, FittedMethod
from handlers.exemplars import crops_png
from handlers.explainers.gradcam_rules import (
    NAME,
    GradCAMRulesConfig,
    GradCAMRulesExplainer,
    Patches,
    extract_patches,
    gradcam_terms,
    gradcam_weights,
    head_gradcam_weights,
    removal_model,
    top_filters,
)
from handlers.model import ModelParts, linear_head_weight
from handlers.solvers.eclat import closed, eclat, tidsets

EXEMPLAR_PATCHES = 3  # strongest supporting patches drawn after a rule's filter averages


SHARED_PATCHES_PER_CLASS = 2


MAX_TILES = 12


def window_masks(corner: torch.Tensor, size: int, hw: Sequence[int]) -> torch.Tensor:
    """(..., 2) top-left corners -> (..., H, W) bool masks of ``size``×``size`` windows."""
    rows = torch.arange(hw[0], device=corner.device)
    cols = torch.arange(hw[1], device=corner.device)
    in_rows = (rows >= corner[..., :1]) & (rows < corner[..., :1] + size)
    in_cols = (cols >= corner[..., 1:]) & (cols < corner[..., 1:] + size)
    return in_rows[..., :, None] & in_cols[..., None, :]


def _patches_all(parts: ModelParts, x: torch.Tensor, config: GradCAMRulesConfig, batch_size: int = 500):
    """The predicted classes (N,) of many inputs and their :class:`Patches` (the served construction), in chunks."""
    head_weight = linear_head_weight(parts)
    class_alpha = None if head_weight is None else head_gradcam_weights(head_weight, parts.feature_shape[1:])
    predicted, found = [], []
    for i in range(0, len(x), batch_size):
        with torch.no_grad():
            f = parts.upstream(x[i:i + batch_size].to(parts.device))
        if class_alpha is None:
            f.requires_grad_(True)
            with torch.enable_grad():
                z = parts.downstream(f)
                alpha = gradcam_weights(f, z, z.argmax(1))
        else:  # the served closed form (the explainer's gradcam)
            with torch.no_grad():
                z = parts.downstream(f)
            alpha = class_alpha[z.argmax(1)]
        f, z = f.detach().float(), z.detach().float()
        classes = z.argmax(1)
        with torch.no_grad():
            target_logit = z.gather(1, classes[:, None])[:, 0]
            cam = gradcam_terms(alpha, f)[1]
            model = removal_model(f, cam, target_logit, classes, head_weight, parts.downstream)
            found.append(extract_patches(f, cam, target_logit, model, parts.input_spec.shape[1:], config.patch_size,
                                         config.n_candidates, config.tau_prt))
        predicted.append(classes.cpu())
    patches = Patches(*(torch.cat([getattr(p, key).cpu() for p in found]) for key in ("corners", "relevant",
                                                                                      "activation")))
    return torch.cat(predicted), patches


def fit(parts: ModelParts, data: FitData, config: GradCAMRulesConfig = GradCAMRulesConfig(),
        log=print) -> FittedMethod:
    """Mine Grad-CAM filter rules on ``data.x_train``; Table 1 and the per-request figures on ``data.x_test``.

    Returns
    -------
    FittedMethod with tensors ``component_filters_`` (R, D) (1 where the component's filter set
    holds the channel), ``class_components_`` (K, q) int64 (each class's top rules R^c, best first,
    −1 padding) and ``filter_reference_`` (D,) (θ_d).
    """
    start = time.perf_counter()
    if len(parts.feature_shape) != 3 or len(parts.input_spec.shape) != 3:
        raise ValueError(f"gradcam_rules needs an image input and a convolutional layer, got input "
                         f"{parts.input_spec.shape} and features {parts.feature_shape}")
    dim = parts.feature_shape[0]
    input_hw = tuple(parts.input_spec.shape[1:])
    q, patch_size = config.q, config.patch_size
    if patch_size > min(input_hw):
        raise ValueError(f"patch_size={patch_size} does not fit the {input_hw} input")
    sizes = sorted(set(config.table_sizes) | {config.n_filters})
    if sizes[-1] > dim:
        raise ValueError(f"n_filters and table_sizes must be in [1, {dim}], got {sizes[-1]}")
    generator = torch.Generator().manual_seed(config.random_state)
    x = data.x_train.float()
    predicted, patches = _patches_all(parts, x, config)
    n = len(x)
    relevant = patches.relevant

    # One transaction per relevant patch: its top filters by eq. 2, plus the predicted class.
    image_of, patch_of = relevant.nonzero(as_tuple=True)
    t_class = predicted[image_of]
    t_activation = patches.activation[image_of, patch_of]  # (T, D)
    n_trans = len(image_of)
    if n_trans == 0:
        raise ValueError(f"no relevant patches at tau_prt={config.tau_prt}: no transactions to mine")
    log(f"gradcam_rules: {n_trans} transactions from {int(relevant.any(1).sum())}/{n} images "
        f"({time.perf_counter() - start:.1f}s)")
    # The transactions of every size share the Grad-CAM maps, patches and activations: only the top-N differs.
    mined = {size: _mine_rules(_transactions(t_activation, size), t_class.tolist(), parts.num_classes,
                               config.tau_support, config.max_rule_len) for size in sizes}
    rules = mined[config.n_filters]
    member = top_filters(t_activation, config.n_filters)  # (T, D) the served size's transactions
    reference = ((t_activation * member).sum(0) / member.sum(0).clamp_min(1)).clamp_min(1e-6)

    # Hierarchical eclat's rules, the top q closed ones per class (R^c), class-shared groups.
    top = {c: _top_rules(found, q) for c, found in rules.items()}
    shared = _shared_groups(rules, q)
    components, sets, owners, class_components, component_filters = _components(rules, top, shared, parts.labels,
                                                                              dim, q)
    factors = {
        "component_filters_": component_filters,
        "class_components_": class_components,
        "filter_reference_": reference.contiguous(),
    }
    crops = _crops(x, image_of, patches.corners[image_of, patch_of], patch_size)
    exemplars = _exemplars(components, owners, component_filters, crops, t_class, member, t_activation)
    owners_of, support_of = _owners(rules)
    rule_filters = {c: sorted({d for r in found for d in r["filters"]}) for c, found in top.items()}

    def described(r: dict) -> dict:
        return {"class": parts.labels[r["class"]], "filters": list(r["filters"]), "support": round(r["support"], 6),
                "confidence": round(r["confidence"], 6), "class_support": round(r["class_support"], 6),
                "component": components[r["component"]].id}

    report = {
        "perturbation_table": _table1(parts, data, {size: {c: _top_rules(found, q) for c, found in mined[size].items()}
                                                    for size in config.table_sizes},
                                      config.random_trials, generator),
        "rules": [described(r) for c in sorted(top) for r in top[c]],
        # A filter is class-specific when it is frequent in that class only.
        "class_specific_filters": {parts.labels[c]: [d for d in rule_filters.get(c, []) if owners_of[(d,)] == {c}]
                                   for c in range(parts.num_classes)},
        "class_shared_filter_groups": [
            {"filters": list(filter_set), "classes": [parts.labels[c] for c in owners[i]],
             "support": round(support_of[filter_set], 6), "component": components[i].id}
            for i, filter_set in enumerate(sets) if components[i].class_index == -1],
        "transactions": n_trans,
        "transaction_size": config.n_filters,
        "itemsets": "closed: no reported filter set has a superset of the same support (among sets of at most "
                    "max_rule_len filters)",
        "images_with_relevant_patches": round(float(relevant.any(1).double().mean()), 6),
        "relevant_patches_per_image": round(float(relevant.sum(1).double().mean()), 6),
        "n_train": n,
        "n_test": len(data.x_test),
    }
    fitted = FittedMethod(NAME, factors, components, dataclasses.asdict(config), report, exemplars)
    report["per_request"] = _per_request(parts, data, fitted)
    n_shared = len(report["class_shared_filter_groups"])
    log(f"gradcam_rules: {sum(map(len, top.values()))} top rules, {len(components)} components "
        f"({n_shared} class-shared), fit in {time.perf_counter() - start:.1f}s")
    return fitted


def _transactions(activation: torch.Tensor, size: int) -> list[list[int]]:
    """(T, D) patch activations -> each patch's ``size`` top filters (eq. 2), in filter order."""
    return top_filters(activation, size).nonzero()[:, 1].reshape(-1, size).tolist()


def _mine_rules(transactions: list[list[int]], classes: list[int], num_classes: int, tau_support: float,
                max_len: int) -> dict[int, list[dict]]:
    """Hierarchical eclat: every filter set frequent within a class, as a rule X → c scored over all transactions.

    Returns, per class with transactions, its rules best first by support × confidence, each a
    dict with ``class``, ``filters`` (sorted tuple), ``class_support`` (within the class),
    ``support`` = #(X ∪ {c}) / #T, ``confidence`` = #(X ∪ {c}) / #(X) and ``closed`` (no superset
    has the same support in the class, :func:`handlers.solvers.eclat.closed`).
    """
    everywhere = tidsets(transactions)
    n_trans = len(transactions)
    rules = {}
    for c in range(num_classes):
        mine = [t for t, k in zip(transactions, classes) if k == c]
        if not mine:
            continue
        frequent = eclat(mine, max(1, math.ceil(tau_support * len(mine) - 1e-9)), max_len=max_len)
        closed_sets = closed(frequent)
        found = []
        for itemset, count in frequent.items():
            tids = -1  # all bits set: the intersection over the itemset's items starts from everything
            for item in itemset:
                tids &= everywhere[item]
            found.append({"class": c, "filters": tuple(sorted(itemset)), "class_support": count / len(mine),
                          "support": count / n_trans, "confidence": count / tids.bit_count(),
                          "closed": itemset in closed_sets})
        found.sort(key=lambda r: (-r["support"] * r["confidence"], len(r["filters"]), r["filters"]))
        rules[c] = found
    return rules


def _top_rules(found: list[dict], q: int) -> list[dict]:
    """A class's R^c: its ``q`` best closed rules (``found`` is ranked)."""
    return [r for r in found if r["closed"]][:q]


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


def _components(rules: dict[int, list[dict]], top: dict[int, list[dict]], shared: list[tuple[int, ...]],
                labels: list[str], dim: int, q: int):
    """The components: each class's top rules R^c and the class-shared groups, one per distinct filter set.

    A set frequent in one class only is class-specific (class_index c); a set frequent in several
    is class-shared (class_index −1). A class's row lists its R^c, best first.

    Returns the components, their filter sets, their owner classes (sorted), the (K, q) table
    and the (R, D) filter masks; each rule of ``top`` gets its component index (``component``).
    """
    owners = {s: sorted(o) for s, o in _owners(rules)[0].items()}
    chosen = list(dict.fromkeys([r["filters"] for c in sorted(top) for r in top[c]] + shared))
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
    table = torch.full((len(labels), q), -1, dtype=torch.long)
    for c, found in top.items():
        for j, r in enumerate(found):
            r["component"] = index[r["filters"]]
            table[c, j] = r["component"]
    filters = torch.zeros(len(chosen), dim)
    for i, s in enumerate(chosen):
        filters[i, list(s)] = 1.0
    return components, chosen, [owners[s] for s in chosen], table, filters


def _crops(x: torch.Tensor, index: torch.Tensor, corner: torch.Tensor, size: int) -> torch.Tensor:
    """Pixel patches: images ``x[index]`` (T,) cut at ``corner`` (T, 2) -> (T, C, size, size)."""
    offset = torch.arange(size)
    rows = (corner[:, 0:1] + offset)[:, :, None]
    cols = (corner[:, 1:2] + offset)[:, None, :]
    return x[index[:, None, None], :, rows, cols].permute(0, 3, 1, 2)


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


def _table1(parts: ModelParts, data: FitData, top_by_size: dict[int, dict[int, list[dict]]], trials: int,
            generator: torch.Generator) -> dict:
    """The paper's Table 1 on held-out data, a row per transaction size: per class, the accuracy with the
    filters of the class's top rules zeroed, with as many random filters zeroed (mean of ``trials``
    draws), the number zeroed (the average perturbation), and the unperturbed baseline."""
    features = parts.features(data.x_test)
    y = data.y_test.to(features.device)
    dim = features.shape[1]
    head_weight = linear_head_weight(parts)
    if head_weight is not None:
        with torch.inference_mode():
            logits, pooled = parts.downstream(features).float(), features.float().flatten(2).mean(2)

    def accuracy(members: torch.Tensor, c: int, keep: torch.Tensor) -> torch.Tensor:
        """Accuracy on ``members`` with each row of ``keep`` (S, D) masking the channels -> (S,)."""
        keep = keep.to(features)
        with torch.inference_mode():
            if head_weight is not None:  # channels masked after the mean: the logits less what they carried
                masked = logits[members][None] - (pooled[members][None] * (1 - keep)[:, None]) @ head_weight.T
            else:
                masked = parts.downstream((features[members][None] * keep[:, None, :, None, None]).flatten(0, 1))
            predicted = masked.reshape(len(keep), len(members), -1).argmax(2)
        return (predicted == c).double().mean(1).cpu()

    def with_mean(values: dict[str, float]) -> dict[str, float]:
        return {**{k: round(v, 6) for k, v in values.items()}, "mean": round(sum(values.values()) / max(1, len(values)), 6)}

    baseline = {}
    rows = {size: {"rule_filters": {}, "random_filters": {}, "perturbed_filters": {}} for size in top_by_size}
    for c, label in enumerate(parts.labels):
        members = (y == c).nonzero().flatten()
        if len(members) == 0:
            continue
        keep = [torch.ones(1, dim)]  # unperturbed, then per size: rule filters zeroed, random filters zeroed
        for top in top_by_size.values():
            chosen = sorted({d for r in top.get(c, []) for d in r["filters"]})
            rule = torch.ones(1 + trials, dim)
            rule[0, chosen] = 0
            for r in range(trials):
                rule[1 + r, torch.randperm(dim, generator=generator)[:len(chosen)]] = 0
            keep.append(rule)
        acc = accuracy(members, c, torch.cat(keep))
        baseline[label] = float(acc[0])
        for i, (size, top) in enumerate(top_by_size.items()):
            block = acc[1 + i * (1 + trials): 1 + (i + 1) * (1 + trials)]
            rows[size]["rule_filters"][label] = float(block[0])
            rows[size]["random_filters"][label] = float(block[1:].mean())
            rows[size]["perturbed_filters"][label] = float(len({d for r in top.get(c, []) for d in r["filters"]}))
    return {
        "rows": [{"transaction_size": size, **{key: with_mean(values) for key, values in row.items()}}
                 for size, row in rows.items()],
        "baseline": with_mean(baseline),
        "random_trials": trials,
        "split": "held-out test set; accuracy = share of the class's images predicted as the class; "
                 "perturbed_filters = filters zeroed (the union of the class's top rules'; random: as many)",
    }


def _per_request(parts: ModelParts, data: FitData, fitted: FittedMethod, batch_size: int = 500) -> dict:
    """The served explanation on held-out images, explaining the predicted class and then the runner-up
    (the next most likely class); and the perturbation test at the layer against the paper's in pixels."""
    explainer = GradCAMRulesExplainer(parts, fitted).to(parts.device)
    labels = parts.labels
    mined = {c: {r["component"] for r in fitted.fit_report["rules"] if r["class"] == labels[c]}
             for c in range(parts.num_classes)}
    ids = [c.id for c in fitted.components]
    counts = {"predicted": [], "runner_up": [], "runner_up_in_input": [], "relevant": [], "relevant_runner_up": []}
    shares, own, reported_total, specific, agree = [], 0, 0, 0, []
    for i in range(0, len(data.x_test), batch_size):
        x = data.x_test[i:i + batch_size].to(parts.device)
        with torch.no_grad():
            upstream = parts.upstream(x)
        none = torch.zeros(len(x), 0, len(fitted.components), dtype=torch.bool, device=parts.device)
        with torch.enable_grad():
            features = upstream.detach().requires_grad_(explainer.needs_grad)
            logits = parts.downstream(features)
        ranked = logits.detach().topk(2, dim=1).indices
        for key, targets in (("predicted", ranked[:, 0]), ("runner_up", ranked[:, 1])):
            with torch.enable_grad():
                batch = ExplainBatch(x, features, logits, targets, none, False)
                out = explainer.explain(batch)
                alpha, f = explainer.gradcam(batch)
                patches = explainer.patches(batch, alpha, f)
            index = out.component_index.cpu()
            counts[key].append((index >= 0).sum(1))
            counts["relevant" if key == "predicted" else "relevant_runner_up"].append(patches.relevant.any(1).cpu())
            if key == "predicted":
                shares.append(out.residual_share.cpu())
                for row, t in zip(index.tolist(), targets.tolist()):
                    got = [j for j in row if j >= 0]
                    own += sum(ids[j] in mined[t] for j in got)
                    specific += sum(fitted.components[j].class_index == t for j in got)
                    reported_total += len(got)
                agree.append(_pixel_agreement(parts, x, targets, logits.detach(), patches, explainer.config))
                # The runner-up's rules against the input's own transactions (those of its prediction).
                members = top_filters(patches.activation, explainer.config.n_filters)
                _, holds = explainer.rules_held(members, patches.relevant, ranked[:, 1])
                counts["runner_up_in_input"].append(holds.flatten(1).any(1).cpu())
    n = {key: torch.cat(values).double() for key, values in counts.items()}
    return {
        "images": len(data.x_test),
        "own_class_rule_share": round(own / max(1, reported_total), 6),
        "class_specific_rule_share": round(specific / max(1, reported_total), 6),
        "images_with_rule": round(float((n["predicted"] > 0).double().mean()), 6),
        "rules_per_image": round(float(n["predicted"].mean()), 6),
        "images_with_relevant_patch": round(float(n["relevant"].mean()), 6),
        "residual_share_mean": round(float(torch.cat(shares).double().mean()), 6),
        "other_class_match_rate": round(float((n["runner_up"] > 0).double().mean()), 6),
        "other_class_in_input_transactions_rate": round(float(n["runner_up_in_input"].mean()), 6),
        "other_class_images_with_relevant_patch": round(float(n["relevant_runner_up"].mean()), 6),
        "relevance_agreement_with_pixel_perturbation": round(float(torch.cat(agree).double().mean()), 6),
        "definitions": {
            "own_class_rule_share": "reported rules (predicted class explained) that are among the class's top "
                                    "rules R^c in `rules`",
            "class_specific_rule_share": "reported rules whose filter set is frequent in the predicted class only",
            "other_class_match_rate": "images where the runner-up class, explained the same way (its Grad-CAM, "
                                      "patches and transactions), reports a rule",
            "other_class_in_input_transactions_rate": "images where a rule of the runner-up is contained in a "
                                                      "relevant patch-transaction of the predicted class",
            "relevance_agreement_with_pixel_perturbation": "images whose relevant patches are the same when "
                                                           "the candidates are zeroed in the input (the paper) as "
                                                           "at the layer (served)",
        },
    }


def _pixel_agreement(parts: ModelParts, x: torch.Tensor, targets: torch.Tensor, logits: torch.Tensor,
                     patches: Patches, config: GradCAMRulesConfig) -> torch.Tensor:
    """(B,) bool: the paper's perturbation test (candidates zeroed in the input, the model rerun) finds
    the relevant patches the served one (zeroed at the layer) finds."""
    masks = window_masks(patches.corners, config.patch_size, x.shape[2:]).cumsum(1) > 0  # (B, k, H, W)
    perturbed = (x[:, None] * ~masks[:, :, None]).flatten(0, 1)
    scores = parts.logits(perturbed).float().reshape(len(x), masks.shape[1], -1)
    rows = torch.arange(len(x), device=x.device)
    target_logit = logits.float()[rows, targets]
    scores = torch.cat([target_logit[:, None], scores[rows, :, targets]], 1)
    drop = (scores[:, :-1] - scores[:, 1:]) / target_logit.abs()[:, None].clamp_min(1e-6)
    relevant = (drop >= config.tau_prt).cumprod(1).bool()
    return (relevant == patches.relevant).all(1).cpu()
