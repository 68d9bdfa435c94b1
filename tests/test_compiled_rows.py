"""The compiled row kernels that no one method's tests cover alone (each method's tests check the kernels it
serves against its tensor solvers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from handlers.solvers.compiled_rows import (add_terms_rows, additive_rows, linear_removal_rows,
                                            removal_contributions_rows, removal_sets_rows, zeroed_mass_rows)


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


@pytest.mark.parametrize("interventions", [0, 3])
def test_the_removal_sets_and_contributions_are_the_tensor_bookkeeping(interventions):
    """removal_sets_rows builds the sets RemovalExplainer's tensor path builds (the empty set, each reported
    component alone, padding as the empty set, then the interventions), and removal_contributions_rows reads
    the target's logit of each set and the contributions as its gather and difference do, bit for bit."""
    generator = np.random.default_rng(interventions)
    b, c, n, k = 6, 4, 9, 5
    index = np.stack([generator.permutation(n)[:c] for _ in range(b)])
    index[1, 2:] = -1  # padding
    index[4] = -1  # nothing reported
    suppress = generator.random((b, interventions, n)) < 0.3
    sets = removal_sets_rows(index, suppress)
    alone = torch.from_numpy(index).unsqueeze(2) == torch.arange(n)
    expected = torch.cat([torch.zeros(b, 1, n, dtype=torch.bool), alone, torch.from_numpy(suppress)], 1).float()
    assert sets.dtype == np.float32 and np.array_equal(sets, expected.numpy())
    logits = generator.standard_normal((b, sets.shape[1], k)).astype(np.float32)
    targets = generator.integers(0, k, b)
    target_of_set, contribution = removal_contributions_rows(logits, index, targets)
    gathered = torch.from_numpy(logits).gather(2, torch.from_numpy(targets).view(b, 1, 1).expand(b, len(sets[0]), 1))
    assert np.array_equal(target_of_set, gathered[:, :, 0].numpy())
    assert np.array_equal(contribution, np.where(index >= 0, target_of_set[:, :1] - target_of_set[:, 1:c + 1], 0))
    assert (contribution[index < 0] == 0).all() and (contribution[index >= 0] != 0).all()
    with pytest.raises(IndexError):
        removal_contributions_rows(logits, index, np.full(b, k))


def test_the_removals_through_a_linear_head_are_the_tensor_products():
    """zeroed_mass_rows is mean_hw(F) · min(1, sets @ filters) and linear_removal_rows logits − mass headᵀ (the
    tensor forms of Grad-CAM rules' and coupled NMF's removals) to float32 rounding; a set that removes nothing
    leaves the logits exactly as they are."""
    generator = np.random.default_rng(0)
    b, s, n, d, g, k = 5, 7, 11, 128, 49, 10
    sets = (generator.random((b, s, n)) < 0.3).astype(np.float32)
    sets[:, 0] = 0
    filters = (generator.random((n, d)) < 0.2).astype(np.float32)
    features = generator.random((b, d, g), dtype=np.float32)
    logits = generator.standard_normal((b, k)).astype(np.float32)
    head = generator.standard_normal((k, d)).astype(np.float32)
    mass = zeroed_mass_rows(sets, filters, features)
    f, z = torch.from_numpy(features), (torch.from_numpy(sets) @ torch.from_numpy(filters)).clamp_max(1)
    np.testing.assert_allclose(mass, (f.mean(2)[:, None] * z).numpy(), rtol=1e-6, atol=1e-7)
    assert (mass[:, 0] == 0).all() and (mass[:, 1:] > 0).any()
    removed = linear_removal_rows(logits, mass, head)
    expected = logits[:, None].astype(np.float64) - mass.astype(np.float64) @ head.T.astype(np.float64)
    np.testing.assert_allclose(removed, expected, rtol=1e-5, atol=1e-5)
    assert np.array_equal(removed[:, 0], logits)


@pytest.mark.parametrize("residual_given", [True, False])
@pytest.mark.parametrize("interventions", [0, 4])
def test_the_additive_kernel_is_the_tensor_bookkeeping(residual_given, interventions):
    """additive_rows against AdditiveExplainer's tensor ops: the residual (given, or what the target logit leaves),
    the residual share (0 for an example whose terms are all 0) and the intervened logits (the suppressed
    contributions summed per class by index_add_, then taken from the logits), to float32 rounding of the sums."""
    generator = np.random.default_rng(interventions + residual_given)
    b, c, n, k = 7, 5, 12, 4
    contribution = generator.standard_normal((b, c)).astype(np.float32)
    bias, target_logit = (generator.standard_normal(b).astype(np.float32) for _ in range(2))
    given = generator.standard_normal(b).astype(np.float32)
    contribution[3], bias[3], target_logit[3], given[3] = 0, 0, 0, 0  # nothing to share
    logits = generator.standard_normal((b, k)).astype(np.float32)
    suppress = generator.random((b, interventions, n)) < 0.4
    suppressed = np.flatnonzero(suppress.any((0, 1)))
    component_class = generator.integers(0, k, n)
    suppressed_contribution = generator.standard_normal((b, len(suppressed))).astype(np.float32)
    residual, share, intervened = additive_rows(contribution, bias, target_logit, given, residual_given, logits,
                                                suppress, suppressed, component_class, suppressed_contribution)
    c_, b_, t_ = map(torch.from_numpy, (contribution, bias, target_logit))
    expected = torch.from_numpy(given) if residual_given else t_ - (c_.sum(1) + b_)
    torch.testing.assert_close(torch.from_numpy(residual), expected, rtol=0, atol=1e-6)
    magnitude = c_.abs().sum(1) + expected.abs()
    expected_share = torch.where(magnitude > 0, expected.abs() / magnitude.clamp_min(1e-30), 0)
    torch.testing.assert_close(torch.from_numpy(share), expected_share, rtol=1e-6, atol=1e-7)
    assert share[3] == 0 and (share > 0).sum() == b - 1
    mask = torch.from_numpy(suppress)[:, :, torch.from_numpy(suppressed)].float()
    removed = torch.zeros(b, interventions, k).index_add_(
        2, torch.from_numpy(component_class[suppressed]), mask * torch.from_numpy(suppressed_contribution)[:, None])
    torch.testing.assert_close(torch.from_numpy(intervened), torch.from_numpy(logits)[:, None] - removed, rtol=0,
                               atol=1e-6)
    assert intervened.shape == (b, interventions, k) and (interventions == 0 or not np.array_equal(
        intervened, np.broadcast_to(logits[:, None], intervened.shape)))
