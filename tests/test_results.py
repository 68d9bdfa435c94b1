"""A batch's results as per-example host rows (server/results.py): the same numbers, ranked once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from handlers.archive import read_archive
from handlers.runtime import ExplainItem, ServedModel
from server.results import explained_rows, ranked_scores


@pytest.fixture(scope="module")
def served(demo_store) -> ServedModel:
    return ServedModel(read_archive(demo_store / "mnist-1.psar"))


def test_scores_rank_classes_like_topk_with_exact_softmax():
    logits = torch.randn(5, 1000, generator=torch.Generator().manual_seed(0))
    for row, scores in zip(logits, ranked_scores(logits)):
        classes, values, probabilities = scores.top(7)
        top = row.topk(7)
        assert classes == top.indices.tolist() and values == top.values.tolist()
        np.testing.assert_allclose(probabilities, torch.softmax(row.double(), 0)[top.indices].numpy(), rtol=1e-12)
        assert sorted(scores.ranked.tolist()) == list(range(1000))  # every class once, for any k
    # Ties keep class order, so equal logits give the same answer on every call.
    tied = ranked_scores(torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0]]))[0]
    assert tied.top(5)[0] == [1, 2, 4, 0, 3]


@pytest.mark.parametrize("interventions", [[], [[0], [0, 1]]])
def test_rows_are_the_batch_explanation_sliced(served, interventions):
    x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    items = [ExplainItem(x[i], None, interventions) for i in range(6)]
    logits, explanation, _ = served.explain("protonmf", items, "feature_grid")
    rows = explained_rows(logits, explanation)
    assert len(rows) == 6
    for i, row in enumerate(rows):
        np.testing.assert_array_equal(row.scores.logits, logits[i].numpy())
        assert row.target_class == int(explanation.target_class[i])
        for field in ("target_logit", "bias", "residual_contribution", "residual_share"):
            assert getattr(row, field) == float(getattr(explanation, field)[i])
        for field in ("component_index", "weight", "contribution", "heatmaps"):
            np.testing.assert_array_equal(getattr(row, field), getattr(explanation, field)[i].numpy())
        assert len(row.intervened) == len(interventions)
        for m, scores in enumerate(row.intervened):
            np.testing.assert_array_equal(scores.logits, explanation.intervened_logits[i, m].numpy())
        # The row adds up as the explanation does.
        total = row.contribution.astype(np.float64).sum() + row.residual_contribution + row.bias
        assert total == pytest.approx(row.target_logit, abs=1e-4)
