"""Tests for handlers.nmf: monotone solvers, determinism, accuracy against sklearn,
the frozen-dictionary encoder and input validation. Small matrices, CPU."""

import numpy as np
import pytest
import torch

from handlers.solvers.active_set import active_set_codes, kkt_violation
from handlers.solvers.nmf import NMF, nnls_encode

INITS = ["random", "nndsvd", "nndsvda", "nndsvdar"]
SOLVERS = ["hals", "rhals", "mu"]
ENCODERS = ["hals", "mu"]  # nnls_encode's sweeps ("rhals" fits with HALS sweeps); "active_set" below


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Run these tests on one intra-op thread, restored afterwards.

    The matrices are tiny, so each matmul costs microseconds while a two-thread
    parallel region waits for both threads to be scheduled: on a loaded CI machine
    that wait made the module 10-20x slower with no extra coverage.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _data(n=80, m=40, rank=12, seed=0, dtype=torch.float32):
    """Non-negative data that is not exactly low rank: ReLU of a random product."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, rank, generator=g, dtype=torch.float64)
    B = torch.randn(rank, m, generator=g, dtype=torch.float64)
    return torch.relu(A @ B).to(dtype)


def _exact_low_rank(n=60, m=30, rank=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, rank, generator=g) @ torch.rand(rank, m, generator=g)


def _rel_err(X, W, H):
    X64 = X.double()
    residual = X64 - W.double() @ H.double()
    return float(torch.linalg.vector_norm(residual) / torch.linalg.vector_norm(X64))


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("init", INITS)
def test_error_history_is_non_increasing(solver, init):
    X = _data()
    model = NMF(5, init=init, solver=solver, max_iter=200, tol=0, check_every=1)
    W = model.fit_transform(X)
    h = np.asarray(model.error_history_)
    # The initialisation, then every iteration (tol=0 stops only once the error stalls);
    # "rhals" leaves out a check whose factors it discards.
    assert model.n_iter_ >= 10
    assert len(h) == model.n_iter_ + 1 if solver != "rhals" else len(h) <= model.n_iter_ + 1
    assert np.all(h[1:] <= h[:-1] * (1 + 1e-6)), np.max(h[1:] / h[:-1])
    assert h[-1] < h[0]
    # The history comes from Gram matrices; the final error is formed exactly.
    assert model.relative_error_ == pytest.approx(h[-1], rel=1e-4)
    assert model.relative_error_ == pytest.approx(_rel_err(X, W, model.components_), rel=1e-5)
    assert model.reconstruction_err_ == pytest.approx(
        model.relative_error_ * float(torch.linalg.vector_norm(X.double())), rel=1e-6
    )


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("init", ["random", "nndsvdar"])
def test_fit_is_deterministic(solver, init):
    X = _data()
    a = NMF(4, init=init, solver=solver, random_state=3)
    b = NMF(4, init=init, solver=solver, random_state=3)
    Wa, Wb = a.fit_transform(X), b.fit_transform(X)
    assert torch.equal(Wa, Wb)
    assert torch.equal(a.components_, b.components_)
    assert a.error_history_ == b.error_history_ and a.n_iter_ == b.n_iter_
    c = NMF(4, init=init, solver=solver, random_state=4).fit(X)
    assert not torch.equal(a.components_, c.components_)


@pytest.mark.parametrize("solver", ["hals", "rhals"])
def test_exact_low_rank_is_recovered(solver):
    X = _exact_low_rank()
    model = NMF(4, solver=solver, max_iter=2000, tol=1e-7)
    W = model.fit_transform(X)
    assert model.relative_error_ < 1e-3
    assert _rel_err(X, W, model.components_) < 1e-3


@pytest.mark.parametrize("solver", ["hals", "rhals"])
def test_matches_sklearn_coordinate_descent(solver):
    from sklearn.decomposition import NMF as SkNMF

    X = _data(n=120, m=50)
    sk = SkNMF(5, solver="cd", init="nndsvda", max_iter=1000, tol=1e-6, random_state=0)
    W_sk = sk.fit_transform(X.numpy())
    sk_err = np.linalg.norm(X.numpy() - W_sk @ sk.components_) / np.linalg.norm(X.numpy())

    model = NMF(5, solver=solver, max_iter=1000, tol=1e-6)
    W = model.fit_transform(X)
    assert model.relative_error_ <= sk_err * 1.01
    assert (W >= 0).all() and (model.components_ >= 0).all()


def test_randomized_hals_finishes_on_the_original_problem():
    """On a flat spectrum the rank-15 projection is poor: the exact error rises at a check,
    that check's factors are discarded (one entry fewer in the history) and exact HALS
    takes over, ending where plain HALS ends."""
    X = torch.rand(300, 120, generator=torch.Generator().manual_seed(0))
    rhals = NMF(5, solver="rhals", max_iter=1000, tol=0, check_every=1).fit(X)
    hals = NMF(5, solver="hals", max_iter=1000, tol=0, check_every=1).fit(X)
    h = np.asarray(rhals.error_history_)
    assert len(h) < rhals.n_iter_ + 1
    assert np.all(h[1:] <= h[:-1] * (1 + 1e-6))  # float32 rounding of the Gram-based error
    assert rhals.relative_error_ == pytest.approx(hals.relative_error_, rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_is_kept(dtype):
    X = _data(dtype=dtype)
    model = NMF(3, max_iter=20)
    W = model.fit_transform(X)
    assert W.dtype == model.components_.dtype == dtype
    assert W.shape == (80, 3) and model.components_.shape == (3, 40)
    assert model.transform(X[:7], n_iter=5).dtype == dtype
    assert model.n_features_in_ == 40


def test_integer_input_becomes_float32():
    X = (_data() * 10).to(torch.int64)
    assert NMF(3, max_iter=5).fit_transform(X).dtype == torch.float32


def test_all_zero_input():
    model = NMF(2)
    W = model.fit_transform(torch.zeros(10, 6))
    assert torch.count_nonzero(W) == 0 and torch.count_nonzero(model.components_) == 0
    assert model.reconstruction_err_ == 0.0 and model.relative_error_ == 0.0


@pytest.mark.parametrize("solver", SOLVERS)
def test_transform_with_frozen_components(solver):
    X = _data()
    model = NMF(5, solver=solver, max_iter=300, tol=1e-6)
    W_fit = model.fit_transform(X)
    H = model.components_.clone()

    W = model.transform(X, n_iter=300)
    assert W.shape == (80, 5) and (W >= 0).all()
    assert torch.equal(model.components_, H)
    # W is a convex problem with H fixed: the encoder does at least as well as the fit's W.
    assert _rel_err(X, W, H) <= model.relative_error_ * (1 + 1e-4)
    assert float(torch.linalg.vector_norm(W - W_fit) / torch.linalg.vector_norm(W_fit)) < 0.05
    # Rows are encoded independently, so a batch gives the rows of the whole.
    torch.testing.assert_close(model.transform(X[10:17], n_iter=300), W[10:17])


def _reference_encode(X, H, n_iter, solver, eps=1e-12):
    """Textbook column-by-column HALS / MU from the ray initialisation, in float64."""
    X, H = X.double(), H.double()
    s = H.sum(0)
    W = (X @ s / (s @ s)).clamp_min(0)[:, None].repeat(1, H.shape[0])
    XHt, G = X @ H.T, H @ H.T
    for _ in range(n_iter):
        if solver == "hals":
            for j in range(H.shape[0]):
                W[:, j] = (W[:, j] + (XHt[:, j] - W @ G[:, j]) / G[j, j]).clamp_min(0)
        else:
            W = W * XHt / (W @ G + eps)
    return W


@pytest.mark.parametrize("solver", ENCODERS)
def test_encoder_runs_exactly_n_iter(solver):
    X = _data(dtype=torch.float64)
    H = NMF(4, solver=solver, max_iter=50).fit(X).components_
    for n_iter in (0, 1, 3, 10):
        expected = _reference_encode(X, H, n_iter, solver)
        torch.testing.assert_close(nnls_encode(X, H, n_iter, solver=solver), expected)
    errors = [_rel_err(X, nnls_encode(X, H, n, solver=solver), H) for n in (0, 1, 5, 25, 125)]
    assert all(b <= a * (1 + 1e-9) for a, b in zip(errors, errors[1:]))
    assert errors[-1] < errors[0]


def test_transform_zero_iterations_is_the_initialisation():
    X = _data()
    model = NMF(3, max_iter=30).fit(X)
    W0 = model.transform(X, n_iter=0)
    s = model.components_.sum(0)
    torch.testing.assert_close(W0, (X @ s / (s @ s))[:, None].expand(-1, 3))


def test_active_set_encoder_is_exact_and_stopping_early_changes_nothing():
    from scipy.optimize import nnls

    X = _data(dtype=torch.float64)
    H = NMF(6, max_iter=50).fit(X).components_.double()
    H[4] = H[2]  # duplicated dictionary rows must not break the support's inverse
    X[0] = 0  # an all-zero row: the zero code
    W = nnls_encode(X, H, 12, solver="active_set")
    assert W.dtype == torch.float64 and (W >= 0).all() and torch.equal(W[0], torch.zeros(6, dtype=torch.float64))
    for w, x in zip(W, X):
        _, exact_residual = nnls(H.T.numpy(), x.numpy())
        assert torch.linalg.vector_norm(x - w @ H).item() == pytest.approx(exact_residual, rel=1e-10, abs=1e-12)
    gram = H @ H.T
    assert (kkt_violation(W, X @ H.T, gram, simplex=False) < 1e-8).all()  # the solver's ridge: 1e-10
    # The CPU stops once every row is optimal; running every step gives the same codes.
    assert torch.equal(active_set_codes(X @ H.T, gram, 12, simplex=False, stop_when_optimal=False), W)
    # Truncated, the codes are feasible, no worse than zero, and flagged as not optimal.
    early = nnls_encode(X, H, 1, solver="active_set")
    assert (early >= 0).all()
    assert ((X - early @ H).norm(dim=1) <= X.norm(dim=1) + 1e-12).all()
    assert (kkt_violation(early, X @ H.T, gram, simplex=False) > 1e-6).any()
    # float32 data gives float32 codes equal to the float64 ones to float32 rounding.
    w32 = nnls_encode(X.float(), H.float(), 12, solver="active_set")
    assert w32.dtype == torch.float32 and torch.allclose(w32.double(), W, atol=1e-4)


@pytest.mark.parametrize("solver", ENCODERS)
def test_encoder_with_precomputed_gram(solver):
    X = _data()
    H = NMF(4, max_iter=30).fit(X).components_
    gram = H @ H.T
    with_gram = nnls_encode(X, H, 20, gram, solver=solver)
    assert torch.equal(with_gram, nnls_encode(X, H, 20, solver=solver))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("solver", SOLVERS)
def test_cuda_matches_cpu(solver):
    X = _data()
    cpu, gpu = NMF(4, solver=solver, max_iter=50, tol=0), NMF(4, solver=solver, max_iter=50, tol=0)
    cpu.fit(X)
    W_gpu = gpu.fit_transform(X.cuda())
    assert W_gpu.is_cuda and gpu.components_.is_cuda
    assert gpu.relative_error_ == pytest.approx(cpu.relative_error_, rel=1e-3)
    assert gpu.transform(X.cuda(), n_iter=10).is_cuda


@pytest.mark.parametrize(
    ("X", "kwargs", "match"),
    [
        (-_data(), {}, "non-negative"),
        (torch.tensor([[1.0, float("nan")], [0.5, 2.0]]), {}, "finite"),
        (torch.rand(10), {}, "2-D"),
        (torch.rand(2, 5, 5), {}, "2-D"),
        (torch.rand(10, 3), {"n_components": 4}, "n_components <= min"),
        (torch.rand(10, 6), {"init": "svd"}, "unknown init"),
        (torch.rand(10, 6), {"solver": "cd"}, "unknown solver"),
        (torch.rand(10, 6), {"n_components": 0}, "positive int"),
        (torch.rand(10, 6), {"check_every": 0}, "check_every"),
    ],
)
def test_invalid_input_raises(X, kwargs, match):
    kwargs = {"n_components": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        NMF(kwargs.pop("n_components"), **kwargs).fit(X)


def test_random_init_allows_more_components_than_min_dim():
    W = NMF(4, init="random", max_iter=10).fit_transform(torch.rand(10, 3))
    assert W.shape == (10, 4)


def test_encoder_and_transform_validation():
    X = _data()
    model = NMF(3, max_iter=10)
    with pytest.raises(RuntimeError, match="not fitted"):
        model.transform(X)
    model.fit(X)
    with pytest.raises(ValueError, match="features"):
        model.transform(X[:, :10])
    with pytest.raises(ValueError, match="2-D"):
        model.transform(X[0])
    with pytest.raises(ValueError, match="unknown solver"):
        nnls_encode(X, model.components_, solver="cd")
    with pytest.raises(ValueError, match="gram"):
        nnls_encode(X, model.components_, gram=torch.eye(2))
    with pytest.raises(ValueError, match="n_iter"):
        nnls_encode(X, model.components_, n_iter=-1)
