"""A batch's results as per-example host rows (handlers/rows.py): the same numbers, ranked once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from handlers.archive import read_archive
from handlers.errors import InvalidInputError
from handlers.rows import ExplainedRow, Scores, explained_rows, predicted_rows
from handlers.runtime import ExplainItem, ModelRuntime


@pytest.fixture(scope="module")
def runtime(demo_store) -> ModelRuntime:
    return ModelRuntime(read_archive(demo_store / "mnist-1.psar"))


def test_scores_rank_classes_like_topk_with_exact_softmax():
    logits = torch.randn(5, 1000, generator=torch.Generator().manual_seed(0))
    for row, scores in zip(logits, predicted_rows(logits), strict=True):
        assert isinstance(scores, Scores)
        classes, values, probabilities = scores.top(7)
        top = row.topk(7)
        assert classes == top.indices.tolist() and values == top.values.tolist()
        np.testing.assert_allclose(probabilities, torch.softmax(row.double(), 0)[top.indices].numpy(), rtol=1e-12)
        assert sorted(scores.ranked.tolist()) == list(range(1000))  # every class once, for any k
    # Ties keep class order, so equal logits give the same answer on every call.
    tied = predicted_rows(torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0]]))[0]
    assert tied.top(5)[0] == [1, 2, 4, 0, 3]


@pytest.mark.parametrize("interventions", [[], [[0], [0, 1]]])
def test_rows_are_the_batch_explanation_sliced(runtime, interventions):
    x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    items = [ExplainItem(x[i], None, interventions) for i in range(6)]
    logits, explanation, _ = runtime.explain("protonmf", items, "feature_grid")
    rows = explained_rows(logits, explanation, [len(interventions)] * 6, additive=True)
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
        assert row.additive and row.additivity_gap == pytest.approx(abs(total - row.target_logit), abs=1e-6)


def test_each_row_has_its_own_interventions(runtime):
    """Batch-mates with more intervention sets never lend theirs: a row has exactly its own."""
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    sets = [[], [[0]], [[0], [1, 2], [3]], []]
    items = [ExplainItem(x[i], None, sets[i]) for i in range(4)]
    logits, explanation, _ = runtime.explain("protonmf", items, "none")
    assert explanation.intervened_logits.shape[1] == 3  # the batch is padded to the most
    rows = explained_rows(logits, explanation, [len(s) for s in sets], additive=True)
    assert [len(row.intervened) for row in rows] == [0, 1, 3, 0]
    for i in range(4):
        alone, alone_explanation, _ = runtime.explain("protonmf", [items[i]], "none")
        [row_alone] = explained_rows(alone, alone_explanation, [len(sets[i])], additive=True)
        for mine, theirs in zip(rows[i].intervened, row_alone.intervened, strict=True):
            np.testing.assert_allclose(mine.logits, theirs.logits, rtol=1e-5, atol=1e-5)


def test_an_input_that_overflows_gets_an_error_and_its_batch_mates_their_rows(runtime):
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    x[2, 0, 14, 14] = 3e38  # finite, but the forward pass overflows float32
    items = [ExplainItem(x[i], None, [[0]]) for i in range(4)]
    for method in ("protonmf", "gradcam_rules"):
        additive = runtime.explainers[method].additive
        logits, explanation, _ = runtime.explain(method, items, "feature_grid")
        assert not logits[2].isfinite().all()  # what the guard is for
        rows = explained_rows(logits, explanation, [1] * 4, additive)
        assert isinstance(rows[2], InvalidInputError) and rows[2].field == "input"
        assert "overflows float32" in str(rows[2])
        others = [0, 1, 3]
        clean_logits, clean, _ = runtime.explain(method, [items[i] for i in others], "feature_grid")
        for row, expected in zip([rows[i] for i in others], explained_rows(clean_logits, clean, [1] * 3, additive)):
            assert isinstance(row, ExplainedRow)
            np.testing.assert_allclose(row.scores.logits, expected.scores.logits, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(row.contribution, expected.contribution, rtol=1e-5, atol=1e-5)
    predicted = predicted_rows(runtime.predict(x))
    assert isinstance(predicted[2], InvalidInputError)
    assert all(not isinstance(predicted[i], Exception) for i in (0, 1, 3))


def test_rows_of_a_method_that_is_not_additive_say_so_with_no_gap(runtime):
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    logits, explanation, _ = runtime.explain("gradcam_rules", [ExplainItem(xi, None, []) for xi in x], "none")
    rows = explained_rows(logits, explanation, [0] * 3, additive=False)
    assert [(row.additive, row.additivity_gap) for row in rows] == [(False, 0.0)] * 3


def test_the_model_layer_answers_rows_with_their_own_interventions_and_its_stage_times(runtime):
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    sets = [[[0]], [], [[0], [1]]]
    items = [ExplainItem(x[i], None, sets[i]) for i in range(3)]
    rows, timings = runtime.explain_rows("protonmf", items, "none")
    assert set(timings) == {"forward", "explain", "rows"}
    assert [len(row.intervened) for row in rows] == [1, 0, 2] and all(row.additive for row in rows)
    logits, explanation, _ = runtime.explain("protonmf", items, "none")
    for row, expected in zip(rows, explained_rows(logits, explanation, [1, 0, 2], additive=True)):
        np.testing.assert_allclose(row.contribution, expected.contribution, rtol=1e-5, atol=1e-6)
    scores, timings = runtime.predict_rows(list(x))
    assert set(timings) == {"forward", "rows"}
    np.testing.assert_allclose(np.stack([s.logits for s in scores]), logits.numpy(), rtol=1e-5, atol=1e-5)
    for row in rows:  # the top component: the reported one that contributes most in absolute value
        reported = row.component_index >= 0
        top = list(row.component_index).index(row.top_component)
        assert abs(row.contribution[top]) == np.abs(row.contribution[reported]).max()


def test_the_top_component_is_the_reported_one_of_largest_contribution_or_none(runtime):
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(6))
    logits, explanation, _ = runtime.explain("protonmf", [ExplainItem(xi, None, []) for xi in x], "none")
    explanation.component_index = explanation.component_index.clone()
    explanation.contribution = explanation.contribution.clone()
    explanation.component_index[0] = -1  # nothing reported
    explanation.component_index[1, 0] = -1  # padding does not count, however large its contribution
    explanation.contribution[1, 0] = 1e6
    explanation.contribution[2] = torch.tensor([-3.0, 1.0, 3.0] + [0.0] * (explanation.contribution.shape[1] - 3))
    rows = explained_rows(logits, explanation, [0] * 3, additive=False)
    assert rows[0].top_component is None
    index = explanation.component_index[1, 1:]
    expected = int(index[explanation.contribution[1, 1:].abs().argmax()])
    assert rows[1].top_component == expected
    assert rows[2].top_component == int(explanation.component_index[2, 0])  # |-3| = |3|: the first of equals
