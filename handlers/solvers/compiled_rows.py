"""Small solvers on the CPU, row by row, compiled: the same steps as the batched tensor solvers.

On a GPU the batched solvers (:func:`handlers.solvers.active_set.active_set_codes`,
:func:`handlers.solvers.simplex.projected_adam`, coupled NMF's removals) run as a few launches or one
captured graph per batch size. On the CPU every tensor op costs its Python call (5-10 us) whatever its
size: a ProtoFac paper-protocol code takes about 1650 of them on (B, k) tensors of a few hundred numbers,
Grad-CAM rules' candidate search and rule matching about 40, every method's bookkeeping a dozen or more (a
removal method's sets, their target logits and its removals through a linear head; an additive method's
residual, its share and the interventions: each op 10-40 us right after a forward pass, where a kernel call
costs a few), and the tensor forms of the rest do more arithmetic than a row needs (coupled NMF's
fold-in tries all 1023 supports of ten concepts; its removals multiply every set by every concept, most of them
zero), and BLAS runs the skinny products that the codes are solved from (a batch of rows times a few dozen
dictionary rows over thousands of columns) far below its speed.
These loops do the same arithmetic on one row (for those products, four rows) at a time, compiled by numba
(once per process, at load: :func:`compile_kernels`), so a batch costs what its flops cost. They follow the
tensor solvers step by step, so a row's result agrees with theirs to rounding (the tests check it); the tensor
solvers stay the reference.

The solvers take float64 / int64 arrays, the kernels over a layer's activations float32 as the model
gives them; all run on the calling thread (no parallel loops).
"""

from __future__ import annotations

import functools
import logging
import math
import time

import numba
import numpy as np

_BETA1, _BETA2, _EPS = 0.9, 0.999, 1e-8  # projected_adam's

log = logging.getLogger(__name__)

# The CPU serves these kernels in place of the tensor solvers; bench.run.gpu_path turns this off, to count
# what a GPU runs.
serve_on_cpu = True


def serves(device) -> bool:
    """Whether work on ``device`` (a torch.device) runs these kernels: on the CPU, unless turned off."""
    return serve_on_cpu and device.type == "cpu"


def kernel(function=None, *, reorder_sums=False):
    """numba.njit, cached beside this file (or in NUMBA_CACHE_DIR) where it can be: a read-only install (a
    container's root file system) compiles at every load instead. Division by zero gives inf or nan as in
    the tensor solvers (numpy's error model), not an exception; the GIL is released while a kernel runs.
    ``reorder_sums``: floating-point sums may be reassociated (and the sign of a zero ignored), so that a
    reduction vectorizes; for kernels whose results the tests compare with a tolerance."""
    if function is None:
        return functools.partial(kernel, reorder_sums=reorder_sums)
    options = {"nogil": True, "error_model": "numpy"}
    if reorder_sums:
        options["fastmath"] = {"reassoc", "nsz"}
    try:
        return numba.njit(cache=True, **options)(function)
    except RuntimeError:  # numba found no writable cache directory
        return numba.njit(**options)(function)


@kernel
def _lerp(start, end, weight):
    # torch.lerp's two branches, so an iterate rounds as the tensor solver's does
    if weight < 0.5:
        return start + weight * (end - start)
    return end - (end - start) * (1 - weight)


@kernel
def _active_set_row(c, g, diagonal, n_iter, tolerance, simplex, w, inverse, support, z, s1, gradient, column):
    """One row of active_set_codes(simplex=simplex, stop_when_optimal=True) into ``w``; the rest is scratch."""
    k = len(c)
    w[:] = 0.0
    inverse[:, :] = 0.0
    support[:] = False
    if simplex:  # from the best vertex; else from w = 0, the empty support
        first = 0
        for j in range(1, k):
            if 0.5 * diagonal[j] - c[j] < 0.5 * diagonal[first] - c[first]:
                first = j
        w[first] = 1.0
        inverse[first, first] = 1.0 / diagonal[first]
        support[first] = True
    for _ in range(n_iter):
        # z = G_SS⁻¹c, on the simplex G_SS⁻¹(c − μ1) with Σz = 1; the products by columns (G_SS⁻¹ is symmetric):
        # contiguous inner loops
        z[:] = 0.0
        s1[:] = 0.0
        for j in range(k):
            if support[j]:
                for i in range(k):
                    z[i] += inverse[j, i] * c[j]
                    s1[i] += inverse[j, i]
        if simplex:
            total_z = 0.0
            total_s = 0.0
            for i in range(k):
                total_z += z[i]
                total_s += s1[i]
            shift = (1.0 - total_z) / total_s
            for i in range(k):
                z[i] = z[i] + s1[i] * shift
        alpha = 1.0
        leave = 0
        blocked = False
        for i in range(k):
            if support[i] and z[i] < 0:
                blocked = True
                ratio = w[i] / (w[i] - z[i])
                if ratio < alpha:
                    alpha = ratio
                    leave = i
        for i in range(k):
            w[i] = max(_lerp(w[i], z[i], alpha), 0.0)
        for i in range(k):
            gradient[i] = -c[i]
        for j in range(k):
            if w[j] != 0:  # a zero adds nothing to the sums
                for i in range(k):
                    gradient[i] += w[j] * g[j, i]
        level = 0.0  # μ on the simplex, else 0
        if simplex:
            size = 0
            for i in range(k):
                if support[i]:
                    level += gradient[i]
                    size += 1
            level /= size
        enter = -1
        outside = np.inf
        for i in range(k):
            if not support[i] and gradient[i] < outside:
                outside = gradient[i]
                enter = i
        add = not blocked and enter >= 0 and outside < level - tolerance
        if blocked:  # remove ``leave`` from G_SS⁻¹
            coefficient = 1.0 / -inverse[leave, leave]
            for i in range(k):
                column[i] = inverse[i, leave]
            support[leave] = False
        elif add:  # border G_SS⁻¹ with ``enter``
            schur = diagonal[enter]
            column[:] = 0.0
            for j in range(k):
                if support[j]:
                    for i in range(k):
                        column[i] += inverse[j, i] * g[enter, j]
            for j in range(k):
                schur -= g[enter, j] * column[j]
            column[enter] -= 1.0
            coefficient = 1.0 / schur
            support[enter] = True
        else:
            break  # optimal: every further step would leave the row as it is
        for i in range(k):
            scaled = coefficient * column[i]
            for j in range(k):
                inverse[i, j] += scaled * column[j]
        for i in range(k):
            if not support[i]:
                w[i] = 0.0
    if simplex:
        total = 0.0
        for i in range(k):
            total += w[i]
        for i in range(k):
            w[i] /= total


@kernel
def active_set_rows(cross, ridged_gram, n_iter, tolerance, simplex):
    """(B, k) active_set_codes(cross, ·, n_iter, simplex=simplex) of ``cross`` (B, k), given the ridged Gram matrix
    G + tolerance·I (k, k) and the tolerance (:func:`handlers.solvers.active_set.ridged_gram`), all float64."""
    b, k = cross.shape
    out = np.empty((b, k))
    diagonal = np.diag(ridged_gram).copy()
    inverse = np.empty((k, k))
    support = np.empty(k, dtype=np.bool_)
    z, s1, gradient, column = np.empty(k), np.empty(k), np.empty(k), np.empty(k)
    for r in range(b):
        _active_set_row(cross[r], ridged_gram, diagonal, n_iter, tolerance, simplex, out[r], inverse, support,
                        z, s1, gradient, column)
    return out


@kernel
def _project_to_simplex(v, u):
    """v onto the simplex in place (project_to_simplex's rule); u: scratch of v's size.

    The shift is max_j θ_j, θ_j = (sum of the j largest − 1) / j, and θ rises exactly while the next largest
    entry exceeds it (Condat 2016): the largest entries are picked one at a time until it stops rising, so a
    projection onto a few vertices costs a few passes, not a sort."""
    k = len(v)
    u[:] = v
    cumulative = 0.0
    shift = -np.inf
    for j in range(k):
        largest = np.argmax(u)
        cumulative += u[largest]
        u[largest] = -np.inf
        theta = (cumulative - 1.0) / (j + 1)
        if theta <= shift:
            break
        shift = theta
    for j in range(k):
        v[j] = max(v[j] - shift, 0.0)


@kernel
def paper_codes_rows(start, cross, energy, gram, head, bias, ce_head_t, oracle, n_steps, lr, reconstruction_weight,
                     concentration_weight, smoothing):
    """(B, k) ProtoFac's paper-protocol codes through an affine head: projected Adam from ``start`` (B, k) on
    eq. 4 row by row, with the gradient of paper_codes' AffineSurrogate branch.

    cross (B, k) aHᵀ, energy (B,) ‖a‖², gram (k, k) HHᵀ, head (k, K), bias (K,), ce_head_t (K, k) λ_ce headᵀ,
    oracle (B,) int64; the weights λ_r / ā and λ_c; smoothing (1e-3 ā)². The products run by columns
    (contiguous inner loops) and skip a code's zeros, which add nothing."""
    b, k = start.shape
    classes = len(bias)
    out = start.copy()
    first, second = np.empty(k), np.empty(k)
    gradient, to_cross, logits, scratch = np.empty(k), np.empty(k), np.empty(classes), np.empty(k)
    # each step's constants as torch.optim.Adam's Python floats (math.pow: C's pow, as Python's **)
    values, corrections = np.empty(n_steps + 1), np.empty(n_steps + 1)
    for step in range(1, n_steps + 1):
        values[step] = -lr / (1 - math.pow(_BETA1, step))
        corrections[step] = math.sqrt(1 - math.pow(_BETA2, step))
    for r in range(b):
        w = out[r]
        first[:] = 0.0
        second[:] = 0.0
        for step in range(1, n_steps + 1):
            # eq. 2: (softmax(w head + bias) − onehot) λ_ce headᵀ
            logits[:] = bias
            for i in range(k):
                if w[i] != 0:  # codes are sparse; a zero adds nothing to these sums
                    for t in range(classes):
                        logits[t] += w[i] * head[i, t]
            top = logits.max()
            normalizer = 0.0
            for t in range(classes):
                logits[t] = math.exp(logits[t] - top)
                normalizer += logits[t]
            for t in range(classes):
                logits[t] = logits[t] / normalizer
            logits[oracle[r]] -= 1.0
            gradient[:] = 0.0
            for t in range(classes):
                for i in range(k):
                    gradient[i] += logits[t] * ce_head_t[t, i]
            # eq. 1: λ_r / ā (wG − c) / ‖a − wH‖, smoothed
            for i in range(k):
                to_cross[i] = -cross[r, i]
            for j in range(k):
                if w[j] != 0:
                    for i in range(k):
                        to_cross[i] += w[j] * gram[j, i]
            raw = energy[r]
            for i in range(k):
                raw += w[i] * (to_cross[i] - cross[r, i])
            factor = 1.0 / math.sqrt(raw + smoothing) if raw >= 0 else 0.0
            # eq. 3: 2 λ_c (w − e_argmax)
            top_index = np.argmax(w)
            for i in range(k):
                vertex = w[i] - 1.0 if i == top_index else w[i]
                gradient[i] = (gradient[i] + reconstruction_weight * to_cross[i] * factor
                               + 2 * concentration_weight * vertex)
            value, correction = values[step], corrections[step]
            for i in range(k):
                first[i] = _lerp(first[i], gradient[i], 1 - _BETA1)
                second[i] = second[i] * _BETA2 + (1 - _BETA2) * gradient[i] * gradient[i]
                w[i] = w[i] + value * (first[i] / (math.sqrt(second[i]) / correction + _EPS))
            _project_to_simplex(w, scratch)
    return out


@kernel
def residual_share_rows(codes, cross, energy, gram, floor, root):
    """(B,) float32 residual shares from a code's terms, row by row: ``u = ‖x − wH‖² = ‖x‖² + w·(wG − 2c)``
    (at least 0), then ``min(u / max(‖x‖², floor), 1)``, its square root where ``root``, and 0 where ‖x‖² is 0.

    codes (B, k) w, cross (B, k) c = xHᵀ, energy (B,) ‖x‖², gram (k, k) G = HHᵀ; all float64. ProtoFac's
    share is the squared ratio, coupled NMF's its root."""
    b, k = codes.shape
    out = np.zeros(b, dtype=np.float32)
    for r in range(b):
        if energy[r] <= 0:
            continue
        unexplained = energy[r]
        for i in range(k):
            if codes[r, i] != 0:
                term = -2.0 * cross[r, i]
                for j in range(k):
                    term += codes[r, j] * gram[j, i]
                unexplained += codes[r, i] * term
        share = min(max(unexplained, 0.0) / max(energy[r], floor), 1.0)
        out[r] = math.sqrt(share) if root else share
    return out


@kernel(reorder_sums=True)
def add_terms_rows(rows, dictionary, scale, cross, energy, zero):
    """Adds the terms a code is solved from, row by row: ``cross += rows @ dictionaryᵀ`` and
    ``energy += scale · ‖rows‖²`` (coupled NMF's fold-in, view by view; ProtoFac's codes).

    rows (B, m) and dictionary (k, m) float32, C-contiguous; cross (B, k) and energy (B,) float64, added to;
    ``zero`` the type each sum is carried in: np.float32(0), or np.float64(0) for exact products of the float32
    numbers summed in float64.

    A BLAS product is slow on these skinny shapes (B about 8, k tens, m in the thousands; its kernels are tuned
    for wider ones): here four rows and two dictionary rows at a time (the last of each repeated to fill a block,
    their sums not kept), each of the eight sums in vector lanes added in any order (``reorder_sums``), so that
    the loop over m vectorizes and reads each number once for several products. A row's sums do not depend on
    the other rows of the batch."""
    b, m = rows.shape
    k = dictionary.shape[0]
    for r in range(b):
        x = rows[r]
        total = zero
        for i in range(m):
            total += (zero + x[i]) * x[i]
        energy[r] += scale * total
    for r0 in range(0, b, 4):
        x0, x1, x2, x3 = rows[r0], rows[min(r0 + 1, b - 1)], rows[min(r0 + 2, b - 1)], rows[min(r0 + 3, b - 1)]
        for j0 in range(0, k, 2):
            y0, y1 = dictionary[j0], dictionary[min(j0 + 1, k - 1)]
            s00 = s01 = s10 = s11 = s20 = s21 = s30 = s31 = zero
            for i in range(m):
                a0, a1, a2, a3 = zero + x0[i], zero + x1[i], zero + x2[i], zero + x3[i]
                e0, e1 = y0[i], y1[i]
                s00 += a0 * e0
                s01 += a0 * e1
                s10 += a1 * e0
                s11 += a1 * e1
                s20 += a2 * e0
                s21 += a2 * e1
                s30 += a3 * e0
                s31 += a3 * e1
            sums = ((s00, s01), (s10, s11), (s20, s21), (s30, s31))
            for rr in range(min(4, b - r0)):
                cross[r0 + rr, j0] += sums[rr][0]
                if j0 + 1 < k:
                    cross[r0 + rr, j0 + 1] += sums[rr][1]


@kernel(reorder_sums=True)
def removed_mass_rows(values, codes, sets, neurons):
    """(B, S, C) float32: what removing each concept set takes from each channel of a layer, the mean over its
    grid of ``min(v, Σ_{d∈S} f_d O_d)`` (coupled NMF's removal, :meth:`CoupledNMFExplainer.removed_mass`).

    values (B, C, G) max(a, 0) over the grid's G positions (G = 1 for channels pooled), codes (B, d) f, sets
    (B, S, d) 1 where a concept is removed, neurons (d, C, G) O; all float32. A set's zero codes add nothing,
    a set carrying nothing takes nothing, and a set of one concept reads its neurons scaled, with no sum
    formed: a removal costs the concepts it removes. Each channel's mean is summed in any order
    (``reorder_sums``), so that the sum vectorizes."""
    b, channels, positions = values.shape
    n_sets, k = sets.shape[1], codes.shape[1]
    out = np.zeros((b, n_sets, channels), dtype=np.float32)
    carried = np.empty((channels, positions), dtype=np.float32)
    mean = np.float32(1.0) / np.float32(positions)
    for r in range(b):
        v = values[r]
        for s in range(n_sets):
            count, first, scale = 0, 0, np.float32(0)
            for d in range(k):
                share = sets[r, s, d] * codes[r, d]
                if share != 0:
                    if count == 0:
                        first, scale = d, share
                    count += 1
            if count == 0:
                continue
            source = neurons[first]
            if count > 1:
                carried[:, :] = 0
                for d in range(k):
                    share = sets[r, s, d] * codes[r, d]
                    if share != 0:
                        o = neurons[d]
                        for c in range(channels):
                            for g in range(positions):
                                carried[c, g] += share * o[c, g]
                source, scale = carried, np.float32(1)
            lost = out[r, s]
            for c in range(channels):
                total = np.float32(0)
                for g in range(positions):
                    total += min(v[c, g], scale * source[c, g])
                lost[c] = total * mean
    return out


@kernel(reorder_sums=True)
def zeroed_mass_rows(sets, filters, features):
    """(B, S, D) float32: what zeroing the union of each set's rules' filters (channels) takes from each channel's
    mean over the grid, ``mean_hw(F) · min(1, Σ_{i∈S} filters_i)`` (Grad-CAM rules' removal).

    sets (B, S, N) 1 where a rule is removed, filters (N, D) 1 where a rule's filter set holds the channel,
    features (B, D, G) F over the grid's G positions; all float32. A rule not removed adds nothing."""
    b, n_sets, n = sets.shape
    channels, positions = features.shape[1], features.shape[2]
    out = np.zeros((b, n_sets, channels), dtype=np.float32)
    mean = np.empty(channels, dtype=np.float32)
    for r in range(b):
        for c in range(channels):
            total = np.float32(0)
            for g in range(positions):
                total += features[r, c, g]
            mean[c] = total / positions
        for s in range(n_sets):
            zeroed = out[r, s]
            for i in range(n):
                if sets[r, s, i] != 0:
                    for c in range(channels):
                        zeroed[c] += sets[r, s, i] * filters[i, c]
            for c in range(channels):
                zeroed[c] = mean[c] * min(zeroed[c], np.float32(1))
    return out


@kernel(reorder_sums=True)
def linear_removal_rows(logits, mass, head):
    """(B, S, K) float32: the logits once each removal's mass is taken from the mean-pooled layer before a linear
    head, ``logits − mass headᵀ`` (coupled NMF's and Grad-CAM rules' removals through an affine head).

    logits (B, K), mass (B, S, D) :func:`removed_mass_rows` or :func:`zeroed_mass_rows`, head (K, D); all float32.
    A removal that takes nothing leaves the logits as they are (the empty set's, exactly)."""
    b, n_sets, channels = mass.shape
    k = logits.shape[1]
    out = np.empty((b, n_sets, k), dtype=np.float32)
    for r in range(b):
        for s in range(n_sets):
            lost = mass[r, s]
            for j in range(k):
                weight = head[j]
                total = np.float32(0)
                for c in range(channels):
                    total += lost[c] * weight[c]
                out[r, s, j] = logits[r, j] - total
    return out


@kernel
def affine_removal_rows(codes, sets, prototype_logits, zero_logits):
    """(B, S, K) float32: ProtoFac's surrogate logits through an affine head with each set's prototypes removed,
    ``zero_logits + Σ_{i∉S} w_i P_i`` (:meth:`ProtoFacExplainer.removed_logits`).

    codes (B, k) w, sets (B, S, k) 1 where a prototype is removed, prototype_logits (k, K) P, zero_logits (K,)
    the head's logits of no activation; all float32. A prototype with a zero or removed weight adds nothing."""
    b, n_sets, k = sets.shape
    out = np.empty((b, n_sets, len(zero_logits)), dtype=np.float32)
    for r in range(b):
        for s in range(n_sets):
            row = out[r, s]
            row[:] = zero_logits
            for i in range(k):
                kept = codes[r, i] - codes[r, i] * sets[r, s, i]
                if kept != 0:
                    for t in range(len(row)):
                        row[t] += kept * prototype_logits[i, t]
    return out


@kernel
def mass_share_rows(codes, mass):
    """(B, k, P) float32: each prototype's share of the reconstruction's activation mass at each position,
    ``w_i M_i[p] / Σ_{i, p} w_i M_i[p]`` (0 where that sum is 0; ProtoFac's heatmaps). codes (B, k) w and mass
    (k, P) M, non-negative float32."""
    b, k = codes.shape
    positions = mass.shape[1]
    out = np.empty((b, k, positions), dtype=np.float32)
    for r in range(b):
        total = np.float32(0)
        for i in range(k):
            for p in range(positions):
                out[r, i, p] = codes[r, i] * mass[i, p]
                total += out[r, i, p]
        scale = max(total, np.float32(1e-30))
        for i in range(k):
            for p in range(positions):
                out[r, i, p] /= scale
    return out


@kernel
def removal_sets_rows(index, suppress):
    """(B, 1 + C + M, N) float32, 1 where a component is removed: the sets a removal method evaluates
    (:meth:`handlers.base.RemovalExplainer.explain`), the empty set, each reported component alone (padding, -1,
    the empty set) and each intervention. index (B, C) int64 the reported components, suppress (B, M, N) bool."""
    b, c = index.shape
    m, n = suppress.shape[1], suppress.shape[2]
    sets = np.zeros((b, 1 + c + m, n), dtype=np.float32)
    for r in range(b):
        for i in range(c):
            if 0 <= index[r, i] < n:
                sets[r, 1 + i, index[r, i]] = 1
        for j in range(m):
            for component in range(n):
                if suppress[r, j, component]:
                    sets[r, 1 + c + j, component] = 1
    return sets


@kernel
def removal_contributions_rows(logits, index, targets):
    """From the logits (B, S, K) float32 of :func:`removal_sets_rows`' sets: the target's logit of each set
    (B, S) float32, and each reported component's contribution (B, C) float32, ``g_t({}) − g_t({i})``, 0 for
    padding. index (B, C) int64, targets (B,) int64 in [0, K) (else IndexError)."""
    b, n_sets, k = logits.shape
    c = index.shape[1]
    target_of_set = np.empty((b, n_sets), dtype=np.float32)
    contribution = np.zeros((b, c), dtype=np.float32)
    for r in range(b):
        t = targets[r]
        if not 0 <= t < k:
            raise IndexError("a target class is out of range")
        for s in range(n_sets):
            target_of_set[r, s] = logits[r, s, t]
        for i in range(c):
            if index[r, i] >= 0:
                contribution[r, i] = target_of_set[r, 0] - target_of_set[r, 1 + i]
    return target_of_set, contribution


@kernel
def additive_rows(contribution, bias, target_logit, residual, residual_given, logits, suppress, suppressed,
                  component_class, suppressed_contribution):
    """An additive method's residual, residual share and intervened logits, row by row
    (:meth:`handlers.base.AdditiveExplainer.explain`).

    contribution (B, C), bias (B,), target_logit (B,) and residual (B,) float32, the residual as the method gave it
    where ``residual_given``, else ignored and ``target_logit − (Σ contribution + bias)``; logits (B, K) float32;
    suppress (B, M, N) bool the interventions; suppressed (U,) int64 the components some intervention names, of
    classes ``component_class`` (N,) int64 and contributions ``suppressed_contribution`` (B, U) float32.

    Returns residual (B,), residual share ``|r| / (Σ|c| + |r|)`` (0 where that is 0) (B,) and the intervened
    logits (B, M, K), each intervention's suppressed contributions summed per class (in the order of
    ``suppressed``), then taken from the logits; all float32."""
    b, c = contribution.shape
    m, k = suppress.shape[1], logits.shape[1]
    out_residual = residual.copy() if residual_given else np.empty(b, dtype=np.float32)
    share = np.zeros(b, dtype=np.float32)
    intervened = np.empty((b, m, k), dtype=np.float32)
    removed = np.empty(k, dtype=np.float32)
    for r in range(b):
        if not residual_given:
            total = np.float32(0)
            for i in range(c):
                total += contribution[r, i]
            out_residual[r] = target_logit[r] - (total + bias[r])
        size = abs(out_residual[r])
        magnitude = np.float32(0)
        for i in range(c):
            magnitude += abs(contribution[r, i])
        magnitude += size
        if magnitude > 0:
            share[r] = size / max(magnitude, np.float32(1e-30))
        for j in range(m):
            removed[:] = 0
            for u in range(len(suppressed)):
                if suppress[r, j, suppressed[u]]:
                    removed[component_class[suppressed[u]]] += suppressed_contribution[r, u]
            for t in range(k):
                intervened[r, j, t] = logits[r, t] - removed[t]
    return out_residual, share, intervened


@kernel
def patch_search_rows(heat, features, size, n_candidates, row_cover, col_cover, row_pool, col_pool):
    """Grad-CAM rules' candidate search (eq. 1, the windows zeroed one after another), each candidate's filter
    activations (eq. 2) and the share of each grid cell under the candidates so far, row by row: what
    :func:`handlers.explainers.gradcam_rules.scan_patches` computes before its perturbation test.

    heat (B, H_in, W_in) Grad-CAM's map at the input's size (not modified); features (B, H·W, D), the grid's
    cells outer and the filters inner; ``size`` the window's side; row_cover (span_h, H), col_cover (span_w, W),
    row_pool (H, H_in), col_pool (W, W_in) as :func:`~handlers.explainers.gradcam_rules.window_tables`; all
    float32. Returns position (B, k) int64, row-major over the span_h × span_w windows, the first of equal
    maxima of the window's heat; activation (B, k, D) float32, each filter's mean over the window's share of
    each cell; removed (B, k, H, W) float32, the union of windows 1..j's share of each cell.

    The window sums come from a summed-area table in float64, and a window whose pixels are all zero sums to
    exactly 0 (a table of nonzero counts says which), as in the tensor search, so the first of such windows
    wins alike; windows whose heat differs by less than float32 rounding may be ranked differently (the tensor
    search's products round)."""
    b, height, width = heat.shape
    span_h, span_w = height - size + 1, width - size + 1
    cells_h, cells_w, dim = row_pool.shape[0], col_pool.shape[0], features.shape[2]
    position = np.empty((b, n_candidates), dtype=np.int64)
    activation = np.zeros((b, n_candidates, dim), dtype=np.float32)
    removed = np.zeros((b, n_candidates, cells_h, cells_w), dtype=np.float32)
    h = np.empty((height, width))
    summed = np.zeros((height + 1, width + 1))  # summed[y, x]: the heat above and left of pixel (y, x)
    nonzero = np.zeros((height + 1, width + 1), dtype=np.int64)
    covered = np.empty((height, width))
    partial = np.empty((cells_h, width))
    for r in range(b):
        h[:, :] = heat[r]
        covered[:, :] = 0.0
        for j in range(n_candidates):
            for y in range(height):
                row_total, row_nonzero = 0.0, 0
                for x in range(width):
                    row_total += h[y, x]
                    row_nonzero += h[y, x] != 0
                    summed[y + 1, x + 1] = summed[y, x + 1] + row_total
                    nonzero[y + 1, x + 1] = nonzero[y, x + 1] + row_nonzero
            best, best_row, best_col = -np.inf, 0, 0
            for y in range(span_h):
                for x in range(span_w):
                    mass = 0.0
                    if nonzero[y + size, x + size] - nonzero[y, x + size] - nonzero[y + size, x] + nonzero[y, x]:
                        mass = summed[y + size, x + size] - summed[y, x + size] - summed[y + size, x] + summed[y, x]
                    if mass > best:
                        best, best_row, best_col = mass, y, x
            position[r, j] = best_row * span_w + best_col
            # eq. 2: the window's share of each cell, normalized, against each filter's activation there
            area = 0.0
            for ch in range(cells_h):
                for cw in range(cells_w):
                    area += row_cover[best_row, ch] * col_cover[best_col, cw]
            mean = activation[r, j]
            for ch in range(cells_h):
                for cw in range(cells_w):
                    share = row_cover[best_row, ch] * col_cover[best_col, cw]
                    if share != 0:
                        weight = np.float32(share / area)
                        cell = features[r, ch * cells_w + cw]
                        for d in range(dim):
                            mean[d] += weight * cell[d]
            for y in range(best_row, best_row + size):
                for x in range(best_col, best_col + size):
                    h[y, x] = 0.0
                    covered[y, x] = 1.0
            # the union so far pooled onto the grid: row_pool @ covered @ col_poolᵀ
            partial[:, :] = 0.0
            for ch in range(cells_h):
                for y in range(height):
                    weight = row_pool[ch, y]
                    if weight != 0:
                        for x in range(width):
                            partial[ch, x] += weight * covered[y, x]
            for ch in range(cells_h):
                for cw in range(cells_w):
                    total = 0.0
                    for x in range(width):
                        total += partial[ch, x] * col_pool[cw, x]
                    removed[r, j, ch, cw] = total
    return position, activation, removed


@kernel(reorder_sums=True)
def reported_rules_rows(top, relevant, rules, filter_reference, activation, terms, filter_index, heatmaps):
    """Grad-CAM rules' answer after the candidate search, row by row, as
    :meth:`GradCAMRulesExplainer.encode_batch` forms it from :meth:`~GradCAMRulesExplainer.matched_rules`: which of
    the target's rules a relevant patch-transaction holds, matched first, their weights, the residual share and
    the heatmaps.

    top (B, k, n) int64 each candidate patch's top filters; relevant (B, k) bool; rules (B, C, 1 + 2S) int64 the
    targets' rows of the explainer's rule table (component, S filters to match, S filters to weigh);
    filter_reference (D,) and activation (B, k, D) float32; terms (B, D, P) float32 the filters' Grad-CAM terms
    α_d F_d over the grid's P cells; filter_index (R + 1, S') int64 each component's filters after the empty set
    (padding D); ``heatmaps``: whether to draw them.

    Returns index (B, C) int64 (-1 padding); weight (B, C) float32, per rule the max over the patches of min
    over its filters of activation / reference where the patch holds it, else 0 (the same divisions, minima and
    maxima as the tensor matching: bit for bit); residual_share (B,) float32, 1 − the positive evidence
    Σ_hw max(α_d F_d, 0) of the reported rules' filters over every filter's (1 without evidence); heatmaps (B, C,
    P) float32, max(Σ_{d in the rule} α_d F_d, 0), or (B, C, 0) when not drawn. The evidence's sums run in any
    order (``reorder_sums``)."""
    b, k, n = top.shape
    c, s = rules.shape[1], (rules.shape[2] - 1) // 2
    dim, cells = terms.shape[1], terms.shape[2]
    index = np.empty((b, c), dtype=np.int64)
    weight = np.empty((b, c), dtype=np.float32)
    share = np.empty(b, dtype=np.float32)
    maps = np.zeros((b, c, cells if heatmaps else 0), dtype=np.float32)
    matched = np.empty(c, dtype=np.bool_)
    presence = np.empty(c, dtype=np.float32)
    covered = np.empty(dim, dtype=np.bool_)
    for r in range(b):
        for slot in range(c):
            matched[slot] = False
            best = np.float32(-np.inf)
            for patch in range(k):
                holds = relevant[r, patch]
                for f in range(s):
                    if not holds:
                        break
                    wanted = rules[r, slot, 1 + f]
                    holds = False
                    for m in range(n):
                        if top[r, patch, m] == wanted:
                            holds = True
                            break
                value = np.float32(0)
                if holds:
                    matched[slot] = True
                    value = np.float32(np.inf)
                    for f in range(s):
                        d = rules[r, slot, 1 + s + f]
                        value = min(value, activation[r, patch, d] / filter_reference[d])
                best = max(best, value)
            presence[slot] = best
        position = 0
        for first in (True, False):  # matched rules first, each group in the table's order
            for slot in range(c):
                if matched[slot] == first:
                    index[r, position] = rules[r, slot, 0] if first else -1
                    weight[r, position] = presence[slot]
                    position += 1
        covered[:] = False
        for slot in range(c):
            if index[r, slot] >= 0:
                for d in filter_index[index[r, slot] + 1]:
                    if d < dim:
                        covered[d] = True
                        if heatmaps:
                            for p in range(cells):
                                maps[r, slot, p] += terms[r, d, p]
        carried = np.float32(0)
        total = np.float32(0)
        for d in range(dim):
            evidence = np.float32(0)
            for p in range(cells):
                evidence += max(terms[r, d, p], np.float32(0))
            total += evidence
            if covered[d]:
                carried += evidence
        share[r] = min(max(np.float32(1) - carried / max(total, np.float32(1e-30)), np.float32(0)), np.float32(1))
        if heatmaps:
            for slot in range(c):
                for p in range(cells):
                    maps[r, slot, p] = max(maps[r, slot, p], np.float32(0))
    return index, weight, share, maps


KERNELS = (active_set_rows, paper_codes_rows, residual_share_rows, add_terms_rows, removed_mass_rows,
           zeroed_mass_rows, linear_removal_rows, affine_removal_rows, mass_share_rows, removal_sets_rows,
           removal_contributions_rows, additive_rows, patch_search_rows, reported_rules_rows)


def compile_kernels() -> float:
    """Compile :data:`KERNELS` for their array types (numba compiles on first call; a server calls this at load,
    never in a request), logging the seconds it took. Returns them (0 once compiled)."""
    if all(kernel.signatures for kernel in KERNELS):
        return 0.0
    begin = time.perf_counter()
    k, classes = 2, 2
    cross, gram = np.ones((1, k)), np.eye(k)
    start = active_set_rows(cross, gram, 1, 1e-10, True)
    paper_codes_rows(start, cross, np.ones(1), gram, np.ones((k, classes)), np.zeros(classes), np.ones((classes, k)),
                     np.zeros(1, dtype=np.int64), 1, 0.01, 1.0, 0.1, 1e-6)
    residual_share_rows(start, cross, np.ones(1), gram, 1e-30, True)
    ones = np.ones((1, 1, k), dtype=np.float32)
    for zero in (np.float32(0), np.float64(0)):
        add_terms_rows(ones[0], ones[0], 1.0, cross, np.zeros(1), zero)
    removed_mass_rows(ones, ones[0], ones, ones.reshape(1, 1, k).repeat(k, 0))
    zeroed_mass_rows(ones, ones[0], ones)
    linear_removal_rows(ones[0], ones, ones[0])
    affine_removal_rows(ones[0], ones, ones[0], ones[0, 0])
    mass_share_rows(ones[0], ones[0])
    index = np.zeros((1, 1), dtype=np.int64)
    removal_sets_rows(index, np.ones((1, 1, k), dtype=np.bool_))
    removal_contributions_rows(ones, index, index[0])
    for given in (True, False):
        additive_rows(ones[0], ones[0, 0], ones[0, 0], ones[0, 0], given, ones[0], np.ones((1, 1, k), dtype=np.bool_),
                      index[0], index[0], ones[0])
    square = np.ones((k, k), dtype=np.float32)
    patch_search_rows(square[None], np.ones((1, k * k, k), dtype=np.float32), 1, 1, square, square, square, square)
    reported_rules_rows(np.zeros((1, 1, 1), dtype=np.int64), np.ones((1, 1), dtype=np.bool_),
                        np.zeros((1, 1, 3), dtype=np.int64), ones[0, 0], ones, ones.reshape(1, k, 1),
                        np.zeros((2, 1), dtype=np.int64), True)
    seconds = time.perf_counter() - begin
    log.info("CPU solvers ready in %.2f s (compiled, or read from numba's cache)", seconds)
    return seconds
