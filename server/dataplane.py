"""The one data plane under every protocol: validation of plain request values, batching, host rows.

A transport (protoserve.v1 in server/servicer.py, the Open Inference Protocol in server/oip.py)
converts its request into a :class:`PredictCall` or :class:`ExplainCall`, and passes it with a
function that encodes the result as its answer; :class:`DataPlane` validates the call, submits its
examples to the model's batcher (all at once, so they batch together), and times what every protocol
shares (the preprocess and encode stages; the model's compute thread times and counts the rest).

Errors name the request field at fault in this module's words: ``input`` (``input.shape``,
``input.data``), ``image``, ``top_k``, ``heatmaps``, ``target_class``, ``interventions``, ``neighbours``. Each
transport renames them into its own (server/rpc.py), so none reads an error's text.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from handlers.errors import InvalidInputError, NotFoundError, echo
from handlers.neighbours import MAX_NEIGHBOURS, Neighbours, NeighbourSearch
from handlers.preprocess import input_from_array
from handlers.rows import ExplainedRow, Scores
from handlers.runtime import ExplainItem, ModelRuntime
from server.decode import ImageDecoder
from server.metrics import Metrics
from server.registry import BatchedModel, ExplainKey, ModelRegistry, PredictKey
from server.settings import Settings

HEATMAP_MODES = ("none", "feature_grid", "input", "presence_feature_grid", "presence_input")

Answer = TypeVar("Answer")


@dataclass(frozen=True)
class Example:
    """One example's input, exactly one of: ``tensor``, an array of the model's input shape (no batch
    dimension; float32, float16, or uint8 scaled like pixels), or ``image``, PNG/JPEG bytes."""

    tensor: np.ndarray | None = None
    image: bytes = b""


@dataclass(frozen=True)
class PredictCall:
    """A prediction of each example. ``top_k`` 0: the default; ``deadline``: a :func:`time.monotonic` time."""

    model: str
    version: str
    examples: list[Example]
    top_k: int = 0
    deadline: float | None = None


@dataclass(frozen=True)
class ExplainCall:
    """An explanation of each example, with the same options. ``method`` "": the model's default;
    ``target_class`` None: each example's predicted class; ``heatmaps``: one of HEATMAP_MODES;
    ``interventions``: per intervention, the component ids it suppresses; ``neighbours``: how many nearest
    probe examples to return with each explanation (0: none; methods that are a :class:`NeighbourSearch`)."""

    model: str
    version: str
    examples: list[Example]
    method: str = ""
    top_k: int = 0
    target_class: int | None = None
    heatmaps: str = "none"
    interventions: Sequence[Sequence[str]] = ()
    deadline: float | None = None
    neighbours: int = 0


@dataclass(frozen=True)
class PredictResult:
    """What a transport encodes: the model version that answered, the validated top-k, a row per example."""

    runtime: ModelRuntime
    top_k: int
    rows: list[Scores]


@dataclass(frozen=True)
class ExplainResult:
    """As PredictResult, with the method that explained; ``neighbours``: each row's nearest probe
    examples, when the call asked for them, else None."""

    runtime: ModelRuntime
    method: str
    top_k: int
    rows: list[ExplainedRow]
    neighbours: list[Neighbours] | None = None


def top_k(requested: int, runtime: ModelRuntime, settings: Settings) -> int:
    """The number of classes to answer with: ``requested`` (0: the default), at most the model's."""
    if requested < 0:
        raise InvalidInputError("top_k", f"must be >= 0, got {requested}")
    if requested > settings.max_top_k:
        raise InvalidInputError("top_k", f"at most {settings.max_top_k}, got {requested}")
    return min(requested or settings.default_top_k, len(runtime.labels))


def explain_options(call: ExplainCall, runtime: ModelRuntime,
                    settings: Settings) -> tuple[ExplainKey, int | None, list[list[int]]]:
    """Validate all of an ExplainCall but its examples: the key it batches under, the target class
    (None: the predicted one) and the suppressed component indices of each intervention."""
    method = call.method or runtime.default_method
    explainer = runtime.explainers.get(method)
    if explainer is None:
        raise NotFoundError(f"method of model {runtime.name!r}", method, sorted(runtime.explainers))
    if call.heatmaps not in HEATMAP_MODES:
        raise InvalidInputError("heatmaps", f"{echo(call.heatmaps)} is not one of {', '.join(HEATMAP_MODES)}")
    if call.heatmaps.startswith("presence_") and not explainer.presence_maps:
        raise InvalidInputError("heatmaps", f"method {method!r} has no presence maps; ask for feature_grid or input "
                                            f"(contribution densities), or use a method whose model info says "
                                            f"presence_maps")
    target = call.target_class
    if target is not None and not 0 <= target < len(runtime.labels):
        raise InvalidInputError("target_class", f"must be in [0, {len(runtime.labels)}), got {target}")
    # Counted before any is read: a message may hold millions.
    if len(call.interventions) > settings.max_interventions:
        raise InvalidInputError("interventions", f"at most {settings.max_interventions} per request, "
                                                 f"got {len(call.interventions)}")
    suppress = []
    for i, component_ids in enumerate(call.interventions):
        if len(component_ids) > len(explainer.component_ids):  # before any is read: a set may hold millions
            raise InvalidInputError("interventions", f"set {i} names {len(component_ids)} components; method "
                                                           f"{method!r} has {len(explainer.component_ids)}")
        indices = []
        for component_id in component_ids:
            if component_id not in explainer.component_ids:
                raise NotFoundError(f"component of method {method!r}", component_id)
            indices.append(explainer.component_ids[component_id])
        suppress.append(indices)
    check_neighbours(call.neighbours, explainer, method)
    return ExplainKey(method, call.heatmaps), target, suppress


def check_neighbours(count: int, explainer, method: str) -> None:
    """Refuse a neighbour count out of [0, MAX_NEIGHBOURS] or the method's probe count, and any from a
    method that has no probe examples (refused, not ignored: a client asking for them expects them)."""
    if count == 0:
        return
    if not isinstance(explainer, NeighbourSearch):
        raise InvalidInputError("neighbours", f"method {method!r} has no probe examples to search; ask for 0, "
                                              f"or use a method that has (coupled_nmf)")
    bound = min(MAX_NEIGHBOURS, explainer.n_probe)
    if not 0 < count <= bound:
        raise InvalidInputError("neighbours", f"must be in [0, {bound}], got {count}")


async def decode_input(example: Example, runtime: ModelRuntime, settings: Settings,
                       images: ImageDecoder) -> torch.Tensor:
    """An example -> float32 (*input_shape); an image is decoded in ``images``' pool, off the event loop.
    More than ``settings.max_input_bytes`` is refused."""
    if (example.tensor is None) == (not example.image):
        raise InvalidInputError("input", "set exactly one of `input` (a tensor) and `image` (PNG/JPEG bytes)")
    field, size = ("image", len(example.image)) if example.image else ("input.data", example.tensor.nbytes)
    if size > settings.max_input_bytes:
        raise InvalidInputError(field, f"{size} bytes is more than the limit of {settings.max_input_bytes}")
    spec = runtime.parts.input_spec
    if example.image:
        return await images.decode(example.image, spec)
    return input_from_array(example.tensor, spec)


class DataPlane:
    """Predictions and explanations of the registry's models, for every transport."""

    def __init__(self, registry: ModelRegistry, settings: Settings, metrics: Metrics):
        self.registry = registry
        self.settings = settings
        self.metrics = metrics

    def model(self, name: str, version: str = "") -> ModelRuntime:
        """A model version (the newest when ``version`` is ""), for its metadata."""
        return self.registry.get(name, version).runtime

    def models(self) -> list[ModelRuntime]:
        return [model.runtime for model in self.registry.all()]

    def ready(self, name: str | None = None, version: str = "") -> bool:
        """Whether the model version (``name`` None: every model, and at least one) can answer now;
        an unknown model is not ready."""
        if name is None:
            models = self.registry.all()
            return bool(models) and all(model.batcher.alive for model in models)
        versions = self.registry.models.get(name, {})
        if not versions or (version and version not in versions):
            return False
        return self.registry.get(name, version).batcher.alive

    async def predict(self, call: PredictCall, encode: Callable[[PredictResult], Answer]) -> Answer:
        """Validate, queue the examples, and return ``encode(result)``: the transport's answer (its time
        is the encode stage)."""
        model = self.registry.get(call.model, call.version)
        runtime = model.runtime
        start = time.perf_counter()
        k = top_k(call.top_k, runtime, self.settings)
        inputs = [await decode_input(example, runtime, self.settings, self.registry.images)
                  for example in call.examples]
        model.stages["preprocess"].observe(time.perf_counter() - start)
        rows = await _submit_all(model, inputs, PredictKey(), call.deadline)
        return _encoded(model, encode, PredictResult(runtime, k, rows))

    async def explain(self, call: ExplainCall, encode: Callable[[ExplainResult], Answer]) -> Answer:
        """As :meth:`predict`; validates completely before queueing, the cheap checks first, the examples last."""
        model = self.registry.get(call.model, call.version)
        runtime = model.runtime
        start = time.perf_counter()
        k = top_k(call.top_k, runtime, self.settings)
        key, target, suppress = explain_options(call, runtime, self.settings)
        items = [ExplainItem(await decode_input(example, runtime, self.settings, self.registry.images),
                             target, suppress) for example in call.examples]
        model.stages["preprocess"].observe(time.perf_counter() - start)
        rows = await _submit_all(model, items, key, call.deadline)
        neighbours = None
        if call.neighbours:  # host arrays only: a product with the probe codes and a sort per row
            search = runtime.explainers[key.method]
            neighbours = [search.neighbours(row.component_index, row.weight, call.neighbours) for row in rows]
        return _encoded(model, encode, ExplainResult(runtime, key.method, k, rows, neighbours))


def _encoded(model: BatchedModel, encode: Callable[[Any], Answer], result) -> Answer:
    start = time.perf_counter()
    answer = encode(result)
    model.stages["encode"].observe(time.perf_counter() - start)
    return answer


async def _submit_all(model: BatchedModel, payloads: list, key, deadline: float | None) -> list:
    """Submit every example at once (they batch); the first failure fails the call."""
    if len(payloads) == 1:  # the usual call: no task of its own
        return [await model.batcher.submit(payloads[0], key=key, deadline=deadline)]
    tasks = [asyncio.ensure_future(model.batcher.submit(p, key=key, deadline=deadline)) for p in payloads]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
