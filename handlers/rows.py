"""A batch's results as per-example host rows, made once per batch on the compute thread.

A transport then builds each answer from plain numpy arrays and Python numbers: a torch call on
the event loop costs 5–10 µs and several times that with the cold caches an idle server has, while
one compiled kernel ranks every row, checks it and finds its top component, and one ``tolist`` per field
serves the whole batch (about 60 µs a batch of one right after a forward pass, where the twenty-odd numpy
calls it replaces took 140; BENCHMARKS.md). The kernels compile when a model loads (:func:`compile_row_kernels`).

Each row is also checked here: an example whose numbers are not all finite (its forward pass
overflowed float32) gets an :class:`~handlers.errors.InvalidInputError` instead of a row, and an
additive method's row says whether it adds up (:func:`additivity_gaps`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from handlers.base import Explanation
from handlers.errors import InvalidInputError
from handlers.solvers.compiled_rows import kernel

OVERFLOW = ("the model's computation overflows float32 on this input (logits or explanation not finite); "
            "send inputs in the range the model was trained on")

# An additive explanation adds up within float32 rounding: sums of a few thousand float32 products
# stay far below this share of the terms' magnitude, and a decomposition that misses by more is wrong.
ADDITIVITY_RTOL = 1e-3
ADDITIVITY_ATOL = 1e-5


@kernel
def _additivity(contribution, index, residual, bias, target):
    """One example's gap ``|Σ reported contribution + residual + bias − target|`` in float64, and whether it is
    within float32 rounding (at most ADDITIVITY_RTOL times the terms' magnitude plus ADDITIVITY_ATOL; False
    where anything is not finite)."""
    total, magnitude = 0.0, 0.0
    for i in range(len(index)):
        if index[i] >= 0:
            term = np.float64(contribution[i])
            total += term
            magnitude += abs(term)
    residual, bias, target = np.float64(residual), np.float64(bias), np.float64(target)
    gap = abs(total + residual + bias - target)
    magnitude += abs(residual) + abs(bias) + abs(target)
    return gap, gap <= ADDITIVITY_RTOL * magnitude + ADDITIVITY_ATOL


@kernel
def additivity_rows(contribution, index, residual, bias, target):
    """:func:`_additivity` of each example: contribution (B, C) float32, index (B, C) int64 (-1 padding),
    residual, bias, target (B,) float32 -> gap (B,) float32, adds up (B,) bool."""
    b = len(index)
    gaps, adds_up = np.empty(b, dtype=np.float32), np.empty(b, dtype=np.bool_)
    for r in range(b):
        gaps[r], adds_up[r] = _additivity(contribution[r], index[r], residual[r], bias[r], target[r])
    return gaps, adds_up


def additivity_gaps(explanation: Explanation) -> tuple[np.ndarray, np.ndarray]:
    """Completeness per example, of an explanation on the CPU: the gap
    ``|sum(contribution) + residual_contribution + bias - target_logit|`` (B,) float32, and whether it is
    within float32 rounding (B,) bool (:func:`_additivity`)."""
    e = explanation
    return additivity_rows(*(np.ascontiguousarray(t.numpy()) for t in (
        e.contribution, e.component_index, e.residual_contribution, e.bias, e.target_logit)))


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


@kernel
def _rank(values, ranked, probabilities):
    """One row of logits (K,) float32: its classes by logit into ``ranked`` (K,) int64, highest first and equal
    logits in class order, and its softmax in float64 into ``probabilities`` (K,). Returns whether all are finite
    (a row that is not gets numbers of no meaning, and becomes an error)."""
    ranked[:] = np.argsort(-values, kind="mergesort")  # stable
    top = -np.inf
    finite = True
    for value in values:
        top = max(top, np.float64(value))
        finite = finite and np.isfinite(value)
    total = 0.0
    for t in range(len(values)):
        probabilities[t] = math.exp(np.float64(values[t]) - top)
        total += probabilities[t]
    for t in range(len(values)):
        probabilities[t] /= total
    return finite


@kernel
def _finite(values):
    """Whether every number of ``values`` (C-contiguous, any shape) is finite."""
    for value in values.ravel():
        if not np.isfinite(value):
            return False
    return True


@kernel
def score_rows(values):
    """Logits (N, K) float32 -> ranked (N, K) int64, probabilities (N, K) float64 and finite (N,) bool, row by
    row as :func:`_rank`."""
    n, k = values.shape
    ranked, probabilities = np.empty((n, k), dtype=np.int64), np.empty((n, k))
    finite = np.empty(n, dtype=np.bool_)
    for q in range(n):
        finite[q] = _rank(values[q], ranked[q], probabilities[q])
    return ranked, probabilities, finite


@kernel
def explained_row_checks(logits, intervened, target_logit, bias, residual, share, weight, contribution, index,
                         heatmaps, residual_heatmaps, additive):
    """What an explanation's host rows are read from, row by row: each logit vector ranked (:func:`_rank`), whether
    every number of an example is finite, its additivity gap and whether it adds up (:func:`_additivity`, where
    ``additive``), and its top component.

    logits (B, K) and intervened (B·M, K) float32; target_logit, bias, residual, share (B,) float32; weight and
    contribution (B, C) float32; index (B, C) int64 (-1 padding); heatmaps (B, ·) and residual_heatmaps (B, ·)
    float32, flattened ((B, 0) where there are none). Returns ranked (B + B·M, K) int64 and probabilities
    (B + B·M, K) float64 (the logits' rows, then the interventions'), finite (B,) bool, gap (B,) float32 and
    adds_up (B,) bool (0 and False where not ``additive``), and top (B,) int64, the reported component of largest
    |contribution| (the first of equals), -1 where none is reported."""
    b, k = logits.shape
    m = intervened.shape[0] // b if b else 0
    ranked, probabilities = np.empty((b + b * m, k), dtype=np.int64), np.empty((b + b * m, k))
    finite, adds_up = np.empty(b, dtype=np.bool_), np.zeros(b, dtype=np.bool_)
    gap, top = np.zeros(b, dtype=np.float32), np.full(b, -1, dtype=np.int64)
    for r in range(b):
        ok = _rank(logits[r], ranked[r], probabilities[r])
        for j in range(r * m, r * m + m):
            ok = _rank(intervened[j], ranked[b + j], probabilities[b + j]) and ok
        ok = ok and np.isfinite(target_logit[r]) and np.isfinite(bias[r]) and np.isfinite(residual[r])
        ok = ok and np.isfinite(share[r]) and _finite(weight[r]) and _finite(contribution[r])
        finite[r] = ok and _finite(heatmaps[r]) and _finite(residual_heatmaps[r])
        largest = -1.0
        for i in range(index.shape[1]):
            if index[r, i] >= 0 and abs(contribution[r, i]) > largest:
                largest, top[r] = abs(contribution[r, i]), index[r, i]
        if additive:
            gap[r], adds_up[r] = _additivity(contribution[r], index[r], residual[r], bias[r], target_logit[r])
    return ranked, probabilities, finite, gap, adds_up, top


KERNELS = (score_rows, explained_row_checks, additivity_rows)


def compile_row_kernels() -> None:
    """Compile :data:`KERNELS` for the arrays they take (a model calls this at load, on any device: rows are
    made on the host); from numba's cache where it can be written."""
    if all(row_kernel.signatures for row_kernel in KERNELS):
        return
    logits, index = np.ones((1, 2), dtype=np.float32), np.zeros((1, 1), dtype=np.int64)
    score_rows(logits)
    numbers, terms = np.ones(1, dtype=np.float32), np.ones((1, 1), dtype=np.float32)
    additivity_rows(terms, index, numbers, numbers, numbers)
    for additive in (True, False):
        explained_row_checks(logits, logits, numbers, numbers, numbers, numbers, terms, terms, index, terms, terms,
                             additive)


def predicted_rows(logits: torch.Tensor) -> list[Scores | InvalidInputError]:
    """Logits (B, K) -> per example its :class:`Scores` (one kernel call ranks the batch), or an error if they
    are not finite."""
    values = np.ascontiguousarray(logits.numpy())
    ranked, probabilities, finite = score_rows(values)
    return [Scores(*row) if ok else InvalidInputError("input", OVERFLOW)
            for row, ok in zip(zip(values, ranked, probabilities), finite.tolist())]


def explained_rows(logits: torch.Tensor, explanation: Explanation, n_interventions: list[int],
                   additive: bool) -> list[ExplainedRow | InvalidInputError]:
    """A batch's logits (B, K) and explanation (CPU tensors) -> per example a row, or an error if
    its numbers are not all finite.

    ``n_interventions``: each example's own intervention count; the batch's ``intervened_logits``
    has as many as the most of them. ``additive``: the method's; its rows' completeness is checked.
    """
    e = explanation
    b, m, k = e.intervened_logits.shape
    # Numpy views of the CPU tensors, C-contiguous as the kernel takes them (a copy only where one is not).
    target_logit, bias, residual, share, weight, contribution, index, logit_rows = (
        np.ascontiguousarray(t.numpy()) for t in (e.target_logit, e.bias, e.residual_contribution, e.residual_share,
                                                   e.weight, e.contribution, e.component_index, logits))
    intervened_rows = np.ascontiguousarray(e.intervened_logits.numpy().reshape(b * m, k))
    heatmaps = e.heatmaps.numpy() if e.heatmaps is not None else None
    residual_heatmaps = e.residual_heatmap.numpy() if e.residual_heatmap is not None else None
    ranked, probabilities, finite, gap, adds_up, top = explained_row_checks(
        logit_rows, intervened_rows, target_logit, bias, residual, share, weight, contribution, index,
        *(np.ascontiguousarray(maps.reshape(b, -1)) if maps is not None else np.zeros((b, 0), dtype=np.float32)
          for maps in (heatmaps, residual_heatmaps)), additive)
    scores = [Scores(*row) for row in zip(itertools.chain(logit_rows, intervened_rows), ranked, probabilities)]
    intervened = scores[b:]
    gaps, adds_up, tops = gap.tolist(), adds_up.tolist(), top.tolist()
    columns = zip(scores[:b], e.target_class.tolist(), target_logit.tolist(), bias.tolist(),
                  residual.tolist(), share.tolist(), index, weight, contribution,
                  heatmaps if heatmaps is not None else [None] * b)
    residual_heatmaps = residual_heatmaps if residual_heatmaps is not None else [None] * b
    return [ExplainedRow(*fields, intervened=intervened[i * m:i * m + n_interventions[i]], additive=adds_up[i],
                         additivity_gap=gaps[i], top_component=tops[i] if tops[i] >= 0 else None,
                         residual_heatmap=residual_heatmaps[i])
            if ok else InvalidInputError("input", OVERFLOW)
            for i, (fields, ok) in enumerate(zip(columns, finite.tolist()))]
