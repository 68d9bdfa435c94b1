"""Request and response conversion between protobuf messages and the handlers' tensors."""

from __future__ import annotations

import json

import torch
from protoserve_client import pb
from protoserve_client.tensors import TensorFormatError, from_tensor, to_tensor

from handlers.errors import InvalidInputError, NotFoundError
from handlers.preprocess import input_from_array
from handlers.runtime import ExplainItem, ModelRuntime
from server.decode import ImageDecoder
from server.registry import ExplainKey
from server.results import ExplainedRow, Scores
from server.settings import Settings

HEATMAP_MODES = {
    pb.HEATMAP_MODE_NONE: "none",
    pb.HEATMAP_MODE_FEATURE_GRID: "feature_grid",
    pb.HEATMAP_MODE_INPUT: "input",
}


async def decode_input(request, served: ModelRuntime, settings: Settings, images: ImageDecoder) -> torch.Tensor:
    """The request's ``input`` tensor or ``image`` bytes -> float32 (*input_shape); an image is decoded
    in ``images``' pool, off the event loop. More than ``settings.max_input_bytes`` is refused."""
    has_tensor, has_image = request.HasField("input"), bool(request.image)
    if has_tensor == has_image:
        raise InvalidInputError("input", "set exactly one of `input` (a tensor) and `image` (PNG/JPEG bytes)")
    field, size = ("image", len(request.image)) if has_image else ("input.data", len(request.input.data))
    if size > settings.max_input_bytes:
        raise InvalidInputError(field, f"{size} bytes is more than the limit of {settings.max_input_bytes}")
    spec = served.parts.input_spec
    if has_image:
        return await images.decode(request.image, spec)
    try:
        array = from_tensor(request.input, field="input")
    except TensorFormatError as exc:
        raise InvalidInputError(exc.field, str(exc)) from exc
    return input_from_array(array, spec)


def top_k(request, served: ModelRuntime, settings: Settings) -> int:
    if request.top_k < 0:
        raise InvalidInputError("top_k", f"must be >= 0, got {request.top_k}")
    if request.top_k > settings.max_top_k:
        raise InvalidInputError("top_k", f"at most {settings.max_top_k}, got {request.top_k}")
    return min(request.top_k or settings.default_top_k, len(served.labels))


def explain_options(request: pb.ExplainRequest, served: ModelRuntime,
                    settings: Settings) -> tuple[ExplainKey, int | None, list[list[int]]]:
    """Validate all of an ExplainRequest but its input: the key it batches under, the target class
    (None: the predicted one) and the suppressed component indices of each intervention."""
    method = request.method or served.default_method
    explainer = served.explainers.get(method)
    if explainer is None:
        raise NotFoundError(f"method of model {served.name!r}", method, sorted(served.explainers))
    if request.heatmaps not in HEATMAP_MODES:
        raise InvalidInputError("heatmaps", f"unknown heatmap mode {request.heatmaps}")
    target = None
    if request.HasField("target_class"):
        if not 0 <= request.target_class < len(served.labels):
            raise InvalidInputError("target_class", f"must be in [0, {len(served.labels)}), got {request.target_class}")
        target = request.target_class
    if len(request.interventions) > settings.max_interventions:
        raise InvalidInputError("interventions", f"at most {settings.max_interventions} per request, "
                                                 f"got {len(request.interventions)}")
    suppress = []
    for intervention in request.interventions:
        indices = []
        for component_id in intervention.suppress:
            if component_id not in explainer.component_ids:
                raise NotFoundError(f"component of method {method!r}", component_id)
            indices.append(explainer.component_ids[component_id])
        suppress.append(indices)
    return ExplainKey(method, HEATMAP_MODES[request.heatmaps]), target, suppress


async def decode_explain(request: pb.ExplainRequest, served: ModelRuntime, settings: Settings,
                         images: ImageDecoder) -> tuple[ExplainKey, ExplainItem]:
    """Validate an ExplainRequest completely, before it is queued: the cheap checks first, the input last."""
    key, target, suppress = explain_options(request, served, settings)
    return key, ExplainItem(await decode_input(request, served, settings, images), target, suppress)


def add_class_scores(target, scores: Scores, labels: list[str], k: int) -> None:
    """Append the top-k classes of ``scores``, highest first, to the repeated ClassScore field ``target``."""
    for index, logit, probability in zip(*scores.top(k)):
        target.add(class_index=index, label=labels[index], logit=logit, probability=probability)


def explain_response(request: pb.ExplainRequest, served: ModelRuntime, method: str, k: int,
                     row: ExplainedRow) -> pb.ExplainResponse:
    """One example's explanation as a response: numpy slices and protobuf only (see server/results.py)."""
    components = served.explainers[method].components
    response = pb.ExplainResponse(
        request_id=request.request_id, model=served.name, version=served.version, method=method,
        target_class=row.target_class, target_logit=row.target_logit, bias=row.bias,
        residual_contribution=row.residual_contribution, residual_share=row.residual_share,
        additive=row.additive, additivity_gap=row.additivity_gap)
    add_class_scores(response.prediction, row.scores, served.labels, k)
    reported = [(j, components[c]) for j, c in enumerate(row.component_index.tolist()) if c >= 0]
    weight, contribution = row.weight.tolist(), row.contribution.tolist()
    for j, c in reported:
        response.components.add(id=c.id, label=c.label, class_index=c.class_index, weight=weight[j],
                                contribution=contribution[j])
    if row.heatmaps is not None:
        for j, c in reported:
            response.heatmaps.add(component_id=c.id, map=to_tensor(row.heatmaps[j]))
    for intervention, scores in zip(request.interventions, row.intervened):
        answer = response.interventions.add(suppressed=intervention.suppress,
                                            target_logit=float(scores.logits[row.target_class]))
        add_class_scores(answer.prediction, scores, served.labels, k)
    return response


# ModelInfo.backend names the library that runs the forward pass.
BACKEND_NAMES = {"torch": "torch", "onnx": "onnxruntime"}


def model_info(served: ModelRuntime, with_components: bool) -> pb.ModelInfo:
    spec = served.parts.input_spec
    info = pb.ModelInfo(name=served.name, version=served.version, input_dtype=spec.dtype,
                        input_shape=spec.shape, labels=served.labels, default_method=served.default_method,
                        layer=served.parts.layer, feature_shape=served.parts.feature_shape,
                        backend=BACKEND_NAMES[served.backend], execution_provider=served.execution_provider)
    for name, explainer in served.explainers.items():
        method = info.methods.add(name=name, additive=explainer.additive,
                                  residual_share_definition=explainer.residual_share_definition,
                                  contribution_definition=explainer.contribution_definition,
                                  fit_report_json=json.dumps(explainer.fit_report, sort_keys=True))
        if with_components:
            exemplars = served.archive.methods[name].exemplars
            for c in explainer.components:
                method.components.add(id=c.id, label=c.label, class_index=c.class_index,
                                      exemplar_png=exemplars.get(c.id, b""))
    return info
