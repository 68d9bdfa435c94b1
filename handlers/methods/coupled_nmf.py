"""Coupled NMF: concepts shared by pixels, neurons of several layers and examples.

Seed paper: U. S. Saini, E. E. Papalexakis, "Analyzing Representations inside
Convolutional Neural Networks" (arXiv:2012.12516).

Offline, on a probe set of N training examples, the model's views of the examples are
factorized with one shared, non-negative example factor F (d concepts × N):

* pixel matrices D_i (pixels of input channel i × N), one per input channel;
* activation matrices A_j (channels of analysed layer j × N), one per analysed layer,
  each example's activation pooled by the spatial mean (a channel is a "neuron");

    min_{F, P_i, O_j ≥ 0}  Σ_i ‖D_i − P_i F‖² + Σ_j ‖A_j − O_j F‖² + R(F, P, O)

with the paper's multiplicative updates (eq. 3.2),

    P_i ← P_i ⊙ D_i Fᵀ / (P_i F Fᵀ + λ P_i),     O_j ← O_j ⊙ A_j Fᵀ / (O_j F Fᵀ + λ O_j),
    F   ← F ⊙ (Σ_i P_iᵀ D_i + Σ_j O_jᵀ A_j) / (Σ_i P_iᵀ P_i F + Σ_j O_jᵀ O_j F + λ F + μ G(F)),

where R is either the L2 penalty λ(‖F‖² + Σ‖P_i‖² + Σ‖O_j‖²) ("l2") or none with the
concept columns of the stacked loadings [P_1; …; O_J] rescaled to unit norm after each
update, F's rows absorbing the scale ("unit_norm", λ = 0 above). The optional group
sparsity of the paper's section 5 adds μ Σ_d Σ_g ‖F[d, g]‖₂ over groups g of probe
examples (their classes, or the given groups of classes), whose gradient is
G(F)[d, n] = F[d, n] / ‖F[d, g(n)]‖₂: each concept is pushed towards few groups.
Every view is first divided by its RMS example norm so that no view dominates the loss;
the stored factors P_i, O_j are in the views' original units. Each pass over the data
applies an update several times on the same products (Gillis & Glineur 2012's
accelerated multiplicative updates), since the products with the data dominate the cost.

The global analysis (fit report ``concepts`` and ``layers``): per concept its top classes,
top probe examples and dominant group; per analysed layer the cosine similarity of the
concepts over its neurons (columns of O_j) and the mean of the leading eigenvalues of
that similarity matrix (the paper's Fig. 2 and 3); per concept an exemplar PNG showing its
pixel mask (a column of P drawn as an image) and its top probe examples; the paper's
kNN analysis of held-out examples in concept space among the probe examples.

Per request, with the factors fixed, the input is folded in: f ≥ 0 minimizing
Σ_i ‖d_i − P_i f‖² + Σ_j ‖a_j − O_j f‖² (+ λ‖f‖² for "l2"), in the same normalized
units, exactly, by active-set steps (:func:`handlers.nmf.nnls_encode`, ``solver="active_set"``;
archives fitted before it used 50 projected HALS sweeps, which they keep).
A concept's weight is f_d; its contribution is defined by intervention on the deepest
analysed layer, the explained layer whose activation a (C, *grid) the downstream
consumes: the concept carries o_d f_d of each channel's pooled activation ā, so removing
a set S of concepts scales each channel down by that share,

    a_S = a − a⁺ ⊙ r_S,    r_S[c] = min(1, Σ_{d∈S} O_J[c, d] f_d / ā[c])

(a⁺ = max(a, 0); for a global-average-pooling head this removes exactly Σ_S O_J f_d
from the pooled features, capped so that no channel goes below zero), and the rest of
the network is run on a_S (ā = mean_hw(a⁺)). The contribution of concept d is
logit_t(a) − logit_t(a_{d}), exact by construction; interventions are the logits of
a_S. The method is not additive. Heatmaps are the concepts' pixel masks weighted for
this input, f_d · Σ_i P_i[:, d], at the input's resolution (the "feature grid" of this
method's heatmaps is the pixel grid).
"""

from __future__ import annotations

import contextlib
import math
import time

import torch

from handlers.active_set import kkt_violation
from handlers.base import Component, ExplainBatch, Explainer, Explanation, FitData, FittedMethod
from handlers.exemplars import crops_png
from handlers.model import ModelParts, linear_head_weight
from handlers.model_parts import GraphProgram, non_negative_layers
from handlers.nmf import NMF, nnls_encode

NAME = "coupled_nmf"
FOLD_IN_SOLVER = "active_set"  # the exact per-request fold-in (archives record theirs)
REGULARIZATIONS = ("unit_norm", "l2")
EXEMPLAR_EXAMPLES = 4
_EPS = 1e-12


# --------------------------------------------------------------------------- views

def _pool(t: torch.Tensor) -> torch.Tensor:
    """(B, C, *grid) -> (B, C) by the spatial mean; (B, C) unchanged."""
    return t.flatten(2).mean(2) if t.dim() > 2 else t


def tap_module(upstream: GraphProgram, layers: list[str], keep_output: bool = True) -> GraphProgram:
    """The upstream, also returning the pooled activations of ``layers``.

    Returns a module ``(B, *input_shape) -> (output, *taps)`` with ``taps[j]`` of shape
    (B, C_j), sharing the upstream's submodules, so that one forward pass gives the
    explained layer and every analysed layer; without ``keep_output``, the upstream cut
    short after the deepest tap, returning the taps alone. Each activation is pooled right
    where it is computed, so an in-place operation further down the graph cannot alter it.

    Raises
    ------
    ValueError
        If a name is not a node of the upstream's graph.
    """
    return upstream.with_taps(layers, _pool, keep_output)


def _pixel_layout(input_shape: list[int]) -> tuple[int, tuple[int, int]]:
    """Input channels and the (H, W) of a pixel map: (C, H, W) -> C, (H, W);
    (C, L) -> C, (1, L); (L,) -> 1, (1, L)."""
    if len(input_shape) == 3:
        return input_shape[0], (input_shape[1], input_shape[2])
    if len(input_shape) == 2:
        return input_shape[0], (1, input_shape[1])
    return 1, (1, math.prod(input_shape))


# --------------------------------------------------------------------------- offline fit

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
def fit(parts: ModelParts, data: FitData, *, n_concepts: int = 10, n_probe: int = 2000,
        layers: list[str] | None = None, regularization: str = "unit_norm", alpha: float = 1e-3,
        group_sparsity: float = 0.0, class_groups: dict[str, list[int]] | None = None,
        max_iter: int = 300, inner_iter: int = 10, tol: float = 1e-4, check_every: int = 10,
        fold_in_iter: int | None = None,
        n_top_classes: int = 3, n_top_examples: int = 8, n_eigenvalues: int = 3, knn: int = 5,
        random_state: int = 0, log=print) -> FittedMethod:
    """Fit the coupled NMF on a probe subset of ``data.x_train``; report on ``data.x_test``.

    Parameters
    ----------
    n_concepts : number of concepts d.
    n_probe : probe examples N, drawn from ``x_train`` by a generator seeded with ``random_state``.
    layers : upstream node names of the analysed layers besides the explained one; None:
        every ReLU node of the upstream. The explained layer ``parts.layer`` is always
        analysed, last (the deepest).
    regularization : "unit_norm" (unit-norm concept columns of the stacked loadings) or
        "l2" (the L2 penalty ``alpha`` on every factor, kept in the fold-in).
    group_sparsity : μ of the group-sparsity penalty on F (0: off).
    class_groups : group name -> class indices, for the group sparsity and each concept's
        dominant group; None: every class is its own group.
    max_iter, inner_iter, tol, check_every : multiplicative updates: at most ``max_iter``
        passes over the data, each updating W then F ``inner_iter`` times; stop when the
        objective falls by less than ``tol`` (relative) over ``check_every`` passes.
    fold_in_iter : active-set steps of the per-request fold-in; None: 2 * n_concepts, room for
        every concept to enter and leave once (on the CPU it stops once every code is optimal).

    Returns
    -------
    FittedMethod
        Factors ``pixel_factors_`` (C_in, H·W, d), ``neuron_factors_{j}_`` (C_j, d) for each
        analysed layer j (the explained layer last), ``view_scales_`` (C_in + J,),
        ``pixel_offset_`` (C_in,), ``probe_codes_`` (N, d), ``probe_index_`` (N,) and
        ``probe_labels_`` (N,).
    """
    start = time.perf_counter()
    if regularization not in REGULARIZATIONS:
        raise ValueError(f"unknown regularization {regularization!r}; expected one of {REGULARIZATIONS}")
    chosen = non_negative_layers(parts.upstream) if layers is None else layers
    extra = [name for name in chosen if name != parts.layer]
    analysed = [*extra, parts.layer]
    n_in, map_hw = _pixel_layout(parts.input_spec.shape)
    num_classes = parts.num_classes
    groups = class_groups or {label: [c] for c, label in enumerate(parts.labels)}
    group_of_class = torch.full((num_classes,), -1, dtype=torch.long)
    for g, members in enumerate(groups.values()):
        group_of_class[torch.as_tensor(members, dtype=torch.long)] = g
    if (group_of_class < 0).any():
        raise ValueError(f"class_groups leave classes {(group_of_class < 0).nonzero().flatten().tolist()} ungrouped")

    generator = torch.Generator().manual_seed(random_state)
    n = min(n_probe, len(data.x_train))
    probe_index = torch.randperm(len(data.x_train), generator=generator)[:n].sort().values
    probe_x, probe_y = data.x_train[probe_index], data.y_train[probe_index]

    # Pixel views are shifted so that every channel's probe minimum is 0 (a no-op for [0, 1] images).
    pixel_offset = probe_x.reshape(n, n_in, -1).amin(dim=(0, 2)).clamp_max(0)
    views = _raw_views(parts, tap_module(parts.upstream, extra), pixel_offset, probe_x)  # list of (N, T_v)
    scales = torch.stack([v.square().sum(1).mean().sqrt().clamp_min(_EPS) for v in views])
    # The updates run on the GPU when there is one.
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    X = torch.cat([v / s for v, s in zip(views, scales)], 1).T.contiguous().to(device)  # (T, N), normalized units
    sizes = [v.shape[1] for v in views]
    log(f"coupled_nmf: probe {n} examples; views: {n_in} pixel channel(s) of {sizes[0]} pixels, layers "
        + ", ".join(f"{name} ({size})" for name, size in zip(analysed, sizes[n_in:])))

    lam = alpha if regularization == "l2" else 0.0
    fold_in_iter = 2 * n_concepts if fold_in_iter is None else fold_in_iter
    W, F, n_iter, objective = _coupled_mu(X, n_concepts, lam=lam, unit_norm=regularization == "unit_norm",
                                          mu=group_sparsity, groups=group_of_class[probe_y], max_iter=max_iter,
                                          inner_iter=inner_iter, tol=tol, check_every=check_every,
                                          random_state=random_state)
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
        "probe_codes_": nnls_encode(X.T, W.T, fold_in_iter, gram=W.T @ W + lam * torch.eye(n_concepts),
                                    solver=FOLD_IN_SOLVER),
        "probe_index_": probe_index.contiguous(),
        "probe_labels_": probe_y.contiguous(),
    }
    hyper = {"n_concepts": n_concepts, "n_probe": n, "layers": analysed, "regularization": regularization,
             "alpha": alpha, "group_sparsity": group_sparsity, "class_groups": groups, "max_iter": max_iter,
             "inner_iter": inner_iter, "tol": tol, "check_every": check_every, "fold_in_iter": fold_in_iter,
             "fold_in_solver": FOLD_IN_SOLVER,
             "n_top_classes": n_top_classes, "n_top_examples": n_top_examples, "n_eigenvalues": n_eigenvalues,
             "knn": knn, "random_state": random_state,
             "neurons": "channels, each example's activation pooled by the spatial mean; negatives clipped to 0",
             "view_normalization": "each view divided by its RMS example norm over the probe set"}
    concepts = _concept_table(F, probe_y, probe_index, parts.labels, groups, group_of_class, n_top_classes,
                              n_top_examples)
    components = []
    for d, entry in enumerate(concepts):
        entry["label"] = f"concept {d}: " + ", ".join(c["class"] for c in entry["top_classes"])
        components.append(Component(entry["id"], entry["label"], -1))
    exemplars = {}
    if len(parts.input_spec.shape) == 3:
        exemplars = {c.id: _exemplar(factors["pixel_factors_"][:, :, d], map_hw, data.x_train,
                                     concepts[d]["top_examples"]) for d, c in enumerate(components)}
    fitted = FittedMethod(NAME, factors, components, hyper, {}, exemplars)

    explainer = CoupledNMFExplainer(parts, fitted).to(parts.device)
    view_names = [*(["pixels"] if n_in == 1 else [f"pixels_{i}" for i in range(n_in)]), *analysed]
    fitted.fit_report = _round({
        "concepts": concepts,
        "layers": _layer_similarity(blocks[n_in:], analysed, n_eigenvalues),
        **_held_out(explainer, parts, data, X, W, F, sizes, view_names, knn),
        "n_iter": n_iter,
        "objective": objective,
        "n_probe": n,
        "n_test": len(data.x_test),
        "fit_device": device.type,
        "fit_seconds": time.perf_counter() - start,
    })
    log(f"coupled_nmf: fitted in {time.perf_counter() - start:.1f}s")
    return fitted


def _raw_views(parts: ModelParts, taps: GraphProgram, pixel_offset: torch.Tensor, x: torch.Tensor,
               batch_size: int = 256) -> list[torch.Tensor]:
    """The views of many inputs in original units: one (N, H·W) per input channel, then one
    (N, C_j) per analysed layer (the explained layer last)."""
    n_in = len(pixel_offset)
    chunks = []
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size].to(parts.device)
            pixels = (xb.reshape(len(xb), n_in, -1) - pixel_offset.to(xb.device)[:, None]).clamp_min(0)
            features, *layer_views = taps(xb)
            layer_views.append(_pool(features))
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
            W = W * XFt / (W @ FFt + lam * W + _EPS)
        if unit_norm:
            norms = torch.linalg.vector_norm(W, dim=0).clamp_min(_EPS)
            W, F = W / norms, F * norms[:, None]
        WtX, WtW = W.T @ X, W.T @ W
        for _ in range(inner_iter):
            denominator = WtW @ F + lam * F + _EPS
            if mu:
                denominator = denominator + mu * F / group_norms(F).clamp_min(_EPS)[:, groups]
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
    class_share = class_mean / class_mean.sum(1, keepdim=True).clamp_min(_EPS)
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
            "mass_share": float(total[d] / total.sum().clamp_min(_EPS)),
        })
    return table


def _layer_similarity(neuron_factors: list[torch.Tensor], names: list[str], n_eigenvalues: int) -> dict:
    """Per layer: cosine similarity of the concepts over its neurons (d, d), its eigenvalues
    (descending), the mean of the leading ``n_eigenvalues`` and the mean off-diagonal similarity."""
    out = {}
    for name, O in zip(names, neuron_factors):
        unit = O / torch.linalg.vector_norm(O, dim=0).clamp_min(_EPS)
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
    the test residual shares, and the paper's kNN analysis in concept space: how often the
    majority class of a test example's nearest probe examples is its label / the model's class."""
    def per_view(residual, X):
        errors = {}
        for name, r, x in zip(view_names, residual.split(sizes, 0), X.split(sizes, 0)):
            errors[name] = float(torch.linalg.vector_norm(r) / torch.linalg.vector_norm(x).clamp_min(_EPS))
        return errors

    codes, shares, x_test = [], [], []
    with torch.inference_mode():
        for i in range(0, len(data.x_test), 256):
            xb = data.x_test[i:i + 256].to(parts.device)
            features, *taps = explainer.tapped_upstream(xb)
            f, share, x = explainer.encode(xb, features, taps)
            codes.append(f.cpu())
            shares.append(share.cpu())
            x_test.append(x.cpu())
    codes, shares, x_test = torch.cat(codes), torch.cat(shares), torch.cat(x_test).T
    dictionary, gram = explainer.dictionary_.cpu(), explainer.gram_.cpu()
    violation = kkt_violation(codes, x_test.T @ dictionary.T, gram, simplex=False)
    ids, _ = explainer.nearest_probes(codes.to(parts.device), knn)
    # probe_index_ is sorted, so a neighbour's position among the probes is found by bisection.
    neighbour_labels = explainer.probe_labels_[torch.searchsorted(explainer.probe_index_, ids)].cpu()
    majority = torch.mode(neighbour_labels, dim=1).values
    predicted = parts.logits(data.x_test).argmax(1).cpu()
    return {
        "reconstruction_error": {"probe": per_view(X - W @ F, X),
                                 "test": per_view(x_test - dictionary.T @ codes.T, x_test)},
        # The share of held-out codes that are optimal (KKT) after the fold-in's fixed steps.
        "fold_in_converged": float((violation <= 1e-6).double().mean()),
        "residual_share_test": {"mean": float(shares.mean()), "median": float(shares.median()),
                                "max": float(shares.max())},
        "knn": {"k": knn, "majority_matches_label": float((majority == data.y_test).double().mean()),
                "majority_matches_model": float((majority == predicted).double().mean())},
    }


def _exemplar(pixel_factor: torch.Tensor, map_hw: tuple[int, int], x_train: torch.Tensor,
              top_examples: list[int]) -> bytes:
    """The concept's pixel mask (its P column drawn as an image), then its top probe examples."""
    mask = pixel_factor.reshape(len(pixel_factor), *map_hw)
    images = [mask, *(x_train[i] for i in top_examples[:EXEMPLAR_EXAMPLES])]
    return crops_png(images, [(0, 0, map_hw[0], map_hw[1])] * len(images))


def _round(value):
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_round(v) for v in value]
    return value


# --------------------------------------------------------------------------- online

class CoupledNMFExplainer(Explainer):
    """Fold-in of each input into the fitted concepts; contributions by intervention.

    Heatmaps are (B, d, H, W) at the input's resolution (its pixel grid), not on the
    explained layer's grid.
    """

    name = NAME
    additive = False
    residual_share_definition = (
        "||x - W f|| / ||x||: the relative error of the fold-in's reconstruction of the input's stacked views "
        "(pixels of each channel and the spatially pooled channels of each analysed layer, each view divided "
        "by its RMS norm over the probe set); in [0, 1] since f = 0 is feasible"
    )
    contribution_definition = (
        "logit_t(a) - logit_t(a_d) with a the explained layer's activation and a_d = a - max(a,0) * r, "
        "r[c] = min(1, O[c,d] f_d / mean_hw(max(a,0))[c]): the target logit's change when the concept's share "
        "of each channel is removed from the explained (deepest analysed) layer and the rest of the network is "
        "run; weight = f_d, the concept's fold-in coefficient; not additive"
    )

    def __init__(self, model: ModelParts, fitted: FittedMethod):
        super().__init__(model, fitted)
        f = fitted.factors
        hyper = fitted.hyperparameters
        self.layers = list(hyper["layers"])
        self.fold_in_iter = int(hyper["fold_in_iter"])
        self.fold_in_solver = hyper["fold_in_solver"]
        self.alpha = float(hyper["alpha"]) if hyper["regularization"] == "l2" else 0.0
        self.pixel_factors_ = f["pixel_factors_"].float()  # (C_in, H·W, d)
        self.neuron_factors_ = [f[f"neuron_factors_{j}_"].float() for j in range(len(self.layers))]  # (C_j, d)
        self.view_scales_ = f["view_scales_"].float()  # (C_in + J,)
        self.pixel_offset_ = f["pixel_offset_"].float()  # (C_in,)
        self.probe_codes_ = f["probe_codes_"].float()  # (N, d)
        self.probe_index_ = f["probe_index_"].long()  # (N,)
        self.probe_labels_ = f["probe_labels_"].long()  # (N,)
        n_in, self.map_hw = _pixel_layout(model.input_spec.shape)
        d = len(fitted.components)
        expected = (n_in, self.map_hw[0] * self.map_hw[1], d)
        if tuple(self.pixel_factors_.shape) != expected:
            raise ValueError(f"coupled_nmf pixel factors of shape {tuple(self.pixel_factors_.shape)} do not fit "
                             f"inputs of shape {model.input_spec.shape} with {d} concepts (expected {expected})")
        if self.layers[-1] != model.layer or self.neuron_factors_[-1].shape != (model.feature_shape[0], d):
            raise ValueError(f"coupled_nmf was fitted at layer {self.layers[-1]!r} with "
                             f"{self.neuron_factors_[-1].shape[0]} channels; the model explains {model.layer!r} "
                             f"with {model.feature_shape[0]}")
        if len(self.view_scales_) != n_in + len(self.layers):
            raise ValueError(f"coupled_nmf has {len(self.view_scales_)} view scales for "
                             f"{n_in + len(self.layers)} views")
        self._build()

    def _build(self) -> None:
        """Derived tensors and the taps module (built again after a move, on the model's modules)."""
        n_in = len(self.pixel_offset_)
        pixel_scales, layer_scales = self.view_scales_[:n_in], self.view_scales_[n_in:]
        # The fold-in dictionary in normalized units: rows are concepts, columns the stacked views.
        blocks = [*(self.pixel_factors_ / pixel_scales[:, None, None]).unbind(0),
                  *(o / s for o, s in zip(self.neuron_factors_, layer_scales))]
        self.dictionary_ = torch.cat(blocks, 0).T.contiguous()  # (d, T)
        d = self.dictionary_.shape[0]
        self.gram_ = self.dictionary_ @ self.dictionary_.T + self.alpha * torch.eye(d, device=self.dictionary_.device)
        self.pixel_masks_ = self.pixel_factors_.sum(0).T.contiguous()  # (d, H·W), original units
        # The torch forward pass runs the tapped upstream (batch.taps); otherwise the analysed
        # layers are computed again, by the upstream cut short after the deepest one.
        self.tapped_upstream = tap_module(self.model.upstream, self.layers[:-1])
        self._taps = tap_module(self.model.upstream, self.layers[:-1], keep_output=False)
        # Makes every removal a product with the head's weight (see removed_logits).
        self.head_weight_ = linear_head_weight(self.model)

    def to(self, device):
        for name in ("pixel_factors_", "view_scales_", "pixel_offset_", "probe_codes_", "probe_index_",
                     "probe_labels_"):
            setattr(self, name, getattr(self, name).to(device))
        self.neuron_factors_ = [o.to(device) for o in self.neuron_factors_]
        self._build()
        return self

    def encode(self, inputs: torch.Tensor, features: torch.Tensor, taps: tuple[torch.Tensor, ...] | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fold inputs into the concepts with the factors fixed (call without autograd,
        e.g. under ``torch.inference_mode()``, as :meth:`explain` is).

        Parameters
        ----------
        inputs : (B, *input_shape)
        features : (B, *feature_shape), the explained layer's activation for ``inputs``
        taps : the pooled analysed layers, ``tapped_upstream(inputs)[1:]``; None: computed here

        Returns
        -------
        f : (B, d) non-negative concept coefficients
        residual_share : (B,) ``||x - f D|| / ||x||`` in [0, 1]
        x : (B, T) the stacked views in normalized units
        """
        b, n_in = len(inputs), len(self.pixel_offset_)
        pixels = (inputs.float().reshape(b, n_in, -1) - self.pixel_offset_[:, None]).clamp_min(0)
        taps = self._taps(inputs) if taps is None else taps
        layer_views = [*(v.float().clamp_min(0) for v in taps), _pool(features.float().clamp_min(0))]
        scales = self.view_scales_
        x = torch.cat([(pixels / scales[:n_in, None]).flatten(1),
                       *(v / s for v, s in zip(layer_views, scales[n_in:]))], 1)
        f = nnls_encode(x, self.dictionary_, self.fold_in_iter, gram=self.gram_, solver=self.fold_in_solver)
        norm = torch.linalg.vector_norm(x, dim=1)
        error = torch.linalg.vector_norm(x - f @ self.dictionary_, dim=1)
        share = torch.where(norm > 0, error / norm.clamp_min(_EPS), torch.zeros_like(norm)).clamp(0, 1)
        return f, share, x

    def remove(self, features: torch.Tensor, f: torch.Tensor, sets: torch.Tensor) -> torch.Tensor:
        """The explained layer's activation with concept sets removed.

        Parameters
        ----------
        features : (B, C, *grid) the activation a
        f : (B, d) concept coefficients
        sets : (B, M, d) bool or 0/1, the concepts removed in each of M variants

        Returns
        -------
        (B, M, C, *grid): ``a - max(a, 0) * r`` with ``r[c] = min(1, Σ_S O[c, d] f_d / mean_hw(max(a, 0))[c])``
        """
        a = features.float()
        positive = a.clamp_min(0)
        ratio = self._removal_ratio(_pool(positive), f, sets)
        ratio = ratio.reshape(*ratio.shape, *([1] * (a.dim() - 2)))
        return a.unsqueeze(1) - positive.unsqueeze(1) * ratio

    def _removal_ratio(self, pooled: torch.Tensor, f: torch.Tensor, sets: torch.Tensor) -> torch.Tensor:
        """(B, M, C): the share ``r`` of each channel that each concept set removes (see :meth:`remove`)."""
        removed = torch.einsum("bmd,bd,cd->bmc", sets.float(), f, self.neuron_factors_[-1])
        return torch.where(pooled.unsqueeze(1) > 0, removed / pooled.unsqueeze(1).clamp_min(_EPS),
                           torch.zeros_like(removed)).clamp_max(1)

    def removed_logits(self, features: torch.Tensor, logits: torch.Tensor, f: torch.Tensor,
                       sets: torch.Tensor) -> torch.Tensor:
        """(B, M, K): the logits with each concept set removed, ``downstream(remove(...))``.

        For a non-negative layer and an average-pool + linear head, ``r`` is constant over the grid,
        so ``downstream(a - a r) = logits - (mean_hw(a) * r) @ weight.T``: no (B, M, C, *grid)
        activation is formed and the head is not run again.
        """
        if self.head_weight_ is None:
            removed = self.remove(features, f, sets)
            b, m = sets.shape[:2]
            return self.model.downstream(removed.reshape(b * m, *removed.shape[2:])).float().reshape(b, m, -1)
        pooled = _pool(features.float().clamp_min(0))
        lost = pooled.unsqueeze(1) * self._removal_ratio(pooled, f, sets)  # (B, M, C)
        return logits.float().unsqueeze(1) - lost @ self.head_weight_.T

    def nearest_probes(self, weight: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The paper's kNN analysis: the probe examples nearest in concept space (cosine).

        Parameters
        ----------
        weight : (B, d) concept coefficients f
        k : neighbours per example

        Returns
        -------
        ids : (B, k) int64 indices into the fit data's ``x_train``, nearest first
        similarity : (B, k) cosine similarity of the concept vectors
        (The neighbours' concept distributions are ``probe_codes_`` rows, normalized to sum 1.)
        """
        unit = weight / torch.linalg.vector_norm(weight, dim=1, keepdim=True).clamp_min(_EPS)
        probes = self.probe_codes_ / torch.linalg.vector_norm(self.probe_codes_, dim=1, keepdim=True).clamp_min(_EPS)
        similarity, where = (unit @ probes.T).topk(k, dim=1)
        return self.probe_index_[where], similarity

    def explain(self, batch: ExplainBatch) -> Explanation:
        f, residual_share, _ = self.encode(batch.inputs, batch.features, batch.taps)
        b, d = f.shape
        # One pass: each concept alone (contributions), then the requested sets.
        singles = torch.eye(d, device=f.device).expand(b, d, d)
        sets = torch.cat([singles, batch.suppress.to(f.dtype)], 1)  # (B, d + M, d)
        logits = self.removed_logits(batch.features, batch.logits, f, sets)
        t = batch.targets
        rows = torch.arange(b, device=t.device)
        target_logit = batch.logits.float()[rows, t]
        contribution = target_logit.unsqueeze(1) - logits[rows, :d, t]
        heatmaps = None
        if batch.heatmaps:
            heatmaps = (f.unsqueeze(2) * self.pixel_masks_).reshape(b, d, *self.map_hw)
        zeros = torch.zeros_like(target_logit)
        return Explanation(
            target_class=t,
            component_index=torch.arange(d, device=t.device).expand(b, d),
            weight=f,
            contribution=contribution,
            bias=zeros,
            residual_contribution=zeros,
            residual_share=residual_share,
            target_logit=target_logit,
            heatmaps=heatmaps,
            intervened_logits=logits[:, d:],
        )
