"""Tests for handlers.solvers.small_nnls' shared-dictionary solver: exact NNLS by every support, the
supports' inverses computed once (coupled NMF's fold-in), against scipy's NNLS and the active-set method."""

import numpy as np
import pytest
import torch
from scipy.optimize import nnls

from handlers.solvers.active_set import active_set_codes, kkt_violation
from handlers.solvers.small_nnls import MAX_UNKNOWNS, shared_gram_nnls, support_inverses


def _problem(k: int, seed: int, duplicated: bool = False, n_rows: int = 40, m: int = 30
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """A non-negative dictionary H (k, m), its last row a copy of its first when ``duplicated``, and rows
    X (n_rows, m) of mixed sign (so that many codes sit on the boundary) with an all-zero row."""
    generator = torch.Generator().manual_seed(seed)
    H = torch.rand(k, m, generator=generator, dtype=torch.float64)
    if duplicated:
        H[k - 1] = H[0]
    X = torch.randn(n_rows, m, generator=generator, dtype=torch.float64) + 0.3
    X[0] = 0
    return H, X


@pytest.mark.parametrize("k", [1, 2, 5, MAX_UNKNOWNS])
def test_codes_are_scipys_nnls_and_the_active_sets(k):
    H, X = _problem(k, seed=k)
    gram = H @ H.T
    codes = shared_gram_nnls(X @ H.T, support_inverses(gram))
    assert codes.shape == (len(X), k) and codes.dtype == torch.float64 and (codes >= 0).all()
    assert torch.equal(codes[0], torch.zeros(k, dtype=torch.float64))  # the zero row: the zero code
    for w, x in zip(codes, X):
        _, exact_residual = nnls(H.T.numpy(), x.numpy())
        assert torch.linalg.vector_norm(x - w @ H).item() == pytest.approx(exact_residual, rel=1e-9, abs=1e-12)
    assert (kkt_violation(codes, X @ H.T, gram, simplex=False) < 1e-8).all()
    # The same problem as the active set's (its ridge included), converged: the same codes.
    stepped = active_set_codes(X @ H.T, gram, 4 * k, simplex=False, stop_when_optimal=False)
    assert torch.allclose(codes, stepped, atol=1e-10)


@pytest.mark.parametrize("k", [5, MAX_UNKNOWNS])
def test_collinear_rows_keep_the_optimum(k):
    """Duplicated dictionary rows: the codes are not unique (the ridge splits the weight between the copies,
    and G_SS of both copies is nearly singular), but the optimum and the reconstruction wH are."""
    H, X = _problem(k, seed=k, duplicated=True)
    codes = shared_gram_nnls(X @ H.T, support_inverses(H @ H.T))
    assert (codes >= 0).all() and torch.equal(codes[0], torch.zeros(k, dtype=torch.float64))
    for w, x in zip(codes, X):
        _, exact_residual = nnls(H.T.numpy(), x.numpy())
        assert torch.linalg.vector_norm(x - w @ H).item() == pytest.approx(exact_residual, rel=1e-9, abs=1e-12)
    stepped = active_set_codes(X @ H.T, H @ H.T, 4 * k, simplex=False, stop_when_optimal=False)
    assert torch.allclose(codes @ H, stepped @ H, atol=1e-6)
    assert (kkt_violation(codes, X @ H.T, H @ H.T, simplex=False) < 1e-5).all()


def test_a_row_is_solved_alone_and_float32_rows_give_float32_rounding():
    H, X = _problem(8, seed=3)
    inverses = support_inverses(H @ H.T)
    together = shared_gram_nnls(X @ H.T, inverses)
    alone = torch.cat([shared_gram_nnls(x[None] @ H.T, inverses) for x in X])
    assert torch.allclose(together, alone, rtol=0, atol=1e-12)
    single = shared_gram_nnls((X @ H.T).float(), inverses)
    assert single.dtype == torch.float64 and torch.allclose(single, together, atol=1e-4)


def test_the_inverses_are_those_of_every_support():
    H, _ = _problem(3, seed=1)
    gram = H @ H.T
    inverses = support_inverses(gram)
    assert inverses.shape == (8, 3, 3) and torch.equal(inverses[0], torch.zeros(3, 3, dtype=torch.float64))
    ridged = gram + 1e-10 * gram.diagonal().mean() * torch.eye(3, dtype=torch.float64)
    for index, members in enumerate([[0], [1], [0, 1], [2], [0, 2], [1, 2], [0, 1, 2]], start=1):
        expected = torch.zeros(3, 3, dtype=torch.float64)
        expected[np.ix_(members, members)] = torch.linalg.inv(ridged[np.ix_(members, members)])
        assert torch.allclose(inverses[index], expected, rtol=1e-9, atol=1e-12)


def test_more_unknowns_than_the_bound_are_refused():
    with pytest.raises(ValueError, match=f"at most {MAX_UNKNOWNS} unknowns"):
        support_inverses(torch.eye(MAX_UNKNOWNS + 1))
