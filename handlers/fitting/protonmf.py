"""Offline half of protonmf: the fit and its report (the online explainer is handlers/explainers/protonmf.py).

ProtoNMF: a black-box model turned into a prototype-based one by NMF.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from handlers.base import Component, FitData, FittedMethod
from handlers.exemplars import crops_png, grid_cell_box
from handlers.explainers.protonmf import NAME, ProtoNMFConfig, non_negative, feature_grid
from handlers.model import ModelParts, pooled_linear_head
from handlers.solvers.nmf import NMF

EXEMPLARS_PER_PROTOTYPE = 3


def fit(parts: ModelParts, data: FitData, config: ProtoNMFConfig = ProtoNMFConfig(), log=print) -> FittedMethod:
    """Fit ProtoNMF on ``data.x_train`` and report on ``data.x_test``.

    Returns tensors ``prototypes_`` (K, p, D), ``coefficients_`` (K, p),
    ``residual_prototypes_`` (K, D) and ``bias_`` (K,).
    """
    head_weight, head_bias = pooled_linear_head(parts)
    num_classes, dim = head_weight.shape
    n_prototypes = config.n_prototypes
    if n_prototypes > dim:
        raise ValueError(f"n_prototypes={n_prototypes} exceeds the layer's {dim} channels")
    features = parts.features(data.x_train)
    if (features < 0).any():
        log(f"protonmf: {(features < 0).float().mean().item():.1%} of the features at {parts.layer!r} are negative "
            "and are clipped to zero (offline and online alike)")
    features = non_negative(features)
    grid_shape = list(features.shape[2:])
    positions = feature_grid(features)  # (N, D, P)

    prototypes = torch.zeros(num_classes, n_prototypes, dim)
    coefficients = torch.zeros(num_classes, n_prototypes)
    feature_error, head_error, exemplars = {}, {}, {}
    components: list[Component] = []
    for c in range(num_classes):
        start = time.perf_counter()
        members = (data.y_train == c).nonzero().flatten()
        if len(members) == 0:
            raise ValueError(f"class {c} ({parts.labels[c]!r}) has no training examples")
        matrix = positions[members].transpose(1, 2).reshape(-1, dim).float()  # (n_c·P, D)
        nmf = NMF(n_prototypes, init=config.init, solver=config.solver, max_iter=config.max_iter, tol=config.tol,
                  random_state=config.random_state)
        encoding = nmf.fit_transform(matrix)  # (n_c·P, p)
        basis = nmf.components_.cpu()  # (p, D)
        v = head_weight[c].cpu()
        # Least squares V^c ≈ C^c B^c; lstsq handles a rank-deficient basis.
        coef = torch.linalg.lstsq(basis.T.double(), v.double().unsqueeze(1)).solution.squeeze(1).float()
        residual = v - coef @ basis
        prototypes[c], coefficients[c] = basis, coef
        feature_error[parts.labels[c]] = float(nmf.relative_error_)
        head_error[parts.labels[c]] = float(residual.norm() / v.norm().clamp_min(1e-12))
        for i in range(n_prototypes):
            component = Component(id=f"c{c}.p{i}", label=f"{parts.labels[c]} prototype {i}", class_index=c)
            components.append(component)
            if grid_shape and len(parts.input_spec.shape) == 3:
                exemplars[component.id] = _exemplar(data.x_train, members, encoding[:, i].cpu(), grid_shape,
                                                    parts.input_spec.shape[1:])
        log(f"protonmf: class {parts.labels[c]!r}: {len(members)} images, relative error "
            f"{nmf.relative_error_:.4f} after {nmf.n_iter_} iterations, head error {head_error[parts.labels[c]]:.4f} "
            f"({time.perf_counter() - start:.1f}s)")

    residual_prototypes = head_weight.cpu() - torch.einsum("kp,kpd->kd", coefficients, prototypes)
    factors = {
        "prototypes_": prototypes.contiguous(),
        "coefficients_": coefficients.contiguous(),
        "residual_prototypes_": residual_prototypes.contiguous(),
        "bias_": head_bias.cpu().contiguous(),
    }
    report = {
        **_table3(parts, data, factors),
        "feature_reconstruction_error": feature_error,
        "head_reconstruction_error": head_error,
        "n_train": len(data.x_train),
        "n_test": len(data.x_test),
    }
    return FittedMethod(NAME, factors, components, dataclasses.asdict(config), report, exemplars)


def _exemplar(x_train: torch.Tensor, members: torch.Tensor, encoding: torch.Tensor, grid_shape: list[int],
              input_hw: list[int]) -> bytes:
    """The training regions where the prototype is most present, one per image."""
    per_image = encoding.reshape(len(members), -1)  # (n_c, P)
    strength, where = per_image.max(dim=1)
    order = strength.argsort(descending=True)[:EXEMPLARS_PER_PROTOTYPE]
    images, boxes = [], []
    for j in order.tolist():
        row, col = divmod(int(where[j]), grid_shape[1])
        images.append(x_train[members[j]])
        boxes.append(grid_cell_box(tuple(input_hw), tuple(grid_shape), row, col))
    return crops_png(images, boxes)


def _table3(parts: ModelParts, data: FitData, factors: dict[str, torch.Tensor]) -> dict:
    """Held-out accuracies of the paper's Table 3: NMF prototypes only, residual only, both."""
    features = non_negative(parts.features(data.x_test))
    logits = parts.logits(data.x_test)
    pooled = feature_grid(features).mean(2).cpu()  # (M, D)
    nmf_head = torch.einsum("kp,kpd->kd", factors["coefficients_"], factors["prototypes_"])
    bias = factors["bias_"]
    y = data.y_test

    def acc(scores: torch.Tensor) -> float:
        return round(float((scores.argmax(1).cpu() == y).double().mean()), 6)

    return {
        "acc_black_box": acc(logits),
        "acc_nmf_only": acc(pooled @ nmf_head.T + bias),
        "acc_residual_only": acc(pooled @ factors["residual_prototypes_"].T + bias),
        "acc_nmf_plus_residual": acc(pooled @ (nmf_head + factors["residual_prototypes_"]).T + bias),
    }

