"""Probe neighbours: the examples a method was fitted on that lie nearest to an input in its
component space (coupled NMF's neighbour view, Saini & Papalexakis Fig. 4d and 5d).

A method that offers them implements :class:`NeighbourSearch`; the data plane asks it for an
explained row's neighbours only when the request asks for some (``ExplainRequest.neighbours``),
so a request without them costs nothing more. The search runs on host arrays (a (k,) answer from
an (N, C) matrix of probe codes), like the rows it reads.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

# The most neighbours one request may ask for (the paper shows about 30).
MAX_NEIGHBOURS = 64


@dataclass(frozen=True, slots=True)
class Neighbours:
    """One input's k nearest probe examples, nearest first, and the components they belong to.

    probe_index     : (k,) int64, each neighbour's index in the training split the method was fitted on
    distance        : (k,) float32, the method's distance in component space (ascending)
    class_index     : (k,) int64, each neighbour's true class
    top_component   : (k,) int64, the component (index into the method's components) each neighbour
                      has its highest weight for
    component_share : (N,) float64, the share of the k neighbours whose top component is each of the
                      method's N components (sums to 1)
    png             : k PNG images, each neighbour's example as drawn at fit time, or None where the
                      method stored none (archives fitted before they were)
    """

    probe_index: np.ndarray
    distance: np.ndarray
    class_index: np.ndarray
    top_component: np.ndarray
    component_share: np.ndarray
    png: tuple[bytes, ...] | None = None


class NeighbourSearch(ABC):
    """An explainer that can name an input's nearest probe examples from its explained row."""

    @property
    @abstractmethod
    def n_probe(self) -> int:
        """The number of probe examples searched (at most this many neighbours exist)."""

    @abstractmethod
    def neighbours(self, component_index: np.ndarray, weight: np.ndarray, k: int) -> Neighbours:
        """The ``k`` probe examples nearest to an input whose reported components ``component_index``
        (C,) int64 (-1 = padding) have ``weight`` (C,) float32; ``1 <= k <= n_probe``."""
