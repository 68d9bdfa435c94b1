"""ProtoFac: a layer's activations factorized into real prototypes with simplex weights.

Seed paper: S. Das, P. Xu, Z. Dai, A. Endert, L. Ren, "Interpreting Deep Neural Networks
through Prototype Factorization" (ICDM Workshops 2020).

Offline (the paper's Algorithm 1). The model's activations at the explained layer, one
flattened row per training input, form A (n × m); the frozen model's own predictions
ŷ are the oracle labels. A is factorized as A ≈ W H with

* H (k × m) ≥ 0: k prototypes, each in the end the latent vector of a real *candidate*:
  an image patch (a ``window``-pixel square from a sliding window, ``windows_per_side``
  positions per axis, the input outside the window masked to zero, since the model has a
  fixed input size) or, for a series model, a whole training series (a heartbeat).
  Candidates come from ``candidate_fraction`` of the training inputs of every class;
* W (n × k) ≥ 0 with every row on the probability simplex, kept there by Euclidean
  projection of each row after every optimizer step (sort-based, Duchi et al. 2008).

The loss (paper eq. 3) on a mini-batch B is

    λ_ce · CE(f_down(W_B H), ŷ_B) + λ_r · L_r + λ_c · L_c,
    L_r = ‖A_B − W_B H‖_F / (sqrt(|B|) · ā)        (the F-loss (1/n)‖A − WH‖_F, estimated
                                                      on the batch and made scale-free by ā,
                                                      the mean row norm of A)
    L_c = (1/k) Σ_j min_c ‖h_j − a_c‖² / ā²          (concentration: every prototype near
                                                      some candidate's latent vector a_c)

with f_down the frozen network after the layer. Adam updates W and H; H is clamped at
zero after each step; the nearest candidate of every prototype (for L_c) is recomputed
once per epoch. Every ``projection_interval`` epochs each prototype is replaced by its
nearest candidate (distinct candidates, greedily, closest prototype first) and W is
refined with H frozen by the reconstruction solver below; the projected H with the best
accuracy against the oracle (on a fixed subset of the training data) is kept.

Per request, with a the clipped, flattened features of one input and H frozen, the
weights are the simplex-constrained least-squares code

    w = argmin_{w ∈ Δ_k} ‖a − w H‖²,

found by a fixed number of primal active-set steps (:func:`simplex_least_squares`, the Gram
matrix cached), exact once each row's support is found. The same solver gives the held-out W
of the fit report, so the reported accuracies are those of the served explanation, and the
report says on what share of held-out rows it had converged in that many steps. The
surrogate's prediction is f_down(wH). ProtoFac is not additive; a prototype's contribution is the drop of the
surrogate's target logit when its weight is set to zero,
c_i = f_down(wH)[t] − f_down(w_{−i}H)[t], and an intervention evaluates f_down(w'H) with
the suppressed weights zeroed and *not* renormalized (so suppression removes the
prototypes' share of the reconstruction, consistently with the contributions). The
response's bias is f_down(0)[t] and its residual contribution is the model's target
logit minus the surrogate's, f[t] − f_down(wH)[t], so that for an affine downstream (both
demo models) Σ_i c_i + residual + bias equals the model's target logit exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from handlers.base import Codes, ExplainBatch, FittedMethod, MethodConfig, RemovalExplainer
from handlers.model import ModelParts, linear_head_weight
from handlers.solvers.simplex import simplex_least_squares

NAME = "protofac"


@dataclass(frozen=True)
class ProtoFacConfig(MethodConfig):
    """ProtoFac's hyperparameters.

    n_prototypes : k.
    lambda_ce, lambda_r, lambda_c : weights of the loss terms (module docstring).
    epochs, projection_interval, batch_size, lr_weights, lr_prototypes : the Adam schedule;
        ``lr_prototypes`` is relative to the features' root-mean-square entry.
    candidate_fraction : share of every class's training inputs cut into candidates.
    window, windows_per_side : the sliding window of image models (pixels; positions per
        axis); 16 and 5 on a 32×32 input are the paper's 16×16 windows at stride 4.
    solver_iter : steps of the active-set simplex solver online per request, and offline for W
        after each projection, the held-out W and the accuracies that choose the kept
        prototypes; None: n_prototypes (enough to add every prototype once; archives store the
        number). The report's ``solver_converged`` is the share of held-out rows whose codes are
        optimal after that many steps.
    eval_size : training rows (a fixed random subset) on which the accuracy against the
        oracle picks the best projection.
    nmf_max_iter : iterations of the plain NMF baseline (f_loss_nmf).
    k_sweep, sweep_epochs : the accuracy-vs-k table and plot (paper Fig. 5), each k fitted
        with ``sweep_epochs`` epochs and a projection after every epoch; () skips it.
    """

    method = NAME
    n_prototypes: int = 30
    lambda_ce: float = 1.0
    lambda_r: float = 1.0
    lambda_c: float = 0.1
    epochs: int = 8
    projection_interval: int = 2
    batch_size: int = 256
    lr_weights: float = 0.01
    lr_prototypes: float = 1.0
    candidate_fraction: float = 0.2
    window: int = 20
    windows_per_side: int = 5
    solver_iter: int | None = None
    eval_size: int = 1000
    nmf_max_iter: int = 50
    k_sweep: tuple[int, ...] = (5, 10, 20, 50)
    sweep_epochs: int = 1
    random_state: int = 0

    def __post_init__(self):
        super().__post_init__()
        self.require_at_least(1, "n_prototypes", "epochs", "projection_interval", "batch_size", "window",
                              "windows_per_side", "eval_size", "nmf_max_iter", "sweep_epochs")
        self.require_at_least(0, "lambda_ce", "lambda_r", "lambda_c", "lr_weights", "lr_prototypes")
        self.require(0 < self.candidate_fraction <= 1, "candidate_fraction", "in (0, 1]")
        self.require(self.solver_iter is None or self.solver_iter >= 1, "solver_iter", "None or at least 1")
        self.require(all(k >= 1 for k in self.k_sweep), "k_sweep", "positive numbers of prototypes")

    @property
    def solver_steps(self) -> int:
        """Steps of the simplex solver: ``solver_iter``, else one per prototype."""
        return self.n_prototypes if self.solver_iter is None else self.solver_iter


def activation_rows(features: torch.Tensor) -> torch.Tensor:
    """(N, *feature_shape) -> (N, m), negative activations counted as zero (H ≥ 0 needs A ≥ 0)."""
    return features.clamp_min(0).flatten(1).float()


class ProtoFacExplainer(RemovalExplainer):
    name = NAME
    config_class = ProtoFacConfig
    residual_share_definition = (
        "||a - wH||^2 / ||a||^2 clamped to [0, 1]: the share of the layer activation's energy (a: the clipped, "
        "flattened features) that the convex combination wH of the prototypes does not reconstruct"
    )
    contribution_definition = (
        "f_down(wH)[t] - f_down(w_{-i}H)[t]: the drop of the surrogate's target logit when prototype i's weight is "
        "set to zero (the others not renormalized); weight = w_i, the simplex least-squares code of the features "
        "on the prototypes H. Not additive in general: bias = f_down(0)[t] and residual_contribution = the model's "
        "target logit minus the surrogate's f_down(wH)[t], so the sum identity holds exactly only when the network "
        "after the layer is affine (true for the demo models). Interventions: f_down(w'H), suppressed weights zeroed"
    )
    factors = {
        "prototypes_": (torch.float32, ("C", "F")),  # H, k prototypes of m = F flattened features
        "prototype_inputs_": (torch.float32, ("C", "*input")),
    }

    def __init__(self, model: ModelParts, fitted: FittedMethod):
        super().__init__(model, fitted)
        k = len(self.prototypes_)
        self.gram_ = self.prototypes_ @ self.prototypes_.T  # (k, k), cached for the solver
        with torch.inference_mode():
            device = model.device
            self.zero_logits_ = model.downstream(torch.zeros(1, *model.feature_shape, device=device))[0].float().cpu()
        # An average-pool + linear head is affine in the reconstruction wH: the logits of any
        # weights w are w @ (each prototype's logits without the bias) + bias (see removed_logits).
        weight = linear_head_weight(model)
        self.prototype_logits_ = None
        if weight is not None:
            pooled = self.prototypes_.reshape(k, model.feature_shape[0], -1).mean(2)  # (k, C)
            self.prototype_logits_ = pooled @ weight.cpu().T  # (k, K)

    def encode_batch(self, batch: ExplainBatch) -> Codes:
        features = activation_rows(batch.features)  # (B, m)
        b, k = len(features), len(self.prototypes_)
        w = simplex_least_squares(features, self.prototypes_, self.gram_, self.config.solver_steps)  # (B, k)
        energy = features.square().sum(1)
        unexplained = (features - w @ self.prototypes_).square().sum(1)
        return Codes(
            component_index=torch.arange(k, device=w.device).expand(b, k),
            weight=w,
            residual_share=torch.where(energy > 0, unexplained / energy.clamp_min(1e-30),
                                       torch.zeros_like(energy)).clamp(0, 1),
            heatmaps=self._heatmaps(batch, w) if batch.heatmaps else None,
        )

    def removed_logits(self, batch: ExplainBatch, codes: Codes, sets: torch.Tensor) -> torch.Tensor:
        """The surrogate f_down(w'H), w' = w with the removed prototypes' weights zeroed (not renormalized):
        by the head's weights when the head is affine, else by the downstream on w'H."""
        kept = codes.weight.unsqueeze(1) * (1 - sets)  # (B, S, k)
        if self.prototype_logits_ is not None:
            return kept @ self.prototype_logits_ + self.zero_logits_
        logits = self.model.downstream((kept @ self.prototypes_).reshape(-1, *batch.features.shape[1:]))
        return logits.float().reshape(*kept.shape[:2], -1)

    def bias_and_residual(self, batch: ExplainBatch, target_logit: torch.Tensor,
                          reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The surrogate's target logit of no prototypes, f_down(0)[t], and the model's target logit less
        the surrogate's, f[t] - f_down(wH)[t]."""
        return self.zero_logits_[batch.targets], target_logit - reference

    def _heatmaps(self, batch: ExplainBatch, w: torch.Tensor) -> torch.Tensor | None:
        """(B, k, H, W) maps, or None where the layer has no grid and the input is not a series.

        A layer with a grid: the prototype's share of the reconstruction's activation mass at
        each position, w_i Σ_d H_i[d, p] / Σ_{d, p} (wH)[d, p] (all maps of an input sum to 1).
        A fully connected layer of a series model: where in time the input agrees with the
        prototype's series, w_i · exp(−mean_channels (x(t) − x_i(t))² / 2) (z-normalized series).
        """
        b, k = w.shape
        grid = batch.features.shape[2:]
        if grid:
            mass = self.prototypes_.reshape(k, batch.features.shape[1], -1).sum(1)  # (k, P)
            share = w.unsqueeze(2) * mass  # (B, k, P)
            share = share / share.sum((1, 2), keepdim=True).clamp_min(1e-30)
            return share.reshape(b, k, *((1, *grid) if len(grid) == 1 else grid))
        if batch.inputs.dim() == 3:
            gap = (batch.inputs.float().unsqueeze(1) - self.prototype_inputs_.unsqueeze(0)).square().mean(2)
            return (w.unsqueeze(2) * torch.exp(-gap / 2)).unsqueeze(2)  # (B, k, 1, T)
        return None

