"""A batch's results as per-example host rows, made once per batch on the compute thread.

The event loop then builds each response from plain numpy arrays and Python numbers: a torch
call there costs 5–10 µs and several times that with the cold caches an idle server has, while
one batched sort, softmax and ``tolist`` per field serve the whole batch (BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from handlers.base import Explanation


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
    intervened          : the M intervened logit vectors, ranked
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


def ranked_scores(logits: torch.Tensor) -> list[Scores]:
    """Logits (B, K) -> one :class:`Scores` per row; one sort and one softmax for the batch."""
    ranked = torch.argsort(logits, dim=-1, descending=True, stable=True)
    probabilities = torch.softmax(logits.double(), dim=-1)
    return [Scores(*row) for row in zip(logits.numpy(), ranked.numpy(), probabilities.numpy())]


def explained_rows(logits: torch.Tensor, explanation: Explanation) -> list[ExplainedRow]:
    """A batch's logits (B, K) and explanation (CPU tensors) -> one row per example."""
    e = explanation
    b, m, k = e.intervened_logits.shape
    intervened = ranked_scores(e.intervened_logits.reshape(b * m, k))
    heatmaps = e.heatmaps.numpy() if e.heatmaps is not None else [None] * b
    columns = zip(ranked_scores(logits), e.target_class.tolist(), e.target_logit.tolist(), e.bias.tolist(),
                  e.residual_contribution.tolist(), e.residual_share.tolist(), e.component_index.numpy(),
                  e.weight.numpy(), e.contribution.numpy(), heatmaps)
    return [ExplainedRow(*fields, intervened=intervened[i * m:(i + 1) * m]) for i, fields in enumerate(columns)]
