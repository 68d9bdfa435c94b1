"""The one contract every explanation method follows.

Offline, a method's ``fit`` turns a split model and training data into a
:class:`FittedMethod` (tensors, components, exemplars, fit report). Online, its
:class:`Explainer` is built once from those tensors and explains whole batches with a
fixed amount of tensor work: no fitting, no per-request state on the object.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from handlers.model import ModelParts


@dataclass(frozen=True)
class Component:
    """A prototype / concept / rule / x-feature.

    ``class_index`` is the class it belongs to, or -1 if shared by all classes.
    """

    id: str
    label: str
    class_index: int


@dataclass
class FitData:
    """Data for an offline fit. Inputs are preprocessed model inputs.

    x_train : (N, *input_shape) float32;  y_train : (N,) int64
    x_test  : (M, *input_shape) float32;  y_test  : (M,) int64  (held out, for the fit report)
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@dataclass
class FittedMethod:
    """Everything an archive stores for one method."""

    name: str
    factors: dict[str, torch.Tensor]
    components: list[Component]
    hyperparameters: dict
    fit_report: dict
    exemplars: dict[str, bytes] = field(default_factory=dict)  # component id -> PNG


@dataclass
class ExplainBatch:
    """One batch to explain.

    inputs   : (B, *input_shape) preprocessed inputs
    features : (B, *feature_shape) the layer's output for ``inputs``
    logits   : (B, K) the model's logits
    targets  : (B,) int64, the explained class of each example
    suppress : (B, M, N) bool, M intervention sets over the method's N components
    heatmaps : whether to compute heatmaps
    taps     : what the explainer's ``tapped_upstream`` returned besides ``features``, when
               the forward pass ran it; None: the explainer computes what it needs itself
    """

    inputs: torch.Tensor
    features: torch.Tensor
    logits: torch.Tensor
    targets: torch.Tensor
    suppress: torch.Tensor
    heatmaps: bool
    taps: tuple[torch.Tensor, ...] | None = None


@dataclass
class Explanation:
    """A batch of explanations, fixed shapes; C components reported per example.

    target_class          : (B,) int64, the explained class
    component_index       : (B, C) int64 index into the method's components, -1 = padding
    weight, contribution  : (B, C) float32
    bias                  : (B,) float32
    residual_contribution : (B,) float32
    residual_share        : (B,) float32 in [0, 1]
    target_logit          : (B,) float32, the model's logit of the target class
    heatmaps              : (B, C, H, W) float32 on the feature grid, or None
    intervened_logits     : (B, M, K) float32, the logits with each intervention applied
    """

    target_class: torch.Tensor
    component_index: torch.Tensor
    weight: torch.Tensor
    contribution: torch.Tensor
    bias: torch.Tensor
    residual_contribution: torch.Tensor
    residual_share: torch.Tensor
    target_logit: torch.Tensor
    heatmaps: torch.Tensor | None
    intervened_logits: torch.Tensor


class Explainer(ABC):
    """The online half of a method, built once per loaded archive.

    Subclasses set the class attributes and implement :meth:`explain`; their fitted
    tensors end in ``_`` and live on ``device``.
    """

    name: ClassVar[str]
    additive: ClassVar[bool]
    residual_share_definition: ClassVar[str]
    contribution_definition: ClassVar[str]
    # explain() runs under inference_mode unless True (per instance: it may depend on the model);
    # then under enable_grad, with features that require grad and logits computed from them (the
    # upstream records no graph).
    needs_grad: bool = False
    # A module (B, *input_shape) -> (features, *taps) that the torch forward pass runs instead of
    # the upstream, for methods that also read other layers (``ExplainBatch.taps``).
    tapped_upstream: torch.nn.Module | None = None

    def __init__(self, model: ModelParts, fitted: FittedMethod):
        self.model = model
        self.components = fitted.components
        self.component_ids = {c.id: i for i, c in enumerate(fitted.components)}
        self.fit_report = fitted.fit_report
        self.hyperparameters = fitted.hyperparameters

    @abstractmethod
    def explain(self, batch: ExplainBatch) -> Explanation:
        """Explain ``batch``; pure tensor code, fixed cost, no state kept."""

    @abstractmethod
    def to(self, device: torch.device) -> "Explainer":
        """Move the fitted tensors to ``device``; returns self."""
