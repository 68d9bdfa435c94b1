"""Offline half of protonmf: the fit and its report (the online explainer is handlers/explainers/protonmf.py).

ProtoNMF: a black-box model turned into a prototype-based one by NMF. Per class: NMF of the clipped
features (paper eq. 1, its error eq. 3; the paper's multiplicative updates, eq. 2, are ``solver="mu"``;
:func:`_class_nmf`, or online, :func:`_class_online_nmf`), the head's row
by least squares on the prototypes (eq. 4) and the residual prototype (eq. 5), in :func:`fit`;
what the head reads of negative features (:func:`head_reads`); the report's Table 3 accuracies
(:func:`_table3`) and Fig. 5 sweep over the prototype count (:func:`_p_sweep`).
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch

from handlers.base import Component, FitData, FittedMethod
from handlers.exemplars import crops_png, grid_cell_box
from handlers.explainers.protonmf import NAME, ProtoNMFConfig, feature_grid, non_negative
from handlers.fitting.feature_cache import FeatureCache
from handlers.graph_program import non_negative_layers
from handlers.model import ModelParts, pooled_linear_head
from handlers.solvers.nmf import NMF, MiniBatchNMF

EXEMPLARS_PER_PROTOTYPE = 3
# The fit reads ``data.stream`` when there is one (handlers.fitting.streaming).
STREAMS = True
# Online NMF over the feature cache (handlers.solvers.nmf.MiniBatchNMF): about ONLINE_STEPS mini-batch
# updates of each class's dictionary, in whole passes and at least ONLINE_MIN_PASSES (50 passes over a
# class that is one batch, 3 over one of 20 batches or more), so the work per class is bounded by the
# batch size rather than the class size; and the forgetting of the previous pass's statistics (fast:
# a pass's first codes are stale by its end; see docs/methods.md).
ONLINE_STEPS = 50
ONLINE_MIN_PASSES = 3
ONLINE_FORGET_FACTOR = 0.1
# Copies of a mini-batch of rows the online fit holds at once (the rows, their clipped grid, the residual).
MINI_BATCH_COPIES = 3
# The Fig. 5 sweep fits each class on its first SWEEP_EXAMPLES training examples, SWEEP_MAX_ITER
# iterations per fit: a few seconds for the demo models next to the fit itself.
SWEEP_EXAMPLES = 20
SWEEP_MAX_ITER = 100


def fit(parts: ModelParts, data: FitData, config: ProtoNMFConfig = ProtoNMFConfig(), log=print) -> FittedMethod:
    """Fit ProtoNMF on the training data and report on the held-out data: ``data.x_train`` and
    ``data.x_test`` in memory (NMF per class), or, with ``data.stream``, the whole source's cached
    features (online NMF per class, each class a task of the stream's engine).

    Returns tensors ``prototypes_`` (K, p, D), ``coefficients_`` (K, p),
    ``residual_prototypes_`` (K, D) and ``bias_`` (K,); the hyperparameters record ``head_reads``.
    """
    head_weight, head_bias = pooled_linear_head(parts)
    config = dataclasses.replace(config, head_reads=head_reads(parts, head_weight, head_bias))
    num_classes, dim = head_weight.shape
    n_prototypes = config.n_prototypes
    if n_prototypes > dim:
        raise ValueError(f"n_prototypes={n_prototypes} exceeds the layer's {dim} channels")
    grid_shape = list(parts.feature_shape[1:])
    draws = bool(grid_shape) and len(parts.input_spec.shape) == 3
    for c in range(num_classes):
        count = int((data.y_train == c).sum()) if data.stream is None else data.stream.cache.count("train", c)
        if count == 0:
            raise ValueError(f"class {c} ({parts.labels[c]!r}) has no training examples")

    if data.stream is None:
        features = parts.features(data.x_train)
        _log_negatives(float((features < 0).float().mean()), parts, log)
        positions = feature_grid(non_negative(features))  # (N, D, P)
        per_class = [_class_nmf(positions, data.y_train, c, config, draws) for c in range(num_classes)]

        def training_input(c: int, i: int) -> torch.Tensor:  # class c's i-th training input
            return data.x_train[(data.y_train == c).nonzero().flatten()[i]]

        def sweep_positions(c: int) -> torch.Tensor:  # class c's first sweep examples, (n, D, P) clipped
            return positions[(data.y_train == c).nonzero().flatten()[:SWEEP_EXAMPLES]]

        test = [(parts.features(data.x_test), data.y_test)]
        extra = {"n_train": len(data.x_train), "n_test": len(data.x_test)}
    else:
        stream = data.stream
        rows = max(n_prototypes, stream.batch_bytes // (4 * dim * MINI_BATCH_COPIES))
        per_class = stream.engine.map(_class_online_nmf, [(stream.cache, c, config, rows, draws)
                                                          for c in range(num_classes)], desc="protonmf classes")
        _log_negatives(sum(r["negative"] for r in per_class) / sum(r["entries"] for r in per_class), parts, log)

        def training_input(c: int, i: int) -> torch.Tensor:
            return stream.train[int(stream.cache.indices("train", c)[i])][0]

        def sweep_positions(c: int) -> torch.Tensor:
            first = stream.cache.read("train", c, 0, min(SWEEP_EXAMPLES, stream.cache.count("train", c)))
            return feature_grid(non_negative(torch.from_numpy(first)))

        test = _cached_test(stream.cache, rows // max(1, math.prod(grid_shape)))
        extra = {"n_train": len(stream.cache.labels["train"]), "n_test": len(stream.cache.labels["test"]),
                 "streamed": True, "online_nmf": {"steps": ONLINE_STEPS, "min_passes": ONLINE_MIN_PASSES,
                                                  "forget_factor": ONLINE_FORGET_FACTOR, "batch_rows": rows,
                                                  "passes": {parts.labels[c]: r["n_iter"]
                                                             for c, r in enumerate(per_class)}}}

    prototypes = torch.zeros(num_classes, n_prototypes, dim)
    coefficients = torch.zeros(num_classes, n_prototypes)
    feature_error, head_error, exemplars = {}, {}, {}
    components: list[Component] = []
    for c, result in enumerate(per_class):
        basis = result["basis"]  # (p, D)
        v = head_weight[c].cpu()
        coef = _head_coefficients(basis, v)
        residual = v - coef @ basis  # eq. 5
        prototypes[c], coefficients[c] = basis, coef
        feature_error[parts.labels[c]] = float(result["relative_error"])
        head_error[parts.labels[c]] = float(residual.norm() / v.norm().clamp_min(1e-12))
        for i in range(n_prototypes):
            component = Component(id=f"c{c}.p{i}", label=f"{parts.labels[c]} prototype {i}", class_index=c)
            components.append(component)
            if draws:
                exemplars[component.id] = _exemplar([training_input(c, j) for j, _ in result["exemplars"][i]],
                                                    [where for _, where in result["exemplars"][i]], grid_shape,
                                                    parts.input_spec.shape[1:])
        log(f"protonmf: class {parts.labels[c]!r}: {result['n_examples']} images, relative error "
            f"{result['relative_error']:.4f} after {result['n_iter']} iterations, head error "
            f"{head_error[parts.labels[c]]:.4f} ({result['seconds']:.1f}s)")

    residual_prototypes = head_weight.cpu() - torch.einsum("kp,kpd->kd", coefficients, prototypes)
    factors = {
        "prototypes_": prototypes.contiguous(),
        "coefficients_": coefficients.contiguous(),
        "residual_prototypes_": residual_prototypes.contiguous(),
        "bias_": head_bias.cpu().contiguous(),
    }
    report = {
        **_table3(parts, test, factors, config.head_reads),
        "feature_reconstruction_error": feature_error,
        "head_reconstruction_error": head_error,
        "head_reads": config.head_reads,
        "p_sweep": _p_sweep([sweep_positions(c) for c in range(num_classes)], head_weight.cpu(), config),
        **extra,
    }
    return FittedMethod(NAME, factors, components, dataclasses.asdict(config), report, exemplars)


def _head_coefficients(basis: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """C^c = argmin ‖V^c − C B^c‖² (eq. 4), (p,); lstsq handles a rank-deficient basis (p, D)."""
    return torch.linalg.lstsq(basis.T.double(), v.double().unsqueeze(1)).solution.squeeze(1).float()


def head_reads(parts: ModelParts, head_weight: torch.Tensor, head_bias: torch.Tensor, atol: float = 1e-4) -> str:
    """What the head does with the layer's negative features: "signed" when it is linear on them
    (they reach it), "clipped" when it reads max(F, 0) (a ReLU starts it, or the layer is a ReLU's
    output and has none). Probed with seeded signed feature maps; a head that does neither is refused.

    head_weight : (K, D), head_bias : (K,) from :func:`handlers.model.pooled_linear_head`
    """
    if parts.layer in non_negative_layers(parts.upstream):
        return "clipped"
    d, *grid = parts.feature_shape
    probe = torch.randn(8, d, *grid, generator=torch.Generator().manual_seed(0)).to(parts.device)
    with torch.inference_mode():
        logits = parts.downstream(probe)
    flat = probe.flatten(2) if grid else probe.unsqueeze(2)
    scale = atol * max(1.0, logits.abs().max().item())
    for reads, seen in (("signed", flat), ("clipped", flat.clamp_min(0))):
        if (seen.mean(2) @ head_weight.T + head_bias - logits).abs().max().item() <= scale:
            return reads
    raise ValueError(f"protonmf: the head after {parts.layer!r} is linear on non-negative features but reads "
                     "negative ones neither as they are nor clipped at zero, so no decomposition of its logits "
                     "is exact: explain a layer after a ReLU, or one that feeds the pooled linear head directly")


def _p_sweep(per_class: list[torch.Tensor], head_weight: torch.Tensor, config: ProtoNMFConfig) -> list[dict]:
    """The paper's Fig. 5: per prototype count p, the feature and head reconstruction errors, each the
    mean over classes of ‖A^c − E^c B^c‖_F / ‖A^c‖_F (eq. 3, relative) and ‖R^c‖ / ‖V^c‖ (eq. 5).

    per_class : K tensors (n_c, D, P), a subset of each class's clipped features; head_weight : (K, D)
    """
    # Small products: one intra-op thread (63 s of CPU instead of 1.6 s for MNIST's sweep on a busy
    # 2-core machine, the threads' synchronisation costing more than it saves).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _sweep_rows(per_class, head_weight, config)
    finally:
        torch.set_num_threads(threads)


def _sweep_rows(per_class: list[torch.Tensor], head_weight: torch.Tensor, config: ProtoNMFConfig) -> list[dict]:
    dim = head_weight.shape[1]
    rows = []
    for p in sorted({p for p in config.p_sweep if p <= dim}):
        feature_errors, head_errors = [], []
        for c, positions in enumerate(per_class):
            matrix = positions.transpose(1, 2).reshape(-1, dim).float()
            nmf = NMF(p, init=config.init, solver=config.solver, max_iter=SWEEP_MAX_ITER, tol=config.tol,
                      random_state=config.random_state)
            nmf.fit(matrix)
            v = head_weight[c]
            residual = v - _head_coefficients(nmf.components_.cpu(), v) @ nmf.components_.cpu()
            feature_errors.append(float(nmf.relative_error_))
            head_errors.append(float(residual.norm() / v.norm().clamp_min(1e-12)))
        rows.append({"p": p, "feature_reconstruction_error": round(sum(feature_errors) / len(feature_errors), 6),
                     "head_reconstruction_error": round(sum(head_errors) / len(head_errors), 6)})
    return rows



def _log_negatives(fraction: float, parts: ModelParts, log) -> None:
    if fraction > 0:
        log(f"protonmf: {fraction:.1%} of the features at {parts.layer!r} are negative: NMF sees them as zero, "
            "and what reaches the head of them goes to the residual prototype")


def _class_nmf(positions: torch.Tensor, y: torch.Tensor, c: int, config: ProtoNMFConfig, draws: bool) -> dict:
    """Class c's NMF on its rows in memory: the basis (p, D), its error and exemplar choices."""
    start = time.perf_counter()
    members = (y == c).nonzero().flatten()
    dim = positions.shape[1]
    matrix = positions[members].transpose(1, 2).reshape(-1, dim).float()  # (n_c·P, D)
    nmf = NMF(config.n_prototypes, init=config.init, solver=config.solver, max_iter=config.max_iter, tol=config.tol,
              random_state=config.random_state)
    encoding = nmf.fit_transform(matrix)  # (n_c·P, p)
    strength, where = encoding.cpu().reshape(len(members), -1, config.n_prototypes).max(dim=1)  # (n_c, p)
    return {"basis": nmf.components_.cpu(), "relative_error": nmf.relative_error_, "n_iter": nmf.n_iter_,
            "n_examples": len(members), "seconds": time.perf_counter() - start,
            "exemplars": _top_regions(strength, where, torch.arange(len(members))) if draws else None}


class _ClassRows:
    """Class c's clipped training features as NMF rows (n_c·P, D), read from the cache on demand."""

    def __init__(self, cache: FeatureCache, c: int):
        self.cache, self.c = cache, c
        self.positions = math.prod(cache.feature_shape[1:])
        self.dim = cache.feature_shape[0]

    def __len__(self) -> int:
        return self.cache.count("train", self.c) * self.positions

    def __getitem__(self, rows: slice) -> torch.Tensor:
        first, last = rows.start // self.positions, -(-min(rows.stop, len(self)) // self.positions)
        features = torch.from_numpy(self.cache.read("train", self.c, first, last))
        matrix = feature_grid(non_negative(features)).transpose(1, 2).reshape(-1, self.dim)
        offset = first * self.positions
        return matrix[rows.start - offset:min(rows.stop, len(self)) - offset]


def _class_online_nmf(task: tuple[FeatureCache, int, ProtoNMFConfig, int, bool]) -> dict:
    """Class c's online NMF over its cached features (an engine task): the basis (p, D), its error,
    exemplar choices and the count of negative features."""
    cache, c, config, rows, draws = task
    # Thousands of small products: one intra-op thread, as thread synchronisation would cost more
    # than it saves (15x on a busy 2-core machine); on a cluster a task has one core anyway.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _online_nmf(cache, c, config, rows, draws)
    finally:
        torch.set_num_threads(threads)


def _online_nmf(cache: FeatureCache, c: int, config: ProtoNMFConfig, rows: int, draws: bool) -> dict:
    start = time.perf_counter()
    matrix = _ClassRows(cache, c)
    images = max(1, rows // matrix.positions)
    passes = max(ONLINE_MIN_PASSES, math.ceil(ONLINE_STEPS / math.ceil(cache.count("train", c) / images)))
    nmf = MiniBatchNMF(config.n_prototypes, init=config.init, batch_size=images * matrix.positions,
                       max_iter=passes, forget_factor=ONLINE_FORGET_FACTOR, random_state=config.random_state)
    nmf.fit(matrix)
    strengths, wheres, negative = [], [], 0
    for _, features in cache.batches("train", c, images):
        negative += int((features < 0).sum())
        batch = torch.from_numpy(features)
        codes = nmf.transform(feature_grid(non_negative(batch)).transpose(1, 2).reshape(-1, matrix.dim))
        strength, where = codes.reshape(len(batch), -1, config.n_prototypes).max(dim=1)
        strengths.append(strength)
        wheres.append(where)
    n = cache.count("train", c)
    return {"basis": nmf.components_.cpu(), "relative_error": nmf.relative_error_, "n_iter": nmf.n_iter_,
            "n_examples": n, "seconds": time.perf_counter() - start, "negative": negative,
            "entries": n * math.prod(cache.feature_shape),
            "exemplars": _top_regions(torch.cat(strengths), torch.cat(wheres), torch.arange(n)) if draws else None}


def _top_regions(strength: torch.Tensor, where: torch.Tensor, examples: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per prototype, the (example, grid position) where it is most present, one per example, strongest first.

    strength, where : (n, p) the largest code of each example and its position; examples : (n,)
    """
    order = strength.argsort(dim=0, descending=True)[:EXEMPLARS_PER_PROTOTYPE]  # (e, p)
    return [[(int(examples[j]), int(where[j, i])) for j in order[:, i].tolist()] for i in range(strength.shape[1])]


def _exemplar(images: list[torch.Tensor], positions: list[int], grid_shape: list[int], input_hw: list[int]) -> bytes:
    """The training regions where the prototype is most present, one per image."""
    boxes = [grid_cell_box(tuple(input_hw), tuple(grid_shape), *divmod(where, grid_shape[1])) for where in positions]
    return crops_png(images, boxes)


def _cached_test(cache: FeatureCache, images: int):
    """The held-out split's cached features and labels, batch by batch."""
    for c in range(cache.num_classes):
        for _, features in cache.batches("test", c, max(1, images)):
            yield torch.from_numpy(features), torch.full((len(features),), c, dtype=torch.int64)


def _table3(parts: ModelParts, test, factors: dict[str, torch.Tensor], reads: str) -> dict:
    """Held-out accuracies of the paper's Table 3: NMF prototypes only, residual only, both; the
    terms as served (handlers/explainers/protonmf.py), so that both together are the black box.

    ``test`` gives batches ``(features, y)``: the layer's raw features and the labels; ``reads``:
    what the head reads of negative features.
    """
    nmf_head = torch.einsum("kp,kpd->kd", factors["coefficients_"], factors["prototypes_"])  # (K, D)
    correct = dict.fromkeys(["acc_black_box", "acc_nmf_only", "acc_residual_only", "acc_nmf_plus_residual"], 0)
    total = 0
    for features, y in test:
        with torch.inference_mode():
            logits = parts.downstream(features.to(parts.device)).cpu()
        grid = feature_grid(features).cpu()
        pooled = non_negative(grid).mean(2)  # (M, D)
        pooled_read = grid.mean(2) if reads == "signed" else pooled
        nmf_only = pooled @ nmf_head.T
        residual_only = pooled_read @ factors["residual_prototypes_"].T - (pooled - pooled_read) @ nmf_head.T
        for key, scores in (("acc_black_box", logits), ("acc_nmf_only", nmf_only + factors["bias_"]),
                            ("acc_residual_only", residual_only + factors["bias_"]),
                            ("acc_nmf_plus_residual", nmf_only + residual_only + factors["bias_"])):
            correct[key] += int((scores.argmax(1) == y).sum())
        total += len(y)
    return {key: round(value / total, 6) if total else float("nan") for key, value in correct.items()}
