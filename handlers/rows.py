"""A batch's results as per-example host rows, made once per batch on the compute thread.

A transport then builds each answer from plain numpy arrays and Python numbers: a torch call on
the event loop costs 5–10 µs and several times that with the cold caches an idle server has, while
one batched sort, softmax and ``tolist`` per field serve the whole batch (BENCHMARKS.md).

Each row is also checked here: an example whose numbers are not all finite (its forward pass
overflowed float32) gets an :class:`~handlers.errors.InvalidInputError` instead of a row, and an
additive method's row says whether it adds up (:func:`additivity_gaps`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from handlers.base import Explanation
from handlers.errors import InvalidInputError

OVERFLOW = ("the model's computation overflows float32 on this input (logits or explanation not finite); "
            "send inputs in the range the model was trained on")

# An additive explanation adds up within float32 rounding: sums of a few thousand float32 products
# stay far below this share of the terms' magnitude, and a decomposition that misses by more is wrong.
ADDITIVITY_RTOL = 1e-3
ADDITIVITY_ATOL = 1e-5


def additivity_gaps(explanation: Explanation) -> tuple[np.ndarray, np.ndarray]:
    """Completeness per example, of an explanation on the CPU.

    Returns the gap ``|sum(contribution) + residual_contribution + bias - target_logit|`` (B,) float32,
    and whether it is within float32 rounding (B,) bool: at most ``ADDITIVITY_RTOL`` times the
    terms' magnitude plus ``ADDITIVITY_ATOL`` (False where anything is not finite).
    """
    e = explanation
    contribution = np.where(e.component_index.numpy() >= 0, e.contribution.numpy().astype(np.float64), 0.0)
    residual, bias, target = (t.numpy().astype(np.float64) for t in (e.residual_contribution, e.bias, e.target_logit))
    with np.errstate(invalid="ignore", over="ignore"):  # a non-finite term makes its row's gap NaN: not adding up
        gap = np.abs(contribution.sum(1) + residual + bias - target)
        magnitude = np.abs(contribution).sum(1) + np.abs(residual) + np.abs(bias) + np.abs(target)
        return gap.astype(np.float32), gap <= ADDITIVITY_RTOL * magnitude + ADDITIVITY_ATOL


@dataclass(frozen=True, slots=True)
class Scores:
    """One logit vector with its classes ranked, what a top-k answer is read from.

    logits        : (K,) float32
    ranked        : (K,) int64, class indices by logit, highest first
    probabilities : (K,) float64, the softmax of ``logits``
    """

    logits: np.ndarray
    ranked: np.ndarray
    probabilities: np.ndarray

    def top(self, k: int) -> tuple[list[int], list[float], list[float]]:
        """The ``k`` highest classes, their logits and their probabilities."""
        classes = self.ranked[:k]
        return classes.tolist(), self.logits[classes].tolist(), self.probabilities[classes].tolist()


@dataclass(frozen=True, slots=True)
class ExplainedRow:
    """One example of a batched :class:`handlers.base.Explanation`; C components, M interventions.

    component_index     : (C,) int64 into the method's components, -1 = padding
    weight, contribution: (C,) float32
    heatmaps            : (C, H, W) float32 on the feature grid, or None
    intervened          : the example's own M intervened logit vectors, ranked
    residual_heatmap    : (H, W) float32, the residual's map (presence heatmaps), or None
    additive            : an additive method's row that adds up within float32 rounding
    additivity_gap      : |sum(contribution) + residual_contribution + bias - target_logit|; 0 for
                          a method that is not additive
    top_component       : the index (into the method's components) of the reported component that
                          contributes most in absolute value (the first of equals); None when none is reported
    """

    scores: Scores
    target_class: int
    target_logit: float
    bias: float
    residual_contribution: float
    residual_share: float
    component_index: np.ndarray
    weight: np.ndarray
    contribution: np.ndarray
    heatmaps: np.ndarray | None
    intervened: list[Scores]
    additive: bool
    additivity_gap: float
    top_component: int | None
    residual_heatmap: np.ndarray | None = None


def ranked_scores(values: np.ndarray) -> list[Scores]:
    """Logits (B, K) float32 -> one :class:`Scores` per row; one sort and one softmax for the batch."""
    ranked = np.argsort(-values, axis=-1, kind="stable")  # highest first; equal logits in class order
    with np.errstate(invalid="ignore", over="ignore"):  # rows that are not finite become errors (below)
        wide = values.astype(np.float64)
        exp = np.exp(wide - wide.max(-1, keepdims=True))
        probabilities = exp / exp.sum(-1, keepdims=True)
    return [Scores(*row) for row in zip(values, ranked, probabilities)]


def _finite(b: int, *arrays: np.ndarray | None) -> np.ndarray:
    """(B,) bool: every number of the example is finite in each array given (each of B rows).
    One check over the arrays side by side: a numpy call costs microseconds on these few numbers."""
    values = np.concatenate([a.reshape(b, -1) for a in arrays if a is not None], axis=1)
    return np.isfinite(values).all(1)


def predicted_rows(logits: torch.Tensor) -> list[Scores | InvalidInputError]:
    """Logits (B, K) -> per example its :class:`Scores`, or an error if they are not finite."""
    values = logits.numpy()
    finite = _finite(len(values), values).tolist()
    return [scores if ok else InvalidInputError("input", OVERFLOW) for scores, ok in zip(ranked_scores(values), finite)]


def explained_rows(logits: torch.Tensor, explanation: Explanation, n_interventions: list[int],
                   additive: bool) -> list[ExplainedRow | InvalidInputError]:
    """A batch's logits (B, K) and explanation (CPU tensors) -> per example a row, or an error if
    its numbers are not all finite.

    ``n_interventions``: each example's own intervention count; the batch's ``intervened_logits``
    has as many as the most of them. ``additive``: the method's; its rows' completeness is checked.
    """
    e = explanation
    b, m, k = e.intervened_logits.shape
    # Numpy views of the CPU tensors: an op on these few numbers costs about 1 µs, a torch op 5-10.
    target_logit, bias, residual, share = (t.numpy() for t in (e.target_logit, e.bias, e.residual_contribution,
                                                               e.residual_share))
    weight, contribution = e.weight.numpy(), e.contribution.numpy()
    heatmaps = e.heatmaps.numpy() if e.heatmaps is not None else None
    residual_heatmaps = e.residual_heatmap.numpy() if e.residual_heatmap is not None else None
    logit_rows, intervened_rows = logits.numpy(), e.intervened_logits.numpy().reshape(b * m, k)
    finite = _finite(b, logit_rows, target_logit, bias, residual, share, weight, contribution,
                     intervened_rows.reshape(b, -1), heatmaps, residual_heatmaps)
    if additive:
        gap, adds_up = additivity_gaps(e)
        gaps, adds_up = gap.tolist(), adds_up.tolist()
    else:
        gaps, adds_up = [0.0] * b, [False] * b
    index = e.component_index.numpy()
    reported = index >= 0
    top = np.take_along_axis(index, np.where(reported, np.abs(contribution), -1.0).argmax(1, keepdims=True), 1)
    tops = [int(c) if any_reported else None for c, any_reported in zip(top[:, 0].tolist(), reported.any(1).tolist())]
    scores = ranked_scores(np.concatenate([logit_rows, intervened_rows]))  # one sort and softmax for both
    intervened = scores[b:]
    columns = zip(scores[:b], e.target_class.tolist(), target_logit.tolist(), bias.tolist(),
                  residual.tolist(), share.tolist(), index, weight, contribution,
                  heatmaps if heatmaps is not None else [None] * b)
    residual_heatmaps = residual_heatmaps if residual_heatmaps is not None else [None] * b
    return [ExplainedRow(*fields, intervened=intervened[i * m:i * m + n_interventions[i]], additive=adds_up[i],
                         additivity_gap=gaps[i], top_component=tops[i], residual_heatmap=residual_heatmaps[i])
            if ok else InvalidInputError("input", OVERFLOW)
            for i, (fields, ok) in enumerate(zip(columns, finite.tolist()))]
