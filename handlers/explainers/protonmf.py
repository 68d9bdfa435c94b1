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

from dataclasses import dataclass

import torch

from handlers.base import AdditiveExplainer, Decomposition, ExplainBatch, FittedMethod, MethodConfig
from handlers.model import ModelParts
from handlers.solvers.nmf import INITS, SOLVERS

NAME = "protonmf"


@dataclass(frozen=True)
class ProtoNMFConfig(MethodConfig):
    """ProtoNMF's hyperparameters: p prototypes per class and the per-class NMF's settings
    (:class:`handlers.solvers.nmf.NMF`)."""

    method = NAME
    n_prototypes: int = 3
    solver: str = "rhals"
    init: str = "nndsvda"
    max_iter: int = 500
    tol: float = 1e-4
    random_state: int = 0

    def __post_init__(self):
        super().__post_init__()
        self.require_at_least(1, "n_prototypes", "max_iter")
        self.require_at_least(0, "tol")
        self.require(self.solver in SOLVERS, "solver", f"one of {', '.join(SOLVERS)}")
        self.require(self.init in INITS, "init", f"one of {', '.join(INITS)}")


def non_negative(features: torch.Tensor) -> torch.Tensor:
    """The paper's rule, offline and online alike: negative features count as zero."""
    return features.clamp_min(0)


def feature_grid(features: torch.Tensor) -> torch.Tensor:
    """(B, D, *grid) -> (B, D, P) with P positions (1 for a fully connected layer)."""
    return features.flatten(2) if features.dim() > 2 else features.unsqueeze(2)


class ProtoNMFExplainer(AdditiveExplainer):
    name = NAME
    config_class = ProtoNMFConfig
    residual_share_definition = (
        "|residual_contribution| / (sum_i |contribution_i| + |residual_contribution|): the share of the target "
        "logit's magnitude (bias excluded) carried by the residual prototype R^c rather than the NMF prototypes"
    )
    contribution_definition = (
        "C^c_i * mean_hw(F . b_i): the prototype's least-squares head coefficient times its activation "
        "(weight = mean_hw(F . b_i), F the clipped layer features); exact, with the residual prototype R^c"
    )
    factors = {
        "prototypes_": (torch.float32, ("K", "p", "D")),  # B^c
        "coefficients_": (torch.float32, ("K", "p")),  # C^c
        "residual_prototypes_": (torch.float32, ("K", "D")),  # R^c
        "bias_": (torch.float32, ("K",)),
    }

    def __init__(self, model: ModelParts, fitted: FittedMethod):
        super().__init__(model, fitted)
        self._flat_prototypes = self.prototypes_.flatten(0, 1)  # (K·p, D), row c·p + i: component c.p{i}
        self._flat_coefficients = self.coefficients_.flatten()  # (K·p,)

    def decompose(self, batch: ExplainBatch, suppressed: torch.Tensor) -> Decomposition:
        grid = feature_grid(non_negative(batch.features)).float()  # (B, D, P)
        pooled = grid.mean(2)  # (B, D)
        t = batch.targets
        b, p = len(pooled), self.prototypes_.shape[1]
        prototypes, coefficients = self.prototypes_[t], self.coefficients_[t]  # (B, p, D), (B, p)
        activation = torch.bmm(prototypes, pooled.unsqueeze(2)).squeeze(2)  # (B, p)
        suppressed_contribution = (pooled @ self._flat_prototypes[suppressed].T) * self._flat_coefficients[suppressed]
        heatmaps = None
        if batch.heatmaps:
            # (B, p, D) x (B, D, P) -> (B, p, P): the contributions' spatial densities.
            density = torch.bmm(prototypes, grid) * coefficients.unsqueeze(2) / grid.shape[2]
            heatmaps = density.reshape(b, p, *(batch.features.shape[2:] or (1, 1)))
        return Decomposition(
            component_index=t.unsqueeze(1) * p + torch.arange(p, device=t.device),
            weight=activation,
            contribution=activation * coefficients,
            bias=self.bias_[t],
            residual=(pooled * self.residual_prototypes_[t]).sum(1),
            heatmaps=heatmaps,
            suppressed_contribution=suppressed_contribution,
        )
