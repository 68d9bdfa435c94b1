"""ProtoNMF: a black-box model turned into a prototype-based one by NMF.

Seed paper: "ProtoNMF: Turning a Black Box into a Prototype Based Interpretable Model via
Non-negative Matrix Factorization".

Offline, per class c: the class's non-negative features at the layer, as a matrix
A^c (n_c·H·W × D), are factorized A^c ≈ E^c B^c with p prototypes (rows of B^c). The
head's row V^c is reconstructed from them by least squares, V^c ≈ C^c B^c, and the
residual prototype R^c = V^c − C^c B^c keeps the rest, so that the augmented prototypes
[B^c; R^c] with coefficients [C^c, 1] reproduce the head exactly (paper eq. 8).

Per request, with F the clipped features (D, H, W) and pooling by the spatial mean:

    logit_c = Σ_i C^c_i · mean_hw(F·b_i) + mean_hw(F·R^c) + bias_c      (exact)

so a prototype's weight is its activation mean_hw(F·b_i), its contribution C^c_i times
that, the residual contribution mean_hw(F·R^c), and an intervention subtracts the
suppressed contributions from the logits. Heatmaps are the spatial densities of the
contributions, C^c_i·(F_hw·b_i)/(H·W), which sum to the contributions.
"""

from __future__ import annotations

import time

import torch

from handlers.base import Component, ExplainBatch, Explainer, Explanation, FitData, FittedMethod
from handlers.exemplars import crops_png, grid_cell_box
from handlers.model import ModelParts, pooled_linear_head
from handlers.nmf import NMF

NAME = "protonmf"
EXEMPLARS_PER_PROTOTYPE = 3


def clip_features(features: torch.Tensor) -> torch.Tensor:
    """The paper's rule, offline and online alike: negative features count as zero."""
    return features.clamp_min(0)


def _grid(features: torch.Tensor) -> torch.Tensor:
    """(B, D, *grid) -> (B, D, P) with P positions (1 for a fully connected layer)."""
    return features.flatten(2) if features.dim() > 2 else features.unsqueeze(2)


def fit(parts: ModelParts, data: FitData, *, n_prototypes: int = 3, solver: str = "rhals",
        init: str = "nndsvda", max_iter: int = 500, tol: float = 1e-4, random_state: int = 0,
        log=print) -> FittedMethod:
    """Fit ProtoNMF on ``data.x_train`` and report on ``data.x_test``.

    Returns tensors ``prototypes_`` (K, p, D), ``coefficients_`` (K, p),
    ``residual_prototypes_`` (K, D) and ``bias_`` (K,).
    """
    head_weight, head_bias = pooled_linear_head(parts)
    num_classes, dim = head_weight.shape
    if n_prototypes > dim:
        raise ValueError(f"n_prototypes={n_prototypes} exceeds the layer's {dim} channels")
    features = parts.features(data.x_train)
    if (features < 0).any():
        log(f"protonmf: {(features < 0).float().mean().item():.1%} of the features at {parts.layer!r} are negative "
            "and are clipped to zero (offline and online alike)")
    features = clip_features(features)
    grid_shape = list(features.shape[2:])
    positions = _grid(features)  # (N, D, P)

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
        nmf = NMF(n_prototypes, init=init, solver=solver, max_iter=max_iter, tol=tol, random_state=random_state)
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
    hyper = {"n_prototypes": n_prototypes, "solver": solver, "init": init, "max_iter": max_iter,
             "tol": tol, "random_state": random_state, "feature_clipping": "negative features set to zero"}
    return FittedMethod(NAME, factors, components, hyper, report, exemplars)


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
    features = clip_features(parts.features(data.x_test))
    logits = parts.logits(data.x_test)
    pooled = _grid(features).mean(2).cpu()  # (M, D)
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


class ProtoNMFExplainer(Explainer):
    name = NAME
    additive = True
    residual_share_definition = (
        "|residual_contribution| / (sum_i |contribution_i| + |residual_contribution|): the share of the target "
        "logit's magnitude (bias excluded) carried by the residual prototype R^c rather than the NMF prototypes"
    )
    contribution_definition = (
        "C^c_i * mean_hw(F . b_i): the prototype's least-squares head coefficient times its activation "
        "(weight = mean_hw(F . b_i), F the clipped layer features); exact, with the residual prototype R^c"
    )

    def __init__(self, model: ModelParts, fitted: FittedMethod):
        super().__init__(model, fitted)
        f = fitted.factors
        self.prototypes_ = f["prototypes_"].float()  # (K, p, D)
        self.coefficients_ = f["coefficients_"].float()  # (K, p)
        self.residual_prototypes_ = f["residual_prototypes_"].float()  # (K, D)
        self.bias_ = f["bias_"].float()  # (K,)
        num_classes, n_prototypes, dim = self.prototypes_.shape
        if num_classes != model.num_classes or dim != model.feature_shape[0]:
            raise ValueError(f"protonmf factors of shape {tuple(self.prototypes_.shape)} do not fit a model with "
                             f"{model.num_classes} classes and {model.feature_shape[0]} channels")
        self.n_prototypes = n_prototypes
        self._flat_prototypes = self.prototypes_.reshape(-1, dim)  # (K·p, D)
        self._flat_coefficients = self.coefficients_.reshape(-1)  # (K·p,)

    def to(self, device):
        for name in ("prototypes_", "coefficients_", "residual_prototypes_", "bias_", "_flat_prototypes",
                     "_flat_coefficients"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def explain(self, batch: ExplainBatch) -> Explanation:
        grid = _grid(clip_features(batch.features)).float()  # (B, D, P)
        pooled = grid.mean(2)  # (B, D)
        t = batch.targets
        b, p, num_classes = len(pooled), self.n_prototypes, self.bias_.shape[0]
        prototypes, coefficients = self.prototypes_[t], self.coefficients_[t]  # (B, p, D), (B, p)
        activation = torch.bmm(prototypes, pooled.unsqueeze(2)).squeeze(2)  # (B, p)
        contribution = activation * coefficients
        residual = (pooled * self.residual_prototypes_[t]).sum(1)  # (B,)
        magnitude = contribution.abs().sum(1) + residual.abs()
        residual_share = torch.where(magnitude > 0, residual.abs() / magnitude.clamp_min(1e-30),
                                     torch.zeros_like(magnitude))
        heatmaps = None
        if batch.heatmaps:
            # (B, p, D) x (B, D, P) -> (B, p, P): the contributions' spatial densities.
            density = torch.bmm(prototypes, grid) * coefficients.unsqueeze(2) / grid.shape[2]
            heatmaps = density.reshape(b, p, *(batch.features.shape[2:] or (1, 1)))
        # Suppressing prototypes removes their contributions from their own class's logit. Only the
        # prototypes some intervention names are computed: all K·p of them can be thousands.
        suppressed = batch.suppress.any(1).any(0).nonzero().squeeze(1)  # (U,)
        removed_each = (pooled @ self._flat_prototypes[suppressed].T) * self._flat_coefficients[suppressed]  # (B, U)
        mask = batch.suppress[:, :, suppressed].float()  # (B, M, U)
        removed = torch.zeros(b, mask.shape[1], num_classes, device=pooled.device)
        removed.index_add_(2, suppressed // p, mask * removed_each.unsqueeze(1))
        intervened = batch.logits.float().unsqueeze(1) - removed
        rows = torch.arange(b, device=pooled.device)
        return Explanation(
            target_class=t,
            component_index=t.unsqueeze(1) * p + torch.arange(p, device=t.device),
            weight=activation,
            contribution=contribution,
            bias=self.bias_[t],
            residual_contribution=residual,
            residual_share=residual_share,
            target_logit=batch.logits.float()[rows, t],
            heatmaps=heatmaps,
            intervened_logits=intervened,
        )
