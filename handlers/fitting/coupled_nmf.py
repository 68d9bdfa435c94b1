"""Offline half of coupled_nmf: the fit and its report (the online explainer is handlers/explainers/coupled_nmf.py).

Coupled NMF: concepts shared by pixels, neurons of several layers and examples.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import torch

from handlers.base import Component, FitData, FittedMethod
from handlers.exemplars import crops_png, example_png
from handlers.explainers.coupled_nmf import (
    EPS,
    NAME,
    CoupledNMFConfig,
    CoupledNMFExplainer,
    pixel_layout,
    spatial_mean,
    tap_module,
)
from handlers.fitting import tcav
from handlers.graph_program import GraphProgram, non_negative_layers
from handlers.model import ModelParts, linear_head_weight
from handlers.solvers.active_set import kkt_violation
from handlers.solvers.nmf import NMF, nnls_encode

EXEMPLAR_EXAMPLES = 4
# The KKT violation (relative to the Gram's scale) under which the fit report counts a held-out code optimal.
FOLD_IN_TOLERANCE = 1e-5


@contextlib.contextmanager
def _cpu_threads(n: int):
    """Run with ``n`` intra-op CPU threads, then restore. The fit is thousands of small
    tensor operations, for which thread synchronisation costs more than it saves (by an
    order of magnitude on a busy 2-core machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@_cpu_threads(1)
def fit(parts: ModelParts, data: FitData, config: CoupledNMFConfig = CoupledNMFConfig(), log=print) -> FittedMethod:
    """Fit the coupled NMF on a probe subset of ``data.x_train``; report on ``data.x_test``.

    Returns
    -------
    FittedMethod
        Factors ``pixel_factors_`` (C_in, H·W, d), ``neuron_factors_{j}_`` (C_j·H_j·W_j, d), or (C_j, d)
        for a layer pooled, for each analysed layer j (the explained layer last), ``view_scales_`` (C_in + J,),
        ``pixel_offset_`` (C_in,), ``probe_codes_`` (N, d), ``probe_index_`` (N,),
        ``probe_labels_`` (N,), ``probe_png_`` (total bytes,) uint8 and ``probe_png_offsets_`` (N + 1,).
    """
    start = time.perf_counter()
    chosen = non_negative_layers(parts.upstream) if config.layers is None else config.layers
    extra = [name for name in chosen if name != parts.layer]
    analysed = [*extra, parts.layer]
    n_in, map_hw = pixel_layout(parts.input_spec.shape)
    num_classes = parts.num_classes
    groups = config.class_groups or {label: (c,) for c, label in enumerate(parts.labels)}
    group_of_class = torch.full((num_classes,), -1, dtype=torch.long)
    for g, members in enumerate(groups.values()):
        group_of_class[torch.as_tensor(members, dtype=torch.long)] = g
    if (group_of_class < 0).any():
        raise ValueError(f"class_groups leave classes {(group_of_class < 0).nonzero().flatten().tolist()} ungrouped")

    generator = torch.Generator().manual_seed(config.random_state)
    n = min(config.n_probe, len(data.x_train))
    probe_index = torch.randperm(len(data.x_train), generator=generator)[:n].sort().values
    probe_x, probe_y = data.x_train[probe_index], data.y_train[probe_index]

    # Neurons: units of each layer's maps, or its pooled channels where the N x C·H·W view is too large.
    pooled_layers = _pooled_layers(parts, extra, probe_x, config)
    pooled = [name in pooled_layers for name in analysed]
    # Pixel views are shifted so that every channel's probe minimum is 0 (a no-op for [0, 1] images).
    pixel_offset = probe_x.reshape(n, n_in, -1).amin(dim=(0, 2)).clamp_max(0)
    views = _raw_views(parts, tap_module(parts.upstream, extra, pooled[:-1]), pixel_offset, probe_x,
                       pooled[-1])  # list of (N, T_v)
    scales = torch.stack([v.square().sum(1).mean().sqrt().clamp_min(EPS) for v in views])
    sizes = [v.shape[1] for v in views]
    # X (T, N) in normalized units, filled view by view (no second copy of the views at once).
    X = torch.empty(sum(sizes), n)
    for v, s, row in zip(views, scales, torch.tensor([0, *sizes]).cumsum(0).tolist()):
        X[row:row + v.shape[1]] = (v / s).T
    del views
    # The updates run on the GPU when there is one.
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    X = X.to(device)
    log(f"coupled_nmf: probe {n} examples; views: {n_in} pixel channel(s) of {sizes[0]} pixels, layers "
        + ", ".join(f"{name} ({size} {'channels, pooled' if p else 'neurons'})"
                    for name, size, p in zip(analysed, sizes[n_in:], pooled)))

    # The settings as fitted, stored in the archive: the layers, groups, probe count, fold-in steps and pooled
    # layers resolved.
    fold_in_iter = 2 * config.n_concepts if config.fold_in_iter is None else config.fold_in_iter
    config = dataclasses.replace(config, layers=analysed, class_groups=groups, n_probe=n, fold_in_iter=fold_in_iter,
                                 pooled_layers=tuple(name for name in analysed if name in pooled_layers))
    n_concepts, lam = config.n_concepts, config.penalty
    W, F, n_iter, objective = _coupled_mu(X, n_concepts, lam=lam, unit_norm=config.regularization == "unit_norm",
                                          mu=config.group_sparsity, groups=group_of_class[probe_y],
                                          max_iter=config.max_iter, inner_iter=config.inner_iter, tol=config.tol,
                                          check_every=config.check_every, random_state=config.random_state)
    X, W, F = X.cpu(), W.cpu(), F.cpu()
    log(f"coupled_nmf: {n_iter} multiplicative updates, objective {objective:.6g} ({time.perf_counter() - start:.1f}s)")

    # Back to the views' original units: X_v ≈ (s_v W_v) F.
    blocks = [b * s for b, s in zip(W.split(sizes, 0), scales)]
    factors = {
        "pixel_factors_": torch.stack(blocks[:n_in]).contiguous(),
        **{f"neuron_factors_{j}_": b.contiguous() for j, b in enumerate(blocks[n_in:])},
        "view_scales_": scales.contiguous(),
        "pixel_offset_": pixel_offset.contiguous(),
        # The probe examples placed in concept space by the per-request solver, so that a
        # request's nearest probe examples are found in one geometry.
        "probe_codes_": nnls_encode(X.T, W.T, config.fold_in_iter, gram=W.T @ W + lam * torch.eye(n_concepts),
                                    solver=config.fold_in_solver),
        "probe_index_": probe_index.contiguous(),
        "probe_labels_": probe_y.contiguous(),
        # The neighbour view's exemplars: each probe example drawn as a small PNG, the bytes end to end.
        **_probe_pngs(probe_x),
    }
    concepts = _concept_table(F, probe_y, probe_index, parts.labels, groups, group_of_class, config.n_top_classes,
                              config.n_top_examples)
    components = []
    for d, entry in enumerate(concepts):
        entry["label"] = f"concept {d}: " + ", ".join(c["class"] for c in entry["top_classes"])
        components.append(Component(entry["id"], entry["label"], -1))
    exemplars = {}
    if len(parts.input_spec.shape) == 3:
        exemplars = {c.id: _exemplar(factors["pixel_factors_"][:, :, d], map_hw, data.x_train,
                                     concepts[d]["top_examples"]) for d, c in enumerate(components)}
    tcav_report = {}
    if config.tcav_random_sets:
        tcav_report = {"tcav": _tcav(parts, data, probe_x, F, analysed, config, [c.id for c in components])}
    fitted = FittedMethod(NAME, factors, components, dataclasses.asdict(config), {}, exemplars)

    explainer = CoupledNMFExplainer(parts, fitted).to(parts.device)
    view_names = [*(["pixels"] if n_in == 1 else [f"pixels_{i}" for i in range(n_in)]), *analysed]
    fitted.fit_report = _round({
        "concepts": concepts,
        "layers": _layer_similarity(blocks[n_in:], analysed, config.n_eigenvalues),
        **_held_out(explainer, parts, data, X, W, F, sizes, view_names, min(config.knn, n)),
        **tcav_report,
        "neurons": config.neurons,
        "pooled_layers": pooled_layers,
        "n_iter": n_iter,
        "objective": objective,
        "n_probe": n,
        "n_test": len(data.x_test),
        "fit_device": device.type,
        "fit_seconds": time.perf_counter() - start,
    })
    log(f"coupled_nmf: fitted in {time.perf_counter() - start:.1f}s")
    return fitted


def _probe_pngs(probe_x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each probe example drawn by :func:`handlers.exemplars.example_png`, as tensors (archives hold no
    other kind): ``probe_png_`` the PNGs end to end (uint8) and ``probe_png_offsets_`` (N + 1,) int64,
    example n's PNG being ``probe_png_[offsets[n]:offsets[n + 1]]``."""
    pngs = [example_png(x) for x in probe_x]
    offsets = torch.zeros(len(pngs) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor([len(p) for p in pngs], dtype=torch.int64).cumsum(0)
    data = torch.tensor(list(b"".join(pngs)), dtype=torch.uint8)
    return {"probe_png_": data, "probe_png_offsets_": offsets}


def _pooled_layers(parts: ModelParts, extra: list[str], probe_x: torch.Tensor, config: CoupledNMFConfig,
                   ) -> dict[str, str]:
    """The analysed layers (``extra``, then the explained one) whose neurons are pooled channels, each
    with the reason: every layer for ``neurons="pooled"``; else those named in ``pooled_layers`` and
    those whose N x C·H·W float32 view would exceed ``max_view_mib``. A layer without a grid (B, C) is
    never listed (its maps are its channels)."""
    with torch.inference_mode():
        features, *taps = parts.upstream.with_taps(extra, torch.clone)(probe_x[:1].to(parts.device))
    reasons = {}
    for name, value in zip([*extra, parts.layer], [*taps, features]):
        if value.dim() <= 2:
            continue
        mib = len(probe_x) * value.shape[1:].numel() * 4 / 2 ** 20
        if config.neurons == "pooled":
            reasons[name] = 'neurons="pooled"'
        elif name in (config.pooled_layers or ()):
            reasons[name] = "named in pooled_layers"
        elif mib > config.max_view_mib:
            reasons[name] = (f"its view of {len(probe_x)} x {value.shape[1:].numel()} neurons would take {mib:.1f} MiB, "
                             f"over max_view_mib = {config.max_view_mib:g}")
    return reasons


def _raw_views(parts: ModelParts, taps: GraphProgram, pixel_offset: torch.Tensor, x: torch.Tensor,
               explained_pooled: bool = True, batch_size: int = 256) -> list[torch.Tensor]:
    """The views of many inputs in original units: one (N, H·W) per input channel, then one per
    analysed layer (the explained layer last), (N, C_j) for a layer pooled, else (N, C_j·H_j·W_j)."""
    n_in = len(pixel_offset)
    chunks = []
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size].to(parts.device)
            pixels = (xb.reshape(len(xb), n_in, -1) - pixel_offset.to(xb.device)[:, None]).clamp_min(0)
            features, *layer_views = taps(xb)
            layer_views.append(spatial_mean(features) if explained_pooled else features.flatten(1))
            chunks.append([*pixels.unbind(1), *(v.float().clamp_min(0) for v in layer_views)])
    return [torch.cat([c[v] for c in chunks]).float().cpu() for v in range(len(chunks[0]))]


def _coupled_mu(X: torch.Tensor, k: int, *, lam: float, unit_norm: bool, mu: float, groups: torch.Tensor,
                max_iter: int, inner_iter: int, tol: float, check_every: int, random_state: int,
                ) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """The paper's multiplicative updates on the stacked views ``X ≈ W F`` (eq. 3.2).

    The W update is row-separable, so updating the stacked loadings W (T, d) at once is
    updating every P_i and O_j by its own rule. Each outer iteration forms the products
    with X once and then repeats the cheap update of each factor ``inner_iter`` times on them
    (Gillis & Glineur 2012's accelerated multiplicative updates; every repetition is the
    same rule and never increases the objective). Returns ``W`` (T, d), ``F`` (d, N), the
    outer iterations run and the final objective.
    """
    # NNDSVDa initialisation (Boutsidis & Gallopoulos 2008) of the stacked matrix only
    # (max_iter=0): strictly positive factors, which the multiplicative updates need.
    init = NMF(k, init="nndsvda", max_iter=0, random_state=random_state)
    F = init.fit_transform(X.T).T.contiguous()  # (d, N)
    W = init.components_.T.contiguous()  # (T, d)
    groups = groups.to(X.device)
    n_groups = int(groups.max()) + 1 if len(groups) else 0
    sq_norm_X = torch.linalg.vector_norm(X).double().square()

    def group_norms(F):  # (d, G): ‖F[d, g]‖₂
        return torch.zeros(k, n_groups, dtype=F.dtype, device=F.device).index_add_(1, groups, F.square()).sqrt()

    def objective(WtX, WtW, F):
        # ‖X − W F‖² from the products already formed, without X − W F.
        value = (sq_norm_X - 2 * torch.sum(WtX * F, dtype=torch.float64)
                 + torch.sum(WtW * (F @ F.T), dtype=torch.float64)).clamp_min(0)
        if lam:
            value = value + lam * (torch.diagonal(WtW).sum().double() + F.square().sum().double())
        if mu:
            value = value + mu * group_norms(F).sum().double()
        return float(value)

    history: list[float] = []
    n_iter = 0
    while n_iter < max_iter:
        n_iter += 1
        XFt, FFt = X @ F.T, F @ F.T
        for _ in range(inner_iter):
            W = W * XFt / (W @ FFt + lam * W + EPS)
        if unit_norm:
            norms = torch.linalg.vector_norm(W, dim=0).clamp_min(EPS)
            W, F = W / norms, F * norms[:, None]
        WtX, WtW = W.T @ X, W.T @ W
        for _ in range(inner_iter):
            denominator = WtW @ F + lam * F + EPS
            if mu:
                denominator = denominator + mu * F / group_norms(F).clamp_min(EPS)[:, groups]
            F = F * WtX / denominator
        if n_iter % check_every == 0 or n_iter == max_iter:
            history.append(objective(WtX, WtW, F))
            if len(history) > 1 and history[-2] - history[-1] <= tol * history[-2]:
                break
    return W, F, n_iter, history[-1] if history else float("nan")


def _concept_table(F: torch.Tensor, y: torch.Tensor, index: torch.Tensor, labels: list[str], groups: dict,
                   group_of_class: torch.Tensor, n_top_classes: int, n_top_examples: int) -> list[dict]:
    """Per concept: its top classes and dominant group by class-balanced mean of F, top probe examples."""
    num_classes = len(labels)
    counts = torch.bincount(y, minlength=num_classes).clamp_min(1).to(F.dtype)
    class_mean = torch.zeros(F.shape[0], num_classes, dtype=F.dtype).index_add_(1, y, F) / counts  # (d, K)
    class_share = class_mean / class_mean.sum(1, keepdim=True).clamp_min(EPS)
    group_share = torch.zeros(F.shape[0], len(groups), dtype=F.dtype).index_add_(1, group_of_class, class_share)
    group_names = list(groups)
    total = F.sum(1)
    table = []
    for d in range(F.shape[0]):
        top = class_share[d].argsort(descending=True)[:n_top_classes]
        g = int(group_share[d].argmax())
        table.append({
            "id": f"concept{d}",
            "top_classes": [{"class": labels[c], "share": float(class_share[d, c])} for c in top.tolist()],
            "dominant_group": {"group": group_names[g], "share": float(group_share[d, g])},
            "top_examples": index[F[d].argsort(descending=True)[:n_top_examples]].tolist(),
            "mass_share": float(total[d] / total.sum().clamp_min(EPS)),
        })
    return table


def _layer_similarity(neuron_factors: list[torch.Tensor], names: list[str], n_eigenvalues: int) -> dict:
    """Per layer: cosine similarity of the concepts over its neurons (d, d), its eigenvalues
    (descending), the mean of the leading ``n_eigenvalues`` and the mean off-diagonal similarity."""
    out = {}
    for name, O in zip(names, neuron_factors):
        unit = O / torch.linalg.vector_norm(O, dim=0).clamp_min(EPS)
        similarity = (unit.T @ unit).double()
        eigenvalues = torch.linalg.eigvalsh(similarity).flip(0)
        d = len(similarity)
        off = (similarity.sum() - similarity.diagonal().sum()) / max(d * (d - 1), 1)
        out[name] = {"neurons": O.shape[0], "similarity": similarity.tolist(), "eigenvalues": eigenvalues.tolist(),
                     "mean_top_eigenvalues": float(eigenvalues[:n_eigenvalues].mean()),
                     "mean_off_diagonal_similarity": float(off)}
    return out


def _held_out(explainer: "CoupledNMFExplainer", parts: ModelParts, data: FitData, X: torch.Tensor,
              W: torch.Tensor, F: torch.Tensor, sizes: list[int], view_names: list[str], knn: int) -> dict:
    """Relative reconstruction error per view (probe: the fit; test: the online fold-in),
    the test residual shares, and the paper's kNN analysis in concept space (Fig. 4d, 5d): how
    often the majority class of a test example's ``knn`` nearest probe examples is its label / the
    model's class, and the mean share of those neighbours whose top concept is the example's own."""
    def per_view(residual, X):
        errors = {}
        for name, r, x in zip(view_names, residual.split(sizes, 0), X.split(sizes, 0)):
            errors[name] = float(torch.linalg.vector_norm(r) / torch.linalg.vector_norm(x).clamp_min(EPS))
        return errors

    codes, shares, x_test = [], [], []
    with torch.inference_mode():
        for i in range(0, len(data.x_test), 256):
            xb = data.x_test[i:i + 256].to(parts.device)
            features, *taps = explainer.tapped_upstream(xb)
            f, share = explainer.encode(xb, features, taps)
            x = explainer.stacked_views(xb, features, taps)
            codes.append(f.cpu())
            shares.append(share.cpu())
            x_test.append(x.cpu())
    codes, shares, x_test = torch.cat(codes), torch.cat(shares), torch.cat(x_test).T
    dictionary, gram = explainer.dictionary_.cpu(), explainer.gram_.cpu()
    violation = kkt_violation(codes, x_test.T @ dictionary.T, gram, simplex=False)
    ids, _ = explainer.nearest_probes(codes.to(parts.device), knn)
    # probe_index_ is sorted, so a neighbour's position among the probes is found by bisection.
    neighbour_rows = torch.searchsorted(explainer.probe_index_, ids).cpu()
    neighbour_labels = explainer.probe_labels_.cpu()[neighbour_rows]
    majority = torch.mode(neighbour_labels, dim=1).values
    # The neighbour view's concept distribution: the share of the neighbours whose top concept is the input's.
    same_top_concept = explainer.probe_codes_.cpu().argmax(1)[neighbour_rows] == codes.argmax(1, keepdim=True)
    predicted = parts.logits(data.x_test).argmax(1).cpu()
    return {
        "reconstruction_error": {"probe": per_view(X - W @ F, X),
                                 "test": per_view(x_test - dictionary.T @ codes.T, x_test)},
        # The share of held-out codes that are optimal (KKT) after the fold-in's fixed steps, to float32
        # accuracy: the solver is exact in float64, but its codes and the views' products with the
        # dictionary (sums over tens of thousands of neurons for maps) are float32, which leaves
        # violations of a few 1e-6 of the Gram's scale on the demo's maps.
        "fold_in_converged": float((violation <= FOLD_IN_TOLERANCE).double().mean()),
        "fold_in_max_violation": float(violation.max()) if len(violation) else 0.0,
        "residual_share_test": {"mean": float(shares.mean()), "median": float(shares.median()),
                                "max": float(shares.max())},
        "knn": {"k": knn, "majority_matches_label": float((majority == data.y_test).double().mean()),
                "majority_matches_model": float((majority == predicted).double().mean()),
                "own_top_concept_share": float(same_top_concept.double().mean())},
    }


def median_mask(latent_image: torch.Tensor) -> torch.Tensor:
    """The paper's mask of a concept's latent image (Fig. 4c, 5c): True where a value is above the
    image's median (the lower median for an even count, a value of the image), else False.

    (C, H, W) float -> (C, H, W) bool; at most half of the values are True, exactly half when they differ.
    """
    return latent_image > latent_image.flatten().median()


def _exemplar(pixel_factor: torch.Tensor, map_hw: tuple[int, int], x_train: torch.Tensor,
              top_examples: list[int]) -> bytes:
    """The paper's Fig. 4a-c for one concept: its latent image (the P columns drawn as an image), its
    topmost probe example, then its top probe examples with the pixels outside the latent image's
    median mask set to the example's minimum (black)."""
    latent = pixel_factor.reshape(len(pixel_factor), *map_hw)
    mask = median_mask(latent)
    top = [x_train[i] for i in top_examples[:EXEMPLAR_EXAMPLES]]
    masked = [torch.where(mask, x, x.min()) for x in top]
    images = [latent, top[0], *masked]
    return crops_png(images, [(0, 0, map_hw[0], map_hw[1])] * len(images))


def _tcav(parts: ModelParts, data: FitData, probe_x: torch.Tensor, F: torch.Tensor, analysed: list[str],
          config: CoupledNMFConfig, ids: list[str]) -> dict:
    """The paper's TCAV validation (section 5, Fig. 6) of every concept, as a concept given by its top
    probe examples (by F), for every class (see :mod:`handlers.fitting.tcav`).

    The layer is the explained one, unless the head after it is linear (global average pool +
    linear, as the demo's): there the gradient of a logit is one constant vector, so every input of a
    class would score the same; then it is the analysed layer before it.
    """
    layer = analysed[-1]
    if linear_head_weight(parts) is not None and len(analysed) > 1:
        layer = analysed[-2]
    generator = torch.Generator().manual_seed(config.random_state + 1)
    n_examples = min(config.tcav_examples, len(probe_x) // 2)
    top = F.argsort(dim=1, descending=True)[:, :n_examples]  # (d, n)
    randoms = [torch.randperm(len(probe_x), generator=generator)[:n_examples]
               for _ in range(2 * config.tcav_random_sets)]
    # Held-out inputs, as many of each class (their own class's logit is differentiated).
    per_class = max(1, config.tcav_inputs // parts.num_classes)
    chosen = torch.cat([(data.y_test == k).nonzero().flatten()[:per_class] for k in range(parts.num_classes)])
    gradients = tcav.layer_gradients(parts.upstream, parts.downstream, layer, data.x_test[chosen],
                                     data.y_test[chosen])
    needed = torch.cat([top.flatten(), *randoms]).unique()
    activations = tcav.layer_activations(parts.upstream, layer, probe_x[needed])
    row = torch.full((len(probe_x),), -1, dtype=torch.long)
    row[needed] = torch.arange(len(needed))
    scores, null, p_values = tcav.tcav_table([activations[row[t]] for t in top],
                                             [activations[row[r]] for r in randoms],
                                             gradients, data.y_test[chosen], parts.num_classes)
    significant = p_values < tcav.SIGNIFICANCE
    return {
        "layer": layer, "concept_examples": n_examples, "random_sets": config.tcav_random_sets,
        "inputs": len(chosen), "classifier": "ridge regression on +-1 labels (closed form), unit normal",
        "test": "two-sided Welch t-test of the concept's scores against random-vs-random CAVs' scores",
        "alpha": tcav.SIGNIFICANCE,
        "null_score": null.mean(0).tolist(),
        "concepts": [{"id": ids[d], "score": scores[d].mean(0).tolist(), "score_std": scores[d].std(0).tolist(),
                      "p_value": p_values[d].tolist(), "significant": significant[d].tolist()}
                     for d in range(len(ids))],
        "significant_share": float(significant.double().mean()),
    }


def _round(value):
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_round(v) for v in value]
    return value

