"""The one contract every explanation method follows.

Offline, a method's ``fit`` turns a split model, training data and its :class:`MethodConfig`
into a :class:`FittedMethod` (tensors, components, exemplars, fit report). Online, its
:class:`Explainer` is built once from those tensors and explains whole batches with a
fixed amount of tensor work: no fitting, no per-request state on the object.

Explainers come in two families that own the protocol around a method's own math:
:class:`AdditiveExplainer` (contributions that add up to the target logit) and
:class:`RemovalExplainer` (a contribution is the target logit's drop when the component
is removed). docs/methods.md ("Adding a method") shows a minimal method.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from handlers.device_graphs import Capture, CaptureReport
from handlers.model import ModelParts
from handlers.solvers import compiled_rows

if TYPE_CHECKING:
    from handlers.fitting.streaming import StreamedData


# The largest settings a method's config takes, far above what fits write (a few hundred steps, thousands of
# examples): an archive's config reaches every request, and a step count of 10**9 would hold a core for an hour.
MAX_STEPS = 100_000  # iterations, steps, epochs and per-request loops (and ProtoFac's k, its default solver steps)
MAX_SIZE = 1_000_000  # numbers of components, examples, rows, units, pixels


@dataclass(frozen=True)
class MethodConfig:
    """A method's hyperparameters: one frozen dataclass per method, checked when built.

    Field values are brought to the annotated types (a JSON list becomes a tuple, an int a
    float) and refused with a ValueError naming the field when they do not fit; subclasses
    check ranges and choices in ``__post_init__`` after calling this one. Archives store
    ``dataclasses.asdict(config)`` as the method's hyperparameters.
    """

    method: ClassVar[str]

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, hint = getattr(self, f.name), hints[f.name]
            try:
                object.__setattr__(self, f.name, _conform(value, hint))
            except ValueError:
                kind = hint.__name__ if typing.get_origin(hint) is None else hint
                raise ValueError(f"{self.method}: {f.name}={value!r} is not {kind}") from None

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "MethodConfig":
        """A config from user input; a key that is not a field is refused, naming the allowed keys."""
        unknown = [key for key in values if key not in cls.keys()]
        if unknown:
            raise ValueError(f"{cls.method} has no parameter {unknown[0]!r}; its parameters are "
                             f"{', '.join(cls.keys())}")
        return cls(**values)

    @classmethod
    def from_hyperparameters(cls, stored: dict[str, Any]) -> "MethodConfig":
        """The config an archive stored. Keys that are not fields (notes that older archives carry,
        e.g. ``feature_clipping``) are ignored; fields the archive lacks take their defaults."""
        return cls(**{key: value for key, value in stored.items() if key in cls.keys()})

    def require(self, ok: bool, key: str, rule: str) -> None:
        """Raise ValueError ``key=value must be <rule>`` unless ``ok``."""
        if not ok:
            raise ValueError(f"{self.method}: {key}={getattr(self, key)!r} must be {rule}")

    def require_at_least(self, bound: float, *keys: str) -> None:
        """:meth:`require` each of ``keys`` to be at least ``bound``."""
        for key in keys:
            self.require(getattr(self, key) >= bound, key, f"at least {bound}")

    def require_at_most(self, bound: int, *keys: str) -> None:
        """:meth:`require` each of ``keys`` (a number, a tuple of numbers, or None) to be at most ``bound``."""
        for key in keys:
            value = getattr(self, key)
            values = value if isinstance(value, tuple) else () if value is None else (value,)
            self.require(all(v <= bound for v in values), key, f"at most {bound}")


def _conform(value, hint):
    """``value`` as type ``hint`` (float, int, str, bool, None, unions, tuple[X, ...], dict[str, X]);
    ValueError when it is not one."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is types.UnionType:
        for option in args:
            try:
                return _conform(value, option)
            except ValueError:
                pass
    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(_conform(item, args[0]) for item in value)
    elif origin is dict:
        if isinstance(value, dict) and all(isinstance(key, str) for key in value):
            return {key: _conform(item, args[1]) for key, item in value.items()}
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is type(None):
        if value is None:
            return value
    elif isinstance(value, hint) and (hint is bool or not isinstance(value, bool)):
        return value
    raise ValueError


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
    sample  : None, or where the data came from a larger source than memory holds: the splits are
              uniform samples, {"n", "of", "test_n", "test_of", "seed", "max_memory_mib"}
    stream  : None, or the whole source on disk (features by class, inputs by index) for the
              methods that stream it (offline, :mod:`handlers.fitting.streaming`)
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    sample: dict | None = None
    stream: StreamedData | None = None


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
    heatmap_kind : "contribution" (each component's share of the target logit, in space) or
               "presence" (where each component is present, and the residual's map), for an
               explainer whose ``presence_maps`` is True
    taps     : what the explainer's ``tapped_upstream`` returned besides ``features``, when
               the forward pass ran it; None: the explainer computes what it needs itself
    suppressed : (U,) int64, the components some intervention names, ascending (``suppress``
               reduced over examples and interventions), when the caller knows them on the host
               (the runtime does, from the requests); None: computed from ``suppress`` (a
               ``nonzero``, which on a GPU waits for the device)
    target_logit : (B,) float32, each example's logit of its target class, when the caller has it (the
               runtime does, with the predicted class); None: gathered from ``logits``
    """

    inputs: torch.Tensor
    features: torch.Tensor
    logits: torch.Tensor
    targets: torch.Tensor
    suppress: torch.Tensor
    heatmaps: bool
    taps: tuple[torch.Tensor, ...] | None = None
    heatmap_kind: str = "contribution"
    suppressed: torch.Tensor | None = None
    target_logit: torch.Tensor | None = None

    def __post_init__(self):
        if self.target_logit is None:
            self.target_logit = self.logits.detach().float().gather(1, self.targets.unsqueeze(1)).squeeze(1)


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
    residual_heatmap      : (B, H, W) float32, the residual's map (presence heatmaps), or None
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
    residual_heatmap: torch.Tensor | None = None


FactorSpec = tuple[torch.dtype, tuple[int | str, ...]]


class Explainer(ABC):
    """The online half of a method, built once per loaded archive.

    Subclasses set the class attributes, declare their fitted tensors in ``factors`` and
    implement :meth:`explain` (through one of the two families below). Every declared tensor
    becomes the attribute of its name, converted to its dtype and checked against its shape;
    fitted state ends in ``_``; :meth:`to` moves every tensor attribute.
    """

    name: ClassVar[str]
    additive: ClassVar[bool]
    residual_share_definition: ClassVar[str]
    contribution_definition: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    # The fitted tensors read from the archive: name -> (dtype, shape). A shape entry is a size, a symbol
    # bound to the model ("K" classes, "D" the layer's channels, "F" its flattened size, "C" the number of
    # components), "*input" (the input's shape), or any other symbol, bound by the first tensor that has it.
    factors: ClassVar[dict[str, FactorSpec]] = {}
    # explain() runs under inference_mode unless True (per instance: it may depend on the model);
    # then under enable_grad, with features that require grad and logits computed from them (the
    # upstream records no graph).
    needs_grad: bool = False
    # A module (B, *input_shape) -> (features, *taps) that the torch forward pass runs instead of
    # the upstream, for methods that also read other layers (``ExplainBatch.taps``).
    tapped_upstream: torch.nn.Module | None = None
    # Whether explain() draws presence heatmaps (``ExplainBatch.heatmap_kind``); requests for them are
    # refused otherwise.
    presence_maps: bool = False

    def __init__(self, model: ModelParts, fitted: FittedMethod):
        self.model = model
        self.components = fitted.components
        self.component_ids = {c.id: i for i, c in enumerate(fitted.components)}
        self.fit_report = fitted.fit_report
        self.config = self.config_class.from_hyperparameters(fitted.hyperparameters)
        self._read_factors(fitted.factors)

    def declared_factors(self) -> dict[str, FactorSpec]:
        """The fitted tensors to read (``self.config`` is set by then): ``factors`` unless overridden."""
        return self.factors

    def _read_factors(self, stored: dict[str, torch.Tensor]) -> None:
        """Set each declared tensor as an attribute; ValueError naming the first that is missing or misshapen."""
        m = self.model
        sizes: dict[str, int] = {"K": m.num_classes, "D": m.feature_shape[0], "F": math.prod(m.feature_shape),
                                 "C": len(self.components)}
        for name, (dtype, shape) in self.declared_factors().items():
            if name not in stored:
                raise ValueError(f"{self.name} has no factor {name}")
            tensor = stored[name].to(dtype)
            expected = [size for entry in shape for size in (m.input_spec.shape if entry == "*input" else [entry])]
            fits = tensor.dim() == len(expected) and all(
                actual == (sizes.setdefault(want, actual) if isinstance(want, str) else want)
                for actual, want in zip(tensor.shape, expected))
            if not fits:
                wanted = ", ".join(f"{e}={sizes[e]}" if e in sizes else str(e) for e in expected)
                raise ValueError(f"{self.name} factor {name} has shape {tuple(tensor.shape)}, expected ({wanted}): "
                                 f"it was fitted for another model, layer or component count (this model has "
                                 f"{m.num_classes} classes and features {m.feature_shape} at {m.layer!r})")
            setattr(self, name, tensor)

    def to(self, device: torch.device | str) -> "Explainer":
        """Move every tensor attribute (fitted and derived) to ``device``, and compile the CPU kernels
        (:mod:`handlers.solvers.compiled_rows`) where they serve it, at load, so that no request does; returns
        self."""
        for name, value in list(vars(self).items()):
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))
        if compiled_rows.serves(torch.device(device)):
            compiled_rows.compile_kernels()
        return self

    def capture_graphs(self, sizes: tuple[int, ...], capture: Capture) -> CaptureReport | None:
        """Capture the method's fixed-shape work as one graph per batch size of ``sizes``
        (handlers/device_graphs.py), after :meth:`to`; None for a method with nothing worth a graph."""
        return None

    @abstractmethod
    def explain(self, batch: ExplainBatch) -> Explanation:
        """Explain ``batch``; pure tensor code, fixed cost, no state kept."""


def _host(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as a C-contiguous numpy array, as the compiled kernels take them (a copy only where it is not)."""
    return np.ascontiguousarray(t.detach().numpy())


@dataclass
class Decomposition:
    """An additive method's terms for a batch: C components reported per example, U suppressed ones.

    component_index         : (B, C) int64 into the method's components, -1 = padding (weight and contribution 0)
    weight, contribution    : (B, C) float32
    bias                    : (B,) float32
    residual                : (B,) float32, or None: the target logit less the contributions and the bias
    heatmaps                : (B, C, H, W) float32, or None
    suppressed_contribution : (B, U) float32, each suppressed component's contribution to its own class's logit
    residual_heatmap        : (B, H, W) float32, or None
    """

    component_index: torch.Tensor
    weight: torch.Tensor
    contribution: torch.Tensor
    bias: torch.Tensor
    residual: torch.Tensor | None
    heatmaps: torch.Tensor | None
    suppressed_contribution: torch.Tensor
    residual_heatmap: torch.Tensor | None = None


class AdditiveExplainer(Explainer):
    """A method whose contributions, residual and bias add up to the target logit.

    Each component belongs to one class (its ``class_index``) and adds its contribution to that
    class's logit alone, so suppressing components subtracts their contributions from their own
    classes' logits: interventions are exact without another pass. The subclass implements
    :meth:`decompose`; this class forms the target logit, the residual (unless given), the residual
    share ``|r| / (sum_i |c_i| + |r|)`` and the intervened logits.
    """

    additive = True

    def __init__(self, model: ModelParts, fitted: FittedMethod):
        super().__init__(model, fitted)
        # The intervened logits subtract each component's contribution from its class's logit, in a compiled
        # kernel that does not check bounds: a shared component (-1) has no such logit.
        outside = next((c for c in self.components if not 0 <= c.class_index < model.num_classes), None)
        if outside is not None:
            raise ValueError(f"{self.name}: component {outside.id!r} has class_index {outside.class_index}; every "
                             f"component of an additive method belongs to a class in [0, {model.num_classes})")
        self._component_class = torch.tensor([c.class_index for c in self.components], dtype=torch.int64)

    @abstractmethod
    def decompose(self, batch: ExplainBatch, suppressed: torch.Tensor) -> Decomposition:
        """The target class's terms, and the contributions of the ``suppressed`` (U,) int64 components."""

    def explain(self, batch: ExplainBatch) -> Explanation:
        # Only the components some intervention names are computed: all of them can be thousands.
        suppressed = batch.suppressed
        if suppressed is None:
            suppressed = batch.suppress.any(1).any(0).nonzero().squeeze(1)  # (U,)
        terms = self.decompose(batch, suppressed)
        logits = batch.logits.detach().float()
        target_logit = batch.target_logit
        residual = terms.residual
        if compiled_rows.serves(logits.device):  # one kernel for the fourteen to seventeen ops below
            residual, residual_share, intervened = map(torch.from_numpy, compiled_rows.additive_rows(
                *(_host(v) for v in (terms.contribution, terms.bias, target_logit)),
                _host(target_logit if residual is None else residual), residual is not None, _host(logits),
                batch.suppress.numpy(), _host(suppressed), self._component_class.numpy(),
                _host(terms.suppressed_contribution)))
        else:
            if residual is None:
                residual = target_logit - (terms.contribution.sum(1) + terms.bias)
            residual_size = residual.abs()
            magnitude = terms.contribution.abs().sum(1) + residual_size
            residual_share = torch.where(magnitude > 0, residual_size / magnitude.clamp_min(1e-30),
                                         torch.zeros_like(magnitude))
            mask = batch.suppress[:, :, suppressed].float()  # (B, M, U)
            removed = torch.zeros(*mask.shape[:2], logits.shape[1], device=logits.device)
            removed.index_add_(2, self._component_class[suppressed], mask * terms.suppressed_contribution.unsqueeze(1))
            intervened = logits.unsqueeze(1) - removed
        return Explanation(
            target_class=batch.targets,
            component_index=terms.component_index,
            weight=terms.weight,
            contribution=terms.contribution,
            bias=terms.bias,
            residual_contribution=residual,
            residual_share=residual_share,
            target_logit=target_logit,
            heatmaps=terms.heatmaps,
            intervened_logits=intervened,
            residual_heatmap=terms.residual_heatmap,
        )


@dataclass
class Codes:
    """A removal method's reading of a batch: C components reported per example.

    component_index : (B, C) int64 into the method's N components, -1 = padding (weight and contribution 0)
    weight          : (B, C) float32
    residual_share  : (B,) float32 in [0, 1]
    heatmaps        : (B, C, H, W) float32, or None
    """

    component_index: torch.Tensor
    weight: torch.Tensor
    residual_share: torch.Tensor
    heatmaps: torch.Tensor | None


class RemovalExplainer(Explainer):
    """A method whose contributions are removals: with g(S) the logits once the set S of components
    is removed (the subclass defines what removing means), a component's contribution is
    ``g_t({}) - g_t({i})`` and an intervention suppressing S gives g(S).

    The subclass implements :meth:`encode_batch` and :meth:`removed_logits`; this class forms
    every set the answer needs, [nothing, each reported component alone, each intervention], and
    evaluates them in one call. Bias and residual are zero unless :meth:`bias_and_residual` says
    otherwise (a method whose removals act on a surrogate of the model).
    """

    additive = False

    def __init__(self, model: ModelParts, fitted: FittedMethod):
        super().__init__(model, fitted)
        self._component_range = torch.arange(len(self.components))
        self._no_components = torch.zeros(1, 1, len(self.components), dtype=torch.bool)  # the empty set
        self._zero = torch.zeros(())

    @abstractmethod
    def encode_batch(self, batch: ExplainBatch) -> Codes:
        """The reported components, their weights, the residual share and the heatmaps."""

    @abstractmethod
    def removed_logits(self, batch: ExplainBatch, codes: Codes, sets: torch.Tensor) -> torch.Tensor:
        """(B, S, K) float32: g of each set; ``sets`` (B, S, N) float32, 1 where a component is removed."""

    def bias_and_residual(self, batch: ExplainBatch, target_logit: torch.Tensor,
                          reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(bias, residual_contribution)``, (B,) each, given the model's target logit and g_t({}): zero,
        for removals that act on the model itself."""
        zero = self._zero.expand_as(target_logit)
        return zero, zero

    def explain(self, batch: ExplainBatch) -> Explanation:
        codes = self.encode_batch(batch)
        index = codes.component_index
        b, c = index.shape
        t = batch.targets
        if compiled_rows.serves(index.device):  # two kernels for the bookkeeping's seven ops
            host_index = _host(index)
            sets = torch.from_numpy(compiled_rows.removal_sets_rows(host_index, batch.suppress.numpy()))
            logits = self.removed_logits(batch, codes, sets)  # (B, 1 + C + M, K)
            target_of_set, contribution = map(torch.from_numpy, compiled_rows.removal_contributions_rows(
                _host(logits), host_index, t.numpy()))
        else:
            alone = index.unsqueeze(2) == self._component_range  # (B, C, N); padding (-1) is the empty set
            sets = torch.cat([self._no_components.expand(b, 1, -1), alone, batch.suppress], 1).float()
            logits = self.removed_logits(batch, codes, sets)
            target_of_set = logits.gather(2, t.view(b, 1, 1).expand(b, sets.shape[1], 1)).squeeze(2)
            contribution = torch.where(index >= 0, target_of_set[:, :1] - target_of_set[:, 1:c + 1], self._zero)
        target_logit = batch.target_logit
        bias, residual = self.bias_and_residual(batch, target_logit, target_of_set[:, 0])
        return Explanation(
            target_class=t,
            component_index=index,
            weight=codes.weight,
            contribution=contribution,
            bias=bias,
            residual_contribution=residual,
            residual_share=codes.residual_share,
            target_logit=target_logit,
            heatmaps=codes.heatmaps,
            intervened_logits=logits[:, c + 1:],
        )
