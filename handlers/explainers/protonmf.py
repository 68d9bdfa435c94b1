"""ProtoNMF: a black-box model turned into a prototype-based one by NMF.

Seed paper: "ProtoNMF: Turning a Black Box into a Prototype Based Interpretable Model via
Non-negative Matrix Factorization".

Offline, per class c: the class's features at the layer, clipped at zero (the paper's rule for
signed features), as a matrix A^c (n_c·H·W × D), are factorized A^c ≈ E^c B^c with p prototypes
(rows of B^c; paper eq. 1). The head's row V^c is reconstructed from them by least squares,
V^c ≈ C^c B^c (eq. 4), and the residual prototype R^c = V^c − C^c B^c (eq. 5) keeps the rest,
so that V^c = C^c B^c + R^c exactly (eq. 7).

Per request, with F the layer's features (D, H, W), F⁺ = max(F, 0) and pooling by the spatial
mean, a prototype's weight is its activation mean_hw(F⁺·b_i) and its contribution C^c_i times
that. The head reads either the clipped features (a ReLU starts it, or the layer has none) or
the signed ones (``head_reads``); with G what it reads,

    logit_c = Σ_i C^c_i · mean_hw(F⁺·b_i) + [mean_hw(G·R^c) − C^c B^c · mean_hw(F⁺ − G)] + bias_c

exactly: the bracket is the residual contribution, the residual prototype on what the head
reads, less what the prototypes counted of the negative features they cannot represent (zero
when G = F⁺). An intervention subtracts the suppressed contributions from the logits.

Heatmaps, on the feature grid, of two kinds:

* contribution densities C^c_i·(F⁺_hw·b_i)/(H·W), which sum to the contributions;
* presence maps, the paper's: per position, the non-negative codes E' of F⁺_hw on the augmented
  prototypes b_i + R^c/Σ_j a_j (eqs. 8 and 9), one map per prototype; and the residual
  prototype's map (eq. 6), h_hw = (G_hw − E_hw B^c)·R^c / ‖R^c‖², E_hw the non-negative codes of
  F⁺_hw on B^c (eq. 1 with B^c fixed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from handlers.base import (
    MAX_SIZE,
    MAX_STEPS,
    AdditiveExplainer,
    Decomposition,
    ExplainBatch,
    FittedMethod,
    MethodConfig,
)
from handlers.model import ModelParts
from handlers.solvers.nmf import INITS, SOLVERS
from handlers.solvers.small_nnls import MAX_UNKNOWNS, enumerated_nnls

NAME = "protonmf"
# What the head can read of negative features (ProtoNMFConfig.head_reads).
HEAD_READS = ("clipped", "signed")


@dataclass(frozen=True)
class ProtoNMFConfig(MethodConfig):
    """ProtoNMF's hyperparameters: p prototypes per class and the per-class NMF's settings
    (:class:`handlers.solvers.nmf.NMF`).

    ``head_reads`` is found by the fit, which replaces what is given: "signed" when the layer's
    negative features reach a linear head, "clipped" when the head starts with a ReLU (or the layer
    has none; then both agree). Archives written before it read as "clipped", what they computed.
    ``p_sweep`` are the prototype counts of the fit report's Fig. 5 sweep (none: no sweep).
    """

    method = NAME
    n_prototypes: int = 3
    solver: str = "rhals"
    init: str = "nndsvda"
    max_iter: int = 500
    tol: float = 1e-4
    random_state: int = 0
    head_reads: str = "clipped"
    p_sweep: tuple[int, ...] = (1, 3, 5, 10)

    def __post_init__(self):
        super().__post_init__()
        self.require_at_least(1, "n_prototypes", "max_iter")
        self.require_at_most(MAX_STEPS, "max_iter")
        self.require_at_most(MAX_SIZE, "n_prototypes", "p_sweep")
        self.require_at_least(0, "tol")
        self.require(self.head_reads in HEAD_READS, "head_reads", f"one of {', '.join(HEAD_READS)}")
        self.require(all(p >= 1 for p in self.p_sweep), "p_sweep", "prototype counts of at least 1")
        self.require(self.solver in SOLVERS, "solver", f"one of {', '.join(SOLVERS)}")
        self.require(self.init in INITS, "init", f"one of {', '.join(INITS)}")


def non_negative(features: torch.Tensor) -> torch.Tensor:
    """The paper's rule for what NMF sees, offline and online alike: negative features count as zero."""
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
        "C^c_i * mean_hw(F+ . b_i): the prototype's least-squares head coefficient times its activation "
        "(weight = mean_hw(F+ . b_i), F+ the layer features clipped at zero); exact, with the residual prototype "
        "R^c, which also carries the negative features that reach the head"
    )
    factors = {
        "prototypes_": (torch.float32, ("K", "p", "D")),  # B^c
        "coefficients_": (torch.float32, ("K", "p")),  # C^c
        "residual_prototypes_": (torch.float32, ("K", "D")),  # R^c
        "bias_": (torch.float32, ("K",)),
    }

    def __init__(self, model: ModelParts, fitted: FittedMethod):
        super().__init__(model, fitted)
        k, p = self.coefficients_.shape
        # Component c·p + i is prototype i of class c: requests index the components by that layout.
        if [c.class_index for c in self.components] != [c for c in range(k) for _ in range(p)]:
            raise ValueError(f"protonmf has {len(self.components)} components; its factors hold {p} prototypes for "
                             f"each of {k} classes, listed class by class ({k * p} components, c·p + i of class c)")
        self._flat_prototypes = self.prototypes_.flatten(0, 1)  # (K·p, D), row c·p + i: component c.p{i}
        self._flat_coefficients = self.coefficients_.flatten()  # (K·p,)
        self._prototype_heads = torch.einsum("kp,kpd->kd", self.coefficients_, self.prototypes_)  # C^c B^c
        # Eq. 8's augmented prototypes b_i + R^c / Σ_j a_j; where Σ_j a_j = 0 the residual cannot be
        # distributed and the prototypes stay as they are.
        total = self.coefficients_.sum(1, keepdim=True)  # (K, 1)
        share = torch.where(total != 0, 1 / torch.where(total != 0, total, 1.0), 0.0)
        augmented = self.prototypes_ + (self.residual_prototypes_ * share).unsqueeze(1)  # (K, p, D)
        self._augmented = augmented
        self._augmented_gram = augmented @ augmented.transpose(1, 2)  # (K, p, p)
        self._gram = self.prototypes_ @ self.prototypes_.transpose(1, 2)  # (K, p, p)
        self._residual_norm2 = (self.residual_prototypes_ ** 2).sum(1)  # (K,)
        # The exact per-position NNLS tries every support of the p prototypes: small p only.
        self.presence_maps = self.prototypes_.shape[1] <= MAX_UNKNOWNS

    def decompose(self, batch: ExplainBatch, suppressed: torch.Tensor) -> Decomposition:
        grid = feature_grid(batch.features).float()  # (B, D, P), signed where the layer is
        clipped = non_negative(grid)
        # What the head reads: the residual also carries the negative features when they reach it.
        read = grid if self.config.head_reads == "signed" else clipped
        pooled, pooled_read = clipped.mean(2), read.mean(2)  # (B, D)
        t = batch.targets
        b, p = len(pooled), self.prototypes_.shape[1]
        prototypes, coefficients = self.prototypes_[t], self.coefficients_[t]  # (B, p, D), (B, p)
        activation = torch.bmm(prototypes, pooled.unsqueeze(2)).squeeze(2)  # (B, p)
        residual = ((pooled_read * self.residual_prototypes_[t]).sum(1)
                    - (self._prototype_heads[t] * (pooled - pooled_read)).sum(1))
        suppressed_contribution = (pooled @ self._flat_prototypes[suppressed].T) * self._flat_coefficients[suppressed]
        heatmaps = residual_heatmap = None
        grid_shape = batch.features.shape[2:] or (1, 1)
        if batch.heatmaps and batch.heatmap_kind == "presence":
            presence, residual_map = self._presence(clipped, read, t)
            heatmaps = presence.reshape(b, p, *grid_shape)
            residual_heatmap = residual_map.reshape(b, *grid_shape)
        elif batch.heatmaps:
            # (B, p, D) x (B, D, P) -> (B, p, P): the contributions' spatial densities.
            density = torch.bmm(prototypes, clipped) * coefficients.unsqueeze(2) / grid.shape[2]
            heatmaps = density.reshape(b, p, *grid_shape)
        return Decomposition(
            component_index=t.unsqueeze(1) * p + torch.arange(p, device=t.device),
            weight=activation,
            contribution=activation * coefficients,
            bias=self.bias_[t],
            residual=residual,
            heatmaps=heatmaps,
            suppressed_contribution=suppressed_contribution,
            residual_heatmap=residual_heatmap,
        )

    def _presence(self, clipped: torch.Tensor, read: torch.Tensor,
                  t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The paper's maps at each position: (B, p, P) codes on the augmented prototypes (eq. 9) and
        (B, P) the residual prototype's coefficient on what the prototypes leave (eq. 6).

        clipped, read : (B, D, P) the clipped features and those the head reads; t : (B,) the targets
        """
        augmented, prototypes = self._augmented[t], self.prototypes_[t]  # (B, p, D)
        presence = enumerated_nnls(torch.bmm(augmented, clipped), self._augmented_gram[t])  # (B, p, P)
        codes = enumerated_nnls(torch.bmm(prototypes, clipped), self._gram[t])  # E (eq. 1, B^c fixed)
        left = read - torch.bmm(prototypes.transpose(1, 2), codes)  # (B, D, P): A − E B^c
        norm2 = self._residual_norm2[t].clamp_min(torch.finfo(left.dtype).tiny)  # R^c = 0: map 0
        residual_map = torch.bmm(self.residual_prototypes_[t].unsqueeze(1), left).squeeze(1) / norm2.unsqueeze(1)
        return presence, residual_map
