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

import math

import torch

from handlers.base import ExplainBatch, Explainer, Explanation, FittedMethod
from handlers.model import ModelParts, linear_head_weight
from handlers.solvers.simplex import simplex_least_squares

NAME = "protofac"


def clip_features(features: torch.Tensor) -> torch.Tensor:
    """(N, *feature_shape) -> (N, m), negative activations counted as zero (H ≥ 0 needs A ≥ 0)."""
    return features.clamp_min(0).flatten(1).float()


class ProtoFacExplainer(Explainer):
    name = NAME
    additive = False
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

    def __init__(self, model: ModelParts, fitted: FittedMethod):
        super().__init__(model, fitted)
        f = fitted.factors
        self.prototypes_ = f["prototypes_"].float()  # (k, m)
        self.prototype_inputs_ = f["prototype_inputs_"].float()  # (k, *input_shape)
        k, m = self.prototypes_.shape
        if m != math.prod(model.feature_shape) or k != len(self.components):
            raise ValueError(f"protofac prototypes of shape {(k, m)} do not fit a layer of shape {model.feature_shape} "
                             f"with {len(self.components)} components")
        if list(self.prototype_inputs_.shape) != [k, *model.input_spec.shape]:
            raise ValueError(f"protofac prototype inputs of shape {tuple(self.prototype_inputs_.shape)} do not fit "
                             f"inputs of shape {model.input_spec.shape}")
        self.n_iter = int(fitted.hyperparameters["solver_iter"])
        self.gram_ = self.prototypes_ @ self.prototypes_.T  # (k, k), cached for the solver
        with torch.inference_mode():
            device = model.device
            self.zero_logits_ = model.downstream(torch.zeros(1, *model.feature_shape, device=device))[0].float().cpu()
        # An average-pool + linear head is affine in the reconstruction wH: the logits of any
        # weights w are w @ (each prototype's logits without the bias) + bias (see explain).
        weight = linear_head_weight(model)
        self.prototype_logits_ = None
        if weight is not None:
            pooled = self.prototypes_.reshape(k, model.feature_shape[0], -1).mean(2)  # (k, C)
            self.prototype_logits_ = pooled @ weight.cpu().T  # (k, K)

    def to(self, device):
        for name in ("prototypes_", "prototype_inputs_", "gram_", "zero_logits_", "prototype_logits_"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(device))
        return self

    def explain(self, batch: ExplainBatch) -> Explanation:
        features = clip_features(batch.features)  # (B, m)
        b, k = len(features), self.prototypes_.shape[0]
        w = simplex_least_squares(features, self.prototypes_, self.gram_, self.n_iter)  # (B, k)
        # Every weight vector the answer needs, in one pass (of the head's weights or the downstream):
        # w itself, w without each prototype (contributions), and each intervention.
        keep_one_out = 1 - torch.eye(k, device=w.device, dtype=w.dtype)
        keep_requested = (~batch.suppress).to(w.dtype)  # (B, M, k)
        sets = torch.cat([w.unsqueeze(1), w.unsqueeze(1) * keep_one_out, w.unsqueeze(1) * keep_requested], 1)
        if self.prototype_logits_ is not None:
            logits = sets @ self.prototype_logits_ + self.zero_logits_  # (B, 1 + k + M, K)
        else:
            logits = self.model.downstream((sets @ self.prototypes_).reshape(-1, *batch.features.shape[1:]))
            logits = logits.float().reshape(b, sets.shape[1], -1)
        t = batch.targets
        target_of_set = logits.gather(2, t.view(b, 1, 1).expand(b, sets.shape[1], 1)).squeeze(2)  # (B, 1 + k + M)
        surrogate_target = target_of_set[:, 0]
        contribution = target_of_set[:, :1] - target_of_set[:, 1:k + 1]
        target_logit = batch.logits.float().gather(1, t.unsqueeze(1)).squeeze(1)
        reconstruction = w @ self.prototypes_
        energy = features.square().sum(1)
        residual_share = torch.where(energy > 0, (features - reconstruction).square().sum(1) / energy.clamp_min(1e-30),
                                     torch.zeros_like(energy)).clamp(0, 1)
        return Explanation(
            target_class=t,
            component_index=torch.arange(k, device=t.device).expand(b, k),
            weight=w,
            contribution=contribution,
            bias=self.zero_logits_[t],
            residual_contribution=target_logit - surrogate_target,
            residual_share=residual_share,
            target_logit=target_logit,
            heatmaps=self._heatmaps(batch, w) if batch.heatmaps else None,
            intervened_logits=logits[:, k + 1:],
        )

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

