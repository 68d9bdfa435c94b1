"""Exact codes for small dictionaries: least squares on the simplex or the non-negative orthant.

``w = argmin ½ wᵀGw − cᵀw`` row by row (``G = HHᵀ``, ``c = aHᵀ``, i.e. ``‖a − wH‖²`` up to a
constant), subject to ``w ≥ 0`` and, on the simplex, ``Σw = 1``, by a batched primal active-set
method (Lawson & Hanson 1974, ch. 23). Each step solves the equality-constrained problem on the
row's support S (``w = 0`` off S) and either moves there and adds the coordinate whose gradient
most violates the optimality conditions, or, when that solution leaves the feasible set, steps
to its boundary and drops the coordinate that reached zero. The inverse of each row's ``G_SS``
is kept up to date by one rank-one update per step, so a step costs a few batched
matrix-vector products and no factorization. Every iterate is feasible and the objective never
increases; a row whose support is optimal stays put, so once every row has converged (in about
as many steps as its support has coordinates, plus one per drop; :func:`kkt_violation` tells)
the result is exact to float64 rounding.

ProtoFac's weights are simplex codes of its prototypes; coupled NMF's fold-in is a
non-negative code of its concepts (:func:`handlers.solvers.nmf.nnls_encode` with ``solver="active_set"``).
"""

from __future__ import annotations

import torch


def active_set_codes(cross: torch.Tensor, gram: torch.Tensor, n_iter: int, *, simplex: bool,
                     stop_when_optimal: bool | None = None) -> torch.Tensor:
    """Codes ``w`` of shape (B, k), float64, by ``n_iter`` active-set steps.

    Parameters
    ----------
    cross : Tensor of shape (B, k)
        ``c = aHᵀ``, each row's correlation with the k dictionary rows.
    gram : Tensor of shape (k, k)
        ``G = HHᵀ`` (plus any ridge), cached by callers.
    n_iter : int
        Number of steps (no tolerance test). Rows start at the best single coordinate on the
        simplex and at zero otherwise; a support of s coordinates takes about s steps, plus one
        per drop.
    simplex : bool
        Also require ``Σw = 1``.
    stop_when_optimal : bool, optional
        Stop before ``n_iter`` steps once every row is optimal (the result is the same). Default:
        on the CPU only; on a GPU the test would synchronize with the host every step.
    """
    dtype = torch.float64  # the support's inverse is updated in place step after step
    b, k = cross.shape
    device = cross.device
    g, tolerance = ridged_gram(gram)
    eye = torch.eye(k, dtype=dtype, device=device)
    is_index = eye.bool()
    c = cross.to(dtype)
    rows = torch.arange(b, device=device)
    inverse = torch.zeros(b, k, k, dtype=dtype, device=device)  # G_SS⁻¹, zero off S
    if simplex:
        first = (0.5 * g.diagonal() - c).argmin(1)
        support, w = is_index[first], eye[first]
        inverse[rows, first, first] = 1 / g.diagonal()[first]
    else:
        support = torch.zeros(b, k, dtype=torch.bool, device=device)
        w = torch.zeros(b, k, dtype=dtype, device=device)
    if stop_when_optimal is None:
        stop_when_optimal = device.type == "cpu"
    # Constants of the loop, made once: each step's G_SS⁻¹ products take c and, on the simplex, 1 in one product.
    c_and_ones = torch.stack([c, torch.ones_like(c)], 2) if simplex else c.unsqueeze(2)  # (B, k, 1 or 2)
    diagonal = g.diagonal()
    one = torch.ones((), dtype=dtype, device=device)
    inf = torch.full((), torch.inf, dtype=dtype, device=device)
    for _ in range(n_iter):
        # The minimizer z on S: G_SS⁻¹c, on the simplex G_SS⁻¹(c − μ1) with μ such that Σz = 1.
        products = torch.bmm(inverse, c_and_ones)  # (B, k, 1 or 2): G_SS⁻¹c (and G_SS⁻¹1)
        z = products[:, :, 0]
        if simplex:
            sums = products.sum(1)  # (B, 2): Σz, Σ G_SS⁻¹1
            z = z.addcmul(products[:, :, 1], (1 - sums[:, :1]) / sums[:, 1:])
        blocked = support & (z < 0)
        is_blocked = blocked.any(1)
        ratio = torch.where(blocked, w / (w - z), one)  # in [0, 1) where blocked
        alpha, leave = ratio.min(1)
        w = torch.lerp(w, z, alpha.unsqueeze(1)).clamp_min(0)
        gradient = torch.addmm(c, w, g, beta=-1)  # wG − c
        # At the optimum the gradient equals the level μ (0 without the simplex) on S and is no lower off S.
        if simplex:
            level = (gradient * support).sum(1) / support.sum(1)
        else:
            level = torch.zeros(b, dtype=dtype, device=device)
        outside, enter = torch.where(support, inf, gradient).min(1)
        add = ~is_blocked & (outside < level - tolerance)
        # Rank-one update of G_SS⁻¹: bordering to add ``enter``, or removing ``leave``.
        g_enter = g[enter]  # (B, k)
        column = torch.bmm(inverse, g_enter.unsqueeze(2))  # (B, k, 1): G_SS⁻¹ g_S,enter
        schur = diagonal[enter] - torch.bmm(g_enter.unsqueeze(1), column)[:, 0, 0]
        column = column[:, :, 0]
        u = torch.where(is_blocked.unsqueeze(1), inverse[rows, :, leave], column - eye[enter])
        # 1 / (−G_SS⁻¹[leave, leave]) to remove, 1 / schur to add, 1 / inf = 0 to stay.
        coefficient = torch.where(is_blocked, -inverse[rows, leave, leave], torch.where(add, schur, inf)).reciprocal()
        inverse.addcmul_(coefficient.view(b, 1, 1) * u.unsqueeze(2), u.unsqueeze(1))
        # ``leave`` is on the support of a blocked row, ``enter`` off it where one is added: toggled.
        support = support ^ torch.where(is_blocked.unsqueeze(1), is_index[leave], add.unsqueeze(1) & is_index[enter])
        w = w * support
        if stop_when_optimal and not bool((add | is_blocked).any()):
            break  # every row is optimal and would stay put: the remaining steps change nothing
    return w / w.sum(1, keepdim=True) if simplex else w


def ridged_gram(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(G + tolerance·I in float64, tolerance), tolerance = 1e-10 × G's mean diagonal: the ridge keeps G_SS
    invertible for collinear rows of H, and the tolerance is the solver's optimality test's."""
    gram = gram.to(torch.float64)
    tolerance = 1e-10 * gram.diagonal().mean().clamp_min(1e-30)
    return gram + tolerance * torch.eye(len(gram), dtype=gram.dtype, device=gram.device), tolerance


def kkt_violation(w: torch.Tensor, cross: torch.Tensor, gram: torch.Tensor, *, simplex: bool) -> torch.Tensor:
    """How far each code is from optimal: (B,) ≥ 0, relative to the scale of ``gram``.

    The optimality conditions: the gradient ``wG − c`` equals the level μ on the support (μ = 0
    without the simplex) and is at least μ off it. Returns the largest deviation per row.
    """
    w, cross, gram = w.double(), cross.double(), gram.double()
    gradient = w @ gram - cross
    support = w > 0
    if simplex:
        level = (gradient * support).sum(1, keepdim=True) / support.sum(1, keepdim=True)
    else:
        level = torch.zeros_like(gradient[:, :1])
    deviation = torch.where(support, (gradient - level).abs(), (level - gradient).clamp_min(0))
    return deviation.max(1).values / gram.diagonal().mean().clamp_min(1e-30)
