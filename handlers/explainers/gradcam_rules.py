"""Grad-CAM rules: class-specific and class-shared filter sets mined from Grad-CAM explanations.

Seed paper: "Interpreting Deep Models by Explaining their Predictions".

Offline, on the training images (the paper's pipeline, with the layer's channels as "filters"):

1. Grad-CAM at the explained layer for the predicted class c of each image:
   α_d = mean_hw ∂y_c/∂F_d and L_c = ReLU(Σ_d α_d F_d), upsampled to the input.
2. Candidate patches: a square window of ``patch_size`` pixels at ``n_locations`` random
   positions is scored by the heatmap mass under it; the best is kept and its region of the
   heatmap zeroed, ``n_candidates`` times.
3. Relevant patches by incremental perturbation: the candidates are zeroed in the image one
   after another (best first); patch j is relevant while every step so far lowered the class
   logit by at least τ_prt·|y_c(x)|, i.e. (y_c(x^{j-1}) − y_c(x^j)) / |y_c(x)| ≥ τ_prt.
4. One transaction per relevant patch: the ``n_filters`` (= N − 1) filters with the highest
   mean activation inside the patch window (its footprint on the feature grid) plus the item c.
5. Hierarchical eclat: frequent filter sets X per class (support within the class's
   transactions ≥ τ_support, at most ``max_rule_len`` filters), then support and confidence
   recomputed over all transactions: support(X → c) = #(X ∪ {c}) / #T and
   confidence(X → c) = #(X ∪ {c}) / #(X).
6. The top q rules per class by support × confidence. A filter set frequent in two or more classes
   is class-shared (its component has class_index −1), any other is class-specific (class_index c).
   The class-shared filter groups are the maximal filter sets frequent in two or more classes,
   the q with the highest support over those classes. Components: the top rules of every class
   and the class-shared groups, one per distinct filter set; a class's rules are the components
   whose set is frequent in the class. A filter frequent in one class only is class-specific.
7. Table 1 of the paper on held-out data (``perturbation_accuracy``): each class's accuracy with
   the union of its top rules' filters zeroed, against as many random filters zeroed (averaged
   over draws), and unperturbed.
8. Visual patterns (exemplar PNGs): for a class-specific rule, per filter the average of the
   class's relevant patches holding the filter, weighted by its activation, then the rule's
   strongest patches; for a class-shared group, its patch group (strongest patches per class).

Per request, with F the layer features and t the target class:

* Grad-CAM weights α = mean_hw ∂y_t/∂F (one batched backward pass).
* Match strength of a rule X of class t: m_X = max over windows w of min_{d∈X} A_{d,w} / θ_d, where A_{d,w} is
  filter d's mean activation in the grid window w (the patch size on the grid) and θ_d the
  filter's mean activation in the training patches whose transactions hold it. The rule is
  active when m_X ≥ ``activation_ratio``: all its filters fire together, in one window, at that
  fraction of their typical strength. Components are the target class's active rules
  (weight m_X), strongest first, padded with −1 to the widest class's rule count C.
* contribution of X = y_t(F) − y_t(F with the channels of X zeroed) (a batched downstream pass).
* heatmap of X = ReLU(Σ_{d∈X} α_d F_d), Grad-CAM restricted to the rule's filters, on the grid.
* residual share = Σ_{d∉U} P_d / Σ_d P_d with P_d = Σ_hw ReLU(α_d F_{d,hw}) the filter's positive
  Grad-CAM evidence and U the union of the active rules' filters (1 when there is no positive
  evidence).
* an intervention zeroes the union of the chosen components' filters and reruns the downstream.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from handlers.base import Codes, ExplainBatch, FittedMethod, MethodConfig, RemovalExplainer
from handlers.model import ModelParts, linear_head_weight

NAME = "gradcam_rules"


@dataclass(frozen=True)
class GradCAMRulesConfig(MethodConfig):
    """The rule miner's hyperparameters.

    q : rules kept per class (paper default 10)
    tau_prt : relative class-logit drop a perturbation step must reach for its patch to stay relevant
    tau_support : minimum support of a filter set within a class's transactions (paper default 0.5)
    n_filters : filters per transaction (the paper's N − 1; the class is the N-th item)
    max_rule_len : most filters in one rule (bounds eclat's enumeration, which grows as 2^n_filters)
    patch_size : side of the square patch window, in input pixels
    n_candidates : candidate patches per image (k)
    n_locations : random window positions scored per candidate
    activation_ratio : online, a rule is active when its match strength reaches this
    random_trials : random filter draws averaged per class in ``perturbation_accuracy``
    random_state : seed of the random window positions and the random filters
    """

    method = NAME
    q: int = 10
    tau_prt: float = 0.1
    tau_support: float = 0.5
    n_filters: int = 20
    max_rule_len: int = 4
    patch_size: int = 12
    n_candidates: int = 3
    n_locations: int = 32
    activation_ratio: float = 0.8
    random_trials: int = 20
    random_state: int = 0

    def __post_init__(self):
        super().__post_init__()
        self.require_at_least(1, "q", "n_filters", "max_rule_len", "patch_size", "n_candidates", "n_locations",
                              "random_trials")
        self.require_at_least(0, "activation_ratio")
        self.require(0 < self.tau_support <= 1, "tau_support", "in (0, 1]")


def grid_window(patch_size: int, grid: Sequence[int], input_hw: Sequence[int]) -> tuple[int, ...]:
    """The patch window's size on the feature grid, at least one cell a side."""
    return tuple(max(1, round(patch_size * g / s)) for g, s in zip(grid, input_hw))


def gradcam_weights(features: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Grad-CAM channel weights α_d = mean_hw ∂logit_t/∂F_d, one backward pass for the batch.

    Parameters
    ----------
    features : (B, D, H, W) the layer's output, part of the autograd graph of ``logits``
    logits : (B, K)
    targets : (B,) int64

    Returns
    -------
    (B, D) float32
    """
    rows = torch.arange(len(targets), device=targets.device)
    (grad,) = torch.autograd.grad(logits[rows, targets].sum(), features)
    return grad.float().flatten(2).mean(2)


class GradCAMRulesExplainer(RemovalExplainer):
    name = NAME
    config_class = GradCAMRulesConfig
    residual_share_definition = (
        "sum over filters d outside the active rules of P_d / sum over all filters of P_d, with "
        "P_d = sum_hw ReLU(alpha_d F_d,hw) the filter's positive Grad-CAM evidence for the target "
        "(alpha = spatial mean of the target logit's gradient): the share of the Grad-CAM evidence the "
        "active rules' filters do not carry; 1 when there is no positive evidence"
    )
    contribution_definition = (
        "target logit minus the target logit with the rule's filters (channels) zeroed at the layer; "
        "weight = match strength, max over grid windows of min over the rule's filters of the filter's "
        "window activation / its typical activation in the mined training patches; a rule is returned "
        "when its weight reaches activation_ratio (non-additive: bias and residual_contribution are 0)"
    )
    factors = {
        "component_filters_": (torch.float32, ("C", "D")),  # 1 where the component's filter set holds the channel
        "class_components_": (torch.int64, ("K", "width")),  # each class's rules, best first, -1 padding
        "filter_reference_": (torch.float32, ("D",)),  # θ_d
    }

    def __init__(self, model: ModelParts, fitted: FittedMethod):
        if len(model.feature_shape) != 3:
            raise ValueError(f"gradcam_rules needs a convolutional layer, the model's features are "
                             f"{model.feature_shape}")
        super().__init__(model, fitted)
        n_components, dim = self.component_filters_.shape
        self.window = grid_window(self.config.patch_size, model.feature_shape[1:], model.input_spec.shape[1:])
        # Row 0 is the empty filter set, so padding (index −1) maps to it after the +1 shift.
        self._filters = torch.cat([torch.zeros(1, dim), self.component_filters_])  # (R+1, D)
        size = int(self._filters.sum(1).max())
        # Filter indices of each component, padded with the sentinel D (an always-passing +inf row).
        index = torch.full((n_components + 1, max(1, size)), dim, dtype=torch.long)
        for i, row in enumerate(self._filters):
            members = row.nonzero().flatten()
            index[i, :len(members)] = members
        self._filter_index = index
        # After a non-negative layer, an average-pool + linear head gives Grad-CAM's weights and
        # every zeroed-filter logit in closed form: no gradient and no downstream pass.
        self.head_weight_ = linear_head_weight(model)  # (K, D) or None
        self.needs_grad = self.head_weight_ is None

    def encode_batch(self, batch: ExplainBatch) -> Codes:
        t = batch.targets
        features, logits = batch.features, batch.logits
        if self.head_weight_ is not None:
            # ∂logit_t/∂F[d, h, w] = weight[t, d] / HW at every position.
            alpha = self.head_weight_[t] / math.prod(features.shape[2:])
        else:
            if not features.requires_grad:
                # Features computed without a graph (e.g. frozen parameters): rebuild it from the layer on.
                with torch.enable_grad():
                    features = batch.features.detach().requires_grad_(True)
                    logits = self.model.downstream(features)
            alpha = gradcam_weights(features, logits, t)  # (B, D)
        with torch.no_grad():
            f = features.detach().float()
            slots = self.class_components_[t] + 1  # (B, C), 0 = padding
            masks = self._filters[slots]  # (B, C, D)
            # Match strength: the weakest filter of the rule, in its best window.
            window = F.avg_pool2d(f, self.window, stride=1).flatten(2) / self.filter_reference_[:, None]
            window = torch.cat([window, torch.full_like(window[:, :1], math.inf)], 1)  # (B, D+1, L)
            index = self._filter_index[slots]  # (B, C, S)
            gathered = window.gather(1, index.flatten(1)[:, :, None].expand(-1, -1, window.shape[2]))
            strength = gathered.reshape(*index.shape, -1).amin(2).amax(2)  # (B, C)
            active = (slots > 0) & (strength >= self.config.activation_ratio)
            order = torch.where(active, strength, torch.full_like(strength, -1.0)).argsort(
                dim=1, descending=True, stable=True)
            active, slots = active.gather(1, order), slots.gather(1, order)
            masks = masks.gather(1, order[:, :, None].expand_as(masks)) * active[:, :, None]
            weight = torch.where(active, strength.gather(1, order), torch.zeros_like(strength))

            evidence = (alpha[:, :, None, None] * f).relu()  # (B, D, H, W)
            per_filter = evidence.sum((2, 3))
            covered = masks.amax(1)  # (B, D) the union of the active rules' filters
            total = per_filter.sum(1)
            residual_share = torch.where(total > 0, (per_filter * (1 - covered)).sum(1) / total.clamp_min(1e-30),
                                         torch.ones_like(total))
            heatmaps = torch.einsum("bcd,bd,bdhw->bchw", masks, alpha, f).relu() if batch.heatmaps else None
        return Codes(torch.where(active, slots - 1, torch.full_like(slots, -1)), weight, residual_share.clamp(0, 1),
                     heatmaps)

    @torch.no_grad()
    def removed_logits(self, batch: ExplainBatch, codes: Codes, sets: torch.Tensor) -> torch.Tensor:
        """The logits with the union of the removed rules' filters (channels) zeroed at the layer."""
        zeroed = (sets @ self.component_filters_).clamp_max(1)  # (B, S, D)
        f = batch.features.detach().float()
        if self.head_weight_ is not None:
            # downstream(F (1 - z)) = logits - (mean_hw(F) z) @ weight.T, z constant over the grid.
            lost = (f.flatten(2).mean(2)[:, None] * zeroed) @ self.head_weight_.T
            return batch.logits.detach().float()[:, None] - lost
        perturbed = (f[:, None] * (1 - zeroed)[..., None, None]).to(batch.features.dtype)
        return self.model.downstream(perturbed.flatten(0, 1)).float().reshape(*zeroed.shape[:2], -1)
