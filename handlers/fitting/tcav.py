"""TCAV (Kim et al. 2018, "Interpretability beyond feature attribution: quantitative testing with
concept activation vectors"): how sensitive a class's logit is to a concept given by examples.

Offline only. For a concept (a set of example inputs) and a layer l:

* a CAV v is the normal of a linear classifier that separates the concept's activations at l
  from those of a random set of examples; one CAV per random set;
* the TCAV score of class k is the share of class-k inputs whose logit k increases along v,
  ``mean_x [∇_a logit_k(a_l(x)) · v > 0]``;
* the significance test: the scores of R CAVs against R random sets are compared with those of
  R CAVs of one random set against another (the null), by a two-sided Welch t-test.

Deviation from Kim et al.: the linear classifier is a ridge regression on ±1 labels, solved in
closed form in its dual (n × n for n examples, whatever the layer's size), not SGD logistic
regression; either gives a separating direction, and this one is exact and deterministic.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import stats

from handlers.graph_program import GraphProgram

RIDGE = 1e-2  # of the CAV's ridge regression, relative to the mean squared activation norm
SIGNIFICANCE = 0.05


def layer_gradients(upstream: GraphProgram, downstream: torch.nn.Module, layer: str, x: torch.Tensor,
                    classes: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """The gradient of each input's class logit with respect to the activation at ``layer``.

    Parameters
    ----------
    upstream, downstream : the model split at its explained layer; ``layer`` is a node of the upstream
    x : (N, *input_shape)
    classes : (N,) int64, the logit whose gradient is taken for each input

    Returns
    -------
    (N, F) float32, flattened
    """
    # The tap is the layer's own value (identity), so the gradient reaching it is the one through the network.
    tapped = upstream.with_taps([layer], lambda t: t)
    device = next(upstream.parameters()).device
    gradients = []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device).requires_grad_(True)
        with torch.enable_grad():
            features, value = tapped(xb)
            logits = downstream(features)
            chosen = logits.gather(1, classes[i:i + batch_size].to(device)[:, None]).sum()
            (grad,) = torch.autograd.grad(chosen, value)
        gradients.append(grad.flatten(1).float().cpu())
    return torch.cat(gradients)


def layer_activations(upstream: GraphProgram, layer: str, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(N, *input_shape) -> (N, F) float32: the activations at ``layer``, flattened."""
    taps = upstream.with_taps([layer], lambda t: t.flatten(1).float(), keep_output=False)
    device = next(upstream.parameters()).device
    with torch.inference_mode():
        return torch.cat([taps(x[i:i + batch_size].to(device))[0].cpu() for i in range(0, len(x), batch_size)])


def cav(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """The unit normal (F,) of a ridge classifier of ``positive`` (n, F) against ``negative`` (m, F),
    in the dual: ``w = Xᵀ (X Xᵀ + λ I)⁻¹ y`` with centred X and y = ±1."""
    X = torch.cat([positive, negative])
    y = torch.cat([torch.ones(len(positive)), -torch.ones(len(negative))])
    X = X - X.mean(0)
    gram = X @ X.T
    lam = RIDGE * gram.diagonal().mean().clamp_min(1e-12)
    w = X.T @ torch.linalg.solve(gram + lam * torch.eye(len(X), dtype=X.dtype), y - y.mean())
    return w / torch.linalg.vector_norm(w).clamp_min(1e-30)


def tcav_table(concepts: list[torch.Tensor], randoms: list[torch.Tensor], gradients: torch.Tensor,
               classes: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TCAV scores of each concept and class against random sets, and the null scores.

    Parameters
    ----------
    concepts : per concept, its examples' activations (n_c, F)
    randoms : 2R random sets' activations (n_r, F); the first R are the counterparts of the concepts'
        CAVs, and random set r + R is set r's counterpart in the null
    gradients : (M, F) each held-out input's gradient of its own class's logit; ``classes`` (M,) its class

    Returns
    -------
    scores : (d, R, K) the share of class-k inputs with a positive directional derivative, per CAV
    null : (R, K) the same for the random-vs-random CAVs
    p_values : (d, K) of the two-sided Welch t-test of scores[d, :, k] against null[:, k] (both samples
        constant: 0 where they differ, 1 where they are equal)
    """
    r = len(randoms) // 2
    counts = torch.bincount(classes, minlength=num_classes).clamp_min(1).double()

    def shares(v: torch.Tensor) -> torch.Tensor:  # (K,)
        positive = (gradients @ v > 0).double()
        return torch.zeros(num_classes, dtype=torch.float64).index_add_(0, classes, positive) / counts

    scores = torch.stack([torch.stack([shares(cav(c, randoms[j])) for j in range(r)]) for c in concepts])
    null = torch.stack([shares(cav(randoms[j], randoms[r + j])) for j in range(r)])
    p_values = torch.ones(len(concepts), num_classes, dtype=torch.float64)
    for d in range(len(concepts)):
        for k in range(num_classes):
            a, b = scores[d, :, k].numpy(), null[:, k].numpy()
            p_values[d, k] = welch_p_value(a, b)
    return scores, null, p_values


def welch_p_value(a: np.ndarray, b: np.ndarray) -> float:
    """The two-sided p-value of Welch's t-test of two samples' means (both constant: 0 where they
    differ, 1 where they are equal). Written out because scipy's warns on a constant sample, which
    TCAV shares often are (every input on one side)."""
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    difference = float(a.mean() - b.mean())
    if va + vb == 0:
        return float(difference == 0)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return float(2 * stats.t.sf(abs(difference) / np.sqrt(va + vb), df))
