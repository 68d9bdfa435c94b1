"""The compiled row kernels that no one method's tests cover alone (each method's tests check the kernels it
serves against its tensor solvers)."""

from __future__ import annotations

import numpy as np
import pytest

from handlers.solvers.compiled_rows import add_terms_rows


@pytest.mark.parametrize("zero, rtol", [(np.float32(0), 1e-6), (np.float64(0), 1e-13)])
@pytest.mark.parametrize("rows, atoms, columns", [(8, 10, 25088), (5, 3, 37), (1, 1, 1), (3, 4, 0), (9, 30, 6272)])
def test_the_terms_kernel_is_the_float64_product(rows, atoms, columns, zero, rtol):
    """add_terms_rows against float64 products: whole blocks of four rows and two dictionary rows and their tails,
    float32 sums within 1e-6 and float64 sums of the exact products to rounding; it adds to what the terms hold,
    and a row's terms do not depend on the rows beside it."""
    generator = np.random.default_rng(rows + atoms + columns)
    x = generator.random((rows, columns), dtype=np.float32) * (generator.random((rows, columns)) < 0.5)
    dictionary = generator.random((atoms, columns), dtype=np.float32)
    cross, energy = np.ones((rows, atoms)), np.ones(rows)
    add_terms_rows(x, dictionary, 0.25, cross, energy, zero)
    exact = x.astype(np.float64) @ dictionary.T.astype(np.float64)
    np.testing.assert_allclose(cross, 1 + exact, rtol=rtol, atol=0)
    np.testing.assert_allclose(energy, 1 + 0.25 * np.square(x.astype(np.float64)).sum(1), rtol=rtol, atol=0)
    alone_cross, alone_energy = np.ones((1, atoms)), np.ones(1)
    add_terms_rows(x[-1:].copy(), dictionary, 0.25, alone_cross, alone_energy, zero)
    assert np.array_equal(alone_cross[0], cross[-1]) and alone_energy[0] == energy[-1]
