"""Coupled NMF: concepts shared by pixels, neurons of several layers and examples.

Seed paper: U. S. Saini, E. E. Papalexakis, "Analyzing Representations inside
Convolutional Neural Networks" (arXiv:2012.12516).

Offline, on a probe set of N training examples, the model's views of the examples are
factorized with one shared, non-negative example factor F (d concepts × N):

* pixel matrices D_i (pixels of input channel i × N), one per input channel;
* activation matrices A_j (neurons of analysed layer j × N), one per analysed layer: as the
  paper's eq. 3.1, a neuron is one unit (c, h, w) of the layer's activation maps (C·H·W rows,
  ``neurons="maps"``), or, for a layer whose N × C·H·W view would exceed ``max_view_mib`` (or for
  every layer with ``neurons="pooled"``, as archives fitted before the maps are read), a channel,
  each example's activation pooled by the spatial mean (C rows);

    min_{F, P_i, O_j ≥ 0}  Σ_i ‖D_i − P_i F‖² + Σ_j ‖A_j − O_j F‖² + R(F, P, O)

with the paper's multiplicative updates (eq. 3.2),

    P_i ← P_i ⊙ D_i Fᵀ / (P_i F Fᵀ + λ P_i),     O_j ← O_j ⊙ A_j Fᵀ / (O_j F Fᵀ + λ O_j),
    F   ← F ⊙ (Σ_i P_iᵀ D_i + Σ_j O_jᵀ A_j) / (Σ_i P_iᵀ P_i F + Σ_j O_jᵀ O_j F + λ F + μ G(F)),

where R is either the L2 penalty λ(‖F‖² + Σ‖P_i‖² + Σ‖O_j‖²) ("l2") or none with the
concept columns of the stacked loadings [P_1; …; O_J] rescaled to unit norm after each
update, F's rows absorbing the scale ("unit_norm", λ = 0 above). The optional group
sparsity of the paper's section 5 adds μ Σ_d Σ_g ‖F[d, g]‖₂ over groups g of probe
examples (their classes, or the given groups of classes), whose gradient is
G(F)[d, n] = F[d, n] / ‖F[d, g(n)]‖₂: each concept is pushed towards few groups.
Every view is first divided by its RMS example norm so that no view dominates the loss;
the stored factors P_i, O_j are in the views' original units. Each pass over the data
applies an update several times on the same products (Gillis & Glineur 2012's
accelerated multiplicative updates), since the products with the data dominate the cost.

The global analysis (fit report ``concepts`` and ``layers``): per concept its top classes,
top probe examples and dominant group; per analysed layer the cosine similarity of the
concepts over its neurons (columns of O_j) and the mean of the leading eigenvalues of
that similarity matrix (the paper's Fig. 2 and 3); per concept an exemplar PNG showing its
latent image (its columns of P drawn as an image), its topmost probe example and its top probe
examples masked by the latent image's median (Fig. 4a-c); the paper's kNN analysis of held-out
examples in concept space among the probe examples (Fig. 4d); TCAV scores of the concepts (section 5).

Per request, with the factors fixed, the input is folded in: f ≥ 0 minimizing
Σ_i ‖d_i − P_i f‖² + Σ_j ‖a_j − O_j f‖² (+ λ‖f‖² for "l2"), in the same normalized
units, exactly, by a primal active set (:func:`handlers.solvers.active_set.active_set_codes`): on the CPU as
compiled row loops (:mod:`handlers.solvers.compiled_rows`), elsewhere, for at most ten concepts, by every
support at once (:func:`handlers.solvers.small_nnls.shared_gram_nnls`, the supports' inverses computed at
load: a dozen ops per batch) and for more by the tensor solver's steps (all solve the same problem); archives
fitted before the exact fold-in used 50 projected HALS sweeps, which they keep. The solvers read the input
only through x Dᵀ and ‖x‖², summed view by view (no stacked copy of the views is made per request), and the
residual share comes from the same terms.
A concept's weight is f_d; its contribution is defined by intervention on the deepest
analysed layer, the explained layer whose activation a (C, *grid) the downstream
consumes: the concept carries O_J[u, d] f_d of each of that layer's neurons u, so removing
a set S of concepts scales each neuron down by that share,

    a_S = a − a⁺ ⊙ r_S,    r_S[c, h, w] = min(1, Σ_{d∈S} O_J[(c, h, w), d] f_d / a⁺[c, h, w])   (maps)
                           r_S[c]       = min(1, Σ_{d∈S} O_J[c, d] f_d / ā[c])                 (pooled)

(a⁺ = max(a, 0), ā = mean_hw(a⁺), r_S = 0 where the denominator is 0; this removes exactly
Σ_S O_J f_d from each neuron, capped so that none goes below zero, and for a
global-average-pooling head exactly its spatial mean from the pooled features), and the
rest of the network is run on a_S. The contribution of concept d is
logit_t(a) − logit_t(a_{d}), exact by construction; interventions are the logits of
a_S. The method is not additive. Heatmaps are the concepts' pixel masks weighted for
this input, f_d · Σ_i P_i[:, d], at the input's resolution (the "feature grid" of this
method's heatmaps is the pixel grid).

On request (``ExplainRequest.neighbours``), the neighbour view of the paper's Fig. 4d: the
input's k nearest probe examples by the cosine distance of concept codes, each with the concept
it has its highest affinity for, the distribution of those concepts and each neighbour's example drawn as
a PNG at fit time (the optional ``probe_png_``, ``probe_png_offsets_``; :meth:`neighbours`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from handlers.base import (
    MAX_SIZE,
    MAX_STEPS,
    Codes,
    ExplainBatch,
    FactorSpec,
    FittedMethod,
    MethodConfig,
    RemovalExplainer,
)
from handlers.device_graphs import BucketGraphs, Capture, CaptureReport, example_count
from handlers.graph_program import GraphProgram
from handlers.model import ModelParts, linear_head_weight
from handlers.neighbours import Neighbours, NeighbourSearch
from handlers.solvers import compiled_rows
from handlers.solvers.active_set import ridged_gram
from handlers.solvers.compiled_rows import (active_set_rows, add_terms_rows, linear_removal_rows, removed_mass_rows,
                                            residual_share_rows)
from handlers.solvers.nmf import ENCODERS, nnls_codes
from handlers.solvers.small_nnls import MAX_UNKNOWNS, shared_gram_nnls, support_inverses

NAME = "coupled_nmf"


EPS = 1e-12


REGULARIZATIONS = ("unit_norm", "l2")
NEURONS = ("maps", "pooled")


@dataclass(frozen=True)
class CoupledNMFConfig(MethodConfig):
    """Coupled NMF's hyperparameters.

    n_concepts : number of concepts d.
    n_probe : probe examples N, drawn from ``x_train`` by a generator seeded with ``random_state``
        (archives store the number drawn).
    layers : upstream node names of the analysed layers besides the explained one; None:
        every ReLU node of the upstream. The explained layer is always analysed, last (the
        deepest); archives store the analysed layers, the explained one last.
    regularization : "unit_norm" (unit-norm concept columns of the stacked loadings) or
        "l2" (the L2 penalty ``alpha`` on every factor, kept in the fold-in).
    group_sparsity : μ of the group-sparsity penalty on F (0: off).
    class_groups : group name -> class indices, for the group sparsity and each concept's
        dominant group; None: every class is its own group (archives store the groups).
    max_iter, inner_iter, tol, check_every : multiplicative updates: at most ``max_iter``
        passes over the data, each updating W then F ``inner_iter`` times; stop when the
        objective falls by less than ``tol`` (relative) over ``check_every`` passes.
    fold_in_iter : active-set steps of the per-request fold-in of more than ten concepts (ten or
        fewer are solved by every support at once); None: 2 * n_concepts, room for every
        concept to enter and leave once (archives store the number).
    fold_in_solver : the fold-in's solver, "active_set" (exact; archives fitted before it have
        "hals", 50 projected sweeps, which they keep) or another of :func:`nnls_encode`'s.
    n_top_classes, n_top_examples, n_eigenvalues : sizes of the fit report's tables.
    knn : neighbours per held-out example in the fit report's neighbour view (the paper's about 30;
        archives fitted before it have 5).
    neurons : "maps" (eq. 3.1: each unit (c, h, w) of a layer's activation maps is a neuron) or
        "pooled" (each channel, the example's activation pooled by the spatial mean); archives
        without the field read as "pooled", what they computed.
    max_view_mib : the memory guard of "maps": a layer whose N × C·H·W float32 view would exceed this
        many MiB is pooled instead (the fit report's ``pooled_layers`` says which and why).
    pooled_layers : the analysed layers whose neurons are pooled channels although ``neurons`` is
        "maps"; None: those the memory guard pools (archives store the layers pooled).
    tcav_examples, tcav_random_sets, tcav_inputs : the fit report's TCAV validation (its section 5):
        each concept's top ``tcav_examples`` probe examples against as many random probe examples,
        ``tcav_random_sets`` CAVs per concept and as many random-vs-random ones for the null, scored
        on at most ``tcav_inputs`` held-out inputs (as many of each class); 0 random sets: no TCAV.
    """

    method = NAME
    n_concepts: int = 10
    n_probe: int = 2000
    layers: tuple[str, ...] | None = None
    regularization: str = "unit_norm"
    alpha: float = 1e-3
    group_sparsity: float = 0.0
    class_groups: dict[str, tuple[int, ...]] | None = None
    max_iter: int = 300
    inner_iter: int = 10
    tol: float = 1e-4
    check_every: int = 10
    fold_in_iter: int | None = None
    fold_in_solver: str = "active_set"
    n_top_classes: int = 3
    n_top_examples: int = 8
    n_eigenvalues: int = 3
    knn: int = 30
    neurons: str = "maps"
    max_view_mib: float = 256.0
    pooled_layers: tuple[str, ...] | None = None
    tcav_examples: int = 30
    tcav_random_sets: int = 4
    tcav_inputs: int = 200
    random_state: int = 0

    def __post_init__(self):
        super().__post_init__()
        self.require_at_least(1, "n_concepts", "n_probe", "inner_iter", "check_every", "n_top_classes",
                              "n_top_examples", "n_eigenvalues", "knn", "tcav_examples", "tcav_inputs")
        self.require_at_least(0, "alpha", "group_sparsity", "max_iter", "tol", "tcav_random_sets")
        self.require(self.tcav_random_sets != 1, "tcav_random_sets", "0 or at least 2 (the t-test needs two)")
        self.require(self.neurons in NEURONS, "neurons", f"one of {', '.join(NEURONS)}")
        self.require(self.max_view_mib > 0, "max_view_mib", "positive")
        self.require(self.regularization in REGULARIZATIONS, "regularization", f"one of {', '.join(REGULARIZATIONS)}")
        self.require(self.fold_in_solver in ENCODERS, "fold_in_solver", f"one of {', '.join(ENCODERS)}")
        self.require(self.fold_in_iter is None or self.fold_in_iter >= 1, "fold_in_iter", "None or at least 1")
        # n_concepts: twice it is the default fold-in's steps.
        self.require_at_most(MAX_STEPS, "n_concepts", "max_iter", "inner_iter", "check_every", "fold_in_iter")
        self.require_at_most(MAX_SIZE, "n_probe", "n_top_classes", "n_top_examples", "n_eigenvalues", "knn",
                             "tcav_examples", "tcav_random_sets", "tcav_inputs")

    @classmethod
    def from_hyperparameters(cls, stored: dict) -> "CoupledNMFConfig":
        """As :meth:`MethodConfig.from_hyperparameters`; an archive without ``neurons``, or with the note
        that archives written before the configs carry in its place ("channels, each example's activation
        pooled by the spatial mean; ..."), was fitted on pooled channels, and reads as "pooled"."""
        if stored and stored.get("neurons") not in NEURONS:
            stored = {**stored, "neurons": "pooled"}
        return super().from_hyperparameters(stored)

    def layer_is_pooled(self, name: str) -> bool:
        """Whether analysed layer ``name``'s neurons are pooled channels (else units of its maps)."""
        return self.neurons == "pooled" or name in (self.pooled_layers or ())

    @property
    def penalty(self) -> float:
        """λ of the L2 penalty, fit and fold-in alike: ``alpha`` for "l2", else 0."""
        return self.alpha if self.regularization == "l2" else 0.0


def spatial_mean(t: torch.Tensor) -> torch.Tensor:
    """(B, C, *grid) -> (B, C) by the spatial mean; (B, C) unchanged."""
    return t.flatten(2).mean(2) if t.dim() > 2 else t


def unit_view(t: torch.Tensor) -> torch.Tensor:
    """(B, C, *grid) -> (B, C·H·W) float32, ``max(t, 0)``: the neurons of a layer's maps, a new tensor (an
    in-place operation on ``t`` leaves it as it is)."""
    return t.flatten(1).float().clamp_min(0)


def channel_view(t: torch.Tensor) -> torch.Tensor:
    """(B, C, *grid) -> (B, C) float32, ``max(mean_hw(t), 0)``: the neurons of a layer pooled."""
    return spatial_mean(t).float().clamp_min(0)


def tap_module(upstream: GraphProgram, layers: list[str], pooled: list[bool] | None = None,
               keep_output: bool = True) -> GraphProgram:
    """The upstream, also returning the neuron views of ``layers``.

    Returns a module ``(B, *input_shape) -> (output, *taps)`` with ``taps[j]`` of shape
    (B, C_j) where ``pooled[j]`` (:func:`channel_view`; None: every layer pooled) and else
    (B, C_j·H_j·W_j) (:func:`unit_view`), sharing the upstream's submodules, so that one
    forward pass gives the explained layer and every analysed layer; without ``keep_output``,
    the upstream cut short after the deepest tap, returning the taps alone. Each view is taken
    right where its activation is computed, so an in-place operation further down the graph
    cannot alter it.

    Raises
    ------
    ValueError
        If a name is not a node of the upstream's graph.
    """
    pooled = [True] * len(layers) if pooled is None else pooled
    return upstream.with_taps(layers, [channel_view if p else unit_view for p in pooled], keep_output)


def _unit_rows(t: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm; a zero row stays zero."""
    return t / torch.linalg.vector_norm(t, dim=1, keepdim=True).clamp_min(EPS)


def pixel_layout(input_shape: list[int]) -> tuple[int, tuple[int, int]]:
    """Input channels and the (H, W) of a pixel map: (C, H, W) -> C, (H, W);
    (C, L) -> C, (1, L); (L,) -> 1, (1, L)."""
    if len(input_shape) == 3:
        return input_shape[0], (input_shape[1], input_shape[2])
    if len(input_shape) == 2:
        return input_shape[0], (1, input_shape[1])
    return 1, (1, math.prod(input_shape))


def _probe_png(factors: dict[str, torch.Tensor], n_probe: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The probe examples' PNGs as host arrays (bytes (T,) uint8, offsets (N + 1,) int64), from the
    optional fitted tensors ``probe_png_`` and ``probe_png_offsets_``; None where the archive has neither
    (fitted before they were stored: its neighbours come without PNGs).

    Raises
    ------
    ValueError
        If only one is stored, or the offsets do not cut the bytes into N pieces.
    """
    data, offsets = factors.get("probe_png_"), factors.get("probe_png_offsets_")
    if data is None and offsets is None:
        return None
    if data is None or offsets is None:
        raise ValueError(f"{NAME} stores {'probe_png_' if offsets is None else 'probe_png_offsets_'} "
                         f"without {'probe_png_offsets_' if offsets is None else 'probe_png_'}")
    data, offsets = data.to(torch.uint8).flatten().numpy(), offsets.to(torch.int64).numpy()
    if (offsets.shape != (n_probe + 1,) or offsets[0] != 0 or offsets[-1] != len(data)
            or (np.diff(offsets) < 0).any()):
        raise ValueError(f"{NAME} factor probe_png_offsets_ has shape {offsets.shape}, expected ({n_probe + 1},) "
                         f"offsets rising from 0 to the {len(data)} bytes of probe_png_")
    return data, offsets


class CoupledNMFExplainer(RemovalExplainer, NeighbourSearch):
    """Fold-in of each input into the fitted concepts; contributions by intervention; the
    nearest probe examples in concept space on request.

    Heatmaps are (B, d, H, W) at the input's resolution (its pixel grid), not on the
    explained layer's grid.
    """

    name = NAME
    config_class = CoupledNMFConfig
    residual_share_definition = (
        "||x - W f|| / ||x||: the relative error of the fold-in's reconstruction of the input's stacked views "
        "(pixels of each channel and the neurons of each analysed layer, units of its activation maps or, for "
        "a layer pooled, its spatially pooled channels; each view divided by its RMS norm over the probe set); "
        "in [0, 1] since f = 0 is feasible"
    )
    contribution_definition = (
        "logit_t(a) - logit_t(a_d) with a the explained layer's activation and a_d = a - max(a,0) * r, "
        "r[c,h,w] = min(1, O[(c,h,w),d] f_d / max(a,0)[c,h,w]) (neurons = units of the maps; for a layer "
        "pooled, r[c] = min(1, O[c,d] f_d / mean_hw(max(a,0))[c])), 0 where the denominator is 0: the target "
        "logit's change when the concept's share of each neuron is removed from the explained (deepest "
        "analysed) layer and the rest of the network is run; weight = f_d, the concept's fold-in coefficient; "
        "not additive"
    )

    def __init__(self, model: ModelParts, fitted: FittedMethod):
        super().__init__(model, fitted)
        # A probe's class names its label in every neighbour view.
        if not bool(((self.probe_labels_ >= 0) & (self.probe_labels_ < model.num_classes)).all()):
            raise ValueError(f"coupled_nmf factor probe_labels_ holds classes outside [0, {model.num_classes})")
        layers = self.config.layers
        if layers[-1] != model.layer:
            raise ValueError(f"coupled_nmf was fitted at layer {layers[-1]!r}; the model explains {model.layer!r}")
        self.map_hw = pixel_layout(model.input_spec.shape)[1]
        self.pooled = [self.config.layer_is_pooled(name) for name in layers]
        # The fold-in dictionary in normalized units: rows are concepts, columns the stacked views.
        n_in = len(self.pixel_offset_)
        pixel_scales, layer_scales = self.view_scales_[:n_in], self.view_scales_[n_in:]
        blocks = [*(self.pixel_factors_ / pixel_scales[:, None, None]).unbind(0),
                  *(getattr(self, f"neuron_factors_{j}_") / s for j, s in enumerate(layer_scales))]
        self.dictionary_ = torch.cat(blocks, 0).T.contiguous()  # (d, T)
        d = self.dictionary_.shape[0]
        # A request's terms come view by view in the views' own units, with no stacked copy of its views:
        # x Dᵀ = Σ_j v_j (D_j / s_j)ᵀ and ‖x‖² = Σ_j ‖v_j‖² / s_j² for x = [v_1 / s_1, ...] (see fold_in_terms).
        self._view_sizes = [len(block) for block in blocks]
        column_scales = torch.cat([s.expand(n) for s, n in zip(self.view_scales_, self._view_sizes)])
        # Block by block, each (d, T_j) contiguous as the CPU's terms kernel reads it, in one tensor that to() moves.
        view_dictionary = (self.dictionary_ / column_scales).split(self._view_sizes, 1)
        self.view_dictionary_ = torch.cat([block.flatten() for block in view_dictionary])  # (d · T,)
        self.inverse_square_scales_ = self.view_scales_.double().pow(-2)
        reconstruction_gram = self.dictionary_.double() @ self.dictionary_.double().T
        self.reconstruction_gram_ = reconstruction_gram  # (d, d) float64, ‖fD‖² = f G fᵀ (no penalty)
        self.gram_ = (reconstruction_gram + self.config.penalty * torch.eye(d, dtype=torch.float64)).float()
        self.ridged_gram_, tolerance = ridged_gram(self.gram_)  # for the compiled fold-in
        self._tolerance = float(tolerance)
        # The exact fold-in of few concepts by every support (a dozen ops per batch; an active-set step is ~50).
        exact = self.config.fold_in_solver == "active_set" and d <= MAX_UNKNOWNS
        self.support_inverses_ = support_inverses(self.gram_) if exact else None
        self.pixel_masks_ = self.pixel_factors_.sum(0).T.contiguous()  # (d, H·W), original units
        # O_J as (d, C, G) over the grid's G positions (G = 1 pooled), for removed_mass_rows.
        self.neuron_grid_ = self._explained_neurons.T.reshape(d, model.feature_shape[0], -1).contiguous()
        # Makes every removal a product with the head's weight (see removed_logits).
        self.head_weight_ = linear_head_weight(model)
        self.graphs_: BucketGraphs | None = None  # fold_in_steps() per batch size, on a GPU (capture_graphs)
        self._bind()
        # Host copies for the neighbour view (see neighbours): unit probe codes and what is reported of each probe.
        self._probe_units = _unit_rows(self.probe_codes_.double()).numpy()
        self._probe_top_concept = self.probe_codes_.argmax(1).numpy()
        self._probe_ids = self.probe_index_.numpy()
        self._probe_classes = self.probe_labels_.numpy()
        self._probe_png = _probe_png(fitted.factors, len(self._probe_ids))

    def declared_factors(self) -> dict[str, FactorSpec]:
        if not self.config.layers:
            raise ValueError("coupled_nmf: the archive names no analysed layers")
        n_in, (height, width) = pixel_layout(self.model.input_spec.shape)
        n_layers = len(self.config.layers)
        # The explained layer (the last analysed) has the model's D channels, F units of its maps.
        pooled = [self.config.layer_is_pooled(name) for name in self.config.layers]
        neurons = {f"neuron_factors_{j}_": (torch.float32, (f"C{j}" if j < n_layers - 1 else ("D" if p else "F"),
                                                            "C"))
                   for j, p in enumerate(pooled)}
        return {
            "pixel_factors_": (torch.float32, (n_in, height * width, "C")),
            **neurons,
            "view_scales_": (torch.float32, (n_in + n_layers,)),
            "pixel_offset_": (torch.float32, (n_in,)),
            "probe_codes_": (torch.float32, ("N", "C")),
            "probe_index_": (torch.int64, ("N",)),
            "probe_labels_": (torch.int64, ("N",)),
        }

    @property
    def _explained_neurons(self) -> torch.Tensor:
        """O_J (C, d) or (C·H·W, d): the neuron factors of the explained layer, the last analysed."""
        return getattr(self, f"neuron_factors_{len(self.config.layers) - 1}_")

    def _bind(self) -> None:
        """What is made from the model's modules and this explainer's tensors as they are now: the tapped
        upstream, which the torch forward pass runs (batch.taps), and the upstream cut short after the deepest
        analysed layer, which computes them otherwise; the view dictionary's blocks (d, T_j), views of its tensor."""
        d = len(self.dictionary_)
        sizes = [d * n for n in self._view_sizes]
        self._view_blocks = tuple(flat.view(d, -1) for flat in self.view_dictionary_.split(sizes))
        extra = list(self.config.layers[:-1])
        self.tapped_upstream = tap_module(self.model.upstream, extra, self.pooled[:-1])
        self._taps = tap_module(self.model.upstream, extra, self.pooled[:-1], keep_output=False)

    def to(self, device):
        super().to(device)
        self._bind()  # to the model's modules and this explainer's tensors as they are now
        self.graphs_ = None  # captured on the old device: capture again
        return self

    def fold_in_steps(self, cross: torch.Tensor) -> torch.Tensor:
        """The fold-in of more than ten concepts (or an older archive's HALS sweeps) by a fixed number of steps
        (on a GPU; on the CPU the active set stops once every row is optimal): cross terms x Dᵀ (B, d) -> f (B, d)."""
        return nnls_codes(cross, self.gram_, self.config.fold_in_iter, solver=self.config.fold_in_solver)

    def capture_graphs(self, sizes: tuple[int, ...], capture: Capture) -> CaptureReport | None:
        """:meth:`fold_in_steps` as one graph per batch size (an active-set step is about 47 launches, and it
        takes twice as many steps as concepts); None where the fold-in is by every support (a dozen ops).
        Checked on random non-negative mixtures of the concepts (seeded)."""
        if self.support_inverses_ is not None:
            return None
        generator = torch.Generator().manual_seed(0)
        mixture = torch.rand(example_count(sizes), len(self.dictionary_), generator=generator)
        graphs = BucketGraphs(self.fold_in_steps, capture)
        report = graphs.capture_buckets((mixture.to(self.dictionary_) @ self.dictionary_ @ self.dictionary_.T,), sizes)
        self.graphs_ = graphs
        return report

    def views(self, inputs: torch.Tensor, features: torch.Tensor, taps: tuple[torch.Tensor, ...] | None = None,
              ) -> list[torch.Tensor]:
        """The input's views in their own units, non-negative float32: (B, H·W) for each input channel's pixels
        (less the channel's offset), then each analysed layer's neurons, the explained layer's last.

        ``taps`` are the other analysed layers' views, ``tapped_upstream(inputs)[1:]``; None: computed here."""
        b, n_in = len(inputs), len(self.pixel_offset_)
        pixels = (inputs.float().reshape(b, n_in, -1) - self.pixel_offset_[:, None]).clamp_min(0)
        taps = self._taps(inputs) if taps is None else taps
        explained = channel_view(features) if self.pooled[-1] else unit_view(features)
        return [*pixels.unbind(1), *taps, explained]

    def stacked_views(self, inputs: torch.Tensor, features: torch.Tensor,
                      taps: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """(B, T): :meth:`views` in normalized units (each divided by its scale) side by side, the rows that the
        fold-in codes, ``x ≈ f D``."""
        return torch.cat([v / s for v, s in zip(self.views(inputs, features, taps), self.view_scales_)], 1)

    def fold_in_terms(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """All that the fold-in and its residual read of the stacked views x, from the views themselves.

        Returns
        -------
        cross : (B, d) ``x Dᵀ``, float32 (float64 from the CPU's kernel, which the solvers read as it is)
        energy : (B,) float64, ``‖x‖²``
        """
        blocks = self._view_blocks
        if compiled_rows.serves(views[0].device):  # a BLAS product is slow on (B, T_j) x (T_j, d): see the kernel
            cross, energy = np.zeros((len(views[0]), len(blocks[0]))), np.zeros(len(views[0]))
            for view, block, scale in zip(views, blocks, self.inverse_square_scales_.tolist()):
                add_terms_rows(view.contiguous().numpy(), block.numpy(), scale, cross, energy, np.float32(0))
            return torch.from_numpy(cross), torch.from_numpy(energy)
        cross = views[0] @ blocks[0].T
        for view, block in zip(views[1:], blocks[1:]):
            cross = cross.addmm_(view, block.T)
        norms = torch.stack([torch.linalg.vector_norm(view, dim=1) for view in views], 1)  # (B, V)
        return cross, norms.double().square() @ self.inverse_square_scales_

    def fold_in(self, cross: torch.Tensor) -> torch.Tensor:
        """The codes f (B, d), ``argmin_{f ≥ 0} ‖x − f D‖² (+ λ‖f‖²)``, from the cross terms x Dᵀ (B, d): float32,
        float64 from the CPU's compiled loops.

        The exact fold-in ("active_set") runs as compiled row loops on the CPU (:mod:`handlers.solvers.compiled_rows`,
        stopping once a row is optimal) and else by every support for ten concepts or fewer, or as the tensor
        solver's fixed steps (a captured graph on a GPU); older archives' HALS sweeps run as tensor ops."""
        if self.config.fold_in_solver == "active_set":
            if compiled_rows.serves(cross.device):
                return torch.from_numpy(active_set_rows(cross.double().numpy(), self.ridged_gram_.numpy(),
                                                        self.config.fold_in_iter, self._tolerance, False))
            if self.support_inverses_ is not None:
                return shared_gram_nnls(cross, self.support_inverses_).float()
        return (self.graphs_ or self.fold_in_steps)(cross.float())

    def encode(self, inputs: torch.Tensor, features: torch.Tensor, taps: tuple[torch.Tensor, ...] | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fold inputs into the concepts with the factors fixed (call without autograd,
        e.g. under ``torch.inference_mode()``, as :meth:`explain` is).

        Parameters
        ----------
        inputs : (B, *input_shape)
        features : (B, *feature_shape), the explained layer's activation for ``inputs``
        taps : the views of the other analysed layers, ``tapped_upstream(inputs)[1:]``; None: computed here

        Returns
        -------
        f : (B, d) non-negative concept coefficients
        residual_share : (B,) ``‖x − f D‖ / ‖x‖`` in [0, 1], x the :meth:`stacked_views`; from the fold-in's
            terms, ``‖x − f D‖² = ‖x‖² − 2 f·xDᵀ + f DDᵀ fᵀ`` in float64 (x Dᵀ is float32: the share is exact to
            about 1e-7 / share)
        """
        cross, energy = self.fold_in_terms(self.views(inputs, features, taps))
        f = self.fold_in(cross)
        # The CPU's terms and codes are float64 already; each conversion there would be an op a request.
        w, cross, f = f.double(), cross.double(), f.float()
        # An input of zero views folds in to f = 0: share 0.
        if compiled_rows.serves(w.device):
            return f, torch.from_numpy(residual_share_rows(w.numpy(), cross.numpy(), energy.numpy(),
                                                           self.reconstruction_gram_.numpy(), EPS, True))
        error = energy + torch.linalg.vecdot(w, torch.addmm(cross, w, self.reconstruction_gram_, beta=-2))
        return f, (error / energy.clamp_min(EPS)).clamp(0, 1).sqrt().float()

    def remove(self, features: torch.Tensor, f: torch.Tensor, sets: torch.Tensor) -> torch.Tensor:
        """The explained layer's activation with concept sets removed.

        Parameters
        ----------
        features : (B, C, *grid) the activation a
        f : (B, d) concept coefficients
        sets : (B, M, d) bool or 0/1, the concepts removed in each of M variants

        Returns
        -------
        (B, M, C, *grid): ``a - max(a, 0) * r`` with, per neuron u (a unit (c, h, w) of the maps, or a
        channel c for a layer pooled), ``r[u] = min(1, Σ_S O[u, d] f_d / v[u])``, 0 where ``v[u] = 0``;
        ``v = max(a, 0)`` (maps) or its spatial mean (pooled)
        """
        a = features.float()
        positive = a.clamp_min(0)
        ratio = self._removal_ratio(self._neuron_values(positive), f, sets)
        if self.pooled[-1]:
            ratio = ratio.reshape(*ratio.shape, *([1] * (a.dim() - 2)))
        else:
            ratio = ratio.reshape(*ratio.shape[:2], *a.shape[1:])
        return a.unsqueeze(1) - positive.unsqueeze(1) * ratio

    def _neuron_values(self, positive: torch.Tensor) -> torch.Tensor:
        """(B, U): the explained layer's neurons, from max(a, 0) (B, C, *grid): its spatial mean per
        channel (pooled, U = C) or every unit of the maps (U = C·H·W)."""
        return spatial_mean(positive) if self.pooled[-1] else positive.flatten(1)

    def _carried(self, f: torch.Tensor, sets: torch.Tensor) -> torch.Tensor:
        """(B, M, U) ≥ 0: what each concept set carries of each neuron, ``Σ_S O[u, d] f_d``."""
        return (sets.float() * f.unsqueeze(1)) @ self._explained_neurons.T

    def _removal_ratio(self, values: torch.Tensor, f: torch.Tensor, sets: torch.Tensor) -> torch.Tensor:
        """(B, M, U): the share ``r`` of each neuron that each concept set removes (see :meth:`remove`)."""
        carried = self._carried(f, sets)
        return torch.where(values.unsqueeze(1) > 0, carried / values.unsqueeze(1).clamp_min(EPS),
                           torch.zeros_like(carried)).clamp_max(1)

    def removed_logits(self, batch: ExplainBatch, codes: Codes, sets: torch.Tensor) -> torch.Tensor:
        """(B, S, K): the logits with each concept set removed, ``downstream(remove(...))``.

        For a non-negative layer and an average-pool + linear head,
        ``downstream(a - a r) = logits - mean_hw(a r) @ weight.T`` (pooled: ``r`` is constant over the
        grid, ``mean_hw(a) * r``): the head is not run again, and no (B, S, C, *grid) activation is formed.
        """
        f = codes.weight
        if self.head_weight_ is None:
            removed = self.remove(batch.features, f, sets)
            b, m = sets.shape[:2]
            return self.model.downstream(removed.reshape(b * m, *removed.shape[2:])).float().reshape(b, m, -1)
        mass = self.removed_mass(batch.features, f, sets)
        if compiled_rows.serves(mass.device):
            return torch.from_numpy(linear_removal_rows(batch.logits.float().numpy(), mass.numpy(),
                                                        self.head_weight_.numpy()))
        return batch.logits.float().unsqueeze(1) - mass @ self.head_weight_.T

    def removed_mass(self, features: torch.Tensor, f: torch.Tensor, sets: torch.Tensor) -> torch.Tensor:
        """(B, S, C): the mean over the grid of what each concept set removes from each channel of the explained
        layer, ``mean_hw(max(a, 0) r)`` (:meth:`remove`); since ``v r = min(v, carried)`` (0 where v = 0, carried
        ≥ 0), ``mean_hw(min(v, Σ_S O_d f_d))``, or for a layer pooled ``min(v, Σ_S O_d f_d)`` per channel.

        On the CPU by :func:`removed_mass_rows` (a set costs the concepts it removes, 0 for the empty set), else
        as one product over (B, S, U)."""
        positive = features.float().clamp_min(0)
        if compiled_rows.serves(positive.device):
            values = spatial_mean(positive) if self.pooled[-1] else positive
            values = values.flatten(2) if values.dim() > 2 else values.unsqueeze(2)  # (B, C, G), as neuron_grid_
            mass = removed_mass_rows(values.contiguous().numpy(), f.contiguous().numpy(),
                                     sets.float().contiguous().numpy(), self.neuron_grid_.numpy())
            return torch.from_numpy(mass)
        lost = torch.minimum(self._neuron_values(positive).unsqueeze(1), self._carried(f, sets))
        if not self.pooled[-1]:  # the spatial mean of each channel's removed units
            lost = lost.reshape(*lost.shape[:2], positive.shape[1], -1).mean(3)
        return lost

    def nearest_probes(self, weight: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The paper's kNN analysis: the probe examples nearest in concept space, by cosine distance.

        Parameters
        ----------
        weight : (B, d) concept coefficients f
        k : neighbours per example

        Returns
        -------
        ids : (B, k) int64 indices into the fit data's ``x_train``, nearest first
        distance : (B, k) ``1 - cos(f, f_probe)``, in [0, 1] (non-negative codes), ascending
        """
        similarity, where = (_unit_rows(weight) @ _unit_rows(self.probe_codes_).T).topk(k, dim=1)
        return self.probe_index_[where], 1 - similarity

    @property
    def n_probe(self) -> int:
        return len(self._probe_ids)

    def neighbours(self, component_index: np.ndarray, weight: np.ndarray, k: int) -> Neighbours:
        """The paper's neighbour view of one input (Fig. 4d, 5d): its ``k`` nearest probe examples by
        the cosine distance of concept codes (as :meth:`nearest_probes`, in float64 on the host; ties
        to the lower probe position), each with the concept it has its highest affinity for
        (argmax of its code), and the distribution of those concepts over the k.

        Parameters
        ----------
        component_index : (C,) int64 the reported concepts (-1 = padding)
        weight : (C,) float32 their fold-in coefficients f
        k : neighbours, ``1 <= k <= n_probe``
        """
        f = np.zeros(self._probe_units.shape[1])
        reported = component_index >= 0
        f[component_index[reported]] = weight[reported]
        distance = 1 - self._probe_units @ (f / max(float(np.linalg.norm(f)), EPS))
        nearest = np.argsort(distance, kind="stable")[:k]
        top = self._probe_top_concept[nearest]
        png = None
        if self._probe_png is not None:
            data, offsets = self._probe_png
            png = tuple(data[offsets[n]:offsets[n + 1]].tobytes() for n in nearest.tolist())
        return Neighbours(probe_index=self._probe_ids[nearest], distance=distance[nearest].astype(np.float32),
                          class_index=self._probe_classes[nearest], top_component=top,
                          component_share=np.bincount(top, minlength=len(f)) / k, png=png)

    def encode_batch(self, batch: ExplainBatch) -> Codes:
        f, residual_share = self.encode(batch.inputs, batch.features, batch.taps)
        b, d = f.shape
        heatmaps = (f.unsqueeze(2) * self.pixel_masks_).reshape(b, d, *self.map_hw) if batch.heatmaps else None
        return Codes(self._component_range.expand(b, d), f, residual_share, heatmaps)
