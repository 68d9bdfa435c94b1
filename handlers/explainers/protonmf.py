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

import torch

from handlers.base import ExplainBatch, Explainer, Explanation, FittedMethod
from handlers.model import ModelParts

NAME = "protonmf"


def clip_features(features: torch.Tensor) -> torch.Tensor:
    """The paper's rule, offline and online alike: negative features count as zero."""
    return features.clamp_min(0)


def feature_grid(features: torch.Tensor) -> torch.Tensor:
    """(B, D, *grid) -> (B, D, P) with P positions (1 for a fully connected layer)."""
    return features.flatten(2) if features.dim() > 2 else features.unsqueeze(2)


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
        grid = feature_grid(clip_features(batch.features)).float()  # (B, D, P)
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

