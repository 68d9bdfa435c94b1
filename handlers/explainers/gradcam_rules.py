"""Grad-CAM rules: class-specific and class-shared filter sets mined from Grad-CAM explanations.

Seed paper: "Interpreting Deep Models by Explaining their Predictions" (Meynen, Behzadi-Khormouji,
Oramas). The layer's channels are the paper's "filters". One construction, :func:`extract_patches`,
turns an input into its patch-transactions, offline for every training image and online for each
request:

1. Grad-CAM at the explained layer for class c: α_d = mean_hw ∂y_c/∂F_d and
   H = ReLU(Σ_d α_d F_d), upsampled (bilinear) to the input.
2. Candidate patches (eq. 1): the ``patch_size`` square window with the most heatmap mass, over
   every position; its region of the heatmap is zeroed and the search repeated, ``n_candidates``
   (the paper's k) times.
3. Relevant patches (the incremental perturbation test): the candidates are removed one after
   another, best first; patch j is relevant while every step so far lowered the class logit by at
   least τ_prt·|y_c|, i.e. (y_c^{j-1} − y_c^j) / |y_c| ≥ τ_prt. A patch is removed at the layer:
   the features scaled by (1 − the share of each grid cell under the removed windows), which is
   zeroing the windows in the layer's activation maps resized (nearest) to the input.
4. Patch-transactions (eq. 2): per relevant patch the ``n_filters`` (= N − 1) filters with the
   highest activation in the window (mean of the resized maps under it: eq. 2's sum / ω²), plus c.

Offline (handlers/fitting/gradcam_rules.py), on the training images with c the predicted class:
hierarchical eclat (frequent filter sets per class, support within the class ≥ τ_support, at most
``max_rule_len`` filters), closed itemsets only, support and confidence recomputed over all
transactions, and per class the q rules with the highest support × confidence (R^c); class-shared
filter groups; Table 1 at the transaction sizes ``table_sizes``.

Per request, with t the target class:

* the input's patch-transactions for t (steps 1-4, batched: ``n_candidates`` fixed steps);
* components: the rules of R^t contained in one of the input's relevant patch-transactions, in
  R^t's order (support × confidence, best first), padded with −1 to q;
* weight of a rule X: max over the relevant patches holding X of min_{d∈X} a_d / θ_d, with a_d the
  filter's activation in the patch (step 4) and θ_d its mean activation in the mined training
  transactions that hold it (1: the rule's weakest filter fires as it typically does in its patches);
* contribution of X = y_t(F) − y_t(F with the channels of X zeroed) (a batched downstream pass);
* heatmap of X = ReLU(Σ_{d∈X} α_d F_d), Grad-CAM restricted to the rule's filters, on the grid;
* residual share = Σ_{d∉U} P_d / Σ_d P_d with P_d = Σ_hw ReLU(α_d F_{d,hw}) the filter's positive
  Grad-CAM evidence and U the union of the reported rules' filters (1 when there is no positive
  evidence);
* an intervention zeroes the union of the chosen components' filters and reruns the downstream.

After a non-negative layer and an average-pool + linear head (the demo), Grad-CAM's weights, the
perturbation test and every zeroed-filter logit come in closed form: no gradient, no pass.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from handlers.base import (
    Codes,
    ExplainBatch,
    FittedMethod,
    MethodConfig,
    RemovalExplainer,
)
from handlers.model import ModelParts, linear_head_weight

NAME = "gradcam_rules"


@dataclass(frozen=True)
class GradCAMRulesConfig(MethodConfig):
    """The rule miner's hyperparameters.

    q : rules kept per class (paper default 10)
    tau_prt : relative class-logit drop a perturbation step must reach for its patch to stay relevant
    tau_support : minimum support of a filter set within a class's transactions (paper default 0.5)
    n_filters : filters per transaction of the served rules (the paper's N − 1; the class is the N-th item)
    max_rule_len : most filters in one rule (bounds eclat's enumeration, which grows as 2^n_filters)
    patch_size : side of the square patch window, in input pixels
    n_candidates : candidate patches per image (k)
    random_trials : random filter draws averaged per class in ``perturbation_table``
    random_state : seed of the random filters of ``perturbation_table``
    table_sizes : transaction sizes (filters) of the rows of ``perturbation_table`` (the paper's 5, 10, 25)
    """

    method = NAME
    q: int = 10
    tau_prt: float = 0.1
    tau_support: float = 0.5
    n_filters: int = 10
    max_rule_len: int = 4
    patch_size: int = 12
    n_candidates: int = 3
    random_trials: int = 20
    random_state: int = 0
    table_sizes: tuple[int, ...] = (5, 10, 25)

    def __post_init__(self):
        super().__post_init__()
        self.require_at_least(1, "q", "n_filters", "max_rule_len", "patch_size", "n_candidates", "random_trials")
        self.require(0 < self.tau_support <= 1, "tau_support", "in (0, 1]")
        self.require(all(size >= 1 for size in self.table_sizes), "table_sizes", "sizes of at least 1")


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


@functools.lru_cache(maxsize=16)
def window_tables(size: int, input_hw: tuple[int, ...], grid: tuple[int, ...], device: torch.device):
    """Per axis (rows, then columns), as matrices so that a 2-D window or pooling is ``rows @ X @ cols.T``:

    band  : (span, pixels) float32, 1 on the pixels a window starting at each pixel covers
    cover : (span, cells) float32, the share of each grid cell's pixels that window covers
    pool  : (cells, pixels) float32, each grid cell's mean over its pixels (``adaptive_avg_pool``'s bins)
    """
    tables = []
    for n_pixels, n_cells in zip(input_hw, grid):
        pixels = torch.arange(n_pixels, device=device)
        starts = torch.arange(n_pixels - size + 1, device=device)[:, None]
        band = ((pixels >= starts) & (pixels < starts + size)).float()
        pool = F.adaptive_avg_pool1d(torch.eye(n_pixels, device=device)[:, None], n_cells)[:, 0].T.contiguous()
        tables.append((band, band @ pool.T, pool))
    return tables


# The most elements of the per-position window tables (:func:`position_tables`); above it (large inputs), the
# candidate search zeroes each window from its row and column bands instead.
POSITION_TABLE_MAX_ELEMENTS = 1 << 24


@dataclass
class PositionTables:
    """Per window position p (row-major over the ``span_h × span_w`` positions, as eq. 1's argmax counts them):

    keep   : (P, H_in, W_in) bool, False on the pixels the window covers
    cover  : (P, H·W) float32, the window's share of each grid cell (as :func:`window_tables`' row and column
             covers multiply it)
    picked : (P, 1 + H_in·W_in) float32: the window's area on the grid (cover summed, at least 1e-12) and its
             pixels (1 inside)
    """

    keep: torch.Tensor
    cover: torch.Tensor
    picked: torch.Tensor


@functools.lru_cache(maxsize=16)
def position_tables(size: int, input_hw: tuple[int, ...], grid: tuple[int, ...], device: torch.device
                    ) -> PositionTables | None:
    """The tables of every window position (:class:`PositionTables`), or None when they would exceed
    ``POSITION_TABLE_MAX_ELEMENTS`` elements."""
    (row_band, row_cover, _), (col_band, col_cover, _) = window_tables(size, input_hw, grid, device)
    positions = len(row_band) * len(col_band)
    if positions * (math.prod(input_hw) + math.prod(grid) + 1) > POSITION_TABLE_MAX_ELEMENTS:
        return None
    rows, cols = torch.arange(len(row_band), device=device), torch.arange(len(col_band), device=device)
    rows, cols = rows.repeat_interleave(len(col_band)), cols.repeat(len(row_band))
    window = row_band[rows][:, :, None] * col_band[cols][:, None, :]  # (P, H_in, W_in)
    cover = row_cover[rows][:, :, None] * col_cover[cols][:, None, :]  # (P, H, W)
    area = cover.sum((1, 2)).clamp_min(1e-12)
    return PositionTables(window == 0, cover.flatten(1), torch.cat([area[:, None], window.flatten(1)], 1))


@dataclass
class Patches:
    """An input's candidate patches and what the perturbation test and eq. 2 make of them.

    corners    : (B, k, 2) int64, top-left pixel of each candidate window, best first
    relevant   : (B, k) bool, the relevant patches (a prefix of the candidates)
    activation : (B, k, D) float32, each filter's mean activation in each window (eq. 2 / ω²)
    """

    corners: torch.Tensor
    relevant: torch.Tensor
    activation: torch.Tensor


def extract_patches(features: torch.Tensor, alpha: torch.Tensor, target_logit: torch.Tensor,
                    perturbed_target_logits: Callable[[torch.Tensor], torch.Tensor], input_hw: Sequence[int],
                    patch_size: int, n_candidates: int, tau_prt: float) -> Patches:
    """Steps 1-3 and eq. 2 for a batch (module docstring): a fixed number of batched steps.

    Parameters
    ----------
    features : (B, D, H, W) float32, the layer's output (no graph needed)
    alpha : (B, D) float32, Grad-CAM weights of the class explained
    target_logit : (B,) float32, that class's logit
    perturbed_target_logits : (B, k, H, W) share of each grid cell removed -> (B, k) the class's logit
        with the features scaled by (1 - share)
    input_hw : the input's height and width

    Returns
    -------
    Patches
    """
    position, relevant, activation = scan_patches(features, alpha, target_logit, perturbed_target_logits, input_hw,
                                                  patch_size, n_candidates, tau_prt)
    span_w = input_hw[1] - patch_size + 1
    return Patches(torch.stack([position // span_w, position % span_w], 2), relevant, activation)


def scan_patches(features: torch.Tensor, alpha: torch.Tensor, target_logit: torch.Tensor,
                 perturbed_target_logits: Callable[[torch.Tensor], torch.Tensor], input_hw: Sequence[int],
                 patch_size: int, n_candidates: int, tau_prt: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`extract_patches` with each candidate window given by its position (B, k) int64, row-major over the
    window positions, instead of its corner: (position, relevant, activation)."""
    grid = tuple(features.shape[2:])
    (row_band, row_cover, row_pool), (col_band, col_cover, col_pool) = window_tables(
        patch_size, tuple(input_hw), grid, features.device)
    tables = position_tables(patch_size, tuple(input_hw), grid, features.device)
    heat = F.interpolate(torch.einsum("bd,bdhw->bhw", alpha, features).relu()[:, None], size=tuple(input_hw),
                         mode="bilinear", align_corners=False)[:, 0]
    span_w = len(col_band)
    positions = []
    for j in range(n_candidates):  # each candidate depends on the windows zeroed before it
        mass = row_band @ heat @ col_band.T  # (B, span_h, span_w): eq. 1 at every window position
        positions.append(mass.flatten(1).argmax(1))  # the first of equal maxima, row-major
        if j + 1 == n_candidates:
            break
        if tables is not None:  # the window zeroed
            heat = heat * tables.keep[positions[-1]]
        else:
            row, col = positions[-1] // span_w, positions[-1] % span_w
            heat = heat * (1 - row_band[row][:, :, None] * col_band[col][:, None, :])
    position = torch.stack(positions, 1)  # (B, k)
    if tables is not None:
        cover = tables.cover[position]  # (B, k, H·W), contiguous: the product below is the same BLAS call as before
        picked = tables.picked[position]  # (B, k, 1 + H_in·W_in)
        area, window = picked[..., :1], picked[..., 1:].unflatten(2, tuple(input_hw))
    else:
        rows, cols = position // span_w, position % span_w
        cover = (row_cover[rows][..., :, None] * col_cover[cols][..., None, :]).flatten(2)  # (B, k, H·W)
        area = cover.sum(2, keepdim=True).clamp_min(1e-12)
        window = row_band[rows][..., :, None] * col_band[cols][..., None, :]  # (B, k, H_in, W_in)
    activation = torch.einsum("bkc,bdc->bkd", cover, features.flatten(2)) / area  # (B, k, D)
    # The candidates so far, removed together: their union's share of each grid cell.
    removed = row_pool @ window.cummax(1).values @ col_pool.T  # (B, k, H, W)
    scores = torch.cat([target_logit[:, None], perturbed_target_logits(removed)], 1)  # (B, k + 1)
    drop = (scores[:, :-1] - scores[:, 1:]) / target_logit.abs()[:, None].clamp_min(1e-6)
    relevant = (drop >= tau_prt).cummin(1).values
    return position, relevant, activation


def top_filters(activation: torch.Tensor, n_filters: int) -> torch.Tensor:
    """(..., D) activations -> (..., D) bool, the ``n_filters`` highest: a patch-transaction's filters."""
    members = torch.zeros_like(activation, dtype=torch.bool)
    return members.scatter_(-1, activation.topk(n_filters, dim=-1).indices, True)


def removal_logits(features: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                   head_weight: torch.Tensor | None, downstream: torch.nn.Module,
                   target_logit: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The perturbation test's model: (B, k, H, W) removed shares -> (B, k) target logits of
    ``downstream(F · (1 − share))``; in closed form for an average-pool + linear ``head_weight`` (K, D)
    (``target_logit``: the logits of the targets, when the caller has them)."""
    if target_logit is None:
        target_logit = logits.gather(1, targets[:, None])[:, 0]
    if head_weight is not None:
        # y_t(F (1 - s)) = y_t - sum_hw s · (weight[t] · F) / HW: the pre-ReLU Grad-CAM mass removed.
        score_map = torch.einsum("bd,bdhw->bhw", head_weight[targets], features) / features[0, 0].numel()
        return lambda removed: target_logit[:, None] - torch.einsum("bkhw,bhw->bk", removed, score_map)
    rows = torch.arange(len(targets), device=targets.device)

    def by_downstream(removed: torch.Tensor) -> torch.Tensor:
        scaled = features[:, None] * (1 - removed)[:, :, None]  # (B, k, D, H, W)
        out = downstream(scaled.flatten(0, 1).to(features.dtype)).float().reshape(*removed.shape[:2], -1)
        return out[rows, :, targets]
    return by_downstream


class GradCAMRulesExplainer(RemovalExplainer):
    name = NAME
    config_class = GradCAMRulesConfig
    residual_share_definition = (
        "sum over filters d outside the reported rules of P_d / sum over all filters of P_d, with "
        "P_d = sum_hw ReLU(alpha_d F_d,hw) the filter's positive Grad-CAM evidence for the target "
        "(alpha = spatial mean of the target logit's gradient): the share of the Grad-CAM evidence the "
        "reported rules' filters do not carry; 1 when there is no positive evidence"
    )
    contribution_definition = (
        "target logit minus the target logit with the rule's filters (channels) zeroed at the layer. "
        "Reported: the target class's top rules (support x confidence order) contained in one of the input's "
        "relevant patch-transactions (Grad-CAM of the target, eq. 1 windows, the perturbation test, the top "
        "n_filters filters by eq. 2); weight = max over those patches of min over the rule's filters of the "
        "filter's activation in the patch / its mean in the mined training patches (non-additive: bias and "
        "residual_contribution are 0)"
    )
    factors = {
        "component_filters_": (torch.float32, ("C", "D")),  # 1 where the component's filter set holds the channel
        "class_components_": (torch.int64, ("K", "width")),  # each class's rules R^c, best first, -1 padding
        "filter_reference_": (torch.float32, ("D",)),  # θ_d
    }

    def __init__(self, model: ModelParts, fitted: FittedMethod):
        if len(model.feature_shape) != 3:
            raise ValueError(f"gradcam_rules needs a convolutional layer, the model's features are "
                             f"{model.feature_shape}")
        super().__init__(model, fitted)
        n_components, dim = self.component_filters_.shape
        self.input_hw = tuple(model.input_spec.shape[1:])
        # Row 0 is the empty filter set, so padding (index −1) maps to it after the +1 shift.
        self._filters = torch.cat([torch.zeros(1, dim), self.component_filters_])  # (R+1, D)
        size = int(self._filters.sum(1).max())
        # Filter indices of each component, padded with the sentinel D (an always-passing +inf column).
        index = torch.full((n_components + 1, max(1, size)), dim, dtype=torch.long)
        for i, row in enumerate(self._filters):
            members = row.nonzero().flatten()
            index[i, :len(members)] = members
        self._filter_index = index
        # Each class's rules for the served path, (K, width, 1 + 2S) int64: the component (-1: padding); its
        # filters as matched against a patch's top filters (padding: D, which no patch holds); its filters as
        # gathered for the weight (padding: 0, masked out). A rule of fewer than S filters repeats its first.
        rules = self.class_components_
        padded = torch.where(index[1:] == dim, index[1:, :1], index[1:])  # repeat the first filter
        match = torch.cat([padded, torch.full((1, padded.shape[1]), dim, dtype=torch.long)])[rules]
        gather = torch.cat([padded, torch.zeros(1, padded.shape[1], dtype=torch.long)])[rules]
        self._class_rules = torch.cat([rules[:, :, None], match, gather], 2)
        # The filter sets with an empty one last, where a component index of -1 lands.
        self._filters_last_empty = torch.cat([self.component_filters_, torch.zeros(1, dim)])
        self._zero, self._one, self._no_component = torch.zeros(()), torch.ones(()), torch.tensor(-1)
        # After a non-negative layer, an average-pool + linear head gives Grad-CAM's weights, the
        # perturbation test and every zeroed-filter logit in closed form: no gradient and no downstream pass.
        self.head_weight_ = linear_head_weight(model)  # (K, D) or None
        self.needs_grad = self.head_weight_ is None

    def gradcam(self, batch: ExplainBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Grad-CAM weights α (B, D) of the targets, and the features (B, D, H, W) float32 without a graph."""
        t, features = batch.targets, batch.features
        if self.head_weight_ is not None:
            # ∂logit_t/∂F[d, h, w] = weight[t, d] / HW at every position.
            return self.head_weight_[t] / features[0, 0].numel(), features.detach().float()
        logits = batch.logits
        if not features.requires_grad:
            # Features computed without a graph (e.g. frozen parameters): rebuild it from the layer on.
            with torch.enable_grad():
                features = batch.features.detach().requires_grad_(True)
                logits = self.model.downstream(features)
        return gradcam_weights(features, logits, t), features.detach().float()

    def patches(self, batch: ExplainBatch, alpha: torch.Tensor, features: torch.Tensor) -> Patches:
        """The targets' candidate and relevant patches and their filter activations (module docstring, 1-4)."""
        c = self.config
        with torch.no_grad():
            logits = batch.logits.detach().float()
            model = removal_logits(features, logits, batch.targets, self.head_weight_, self.model.downstream)
            target_logit = logits.gather(1, batch.targets[:, None])[:, 0]
            return extract_patches(features, alpha, target_logit, model, self.input_hw, c.patch_size,
                                   c.n_candidates, c.tau_prt)

    def transactions(self, batch: ExplainBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The input's patch-transactions for its target: (B, k, D) bool filters of each candidate patch,
        and (B, k) bool, which candidates are relevant (only those are transactions)."""
        alpha, features = self.gradcam(batch)
        patches = self.patches(batch, alpha, features)
        return top_filters(patches.activation, self.config.n_filters), patches.relevant

    def rules_held(self, members: torch.Tensor, relevant: torch.Tensor, classes: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Which rules of each class's R^c each relevant patch-transaction holds.

        Parameters
        ----------
        members : (B, k, D) bool, the filters of each patch-transaction
        relevant : (B, k) bool
        classes : (B,) int64

        Returns
        -------
        slots : (B, C) int64, the class's rules as component index + 1 (0 = padding)
        holds : (B, C, k) bool, the rule's filters all lie in the relevant patch's transaction
        """
        slots = self.class_components_[classes] + 1
        missing = torch.einsum("bcd,bkd->bck", self._filters[slots], (~members).float())
        return slots, (missing == 0) & relevant[:, None, :] & (slots > 0)[:, :, None]

    def encode_batch(self, batch: ExplainBatch) -> Codes:
        t, c = batch.targets, self.config
        alpha, f = self.gradcam(batch)
        with torch.no_grad():
            logits = batch.logits.detach().float()
            target_logit = logits.gather(1, t[:, None])[:, 0]
            model = removal_logits(f, logits, t, self.head_weight_, self.model.downstream, target_logit)
            _, relevant, activation = scan_patches(f, alpha, target_logit, model, self.input_hw, c.patch_size,
                                                   c.n_candidates, c.tau_prt)
            # The rules of R^t held by a relevant patch-transaction (its top n_filters filters), as rules_held.
            top = activation.topk(c.n_filters, dim=-1).indices  # (B, k, n)
            table = self._class_rules[t]  # (B, C, 1 + 2S)
            s = (table.shape[2] - 1) // 2
            component, match, gather = table[:, :, 0], table[:, :, 1:1 + s], table[:, :, 1 + s:]
            held = (match[:, :, None, :, None] == top[:, None, :, None, :]).any(4).all(3)  # (B, C, k)
            holds = held & relevant[:, None, :]
            matched = holds.any(2)
            # Weight: the rule's weakest filter against its typical activation, in its best patch.
            ratio = activation / self.filter_reference_  # (B, k, D)
            gathered = ratio[:, None].expand(-1, match.shape[1], -1, -1).gather(
                3, gather[:, :, None, :].expand(-1, -1, ratio.shape[1], -1))  # (B, C, k, S)
            presence = torch.where(holds, gathered.amin(3), self._zero).amax(2)  # (B, C), 0 where not matched
            # Matched rules first, each group in R^t's order (support x confidence).
            order = matched.argsort(dim=1, descending=True, stable=True)
            index = torch.where(matched, component, self._no_component).gather(1, order)
            masks = self._filters_last_empty[index]  # (B, C, D)
            weight = presence.gather(1, order)

            evidence = (alpha[:, :, None, None] * f).relu()  # (B, D, H, W)
            per_filter = evidence.sum((2, 3))
            covered = masks.amax(1)  # (B, D) the union of the reported rules' filters
            total = per_filter.sum(1)
            residual_share = torch.where(total > 0, (per_filter * (1 - covered)).sum(1) / total.clamp_min(1e-30),
                                         self._one)
            heatmaps = torch.einsum("bcd,bd,bdhw->bchw", masks, alpha, f).relu() if batch.heatmaps else None
        return Codes(index, weight, residual_share.clamp(0, 1), heatmaps)

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
