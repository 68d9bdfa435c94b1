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


def additivity_gaps(explanation: Explanation) -> tuple[torch.Tensor, torch.Tensor]:
    """Completeness per example, of an explanation on the CPU.

    Returns the gap ``|sum(contribution) + residual_contribution + bias - target_logit|`` (B,) float32,
    and whether it is within float32 rounding (B,) bool: at most ``ADDITIVITY_RTOL`` times the
    terms' magnitude plus ``ADDITIVITY_ATOL`` (False where anything is not finite).
    """
    e = explanation
    contribution = torch.where(e.component_index >= 0, e.contribution.double(), 0.0)
    terms = (contribution, e.residual_contribution.double(), e.bias.double(), e.target_logit.double())
    gap = (terms[0].sum(1) + terms[1] + terms[2] - terms[3]).abs()
    magnitude = terms[0].abs().sum(1) + terms[1].abs() + terms[2].abs() + terms[3].abs()
    return gap.float(), gap <= ADDITIVITY_RTOL * magnitude + ADDITIVITY_ATOL


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
    residual_heatmap: np.ndarray | None = None

    def top_component(self) -> int | None:
        """The index (into the method's components) of the reported component that contributes most
        in absolute value (the first of equals), or None when none is reported."""
        reported = self.component_index >= 0
        if not reported.any():
            return None
        return int(self.component_index[np.argmax(np.where(reported, np.abs(self.contribution), -1.0))])


def ranked_scores(logits: torch.Tensor) -> list[Scores]:
    """Logits (B, K) -> one :class:`Scores` per row; one sort and one softmax for the batch."""
    ranked = torch.argsort(logits, dim=-1, descending=True, stable=True)
    probabilities = torch.softmax(logits.double(), dim=-1)
    return [Scores(*row) for row in zip(logits.numpy(), ranked.numpy(), probabilities.numpy())]


def predicted_rows(logits: torch.Tensor) -> list[Scores | InvalidInputError]:
    """Logits (B, K) -> per example its :class:`Scores`, or an error if they are not finite."""
    finite = logits.isfinite().all(1).tolist()
    return [scores if ok else InvalidInputError("input", OVERFLOW) for scores, ok in zip(ranked_scores(logits), finite)]


def explained_rows(logits: torch.Tensor, explanation: Explanation, n_interventions: list[int],
                   additive: bool) -> list[ExplainedRow | InvalidInputError]:
    """A batch's logits (B, K) and explanation (CPU tensors) -> per example a row, or an error if
    its numbers are not all finite.

    ``n_interventions``: each example's own intervention count; the batch's ``intervened_logits``
    has as many as the most of them. ``additive``: the method's; its rows' completeness is checked.
    """
    e = explanation
    b, m, k = e.intervened_logits.shape
    finite = (logits.isfinite().all(1) & e.target_logit.isfinite() & e.bias.isfinite()
              & e.residual_contribution.isfinite() & e.residual_share.isfinite()
              & e.weight.isfinite().all(1) & e.contribution.isfinite().all(1)
              & e.intervened_logits.isfinite().reshape(b, -1).all(1))
    if e.heatmaps is not None:
        finite &= e.heatmaps.isfinite().reshape(b, -1).all(1)
    if e.residual_heatmap is not None:
        finite &= e.residual_heatmap.isfinite().reshape(b, -1).all(1)
    if additive:
        gap, adds_up = additivity_gaps(e)
        gaps, adds_up = gap.tolist(), adds_up.tolist()
    else:
        gaps, adds_up = [0.0] * b, [False] * b
    intervened = ranked_scores(e.intervened_logits.reshape(b * m, k))
    heatmaps = e.heatmaps.numpy() if e.heatmaps is not None else [None] * b
    residual_heatmaps = e.residual_heatmap.numpy() if e.residual_heatmap is not None else [None] * b
    columns = zip(ranked_scores(logits), e.target_class.tolist(), e.target_logit.tolist(), e.bias.tolist(),
                  e.residual_contribution.tolist(), e.residual_share.tolist(), e.component_index.numpy(),
                  e.weight.numpy(), e.contribution.numpy(), heatmaps)
    return [ExplainedRow(*fields, intervened=intervened[i * m:i * m + n_interventions[i]], additive=adds_up[i],
                         additivity_gap=gaps[i], residual_heatmap=residual_heatmaps[i])
            if ok else InvalidInputError("input", OVERFLOW)
            for i, (fields, ok) in enumerate(zip(columns, finite.tolist()))]
