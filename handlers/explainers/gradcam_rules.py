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
    MAX_SIZE,
    MAX_STEPS,
    Codes,
    ExplainBatch,
    FittedMethod,
    MethodConfig,
    RemovalExplainer,
)
from handlers.model import ModelParts, linear_head_weight
from handlers.solvers import compiled_rows
from handlers.solvers.compiled_rows import linear_removal_rows, patch_search_rows, reported_rules_rows, zeroed_mass_rows

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
        self.require_at_most(MAX_STEPS, "n_candidates", "random_trials")
        self.require_at_most(MAX_SIZE, "q", "n_filters", "max_rule_len", "patch_size", "table_sizes")
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


def gradcam_terms(alpha: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each filter's Grad-CAM term α_d F_d, (B, D, H·W), and their sum, Grad-CAM's map before its ReLU, (B, H, W),
    from weights α (B, D) and features F (B, D, H, W): one formula for the fit and every request."""
    terms = alpha[:, :, None] * features.flatten(2)
    return terms, terms.sum(1).unflatten(1, features.shape[2:])


def head_gradcam_weights(head_weight: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """(K, D) Grad-CAM's weights α of every class for an average-pool + linear head ``head_weight`` (K, D):
    ∂logit_k/∂F[d, h, w] = weight[k, d] / HW at every position, so α_d = weight[k, d] / HW."""
    return head_weight / math.prod(grid)


# The most elements of the per-position window tables (:func:`position_tables`); above it (large inputs), the
# candidate search zeroes each window from its row and column bands instead.
POSITION_TABLE_MAX_ELEMENTS = 1 << 24


@dataclass
class PositionTables:
    """Per window position p (row-major over the ``span_h × span_w`` positions, as eq. 1's argmax counts them),
    with the input's pixels flattened row-major:

    mass   : (H_in·W_in, P) float32, 1 on the pixels the window covers: ``heat @ mass`` is eq. 1 at every position
    keep   : (P, H_in·W_in) bool, False on the pixels the window covers
    picked : (P, H·W + H_in·W_in) float32: the window's share of each grid cell over its area on the grid (a
             product with the features is eq. 2's mean), then its pixels (1 inside)
    pool   : (H_in·W_in, H·W) float32, each grid cell's mean over its pixels (``adaptive_avg_pool``'s bins)
    """

    mass: torch.Tensor
    keep: torch.Tensor
    picked: torch.Tensor
    pool: torch.Tensor


@functools.lru_cache(maxsize=16)
def position_tables(size: int, input_hw: tuple[int, ...], grid: tuple[int, ...], device: torch.device
                    ) -> PositionTables | None:
    """The tables of every window position (:class:`PositionTables`), or None when they would exceed
    ``POSITION_TABLE_MAX_ELEMENTS`` elements."""
    (row_band, row_cover, row_pool), (col_band, col_cover, col_pool) = window_tables(size, input_hw, grid, device)
    positions, pixels, cells = len(row_band) * len(col_band), math.prod(input_hw), math.prod(grid)
    if positions * (3 * pixels + cells) + pixels * cells > POSITION_TABLE_MAX_ELEMENTS:
        return None
    rows, cols = torch.arange(len(row_band), device=device), torch.arange(len(col_band), device=device)
    rows, cols = rows.repeat_interleave(len(col_band)), cols.repeat(len(row_band))
    window = (row_band[rows][:, :, None] * col_band[cols][:, None, :]).flatten(1)  # (P, H_in·W_in)
    cover = (row_cover[rows][:, :, None] * col_cover[cols][:, None, :]).flatten(1)  # (P, H·W)
    cover = cover / cover.sum(1, keepdim=True).clamp_min(1e-12)
    pool = (row_pool.T[:, None, :, None] * col_pool.T[None, :, None, :]).flatten(2).flatten(0, 1)
    return PositionTables(window.T.contiguous(), window == 0, torch.cat([cover, window], 1), pool)


@functools.lru_cache(maxsize=16)
def successive_differences(k: int, device: torch.device) -> torch.Tensor:
    """(k, k) float32 D with ``(v @ D)[j] = v[j] − v[j − 1]`` (``v[−1]`` = 0): each step's own change."""
    return torch.eye(k, device=device) - torch.ones(k - 1, device=device).diag(1)


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


def extract_patches(features: torch.Tensor, cam: torch.Tensor, target_logit: torch.Tensor,
                    target_logit_falls: Callable[[torch.Tensor], torch.Tensor], input_hw: Sequence[int],
                    patch_size: int, n_candidates: int, tau_prt: float) -> Patches:
    """Steps 1-3 and eq. 2 for a batch (module docstring): a fixed number of batched steps.

    Parameters
    ----------
    features : (B, D, H, W) float32, the layer's output (no graph needed)
    cam : (B, H, W) float32, Grad-CAM's map of the class explained before its ReLU, Σ_d α_d F_d
    target_logit : (B,) float32, that class's logit
    target_logit_falls : (B, k, H, W) share of each grid cell removed -> (B, k) how far the class's logit
        falls with the features scaled by (1 - share) (:func:`removal_model`)
    input_hw : the input's height and width

    Returns
    -------
    Patches
    """
    position, relevant, activation = scan_patches(features, cam, target_logit, target_logit_falls, input_hw,
                                                  patch_size, n_candidates, tau_prt)
    span_w = input_hw[1] - patch_size + 1
    return Patches(torch.stack([position // span_w, position % span_w], 2), relevant, activation)


def scan_patches(features: torch.Tensor, cam: torch.Tensor, target_logit: torch.Tensor,
                 target_logit_falls: Callable[[torch.Tensor], torch.Tensor], input_hw: Sequence[int],
                 patch_size: int, n_candidates: int, tau_prt: float, *, fewest_launches: bool | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`extract_patches` with each candidate window given by its position (B, k) int64, row-major over the
    window positions, instead of its corner: (position, relevant, activation).

    On the CPU the search up to the perturbation test runs as compiled row loops
    (:func:`handlers.solvers.compiled_rows.patch_search_rows`: about 30 small tensor ops fewer, the same
    windows up to ties within float32 rounding). The tensor search elsewhere, with ``fewest_launches`` for a
    device where a launch costs more than the arithmetic: eq. 1 at every position as one product with the table
    of every window (:class:`PositionTables`) instead of a window sum along the rows and then the columns (two
    products with a tenth of the arithmetic), and the union of the windows by a running maximum instead of a
    running sum clamped at 1 (the same numbers). Default: on a GPU only.
    """
    grid, input_hw = tuple(features.shape[2:]), tuple(input_hw)
    (row_band, row_cover, row_pool), (col_band, col_cover, col_pool) = window_tables(patch_size, input_hw, grid,
                                                                                     features.device)
    heat = F.interpolate(cam.relu()[:, None], size=input_hw, mode="bilinear", align_corners=False)[:, 0]
    if compiled_rows.serves(features.device):  # the search as compiled row loops, up to the perturbation test
        found = patch_search_rows(heat.numpy(), features.flatten(2).transpose(1, 2).contiguous().numpy(), patch_size,
                                  n_candidates, row_cover.numpy(), col_cover.numpy(), row_pool.numpy(), col_pool.numpy())
        position, activation, removed = (torch.from_numpy(a) for a in found)
        return position, perturbation_test(removed, target_logit, target_logit_falls, tau_prt), activation
    heat = heat.flatten(1)
    tables = position_tables(patch_size, input_hw, grid, features.device)
    if fewest_launches is None:
        fewest_launches = features.device.type != "cpu"
    dense = fewest_launches and tables is not None
    position = torch.empty(len(heat), n_candidates, dtype=torch.long, device=heat.device)  # (B, k)
    span_w = len(col_band)
    for j in range(n_candidates):  # each candidate depends on the windows zeroed before it
        mass = heat @ tables.mass if dense else row_band @ heat.unflatten(1, input_hw) @ col_band.T
        # Eq. 1 at every position, the first of equal maxima, written in place (no stack after the loop).
        torch.argmax(mass.flatten(1), 1, out=position[:, j])
        if j + 1 < n_candidates:  # the window zeroed
            if tables is not None:
                heat = heat * tables.keep[position[:, j]]
            else:
                row, col = position[:, j] // span_w, position[:, j] % span_w
                heat = heat * (1 - row_band[row][:, :, None] * col_band[col][:, None, :]).flatten(1)
    if tables is not None:
        picked = tables.picked[position]  # (B, k, H·W + H_in·W_in)
        cover, window = picked[..., :tables.pool.shape[1]], picked[..., tables.pool.shape[1]:]
        activation = cover @ features.flatten(2).transpose(1, 2)  # (B, k, D)
        # The candidates so far, removed together: their union's share of each grid cell.
        removed = (union(window, fewest_launches) @ tables.pool).unflatten(2, grid)  # (B, k, H, W)
    else:
        rows, cols = position // span_w, position % span_w
        cover = (row_cover[rows][..., :, None] * col_cover[cols][..., None, :]).flatten(2)  # (B, k, H·W)
        area = cover.sum(2, keepdim=True).clamp_min(1e-12)
        activation = torch.einsum("bkc,bdc->bkd", cover, features.flatten(2)) / area  # (B, k, D)
        window = row_band[rows][..., :, None] * col_band[cols][..., None, :]  # (B, k, H_in, W_in)
        removed = row_pool @ union(window, fewest_launches) @ col_pool.T
    return position, perturbation_test(removed, target_logit, target_logit_falls, tau_prt), activation


def perturbation_test(removed: torch.Tensor, target_logit: torch.Tensor,
                      target_logit_falls: Callable[[torch.Tensor], torch.Tensor], tau_prt: float) -> torch.Tensor:
    """Step 3: (B, k) bool, the relevant candidates, from the share of each grid cell under candidates 1..j
    (B, k, H, W). Step j lowers the logit by the fall with candidates 1..j removed less the fall with 1..j-1
    removed; it passes when that is at least τ_prt·|y|, and a candidate is relevant while every step so far
    passed."""
    margin = torch.addmm(target_logit.abs()[:, None], target_logit_falls(removed),
                         successive_differences(removed.shape[1], removed.device), beta=-tau_prt)  # (B, k)
    return (margin >= 0).cummin(1).values


def union(windows: torch.Tensor, by_running_maximum: bool) -> torch.Tensor:
    """(B, k, ...) windows of 0 and 1 -> (B, k, ...) the union of the first j + 1 at j."""
    return windows.cummax(1).values if by_running_maximum else windows.cumsum(1).clamp_max_(1)


def top_filters(activation: torch.Tensor, n_filters: int) -> torch.Tensor:
    """(..., D) activations -> (..., D) bool, the ``n_filters`` highest: a patch-transaction's filters."""
    members = torch.zeros_like(activation, dtype=torch.bool)
    return members.scatter_(-1, activation.topk(n_filters, dim=-1).indices, True)


def removal_model(features: torch.Tensor, cam: torch.Tensor, target_logit: torch.Tensor, targets: torch.Tensor,
                  head_weight: torch.Tensor | None, downstream: torch.nn.Module
                  ) -> Callable[[torch.Tensor], torch.Tensor]:
    """The perturbation test's model: (B, k, H, W) removed shares -> (B, k) how far the target logit falls,
    ``y_t − downstream(F · (1 − share))_t``.

    For an average-pool + linear ``head_weight`` (K, D) in closed form: ``y_t(F (1 − s)) = y_t − Σ_hw s ·
    (weight[t] · F) / HW``, and ``(weight[t] · F) / HW`` is ``cam``, the Grad-CAM map (before its ReLU) of the
    head's weights (:func:`head_gradcam_weights`), which callers pass.
    """
    if head_weight is not None:
        weights = cam.flatten(1).unsqueeze(2)  # (B, H·W, 1)
        return lambda removed: torch.bmm(removed.flatten(2), weights).squeeze(2)
    rows = torch.arange(len(targets), device=targets.device)

    def by_downstream(removed: torch.Tensor) -> torch.Tensor:
        scaled = features[:, None] * (1 - removed)[:, :, None]  # (B, k, D, H, W)
        out = downstream(scaled.flatten(0, 1).to(features.dtype)).float().reshape(*removed.shape[:2], -1)
        return target_logit[:, None] - out[rows, :, targets]
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
        # Both tables index the tables built below and, in compiled kernels, arrays with no bounds checked; a
        # filter set's size is the width of a table.
        rules = self.class_components_
        if not bool(((rules >= -1) & (rules < n_components)).all()):
            raise ValueError(f"gradcam_rules factor class_components_ holds component indices outside "
                             f"[-1, {n_components})")
        if not bool(((self.component_filters_ == 0) | (self.component_filters_ == 1)).all()):
            raise ValueError("gradcam_rules factor component_filters_ holds values other than 0 and 1")
        # A request takes each patch's top n_filters of the D filters, in windows of patch_size pixels.
        self.config.require(self.config.n_filters <= dim, "n_filters", f"at most the layer's {dim} filters")
        self.config.require(self.config.patch_size <= min(model.input_spec.shape[1:]), "patch_size",
                            f"at most the input's size {model.input_spec.shape[1:]}")
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
        padded = torch.where(index[1:] == dim, index[1:, :1], index[1:])  # repeat the first filter
        match = torch.cat([padded, torch.full((1, padded.shape[1]), dim, dtype=torch.long)])[rules]
        gather = torch.cat([padded, torch.zeros(1, padded.shape[1], dtype=torch.long)])[rules]
        self._class_rules = torch.cat([rules[:, :, None], match, gather], 2)
        # The filter sets with an empty one last, where a component index of -1 lands.
        self._filters_last_empty = torch.cat([self.component_filters_, torch.zeros(1, dim)])
        self._no_component, self._one = torch.tensor(-1), torch.ones(())
        # After a non-negative layer, an average-pool + linear head gives Grad-CAM's weights, the
        # perturbation test and every zeroed-filter logit in closed form: no gradient and no downstream pass.
        self.head_weight_ = linear_head_weight(model)  # (K, D) or None
        self.needs_grad = self.head_weight_ is None
        if self.head_weight_ is not None:
            self._class_alpha = head_gradcam_weights(self.head_weight_, model.feature_shape[1:])  # (K, D)

    def gradcam(self, batch: ExplainBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Grad-CAM weights α (B, D) of the targets, and the features (B, D, H, W) float32 without a graph."""
        t, features = batch.targets, batch.features
        if self.head_weight_ is not None:
            return self._class_alpha[t], features.detach().float()
        logits = batch.logits
        if not features.requires_grad:
            # Features computed without a graph (e.g. frozen parameters): rebuild it from the layer on.
            with torch.enable_grad():
                features = batch.features.detach().requires_grad_(True)
                logits = self.model.downstream(features)
        return gradcam_weights(features, logits, t), features.detach().float()

    def patch_inputs(self, batch: ExplainBatch, cam: torch.Tensor, features: torch.Tensor) -> tuple:
        """The arguments of :func:`extract_patches` and :func:`scan_patches` for the targets' patches, given
        Grad-CAM's map before its ReLU (B, H, W)."""
        c = self.config
        y = batch.target_logit
        model = removal_model(features, cam, y, batch.targets, self.head_weight_, self.model.downstream)
        return features, cam, y, model, self.input_hw, c.patch_size, c.n_candidates, c.tau_prt

    @torch.no_grad()
    def patches(self, batch: ExplainBatch, alpha: torch.Tensor, features: torch.Tensor) -> Patches:
        """The targets' candidate and relevant patches and their filter activations (module docstring, 1-4)."""
        return extract_patches(*self.patch_inputs(batch, gradcam_terms(alpha, features)[1], features))

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
        alpha, f = self.gradcam(batch)
        with torch.no_grad():
            terms, cam = gradcam_terms(alpha, f)
            _, relevant, activation = scan_patches(*self.patch_inputs(batch, cam, f))
            top = activation.topk(self.config.n_filters, dim=-1).indices  # (B, k, n) each patch's transaction
            table = self._class_rules[batch.targets]  # (B, C, 1 + 2S)
            if compiled_rows.serves(f.device):  # the rest as compiled row loops, the same formulas as below
                index, weight, share, maps = (torch.from_numpy(a) for a in reported_rules_rows(
                    top.numpy(), relevant.numpy(), table.numpy(), self.filter_reference_.numpy(), activation.numpy(),
                    terms.numpy(), self._filter_index.numpy(), batch.heatmaps))
                return Codes(index, weight, share, maps.unflatten(2, f.shape[2:]) if batch.heatmaps else None)
            index, weight = self.matched_rules(top, relevant, table, activation)
            masks = self._filters_last_empty[index]  # (B, C, D)
            evidence = terms.relu().sum(2)  # (B, D) each filter's P_d
            covered = masks.amax(1)  # (B, D) the union of the reported rules' filters
            # 1 − (P over the union) / (P over every filter): 1 when there is no positive evidence (both are 0).
            carried = (evidence[:, None, :] @ covered[:, :, None])[:, 0, 0]
            residual_share = torch.addcdiv(self._one, carried, evidence.sum(1).clamp_min(1e-30), value=-1)
            heatmaps = (masks @ terms).relu().unflatten(2, f.shape[2:]) if batch.heatmaps else None
        return Codes(index, weight, residual_share.clamp(0, 1), heatmaps)

    def matched_rules(self, top: torch.Tensor, relevant: torch.Tensor, table: torch.Tensor, activation: torch.Tensor,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """The reported rules: those of R^t held by a relevant patch-transaction (its top ``n_filters`` filters,
        as :meth:`rules_held`), matched first, each group in R^t's order (support x confidence), and their
        weights, the rule's weakest filter against its typical activation in its best patch.

        Parameters
        ----------
        top : (B, k, n) int64 each candidate patch's top filters
        relevant : (B, k) bool
        table : (B, C, 1 + 2S) int64 the targets' rows of the rule table (component, filters to match, to weigh)
        activation : (B, k, D) each candidate patch's filter activations

        Returns
        -------
        index : (B, C) int64 components, -1 padding
        weight : (B, C) float32, 0 where not matched
        """
        s = (table.shape[2] - 1) // 2
        component, match, gather = table[:, :, 0], table[:, :, 1:1 + s], table[:, :, 1 + s:]
        held = (match[:, :, None, :, None] == top[:, None, :, None, :]).any(4).all(3)  # (B, C, k)
        holds = held & relevant[:, None, :]
        matched = holds.any(2)
        ratio = activation / self.filter_reference_  # (B, k, D)
        gathered = ratio[:, None].expand(-1, match.shape[1], -1, -1).gather(
            3, gather[:, :, None, :].expand(-1, -1, ratio.shape[1], -1))  # (B, C, k, S)
        presence = torch.where(holds, gathered.amin(3), self._zero).amax(2)  # (B, C), 0 where not matched
        order = matched.argsort(dim=1, descending=True, stable=True)
        index = torch.where(matched, component, self._no_component).gather(1, order)
        return index, presence.gather(1, order)

    @torch.no_grad()
    def removed_logits(self, batch: ExplainBatch, codes: Codes, sets: torch.Tensor) -> torch.Tensor:
        """The logits with the union of the removed rules' filters (channels) zeroed at the layer."""
        f = batch.features.detach().float()
        if self.head_weight_ is not None and compiled_rows.serves(f.device):
            mass = zeroed_mass_rows(sets.numpy(), self.component_filters_.numpy(), f.flatten(2).contiguous().numpy())
            return torch.from_numpy(linear_removal_rows(batch.logits.detach().float().numpy(), mass,
                                                        self.head_weight_.numpy()))
        zeroed = (sets @ self.component_filters_).clamp_max(1)  # (B, S, D)
        if self.head_weight_ is not None:
            # downstream(F (1 - z)) = logits - (mean_hw(F) z) @ weight.T, z constant over the grid.
            zeroed_mean = f.flatten(2).mean(2)[:, None] * zeroed  # (B, S, D) the zeroed filters' mean activations
            return torch.baddbmm(batch.logits.detach().float()[:, None], zeroed_mean,
                                 self.head_weight_.T.expand(len(f), -1, -1), alpha=-1)
        perturbed = (f[:, None] * (1 - zeroed)[..., None, None]).to(batch.features.dtype)
        return self.model.downstream(perturbed.flatten(0, 1)).float().reshape(*zeroed.shape[:2], -1)
