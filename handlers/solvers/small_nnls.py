"""Exact non-negative least squares for a few unknowns, each problem with its own Gram matrix.

``w = argmin_{w ≥ 0} ½ wᵀGw − cᵀw`` (``‖a − wH‖²`` up to a constant, ``G = HHᵀ``, ``c = Ha``) for a
batch of problems whose dictionaries ``H`` differ (ProtoNMF's presence maps: each example's target
class has its own prototypes), by trying every support S of the k unknowns: the least-squares
solution on S, ``w_S = G_SS⁻¹ c_S``, is a candidate when it is non-negative, and the NNLS solution
is the candidate of lowest objective (it is itself the least-squares solution on its own support,
and every candidate is a feasible point). Fixed cost: 2^k − 1 supports of k × k, so for small k
only (:data:`MAX_UNKNOWNS`); :func:`handlers.solvers.active_set.active_set_codes` shares one ``G``.
"""

from __future__ import annotations

import torch

# 1023 supports: about 10^5 multiply-adds per right-hand side.
MAX_UNKNOWNS = 10


def supports(k: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(2^k − 1, k) bool: every non-empty subset of k unknowns."""
    bits = torch.arange(1, 2 ** k, device=device).unsqueeze(1)
    return (bits >> torch.arange(k, device=device)) & 1 == 1


def enumerated_nnls(cross: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Exact NNLS codes of many right-hand sides per problem.

    Parameters
    ----------
    cross : Tensor of shape (B, k, P)
        ``c = H a`` for P right-hand sides ``a`` of each of the B problems.
    gram : Tensor of shape (B, k, k)
        ``G = H Hᵀ`` of each problem.

    Returns
    -------
    codes : Tensor of shape (B, k, P), float32, non-negative
    """
    b, k, _ = cross.shape
    if k > MAX_UNKNOWNS:
        raise ValueError(f"enumerated_nnls solves at most {MAX_UNKNOWNS} unknowns, got {k}")
    # In float64: G_SS of nearly collinear rows (augmented prototypes) needs it. The empty support is left
    # out here (w = 0 is the fallback below).
    c = cross.to(torch.float64)
    w = support_inverses(gram)[:, 1:] @ c.unsqueeze(1)  # (B, S, k, P), zero off S
    tolerance = 1e-9 * w.abs().amax((1, 2), keepdim=True).clamp_min(1e-30)
    feasible = (w >= -tolerance).all(2)  # (B, S, P)
    objective = torch.where(feasible, -0.5 * (w * c.unsqueeze(1)).sum(2), torch.inf)  # ½wᵀGw − cᵀw at w_S
    best_value, best = objective.min(1)  # (B, P)
    chosen = w.gather(1, best.view(b, 1, 1, -1).expand(b, 1, k, w.shape[3])).squeeze(1)
    # w = 0 (objective 0) wins where no support does better.
    return torch.where((best_value < 0).unsqueeze(1), chosen.clamp_min(0), 0.0).float()


def support_inverses(gram: torch.Tensor) -> torch.Tensor:
    """``G_SS⁻¹`` of every support S of a Gram matrix (or of each of a batch), the empty support included.

    Parameters
    ----------
    gram : Tensor of shape (..., k, k)
        ``G = H Hᵀ`` (plus any ridge), k at most :data:`MAX_UNKNOWNS`.

    Returns
    -------
    inverses : Tensor of shape (..., 2^k, k, k), float64
        Row 0 the empty support (all zero), then :func:`supports`' order; zero off S. ``G`` gets the ridge
        of :func:`handlers.solvers.active_set.active_set_codes` (1e-10 of its mean diagonal), so both
        solve the same problem and ``G_SS`` is invertible for collinear or zero rows of ``H``.
    """
    k = gram.shape[-1]
    if k > MAX_UNKNOWNS:
        raise ValueError(f"support_inverses takes at most {MAX_UNKNOWNS} unknowns, got {k}")
    dtype = torch.float64
    eye = torch.eye(k, dtype=dtype, device=gram.device)
    g = gram.to(dtype)
    g = g + 1e-10 * g.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)[..., None, None] * eye
    support = torch.cat([torch.zeros(1, k, dtype=torch.bool, device=gram.device), supports(k, gram.device)])
    inside = (support.unsqueeze(2) & support.unsqueeze(1)).to(dtype)  # (S, k, k)
    # Off S the identity, then dropped. Contiguous (linalg.inv answers column-major matrices):
    # shared_gram_nnls flattens it without a copy.
    return (torch.linalg.inv(g.unsqueeze(-3) * inside + (1 - inside) * eye) * inside).contiguous()


def shared_gram_nnls(cross: torch.Tensor, inverses: torch.Tensor) -> torch.Tensor:
    """Exact NNLS codes of many rows against one dictionary: ``argmin_{w ≥ 0} ½ wᵀGw − cᵀw`` row by row.

    Parameters
    ----------
    cross : Tensor of shape (B, k)
        ``c = a Hᵀ``, each row's correlation with the dictionary's k rows.
    inverses : Tensor of shape (2^k, k, k)
        :func:`support_inverses` of the dictionary's ``G``.

    Returns
    -------
    codes : Tensor of shape (B, k), float64, non-negative. A fixed number of ops, no host synchronisation.
    """
    b, k = cross.shape
    c = cross.to(inverses.dtype)
    w = (c @ inverses.flatten(0, 1).T).view(b, -1, k)  # (B, S, k): G_SS⁻¹ c_S, zero off S
    floor = w.abs().amax((1, 2)).mul(-1e-9)  # non-negative up to the solves' rounding
    # At w_S the objective is −½ c_Sᵀ G_SS⁻¹ c_S: the feasible w_S of the largest c_Sᵀ G_SS⁻¹ c_S wins (the
    # empty support, value 0, is always feasible). The values of every support as one product, (c ⊗ c)·vec(G_SS⁻¹).
    value = (c.unsqueeze(2) * c.unsqueeze(1)).flatten(1) @ inverses.flatten(1).T  # (B, S)
    best = torch.where(w.amin(2) >= floor.unsqueeze(1), value, -torch.inf).argmax(1)  # the first of equal maxima
    return w.gather(1, best.view(b, 1, 1).expand(b, 1, k)).squeeze(1).clamp_min(0)
