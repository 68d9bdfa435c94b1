"""Non-negative matrix factorization in PyTorch.

A non-negative ``X`` of shape (n_samples, n_features) is approximated by ``W @ H``
with ``W`` of shape (n_samples, n_components) and ``H`` (``components_``) of shape
(n_components, n_features), both non-negative, minimising the Frobenius norm
``||X - W H||_F``. The estimator follows :class:`sklearn.decomposition.NMF`: the
constructor only stores parameters, fitted attributes end in ``_`` and ``transform``
runs the same block update with the dictionary frozen.

Everything runs on the device and in the floating dtype of the input (float32 or
float64; other dtypes become float32), and is deterministic for a given seed: random numbers are drawn from a
seeded CPU :class:`torch.Generator` and then moved, so a seed gives the same draws on
every device.

Internally both factors are stored with the components along the first axis, ``Wt``
(k, n_samples) and ``H`` (k, n_features), so that the row-by-row HALS updates of
either factor read and write contiguous memory.

References
----------
C. Boutsidis, E. Gallopoulos, "SVD based initialization: A head start for
nonnegative matrix factorization", Pattern Recognition 41(4), 2008.

A. Cichocki, A.-H. Phan, "Fast local algorithms for large scale nonnegative matrix
and tensor factorizations", IEICE Trans. Fundamentals E92-A(3), 2009.

J. Mairal, F. Bach, J. Ponce, G. Sapiro, "Online learning for matrix factorization and
sparse coding", JMLR 11, 2010.

N. B. Erichson, A. Mendible, S. Wihlborn, J. N. Kutz, "Randomized nonnegative matrix
factorization", Pattern Recognition Letters 104, 2018.

N. Gillis, F. Glineur, "Accelerated multiplicative updates and hierarchical
alternating least squares algorithms for nonnegative matrix factorization",
Neural Computation 24(4), 2012.

D. D. Lee, H. S. Seung, "Algorithms for non-negative matrix factorization", NIPS 2000.
"""

from __future__ import annotations

import math

import torch

from handlers.solvers.active_set import active_set_codes

__all__ = ["NMF", "MiniBatchNMF", "nnls_encode"]

INITS = ("random", "nndsvd", "nndsvda", "nndsvdar")
SOLVERS = ("hals", "rhals", "mu")
ENCODERS = ("hals", "mu", "active_set")

# Extra columns of the randomized range finder beyond n_components (Halko et al. 2011).
_OVERSAMPLES = 10

# Rows of X per block when the exact residual is formed once at the end of a fit;
# bounds the temporary to 4096 x n_features.
_RESIDUAL_CHUNK = 4096

# Cap on the inner sweeps per factor and outer iteration (see ``_n_inner``).
_MAX_INNER = 10


def _as_float(X: torch.Tensor, name: str = "X") -> torch.Tensor:
    """Check a 2-D tensor and give it a float32/float64 dtype (no host sync)."""
    if not isinstance(X, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(X).__name__}")
    if X.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n_samples, n_features), got shape {tuple(X.shape)}")
    if X.dtype not in (torch.float32, torch.float64):
        X = X.to(torch.float32)
    return X


def _check_non_negative(X: torch.Tensor) -> None:
    """Reject NaN, infinite or negative entries (one pass and one host sync; fit time only)."""
    # NaN propagates into both extremes, an infinity shows in one of them.
    low, high = torch.stack(torch.aminmax(X)).tolist()
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError("NMF requires a finite X; got NaN or infinite entries")
    if low < 0:
        raise ValueError("NMF requires a non-negative X; got negative entries")


def _hals_sweeps(Z: torch.Tensor, P: torch.Tensor, G: torch.Tensor, n_sweeps: int) -> None:
    """HALS on ``min_{Z >= 0} ||Y - Z^T B||_F`` with ``P = B Y^T``, ``G = B B^T``; in place.

    Each row of ``Z`` (one component) is set to its exact minimiser with the other
    rows fixed, ``z_j <- max(0, z_j + (p_j - g_j Z) / g_jj)``, so the loss never
    increases. Only ``P`` and ``G`` are needed: a sweep costs O(k^2 p), not a pass
    over ``Y``.

    Parameters
    ----------
    Z : Tensor of shape (k, p)
        Current factor, updated in place.
    P : Tensor of shape (k, p)
        Cross product of the fixed factor with the data.
    G : Tensor of shape (k, k)
        Gram matrix of the fixed factor.
    n_sweeps : int
        Number of passes over the k rows.
    """
    # Dividing by the diagonal once and zeroing it turns the row update into one
    # matrix-vector product and a clamp, z_j <- max(0, p_j / g_jj - sum_{i != j}
    # (g_ji / g_jj) z_i). A zero diagonal means the fixed factor has an all-zero
    # component, whose p_j and g_j are exactly zero: the row is set to 0, which is as
    # good as any value since the loss does not depend on it.
    d = torch.diagonal(G).clamp_min(torch.finfo(G.dtype).tiny).unsqueeze(1)
    Pn, Gn = P / d, (G / d).fill_diagonal_(0)
    # Row views made once: per-call overhead dominates for small batches.
    rows, p_rows, g_rows, Zt = Z.unbind(0), Pn.unbind(0), Gn.unbind(0), Z.T
    for _ in range(n_sweeps):
        for z, p, g in zip(rows, p_rows, g_rows):
            torch.clamp(torch.addmv(p, Zt, g, alpha=-1), min=0, out=z)


def _mu_sweeps(
    Z: torch.Tensor, P: torch.Tensor, G: torch.Tensor, n_sweeps: int, eps: float
) -> None:
    """Lee-Seung multiplicative updates on the same problem as :func:`_hals_sweeps`; in place.

    ``Z <- Z * P / (G Z)`` never increases the Frobenius loss. ``eps`` guards the
    division; ``P`` is clamped at 0 so that ``Z`` stays non-negative even for data with
    negative entries (which :func:`nnls_encode` does not check, to avoid a host sync).
    Entries at exactly zero stay zero: use a strictly positive initialisation.
    """
    P = P.clamp_min(0)
    for _ in range(n_sweeps):
        Z.mul_(P / (G @ Z).add_(eps))


def _sweeps(
    solver: str, Z: torch.Tensor, P: torch.Tensor, G: torch.Tensor, n_sweeps: int, eps: float
) -> None:
    """``n_sweeps`` in-place updates of ``Z`` by the named solver's rule ("rhals" uses HALS's)."""
    if solver == "mu":
        _mu_sweeps(Z, P, G, n_sweeps, eps)
    else:
        _hals_sweeps(Z, P, G, n_sweeps)


def _codes_cross(X: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """``H @ X.T`` of shape (k, n_samples), contiguous.

    Computed as ``(X @ H.T).T``: BLAS is much slower (up to 20x on small CPU
    matrices) when the large operand is the transposed one.
    """
    return (X @ H.T).T.contiguous()


def _check_solver(solver: str, allowed: tuple[str, ...] = SOLVERS) -> None:
    if solver not in allowed:
        raise ValueError(f"unknown solver {solver!r}; expected one of {allowed}")


@torch.no_grad()  # the solvers update in place; no gradient flows through a fit
def nnls_encode(
    X: torch.Tensor,
    H: torch.Tensor,
    n_iter: int = 50,
    gram: torch.Tensor | None = None,
    *,
    solver: str = "hals",
    eps: float = 1e-12,
) -> torch.Tensor:
    """Non-negative codes ``W`` minimising ``||X - W H||_F`` for a fixed dictionary ``H``.

    Runs exactly ``n_iter`` sweeps of projected HALS (or multiplicative updates) with
    no tolerance test and no host synchronisation, so its cost is fixed per batch:
    one product ``X @ H.T`` plus ``n_iter`` sweeps of O(k^2 n_samples). Rows are
    independent, so any batch of rows can be encoded at once.

    ``W`` starts, row by row, from the best non-negative multiple of the all-ones
    code, ``w_i = max(0, <x_i, 1^T H>) / ||1^T H||^2 * 1``: deterministic, on the
    scale of the data, and strictly positive wherever the row can be explained at
    all (which the multiplicative updates need).

    ``solver="active_set"`` instead takes ``n_iter`` steps of a primal active-set method
    from ``W = 0`` (:func:`handlers.solvers.active_set.active_set_codes`): exact once each row's
    support is found, about one step per non-zero code, for small ``n_components``; on
    the CPU it stops once every row is optimal.

    Parameters
    ----------
    X : Tensor of shape (n_samples, n_features)
        Data to encode; non-negative for NMF (not checked here).
    H : Tensor of shape (n_components, n_features)
        Non-negative dictionary. Moved to the device and dtype of ``X`` if needed.
    n_iter : int, default=50
        Number of sweeps (active-set steps); 0 returns the initialisation.
    gram : Tensor of shape (n_components, n_components), optional
        Precomputed ``H @ H.T``; callers that encode many batches cache it.
    solver : {"hals", "mu", "active_set"}, default="hals"
        Update rule, as in :class:`NMF`, or the exact active-set method.
    eps : float, default=1e-12
        Guard on the divisions of the multiplicative updates.

    Returns
    -------
    W : Tensor of shape (n_samples, n_components)
        Non-negative codes, on the device and in the dtype of ``X``.
    """
    X = _as_float(X)
    _check_solver(solver, ENCODERS)
    if n_iter < 0:
        raise ValueError(f"n_iter must be >= 0, got {n_iter}")
    H = _as_float(H, "H").to(device=X.device, dtype=X.dtype)
    if H.shape[1] != X.shape[1]:
        raise ValueError(f"X has {X.shape[1]} features but H has {H.shape[1]}")
    G = H @ H.T if gram is None else gram.to(device=X.device, dtype=X.dtype)
    if G.shape != (H.shape[0], H.shape[0]):
        raise ValueError(f"gram must have shape {(H.shape[0], H.shape[0])}, got {tuple(G.shape)}")

    return nnls_codes(X @ H.T, G, n_iter, solver=solver, eps=eps)


def nnls_codes(cross: torch.Tensor, gram: torch.Tensor, n_iter: int, *, solver: str = "hals",
               eps: float = 1e-12) -> torch.Tensor:
    """:func:`nnls_encode`'s codes from all that its solvers read of ``X``: ``cross = X Hᵀ`` of shape
    (n_samples, n_components) and ``gram = H Hᵀ``. Returns (n_samples, n_components) in ``cross``'s dtype."""
    if solver == "active_set":
        return active_set_codes(cross, gram, n_iter, simplex=False).to(cross.dtype)
    P = cross.T.contiguous()  # (k, n_samples)
    # <x_i, 1^T H> = sum_j P[j, i] and ||1^T H||^2 = sum(G): the ray minimiser needs
    # no extra pass over X.
    scale = P.sum(0).clamp_min(0) / gram.sum().clamp_min(torch.finfo(cross.dtype).tiny)
    Wt = scale.expand_as(P).contiguous()
    _sweeps(solver, Wt, P, gram, n_iter, eps)
    return Wt.T.contiguous()


def _n_inner(n_other: int, k: int) -> int:
    """Inner sweeps per outer iteration for a factor whose data has ``n_other`` columns.

    The products with ``X`` (O(n_samples n_features k)) dominate an outer iteration,
    while a sweep on fixed ``P`` and ``G`` costs only O(p k^2) for a factor with ``p``
    columns, so repeating the sweeps makes each pass over ``X`` count for more.
    Gillis & Glineur (2012) take up to ``1 + alpha rho`` sweeps, ``rho = 1 + n_other /
    (k + 1)`` the ratio of the two costs and alpha = 0.5, with an early exit that would
    need a host sync per sweep; here the count is fixed and capped, because a sweep
    of k small kernels costs launch overhead rather than flops.
    """
    rho = 1 + n_other / (k + 1)
    return min(_MAX_INNER, int(1 + 0.5 * rho))


def _range_basis(X: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Orthonormal basis ``Q`` of the leading column space of ``X``, by a seeded range finder.

    Halko, Martinsson & Tropp (2011), with 10 oversamples and QR re-orthonormalised
    power iterations, as many as :func:`sklearn.utils.extmath.randomized_svd` takes
    (7 for k < 0.1 min(X.shape), else 4): on data with a flat spectrum the better
    basis saves more NMF iterations than it costs. The test matrix is drawn on the CPU
    so that it does not depend on the device's RNG.

    Returns
    -------
    Q : Tensor of shape (n_samples, l)
        ``l = min(k + 10, n_samples, n_features)`` orthonormal columns.
    """
    q = min(k + _OVERSAMPLES, *X.shape)
    n_power_iter = 7 if k < 0.1 * min(X.shape) else 4
    Q = torch.linalg.qr(X @ _randn((X.shape[1], q), generator, X)).Q
    for _ in range(n_power_iter):
        # (Q^T X)^T rather than X^T Q: the product with X in its stored layout is faster.
        Q = torch.linalg.qr((Q.T @ X).T).Q
        Q = torch.linalg.qr(X @ Q).Q
    return Q


def _randn(shape: tuple[int, ...], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Standard normal draws made on the CPU, then moved to the device and dtype of ``like``."""
    return torch.randn(shape, generator=generator, dtype=like.dtype).to(like.device)


def _initialize(X: torch.Tensor, k: int, init: str, generator: torch.Generator,
                sketch: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Initial factors ``(Wt, H)`` of shapes (k, n_samples) and (k, n_features).

    ``sketch`` is ``(Q, Q^T X)`` from :func:`_range_basis` when the caller has one;
    the NNDSVD variants otherwise compute it.
    """
    n, m = X.shape

    if init == "random":
        # Scaled like sklearn so that W H has the mean of X on average.
        avg = torch.sqrt(X.mean() / k)
        H = _randn((k, m), generator, X).abs_() * avg
        Wt = _randn((k, n), generator, X).abs_() * avg
        return Wt, H

    # NNDSVD (Boutsidis & Gallopoulos 2008): each singular pair (u_j, v_j) is replaced
    # by the positive or the negative parts of both vectors, whichever has the larger
    # norm product. For the leading pair of a non-negative X this is |u_1|, |v_1|
    # (Perron-Frobenius), so one vectorised rule covers every component. The singular
    # triplets are those of the sketch, a randomized truncated SVD.
    if sketch is None:
        Q = _range_basis(X, k, generator)
        sketch = Q, Q.T @ X
    Q, QtX = sketch
    Ub, S, Vh = torch.linalg.svd(QtX, full_matrices=False)
    U, S, Vh = Q @ Ub[:, :k], S[:k], Vh[:k]
    u_pos, u_neg = U.T.clamp_min(0), (-U.T).clamp_min(0)
    v_pos, v_neg = Vh.clamp_min(0), (-Vh).clamp_min(0)
    nu_pos, nu_neg, nv_pos, nv_neg = (
        torch.linalg.vector_norm(part, dim=1) for part in (u_pos, u_neg, v_pos, v_neg)
    )
    use_pos = nu_pos * nv_pos > nu_neg * nv_neg
    u, nu = torch.where(use_pos[:, None], u_pos, u_neg), torch.where(use_pos, nu_pos, nu_neg)
    v, nv = torch.where(use_pos[:, None], v_pos, v_neg), torch.where(use_pos, nv_pos, nv_neg)
    # Unit parts scaled by sqrt(s_j ||u|| ||v||); an all-zero part stays zero.
    lam = torch.sqrt(S * nu * nv)
    tiny = torch.finfo(X.dtype).tiny
    Wt = u * (lam / nu.clamp_min(tiny))[:, None]
    H = v * (lam / nv.clamp_min(tiny))[:, None]

    if init == "nndsvda":
        avg = X.mean()
        Wt = torch.where(Wt == 0, avg, Wt)
        H = torch.where(H == 0, avg, H)
    elif init == "nndsvdar":
        avg = X.mean()
        Wt = torch.where(Wt == 0, _randn(Wt.shape, generator, X).abs_() * (avg / 100), Wt)
        H = torch.where(H == 0, _randn(H.shape, generator, X).abs_() * (avg / 100), H)
    return Wt, H


def _squared_norm(A: torch.Tensor) -> torch.Tensor:
    """Squared Frobenius norm of a 2-D tensor, as a float64 scalar tensor.

    A float32 reduction over tens of millions of entries loses about 1e-3 relative
    accuracy, which would swamp the stopping test; summing row norms in float64 keeps
    it at float32 rounding for the price of one pass.
    """
    return torch.linalg.vector_norm(A, dim=1).double().square().sum()


def _residual_norm(X: torch.Tensor, W: torch.Tensor, H: torch.Tensor) -> float:
    """``||X - W H||_F`` formed exactly, in row blocks to bound memory."""
    blocks = zip(X.split(_RESIDUAL_CHUNK), W.split(_RESIDUAL_CHUNK))
    sq = sum(_squared_norm(torch.addmm(X_b, W_b, H, alpha=-1)) for X_b, W_b in blocks)
    return math.sqrt(float(sq))


class NMF:
    """Non-negative matrix factorization ``X ~= W H`` for the Frobenius loss.

    Parameters
    ----------
    n_components : int
        Number of components k.
    init : {"nndsvda", "nndsvd", "nndsvdar", "random"}, default="nndsvda"
        Initialisation. The NNDSVD variants (Boutsidis & Gallopoulos 2008) start from
        a seeded randomized truncated SVD and need ``n_components <= min(n_samples,
        n_features)``; "nndsvda" fills the zeros with the mean of X, "nndsvdar" with
        small random values, "nndsvd" keeps them (better for sparse factors, but
        zeros never move under the "mu" solver). "random" draws ``|N(0, 1)|`` scaled
        by ``sqrt(mean(X) / k)``.
    solver : {"hals", "rhals", "mu"}, default="hals"
        "hals": hierarchical alternating least squares (Cichocki & Phan 2009), exact
        minimisation over one component of one factor at a time, with several cheap
        sweeps per pass over X (Gillis & Glineur 2012); entries are clamped at 0, so
        the factors can be sparse. "rhals": randomized HALS (Erichson et al. 2018),
        the same updates on ``Q Q^T X``, the projection of X onto its leading
        ``n_components + 10`` dimensions found by a randomized range finder, so an
        iteration costs O((n_samples + n_features) n_components^2) rather than a pass
        over X; once that stops paying (the exact error, measured at each check, fell
        by less than ``tol``) the fit returns to the factors of the last check if the
        error rose and continues with "hals" on X itself, so it converges to a
        solution of the original problem. Much faster when X is large and
        n_components small. "mu": Lee-Seung multiplicative updates. None of them
        increases the error from one check to the next.
    max_iter : int, default=500
        Maximum number of outer iterations (each updates W then H).
    tol : float, default=1e-4
        Stop when the relative error decreased by less than ``tol`` (relative) since
        the previous check; with ``tol=0``, stop once it no longer decreases.
    check_every : int, default=10
        Iterations between two convergence checks; a check is the only host
        synchronisation of the loop.
    random_state : int, default=0
        Seed of the random draws (randomized SVD, "random" and "nndsvdar").
    eps : float, default=1e-12
        Guard on the divisions of the multiplicative updates.

    Attributes
    ----------
    components_ : Tensor of shape (n_components, n_features)
        The dictionary H.
    n_iter_ : int
        Number of outer iterations run.
    reconstruction_err_ : float
        ``||X - W H||_F`` of the training data at the end of the fit (formed exactly).
    relative_error_ : float
        ``reconstruction_err_ / ||X||_F`` (0 for an all-zero X).
    error_history_ : list of float
        Relative error at the initialisation and at every check, from the Gram
        matrices (see :meth:`fit_transform`); non-increasing. A check whose factors
        "rhals" discards is not recorded.
    n_features_in_ : int
        Number of features seen during fit.
    """

    def __init__(
        self,
        n_components: int,
        *,
        init: str = "nndsvda",
        solver: str = "hals",
        max_iter: int = 500,
        tol: float = 1e-4,
        check_every: int = 10,
        random_state: int = 0,
        eps: float = 1e-12,
    ) -> None:
        self.n_components = n_components
        self.init = init
        self.solver = solver
        self.max_iter = max_iter
        self.tol = tol
        self.check_every = check_every
        self.random_state = random_state
        self.eps = eps

    def _check_params(self, X: torch.Tensor) -> None:
        k = self.n_components
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"n_components must be a positive int, got {k!r}")
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}; expected one of {INITS}")
        _check_solver(self.solver)
        if self.init != "random" and k > min(X.shape):
            raise ValueError(
                f"init={self.init!r} needs n_components <= min(n_samples, n_features) = "
                f"{min(X.shape)}, got n_components={k}; use init='random'"
            )
        if self.max_iter < 0 or self.check_every < 1 or self.tol < 0:
            raise ValueError(
                "need max_iter >= 0, check_every >= 1 and tol >= 0, got "
                f"max_iter={self.max_iter}, check_every={self.check_every}, tol={self.tol}"
            )

    @torch.no_grad()
    def fit_transform(self, X: torch.Tensor) -> torch.Tensor:
        """Fit the model to ``X`` and return its codes ``W``.

        Each outer iteration computes ``X H^T`` and ``H H^T``, updates W, then
        ``W^T X`` and ``W^T W`` and updates H ("rhals" forms the products with ``Q Q^T X``
        in place of X while it runs projected). The error at a check comes from those
        products, ``||X||^2 - 2 <W^T X, H> + <W^T W, H H^T>`` clamped at 0, so the
        loop never forms ``X - W H``.

        Parameters
        ----------
        X : Tensor of shape (n_samples, n_features)
            Non-negative, finite data; float32 and float64 are kept, other dtypes
            are converted to float32.

        Returns
        -------
        W : Tensor of shape (n_samples, n_components)
            Non-negative codes, on the device and in the dtype of ``X``.
        """
        X = _as_float(X)
        _check_non_negative(X)
        self._check_params(X)
        k = self.n_components
        n, m = X.shape

        generator = torch.Generator().manual_seed(self.random_state)
        sketch = None
        if self.solver == "rhals":
            Q = _range_basis(X, k, generator)
            sketch = Q, Q.T @ X  # (n, l), (l, m)
        Wt, H = _initialize(X, k, self.init, generator, sketch)
        sq_norm_X = _squared_norm(X)
        # An all-zero X has error 0; dividing by 1 instead of 0 reports it as such.
        norm_X = math.sqrt(float(sq_norm_X)) or 1.0

        def relative_error(WtX, WtW, H, HHt):
            # Accumulated in float64, see _squared_norm; float() is the host sync.
            cross = torch.sum(WtX * H, dtype=torch.float64)
            sq = sq_norm_X - 2 * cross + torch.sum(WtW * HHt, dtype=torch.float64)
            return math.sqrt(max(float(sq), 0.0)) / norm_X

        def inner_sweeps(projected: bool) -> tuple[int, int]:
            # Projected, a "pass over the data" is a product with the l-column sketch.
            if projected:
                return (_n_inner(sketch[0].shape[1], k),) * 2
            return _n_inner(m, k), _n_inner(n, k)

        projected = sketch is not None
        inner_W, inner_H = inner_sweeps(projected)
        G_H = H @ H.T
        history = [relative_error(Wt @ X, Wt @ Wt.T, H, G_H)]
        Q, QtX = sketch if projected else (None, None)
        last_check = (Wt.clone(), H.clone()) if projected else None
        n_iter = 0
        while n_iter < self.max_iter:
            n_iter += 1
            if projected:
                P = (H @ QtX.T) @ Q.T  # H (Q Q^T X)^T, (k, n)
            else:
                P = _codes_cross(X, H)
            _sweeps(self.solver, Wt, P, G_H, inner_W, self.eps)
            WtW = Wt @ Wt.T
            WtX = (Wt @ Q) @ QtX if projected else Wt @ X
            _sweeps(self.solver, H, WtX, WtW, inner_H, self.eps)
            G_H = H @ H.T
            if n_iter % self.check_every == 0 or n_iter == self.max_iter:
                error = relative_error(Wt @ X if projected else WtX, WtW, H, G_H)
                improved = history[-1] - error > self.tol * history[-1]
                if projected and not improved:
                    # The projected problem no longer pays: go on with X itself, from the
                    # last checked factors if these are worse, so the error never rises.
                    projected = False
                    inner_W, inner_H = inner_sweeps(projected)
                    if error > history[-1]:
                        Wt, H = last_check
                        G_H = H @ H.T
                    else:
                        history.append(error)
                else:
                    history.append(error)
                    if not improved:
                        break
                    if projected:
                        last_check = (Wt.clone(), H.clone())

        W = Wt.T.contiguous()
        self.components_ = H
        self.n_iter_ = n_iter
        self.reconstruction_err_ = _residual_norm(X, W, H)
        self.relative_error_ = self.reconstruction_err_ / norm_X
        self.error_history_ = history
        self.n_features_in_ = m
        return W

    def fit(self, X: torch.Tensor) -> NMF:
        """Fit the model to ``X``; see :meth:`fit_transform`.

        Parameters
        ----------
        X : Tensor of shape (n_samples, n_features)

        Returns
        -------
        self : NMF
        """
        self.fit_transform(X)
        return self

    def transform(self, X: torch.Tensor, n_iter: int = 100) -> torch.Tensor:
        """Codes of new rows with ``components_`` frozen, by :func:`nnls_encode`.

        Exactly ``n_iter`` sweeps of the fitted solver's update (HALS for "rhals"), no tolerance test and
        no host synchronisation, so a batch has a fixed cost.

        Parameters
        ----------
        X : Tensor of shape (n_samples, n_features)
            Non-negative data (not checked, to avoid a host sync).
        n_iter : int, default=100
            Number of sweeps; 0 returns the initialisation of :func:`nnls_encode`.

        Returns
        -------
        W : Tensor of shape (n_samples, n_components)
        """
        if not hasattr(self, "components_"):
            raise RuntimeError("this NMF instance is not fitted yet; call fit first")
        solver = "mu" if self.solver == "mu" else "hals"
        return nnls_encode(X, self.components_, n_iter, solver=solver, eps=self.eps)


class MiniBatchNMF:
    """Online NMF ``X ~= W H`` over mini-batches of rows, for an X that does not fit in memory.

    Mairal et al. (2010), as scikit-learn's :class:`~sklearn.decomposition.MiniBatchNMF` for the
    Frobenius loss: for each mini-batch ``X_b`` (b, n_features) the codes ``W_b`` are solved with
    ``H`` fixed (:func:`nnls_encode`, ``transform_iter`` HALS sweeps), the sufficient statistics
    are accumulated, ``A <- rho A + W_b^T W_b`` (k, k) and ``B <- rho B + W_b^T X_b``
    (k, n_features), and ``H`` takes ``update_sweeps`` HALS sweeps on ``min ||X - W H||`` through
    ``A`` and ``B`` alone. ``rho = forget_factor ** (b / n_samples)`` discounts the codes of older
    dictionaries, so after a pass over the data the previous pass weighs ``forget_factor``. Memory
    is O((b + k) n_features) whatever n_samples; the iteration counts are fixed (no tolerance).

    With ``batch_size >= n_samples`` and ``forget_factor=0`` a pass is one alternating HALS
    iteration with the codes solved afresh, so the fit approaches :class:`NMF`'s.

    Parameters
    ----------
    n_components : int
        Number of components k.
    init : {"nndsvda", "nndsvd", "nndsvdar", "random"}, default="nndsvda"
        Initialisation of H, as :class:`NMF`'s, from the first mini-batch.
    batch_size : int, default=1024
        Rows per mini-batch.
    max_iter : int, default=20
        Passes over the data.
    forget_factor : float, default=0.7
        Weight of the previous pass's statistics after one pass, in [0, 1].
    transform_iter : int, default=30
        HALS sweeps solving each mini-batch's codes.
    update_sweeps : int, default=10
        HALS sweeps of H after each mini-batch.
    random_state : int, default=0
        Seed of the initialisation's random draws.

    Attributes
    ----------
    components_ : Tensor of shape (n_components, n_features)
        The dictionary H.
    n_iter_ : int
        Passes over the data run.
    n_steps_ : int
        Mini-batches processed.
    reconstruction_err_ : float
        ``||X - W H||_F``, W the codes by :meth:`transform`, after :meth:`fit` (one more pass).
    relative_error_ : float
        ``reconstruction_err_ / ||X||_F`` (0 for an all-zero X).
    n_features_in_ : int
    """

    def __init__(self, n_components: int, *, init: str = "nndsvda", batch_size: int = 1024, max_iter: int = 20,
                 forget_factor: float = 0.7, transform_iter: int = 30, update_sweeps: int = 10,
                 random_state: int = 0) -> None:
        self.n_components = n_components
        self.init = init
        self.batch_size = batch_size
        self.max_iter = max_iter
        self.forget_factor = forget_factor
        self.transform_iter = transform_iter
        self.update_sweeps = update_sweeps
        self.random_state = random_state

    def _check_params(self) -> None:
        if not isinstance(self.n_components, int) or self.n_components < 1:
            raise ValueError(f"n_components must be a positive int, got {self.n_components!r}")
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}; expected one of {INITS}")
        if self.batch_size < 1 or self.max_iter < 0 or not 0 <= self.forget_factor <= 1:
            raise ValueError("need batch_size >= 1, max_iter >= 0 and 0 <= forget_factor <= 1, got "
                             f"batch_size={self.batch_size}, max_iter={self.max_iter}, "
                             f"forget_factor={self.forget_factor}")

    @torch.no_grad()
    def partial_fit(self, X: torch.Tensor, n_samples: int | None = None) -> MiniBatchNMF:
        """Update the model with one mini-batch.

        Parameters
        ----------
        X : Tensor of shape (b, n_features)
            Non-negative, finite rows. The first call initialises H from them (the NNDSVD
            variants need ``n_components <= min(b, n_features)``).
        n_samples : int, optional
            Rows in the whole data, for the forgetting rate; default: ``b`` (forget per batch).

        Returns
        -------
        self : MiniBatchNMF
        """
        X = _as_float(X)
        _check_non_negative(X)
        k = self.n_components
        if not hasattr(self, "components_"):
            self._check_params()
            if self.init != "random" and k > min(X.shape):
                raise ValueError(f"init={self.init!r} needs n_components <= min(batch rows, n_features) = "
                                 f"{min(X.shape)}, got n_components={k}")
            _, self.components_ = _initialize(X, k, self.init, torch.Generator().manual_seed(self.random_state))
            self._A = torch.zeros(k, k, dtype=X.dtype, device=X.device)
            self._B = torch.zeros(k, X.shape[1], dtype=X.dtype, device=X.device)
            self.n_steps_ = 0
            self.n_features_in_ = X.shape[1]
        elif X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} features, the model {self.n_features_in_}")
        H = self.components_
        W = nnls_encode(X, H, self.transform_iter)
        rho = self.forget_factor ** (len(X) / (n_samples or len(X)))
        self._A.mul_(rho).add_(W.T @ W)
        self._B.mul_(rho).add_(W.T @ X)
        _hals_sweeps(H, self._B, self._A, self.update_sweeps)
        self.n_steps_ += 1
        return self

    @torch.no_grad()
    def fit(self, X) -> MiniBatchNMF:
        """``max_iter`` passes of :meth:`partial_fit` over ``X`` in order, then the error in one more pass.

        Parameters
        ----------
        X : Tensor or array-like of shape (n_samples, n_features)
            Anything with ``len`` and row slices ``X[i:j]`` that give tensors or arrays (rows read
            from disk, say); each slice is used and dropped, so only a mini-batch is in memory.

        Returns
        -------
        self : MiniBatchNMF
        """
        self._check_params()
        for attribute in ("components_", "_A", "_B"):
            self.__dict__.pop(attribute, None)
        n = len(X)
        for _ in range(self.max_iter):
            for start in range(0, n, self.batch_size):
                self.partial_fit(torch.as_tensor(X[start:start + self.batch_size]), n_samples=n)
        self.n_iter_ = self.max_iter
        residual, total = 0.0, 0.0
        for start in range(0, n, self.batch_size):
            batch = _as_float(torch.as_tensor(X[start:start + self.batch_size]))
            W = self.transform(batch, self.transform_iter)
            residual += float(_squared_norm(torch.addmm(batch, W, self.components_, alpha=-1)))
            total += float(_squared_norm(batch))
        self.reconstruction_err_ = math.sqrt(residual)
        self.relative_error_ = self.reconstruction_err_ / (math.sqrt(total) or 1.0)
        return self

    def transform(self, X: torch.Tensor, n_iter: int = 100) -> torch.Tensor:
        """Codes of rows with ``components_`` frozen, by :func:`nnls_encode` (``n_iter`` HALS sweeps).

        Parameters
        ----------
        X : Tensor of shape (n_samples, n_features)
        n_iter : int, default=100

        Returns
        -------
        W : Tensor of shape (n_samples, n_components)
        """
        if not hasattr(self, "components_"):
            raise RuntimeError("this MiniBatchNMF instance is not fitted yet; call fit or partial_fit first")
        return nnls_encode(X, self.components_, n_iter)
