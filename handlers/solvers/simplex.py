"""Codes on the probability simplex: exact least squares (ProtoFac's weights), projection, optimality,
the distance to the nearest vertex (ProtoFac's concentration), and projected Adam steps."""

from __future__ import annotations

import functools
import math

import torch

from handlers.solvers.active_set import active_set_codes, kkt_violation


def project_to_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of every row onto the probability simplex.

    The sort-based rule of Duchi et al. (2008): fixed shapes, no host synchronisation.

    Parameters
    ----------
    v : Tensor of shape (..., k)

    Returns
    -------
    Tensor of shape (..., k), non-negative, each row summing to 1.
    """
    u = v.sort(dim=-1, descending=True).values
    # theta_j = (sum of the j largest - 1) / j rises while u_j > theta_j (theta_j lies between theta_{j-1} and
    # u_j) and no longer after; those j are a prefix, so the shift theta_rho of the rule is max_j theta_j
    # (Condat 2016).
    theta = (u.cumsum(-1) - 1) / _ranks(v.shape[-1], v.dtype, v.device)
    return (v - theta.amax(-1, keepdim=True)).clamp_min(0)


@functools.lru_cache(maxsize=16)
def _ranks(k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(k,) 1, 2, …, k."""
    return torch.arange(1, k + 1, dtype=dtype, device=device)


def vertex_distance(w: torch.Tensor) -> torch.Tensor:
    """min_j ‖w_i − e_j‖² of every row: the squared distance to the nearest standard basis vector.

    Equal to ‖w‖² − 2 max_j w_j + 1 (the nearest vertex is the largest entry's); zero exactly at the
    vertices (one-hot rows).

    Parameters
    ----------
    w : Tensor of shape (B, k)

    Returns
    -------
    Tensor of shape (B,)
    """
    return (w.square().sum(1) - 2 * w.max(1).values + 1).clamp_min(0)


def projected_adam(w: torch.Tensor, gradient_of, n_steps: int, lr: float) -> torch.Tensor:
    """``n_steps`` steps of Adam (β = 0.9, 0.999) on the rows of ``w``, each step projected onto the simplex.

    Adam's moments are per entry, so as long as the objective is a sum of per-row terms, a row's path
    does not depend on the other rows of the batch.

    Parameters
    ----------
    w : Tensor of shape (B, k)
        The starting codes, on the simplex.
    gradient_of : callable (B, k) -> (B, k)
        The objective's gradient at the codes (see :func:`autograd_gradient`).
    n_steps : int
        Number of steps (no tolerance test).
    lr : float
        Adam's step size.

    Returns
    -------
    Tensor of shape (B, k) on the simplex.
    """
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    w = w.detach().clone()
    first, second = torch.zeros_like(w), torch.zeros_like(w)
    for step in range(1, n_steps + 1):
        gradient = gradient_of(w)
        first.lerp_(gradient, 1 - beta1)
        second.mul_(beta2).addcmul_(gradient, gradient, value=1 - beta2)
        # The bias corrections as scalars, as torch.optim.Adam applies them: lr / (1 − β1^t) · m / (√v / √(1 − β2^t) + ε).
        denominator = second.sqrt().div_(math.sqrt(1 - beta2 ** step)).add_(eps)
        w = project_to_simplex(w.addcdiv(first, denominator, value=-lr / (1 - beta1 ** step)))
    return w


def autograd_gradient(loss_of):
    """The gradient of ``loss_of`` (B, k) -> scalar by autograd, as a ``gradient_of`` for :func:`projected_adam`;
    runs with autograd on whatever mode the caller is in."""
    def gradient_of(w: torch.Tensor) -> torch.Tensor:
        w = w.detach().requires_grad_(True)
        return torch.autograd.grad(loss_of(w), w)[0]
    return gradient_of


def simplex_least_squares(features: torch.Tensor, prototypes: torch.Tensor, gram: torch.Tensor,
                          n_iter: int, stop_when_optimal: bool | None = None) -> torch.Tensor:
    """w = argmin over the simplex of ‖a − wH‖², row by row, by ``n_iter`` primal active-set steps
    (:func:`handlers.solvers.active_set.active_set_codes`; on the CPU it stops once every row is optimal).

    Parameters
    ----------
    features : Tensor of shape (B, m)
        The rows a to encode.
    prototypes : Tensor of shape (k, m)
        H.
    gram : Tensor of shape (k, k)
        HHᵀ (cached by callers).
    n_iter : int
        Number of steps (no tolerance test).
    stop_when_optimal : bool, optional
        See :func:`handlers.solvers.active_set.active_set_codes`.

    Returns
    -------
    Tensor of shape (B, k) on the simplex, of ``features``' dtype.
    """
    # aHᵀ in float64, as ProtoFac serves it: a float32 product rounds each row by the batch's shape.
    cross = features.double() @ prototypes.double().T
    w = active_set_codes(cross, gram, n_iter, simplex=True, stop_when_optimal=stop_when_optimal)
    return w.to(features.dtype)


def simplex_kkt_violation(w: torch.Tensor, features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """How far each code is from optimal: (B,) ≥ 0, relative to the scale of HHᵀ
    (:func:`handlers.solvers.active_set.kkt_violation` on the simplex)."""
    features, prototypes = features.double(), prototypes.double()
    return kkt_violation(w, features @ prototypes.T, prototypes @ prototypes.T, simplex=True)
