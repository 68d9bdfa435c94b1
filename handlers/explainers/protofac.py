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

The loss (paper eq. 4) is a sum of per-row terms: on a mini-batch B, with ŷ the oracle labels,

    λ_ce · L_ce + λ_r · L_r + λ_c · L_c
    L_ce = mean_i CE(f_down(w_i H), ŷ_i)                    (eq. 2, multi-class)
    L_r  = mean_i ‖a_i − w_i H‖ / ā                          (eq. 1 row by row, made scale-free by ā,
                                                              the mean row norm of the training A)
    L_c  = mean_i min_j ‖w_i − e_j‖²                         (eq. 3: concentration of each row of W
                                                              on one prototype; e_j the basis vectors)

with f_down the frozen network after the layer. Eq. 1 is (1/n)‖A − WH‖_F; its mean of row norms
here equals it for one row and makes the loss a sum over rows, so a row's W never depends on the
other rows of its batch (the fit report's F-loss is eq. 1 as written). Adam updates W and H; H is
clamped at zero after each step. (An earlier version also pulled every prototype towards its
nearest candidate, (1/k) Σ_j min_c ‖h_j − a_c‖² / ā², under the name of eq. 3; on the MNIST demo,
weight 0.1 against 0, it picked the same prototypes, so it is gone.) Every ``projection_interval`` epochs each prototype is replaced by its
nearest candidate (distinct candidates, greedily, closest prototype first) and W is trained alone
with H frozen (Algorithm 1, lines 15-21); the projected H with the best accuracy against the
oracle (on a fixed subset of the training data) is kept.

W with H frozen, after a projection, for held-out data and per request, comes from one of two
protocols (``served_protocol`` chooses the one served; the fit report measures both):

* ``paper``: the paper's protocol, W trained alone with the same loss (L_ce, L_r, L_c) and the
  oracle ŷ the model's own prediction (the server has it at request time): ``code_steps``
  projected Adam steps (:func:`handlers.solvers.simplex.projected_adam`, step ``lr_codes``)
  from the least-squares code below, computed on k-sized quantities (HHᵀ cached, aHᵀ once per
  input) and, before an affine head, the prototypes' logits, so a step costs O(k²) per input;
* ``least_squares``: the simplex-constrained least-squares code

    w = argmin_{w ∈ Δ_k} ‖a − w H‖²,

  found by a fixed number of primal active-set steps (:func:`simplex_least_squares`, the Gram
  matrix cached, aHᵀ in float64 as for the paper protocol), exact once each row's support
  is found; the report says on what share of
  held-out rows it had converged in that many steps. Archives written before ``served_protocol``
  existed serve this one, as they were fitted and reported with it.

The surrogate's prediction is f_down(wH). ProtoFac is not additive; a prototype's contribution is the drop of the
surrogate's target logit when its weight is set to zero,
c_i = f_down(wH)[t] − f_down(w_{−i}H)[t], and an intervention evaluates f_down(w'H) with
the suppressed weights zeroed and *not* renormalized (so suppression removes the
prototypes' share of the reconstruction, consistently with the contributions). The
response's bias is f_down(0)[t] and its residual contribution is the model's target
logit minus the surrogate's, f[t] − f_down(wH)[t], so that for an affine downstream (both
demo models) Σ_i c_i + residual + bias equals the model's target logit exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
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
from handlers.device_graphs import BucketGraphs, Capture, CaptureReport, example_count
from handlers.model import ModelParts, linear_head_weight
from handlers.solvers.active_set import active_set_codes, ridged_gram
from handlers.solvers import compiled_rows
from handlers.solvers.compiled_rows import (active_set_rows, add_terms_rows, affine_removal_rows, mass_share_rows,
                                            paper_codes_rows, residual_share_rows)
from handlers.solvers.simplex import autograd_gradient, projected_adam, vertex_distance

NAME = "protofac"
PROTOCOLS = ("paper", "least_squares")


@dataclass(frozen=True)
class ProtoFacConfig(MethodConfig):
    """ProtoFac's hyperparameters.

    n_prototypes : k.
    lambda_ce, lambda_r, lambda_c : weights of eq. 4's terms: cross-entropy against the oracle
        (eq. 2), reconstruction (eq. 1), concentration of W (eq. 3) (module docstring).
    epochs, projection_interval, batch_size, lr_weights, lr_prototypes : the Adam schedule;
        ``lr_prototypes`` is relative to the features' root-mean-square entry.
    served_protocol : how W is found with H frozen, per request and for the reported figures:
        ``paper`` (eq. 4 by projected Adam) or ``least_squares`` (module docstring).
    code_steps, lr_codes : the projected Adam steps and step size of the ``paper`` protocol (Algorithm
        1's W-only epochs after each projection use them too).
    candidate_fraction : share of every class's training inputs cut into candidates.
    window, windows_per_side : the sliding window of image models (pixels; positions per
        axis); 16 and 5 on a 32×32 input are the paper's 16×16 windows at stride 4.
    solver_iter : steps of the active-set simplex solver (the least-squares code, also the start of
        the ``paper`` protocol's steps); None: n_prototypes (enough to add every prototype once;
        archives store the number). The report's ``solver_converged`` is the share of held-out rows
        whose least-squares codes are optimal after that many steps.
    eval_size : training rows (a fixed random subset) on which the accuracy against the
        oracle picks the best projection.
    nmf_max_iter : iterations of the plain NMF baseline (f_loss_nmf).
    k_sweep, sweep_epochs, sweep_rows : the accuracy-vs-k table and plot (paper Fig. 5), each k fitted
        on ``sweep_rows`` training rows (a fixed random subset; 0: all) with ``sweep_epochs`` epochs;
        () skips it, and the missing-values test with it.
    missing_fraction : share of the activation values set to zero in the missing-values test
        (paper Sec. IV-C), fitted with the sweep's settings at its largest k up to n_prototypes.
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
    served_protocol: str = "paper"
    code_steps: int = 30
    lr_codes: float = 0.01
    candidate_fraction: float = 0.2
    window: int = 20
    windows_per_side: int = 5
    solver_iter: int | None = None
    eval_size: int = 1000
    nmf_max_iter: int = 50
    k_sweep: tuple[int, ...] = (5, 10, 20, 50)
    sweep_epochs: int = 4
    sweep_rows: int = 1000
    missing_fraction: float = 0.2
    random_state: int = 0

    def __post_init__(self):
        super().__post_init__()
        self.require_at_least(1, "n_prototypes", "epochs", "projection_interval", "batch_size", "window",
                              "windows_per_side", "eval_size", "nmf_max_iter", "sweep_epochs")
        self.require_at_least(0, "lambda_ce", "lambda_r", "lambda_c", "lr_weights", "lr_prototypes",
                              "code_steps", "lr_codes", "sweep_rows")
        self.require_at_most(MAX_STEPS, "n_prototypes", "epochs", "projection_interval", "code_steps", "solver_iter",
                             "nmf_max_iter", "sweep_epochs")
        self.require_at_most(MAX_SIZE, "batch_size", "window", "windows_per_side", "eval_size", "k_sweep", "sweep_rows")
        self.require(self.served_protocol in PROTOCOLS, "served_protocol", f"one of {', '.join(PROTOCOLS)}")
        self.require(0 < self.candidate_fraction <= 1, "candidate_fraction", "in (0, 1]")
        self.require(0 <= self.missing_fraction < 1, "missing_fraction", "in [0, 1)")
        self.require(self.solver_iter is None or self.solver_iter >= 1, "solver_iter", "None or at least 1")
        self.require(all(k >= 1 for k in self.k_sweep), "k_sweep", "positive numbers of prototypes")

    @classmethod
    def from_hyperparameters(cls, stored: dict) -> ProtoFacConfig:
        """As :meth:`MethodConfig.from_hyperparameters`, except that archives written before
        ``served_protocol`` existed were fitted and reported with least squares, and serve it."""
        if stored and "served_protocol" not in stored:
            stored = {**stored, "served_protocol": "least_squares"}
        return super().from_hyperparameters(stored)

    @property
    def solver_steps(self) -> int:
        """Steps of the simplex solver: ``solver_iter``, else one per prototype."""
        return self.n_prototypes if self.solver_iter is None else self.solver_iter


def activation_rows(features: torch.Tensor) -> torch.Tensor:
    """(N, *feature_shape) -> (N, m), negative activations counted as zero (H ≥ 0 needs A ≥ 0)."""
    return features.clamp_min(0).flatten(1).float()


def objective_terms(w: torch.Tensor, logits: torch.Tensor, oracle: torch.Tensor, residual_norm: torch.Tensor,
                    scale: torch.Tensor | float) -> dict[str, torch.Tensor]:
    """Eq. 4's terms, row by row: {"ce" (eq. 2), "reconstruction" (eq. 1), "concentration" (eq. 3)}.

    Parameters
    ----------
    w : (B, k) codes on the simplex.
    logits : (B, K) the surrogate's f_down(wH).
    oracle : (B,) int64 the model's predicted classes.
    residual_norm : (B,) ‖a_i − w_i H‖.
    scale : ā, the mean row norm of the training activations.

    Returns
    -------
    dict of (B,) tensors; the loss is Σ_i λ_ce ce_i + λ_r reconstruction_i + λ_c concentration_i
    (:func:`weighted_objective`), and its batch mean the paper's eq. 4 on the batch.
    """
    return {"ce": F.cross_entropy(logits, oracle, reduction="none"),
            "reconstruction": residual_norm / scale,
            "concentration": vertex_distance(w)}


def weighted_objective(terms: dict[str, torch.Tensor], config: ProtoFacConfig) -> torch.Tensor:
    """(B,) λ_ce ce + λ_r reconstruction + λ_c concentration, from :func:`objective_terms`."""
    return (config.lambda_ce * terms["ce"] + config.lambda_r * terms["reconstruction"]
            + config.lambda_c * terms["concentration"])


def affine_prototype_logits(parts: ModelParts, prototypes: torch.Tensor) -> torch.Tensor | None:
    """(k, K) each prototype's logits less the head's bias, when the head after the layer is an
    average pool + linear layer (then f_down(wH) = w @ this + f_down(0)); else None."""
    weight = linear_head_weight(parts)
    if weight is None:
        return None
    pooled = prototypes.reshape(len(prototypes), parts.feature_shape[0], -1).mean(2)  # (k, C)
    return pooled @ weight.to(pooled).T


@dataclass(frozen=True)
class AffineSurrogate:
    """The surrogate f_down(wH) = w @ head + bias of a network that is affine after the layer.

    head : (k, K) each prototype's logits less the bias;  bias : (K,) f_down(0).
    """

    head: torch.Tensor
    bias: torch.Tensor

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        return w @ self.head + self.bias


def code_terms(features: torch.Tensor, prototypes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The k-sized terms the codes are solved from, in float64: (aHᵀ (B, k), ‖a‖² (B,)) of rows a (B, m) and
    prototypes H (k, m). In float64 because ‖a − wH‖² = ‖a‖² − 2 w·aHᵀ + wHHᵀwᵀ is a difference of terms about
    ‖a‖², nearly equal when the input is close to the prototypes' hull, and Adam's normalized steps would turn
    a row's rounding (which depends on the batch's shape in a float32 product) into steps of full size."""
    features64 = features.double()
    return features64 @ prototypes.double().T, features64.square().sum(1)


def paper_codes(features: torch.Tensor, prototypes: torch.Tensor, gram: torch.Tensor, oracle: torch.Tensor,
                surrogate: Callable[[torch.Tensor], torch.Tensor], scale: torch.Tensor | float,
                config: ProtoFacConfig, start: torch.Tensor | None = None) -> torch.Tensor:
    """W with H frozen by the paper's protocol: ``config.code_steps`` projected Adam steps on eq. 4, row by row.

    Parameters
    ----------
    features : (B, m) the rows a.
    prototypes : (k, m) H;  gram : (k, k) HHᵀ.
    oracle : (B,) int64 the model's predicted classes.
    surrogate : callable (B, k) codes -> (B, K) logits f_down(wH), differentiable; an
        :class:`AffineSurrogate` gets eq. 4's gradient in closed form (a few (B, k) products a step
        instead of autograd's graph), any other callable by autograd.
    scale : ā.
    start : (B, k) codes to start from; default the simplex least-squares codes (computed in float64).

    Returns
    -------
    Tensor of shape (B, k) on the simplex, of ``features``' dtype. Each row depends on its own input only.
    """
    cross, energy = code_terms(features, prototypes)
    return paper_codes_of_terms(cross, energy, gram, oracle, surrogate, scale, config, start).to(features.dtype)


def paper_codes_of_terms(cross: torch.Tensor, energy: torch.Tensor, gram: torch.Tensor, oracle: torch.Tensor,
                         surrogate: Callable[[torch.Tensor], torch.Tensor], scale: torch.Tensor | float,
                         config: ProtoFacConfig, start: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`paper_codes` from the rows' terms (:func:`code_terms`): cross (B, k) aHᵀ and energy (B,) ‖a‖², float64.
    Returns (B, k) float64."""
    # Inference tensors cannot be saved for backward: the k-sized quantities are copied outside inference mode.
    with torch.inference_mode(False), torch.enable_grad():
        cross, energy, gram, oracle = cross.double().clone(), energy.double().clone(), gram.double(), oracle.clone()
        if start is None:
            start = active_set_codes(cross, gram, config.solver_steps, simplex=True)
        start = start.double()
        # The norm is smoothed by 1e-3 ā: at a zero residual (an input equal to a prototype) its gradient,
        # the residual's direction, would be rounding noise.
        smoothing = (1e-3 * float(scale)) ** 2

        def residual_sq(w, to_cross):
            # ‖a − wH‖² = w·(wHHᵀ − 2 aHᵀ) + ‖a‖², from to_cross = wG − c: no m-sized product per step.
            return torch.baddbmm(energy[:, None, None], w.unsqueeze(1), (to_cross - cross).unsqueeze(2))[:, 0, 0]

        def loss(w):
            residual = (residual_sq(w, torch.addmm(cross, w, gram, beta=-1)).clamp_min(0) + smoothing).sqrt()
            return weighted_objective(objective_terms(w, surrogate(w.float()).double(), oracle, residual, scale),
                                      config).sum()

        if isinstance(surrogate, AffineSurrogate):
            # The gradient in a few (B, k) ops a step: eq. 4's weights folded into constants, the logits in float64.
            head, bias = surrogate.head.double(), surrogate.bias.double()
            ce_head_t = config.lambda_ce * head.T  # (K, k)
            # (one_hot would check the classes' range on the host, a synchronization a graph cannot hold)
            target = (oracle[:, None] == torch.arange(len(bias), device=oracle.device)).double()
            rows = torch.arange(len(cross), device=cross.device)
            reconstruction_weight = config.lambda_r / float(scale)

            def gradient_of(w):  # ∂/∂w of loss(w), term by term
                gradient = (torch.addmm(bias, w, head).softmax(1) - target) @ ce_head_t  # eq. 2
                to_cross = torch.addmm(cross, w, gram, beta=-1)  # wG − c
                raw = residual_sq(w, to_cross)
                # eq. 1: (wG − c) / ‖a − wH‖ (smoothed); zero where rounding made the square negative (clamped).
                gradient.addcmul_(to_cross, ((raw >= 0) / (raw.clamp_min(0) + smoothing).sqrt()).unsqueeze(1),
                                  value=reconstruction_weight)
                # eq. 3: 2(w − e_argmax), zero at a vertex (where the distance is zero).
                top = w.max(1)
                return gradient.add_(w.index_put((rows, top.indices), top.values - 1), alpha=2 * config.lambda_c)
        else:
            gradient_of = autograd_gradient(loss)
        return projected_adam(start, gradient_of, config.code_steps, config.lr_codes)


def surrogate_logits(parts: ModelParts, prototypes: torch.Tensor, prototype_logits: torch.Tensor | None,
                     zero_logits: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The surrogate w (B, k) -> f_down(wH) (B, K), differentiable in w: an :class:`AffineSurrogate` of the
    prototypes' logits (k, K) and f_down(0) (K,) when the head is affine, else the downstream on wH.

    Build it outside inference mode: it holds copies of what autograd saves for the backward pass.
    """
    if prototype_logits is not None:
        return AffineSurrogate(prototype_logits.clone(), zero_logits.clone())
    frozen = prototypes.clone()
    return lambda w: parts.downstream((w @ frozen).reshape(-1, *parts.feature_shape)).float()


class ProtoFacExplainer(RemovalExplainer):
    name = NAME
    config_class = ProtoFacConfig
    residual_share_definition = (
        "||a - wH||^2 / ||a||^2 clamped to [0, 1]: the share of the layer activation's energy (a: the clipped, "
        "flattened features) that the convex combination wH of the prototypes does not reconstruct"
    )
    contribution_definition = (
        "f_down(wH)[t] - f_down(w_{-i}H)[t]: the drop of the surrogate's target logit when prototype i's weight is "
        "set to zero (the others not renormalized); weight = w_i, the code of the features on the prototypes H "
        "by the archive's served_protocol (paper: eq. 4 by projected Adam, the model's prediction as the oracle; "
        "least_squares: the simplex least-squares code). Not additive in general: bias = f_down(0)[t] and residual_contribution = the model's "
        "target logit minus the surrogate's f_down(wH)[t], so the sum identity holds exactly only when the network "
        "after the layer is affine (true for the demo models). Interventions: f_down(w'H), suppressed weights zeroed"
    )
    factors = {
        "prototypes_": (torch.float32, ("C", "F")),  # H, k prototypes of m = F flattened features
        "prototype_inputs_": (torch.float32, ("C", "*input")),
    }

    def __init__(self, model: ModelParts, fitted: FittedMethod):
        super().__init__(model, fitted)
        self.prototypes64_ = self.prototypes_.double()  # (k, m), cached for the solvers, which work in float64
        self.gram_ = self.prototypes64_ @ self.prototypes64_.T  # (k, k)
        self.ridged_gram_, tolerance = ridged_gram(self.gram_)  # (k, k), for the compiled solvers
        self._tolerance = float(tolerance)
        with torch.inference_mode():
            device = model.device
            self.zero_logits_ = model.downstream(torch.zeros(1, *model.feature_shape, device=device))[0].float().cpu()
        # An average-pool + linear head is affine in the reconstruction wH: the logits of any
        # weights w are w @ (each prototype's logits without the bias) + bias (see removed_logits).
        self.prototype_logits_ = affine_prototype_logits(model, self.prototypes_)  # (k, K) or None
        # ā on the host: reading it from a device tensor in every request would synchronize.
        self._feature_scale = float(self.feature_scale_[0]) if self.config.served_protocol == "paper" else None
        if self.prototype_logits_ is not None:  # the affine surrogate in float64, for the compiled solvers
            self.head64_ = self.prototype_logits_.double()  # (k, K)
            self.ce_head64_t_ = (self.config.lambda_ce * self.head64_.T).contiguous()  # (K, k)
            self.zero_logits64_ = self.zero_logits_.double()  # (K,)
        # Each prototype's activation mass at each position of a grid layer (k, P), for the heatmaps.
        self.prototype_mass_ = self.prototypes_.reshape(len(self.prototypes_), model.feature_shape[0], -1).sum(1)
        self.graphs_: BucketGraphs | None = None  # codes() per batch size, on a GPU (capture_graphs)

    def to(self, device):
        super().to(device)
        self.graphs_ = None  # captured on the old device: capture again
        return self

    def declared_factors(self):
        if self.config.served_protocol == "paper":  # eq. 1's scale ā, for the per-request loss
            return {**self.factors, "feature_scale_": (torch.float32, (1,))}
        return self.factors

    def codes(self, cross: torch.Tensor, energy: torch.Tensor, oracle: torch.Tensor) -> torch.Tensor:
        """The codes w (B, k) float64 by the served protocol, row by row, from the rows' terms (:func:`code_terms`:
        cross (B, k) aHᵀ and energy (B,) ‖a‖², float64); ``oracle`` (B,) int64, the model's predicted classes, is
        the paper protocol's oracle (unused by least squares).

        On the CPU (:func:`compiled_rows.serves`) the same steps as compiled row loops
        (:mod:`handlers.solvers.compiled_rows`) instead of tensor ops, each of which costs the CPU its Python
        call; not for the paper protocol through a head that is not affine, whose gradient comes from autograd."""
        paper = self.config.served_protocol == "paper"
        if compiled_rows.serves(cross.device) and not (paper and self.prototype_logits_ is None):
            return self._compiled_codes(cross, energy, oracle)
        if not paper:
            return active_set_codes(cross, self.gram_, self.config.solver_steps, simplex=True)
        with torch.inference_mode(False):
            surrogate = surrogate_logits(self.model, self.prototypes_, self.prototype_logits_, self.zero_logits_)
        return paper_codes_of_terms(cross, energy, self.gram_, oracle, surrogate, self._feature_scale, self.config)

    def _compiled_codes(self, cross: torch.Tensor, energy: torch.Tensor, oracle: torch.Tensor) -> torch.Tensor:
        """:meth:`codes` on the CPU, by :func:`active_set_rows` (on the simplex) and :func:`paper_codes_rows`."""
        cross = cross.numpy()
        start = active_set_rows(cross, self.ridged_gram_.numpy(), self.config.solver_steps, self._tolerance, True)
        if self.config.served_protocol == "least_squares":
            return torch.from_numpy(start)
        scale = self._feature_scale
        w = paper_codes_rows(start, cross, energy.numpy(), self.gram_.numpy(), self.head64_.numpy(),
                             self.zero_logits64_.numpy(), self.ce_head64_t_.numpy(), oracle.numpy(),
                             self.config.code_steps, self.config.lr_codes, self.config.lambda_r / scale,
                             self.config.lambda_c, (1e-3 * scale) ** 2)
        return torch.from_numpy(w)

    def capture_graphs(self, sizes: tuple[int, ...], capture: Capture) -> CaptureReport | None:
        """:meth:`codes` as one graph per batch size: on a GPU its solvers take a fixed number of steps
        (about 2400 launches at batch 8 for the demo's paper protocol), replayed as one launch. None for the
        paper protocol through a head that is not affine, whose gradient comes from autograd.

        The graphs are checked on mixtures of the prototypes (seeded), each row a random convex
        combination plus non-negative noise of a tenth of the rows' scale."""
        if self.config.served_protocol == "paper" and self.prototype_logits_ is None:
            return None
        generator = torch.Generator().manual_seed(0)
        k, m = self.prototypes_.shape
        n = example_count(sizes)
        mixture = torch.rand(n, k, generator=generator)
        rows = (mixture / mixture.sum(1, keepdim=True)).to(self.prototypes_) @ self.prototypes_
        scale = rows.square().mean().sqrt()
        rows = rows + 0.1 * scale * torch.rand(n, m, generator=generator).to(rows)
        oracle = torch.arange(n, device=rows.device) % self.model.num_classes
        graphs = BucketGraphs(self.codes, capture)
        report = graphs.capture_buckets((*code_terms(rows, self.prototypes64_), oracle), sizes)
        self.graphs_ = graphs
        return report

    def row_terms(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`code_terms` of rows a (B, m) float32 and the prototypes: (aHᵀ (B, k), ‖a‖² (B,)) float64. On the
        CPU by :func:`add_terms_rows`, the float32 numbers' exact products summed in float64 (the float64
        product's numbers in another order), from the float32 prototypes: half the bytes a float64 product reads,
        and no float64 copy of the rows."""
        if compiled_rows.serves(rows.device):
            cross, energy = np.zeros((len(rows), len(self.prototypes_))), np.zeros(len(rows))
            add_terms_rows(rows.contiguous().numpy(), self.prototypes_.contiguous().numpy(), 1.0, cross, energy,
                           np.float64(0))
            return torch.from_numpy(cross), torch.from_numpy(energy)
        return code_terms(rows, self.prototypes64_)

    def encode_batch(self, batch: ExplainBatch) -> Codes:
        cross, energy = self.row_terms(activation_rows(batch.features))  # (B, k), (B,)
        b, k = cross.shape
        oracle = batch.logits.detach().argmax(1)  # the model's own prediction
        w64 = (self.graphs_ or self.codes)(cross, energy, oracle)  # (B, k)
        w = w64.float()
        return Codes(
            component_index=self._component_range.expand(b, k),
            weight=w,
            residual_share=self.residual_share(w64, cross, energy),
            heatmaps=self._heatmaps(batch, w) if batch.heatmaps else None,
        )

    def residual_share(self, w: torch.Tensor, cross: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
        """(B,) float32 ‖a − wH‖² / ‖a‖² in [0, 1] (0 for a = 0) from the solvers' terms (w, aHᵀ (B, k) and ‖a‖²
        (B,), float64): ‖a − wH‖² = ‖a‖² + w·(wHHᵀ − 2 aHᵀ), no m-sized product; on the CPU by
        :func:`residual_share_rows`."""
        if compiled_rows.serves(w.device):
            return torch.from_numpy(residual_share_rows(w.numpy(), cross.numpy(), energy.numpy(), self.gram_.numpy(),
                                                        1e-30, False))
        unexplained = torch.baddbmm(energy[:, None, None], w.unsqueeze(1),
                                    torch.addmm(cross, w, self.gram_, beta=-2).unsqueeze(2))[:, 0, 0].clamp_min(0)
        return torch.where(energy > 0, unexplained / energy.clamp_min(1e-30),
                           torch.zeros_like(energy)).clamp(0, 1).float()

    def removed_logits(self, batch: ExplainBatch, codes: Codes, sets: torch.Tensor) -> torch.Tensor:
        """The surrogate f_down(w'H), w' = w with the removed prototypes' weights zeroed (not renormalized):
        by the head's weights when the head is affine, else by the downstream on w'H."""
        if self.prototype_logits_ is not None and compiled_rows.serves(sets.device):
            return torch.from_numpy(affine_removal_rows(codes.weight.numpy(), sets.numpy(),
                                                        self.prototype_logits_.numpy(), self.zero_logits_.numpy()))
        w = codes.weight.unsqueeze(1)
        kept = torch.addcmul(w, w, sets, value=-1)  # (B, S, k): w where kept, 0 where removed
        if self.prototype_logits_ is not None:
            return torch.addmm(self.zero_logits_, kept.flatten(0, 1), self.prototype_logits_).unflatten(0, kept.shape[:2])
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
            if compiled_rows.serves(w.device):
                share = torch.from_numpy(mass_share_rows(w.numpy(), self.prototype_mass_.numpy()))
            else:
                share = w.unsqueeze(2) * self.prototype_mass_  # (B, k, P)
                share = share / share.sum((1, 2), keepdim=True).clamp_min(1e-30)
            return share.reshape(b, k, *((1, *grid) if len(grid) == 1 else grid))
        if batch.inputs.dim() == 3:
            gap = (batch.inputs.float().unsqueeze(1) - self.prototype_inputs_.unsqueeze(0)).square().mean(2)
            return (w.unsqueeze(2) * torch.exp(-gap / 2)).unsqueeze(2)  # (B, k, 1, T)
        return None

