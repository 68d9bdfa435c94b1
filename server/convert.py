"""protoserve.v1 messages to the data plane's plain calls, and its results back to messages."""

from __future__ import annotations

import json
from collections.abc import Sequence

from protoserve_client import pb
from protoserve_client.tensors import TensorFormatError, from_tensor, to_tensor

from handlers.errors import InvalidInputError
from handlers.neighbours import Neighbours
from handlers.rows import Scores
from handlers.runtime import ModelRuntime
from server.dataplane import Example, ExplainCall, ExplainResult, PredictCall, PredictResult

HEATMAP_MODES = {
    pb.HEATMAP_MODE_NONE: "none",
    pb.HEATMAP_MODE_FEATURE_GRID: "feature_grid",
    pb.HEATMAP_MODE_INPUT: "input",
    pb.HEATMAP_MODE_PRESENCE_FEATURE_GRID: "presence_feature_grid",
    pb.HEATMAP_MODE_PRESENCE_INPUT: "presence_input",
}

# Heatmap.component_id of ExplainResponse.residual_heatmap: the residual is no component.
RESIDUAL_HEATMAP_ID = "residual"

# ModelInfo.backend names the library that runs the forward pass.
BACKEND_NAMES = {"torch": "torch", "onnx": "onnxruntime"}


class SuppressedIds(Sequence):
    """An ExplainRequest's interventions as the component ids each suppresses, read on demand: the data
    plane counts them before it reads any, and a message may hold millions."""

    def __init__(self, interventions):
        self._interventions = interventions

    def __len__(self) -> int:
        return len(self._interventions)

    def __getitem__(self, index: int) -> Sequence[str]:
        return self._interventions[index].suppress


def example(request: pb.PredictRequest | pb.ExplainRequest) -> Example:
    """The request's ``input`` tensor, decoded (its dtype, shape and length checked), or its ``image`` bytes."""
    if not request.HasField("input"):
        return Example(image=request.image)
    try:
        return Example(tensor=from_tensor(request.input, field="input"), image=request.image)
    except TensorFormatError as exc:
        raise InvalidInputError(exc.field, str(exc)) from exc


def predict_call(request: pb.PredictRequest, deadline: float | None) -> PredictCall:
    return PredictCall(request.model, request.version, [example(request)], request.top_k, deadline)


def explain_call(request: pb.ExplainRequest, deadline: float | None) -> ExplainCall:
    return ExplainCall(
        request.model, request.version, [example(request)], method=request.method, top_k=request.top_k,
        target_class=request.target_class if request.HasField("target_class") else None,
        # An enum value this server does not know goes on as its number, for the data plane to refuse.
        heatmaps=HEATMAP_MODES.get(request.heatmaps, str(request.heatmaps)),
        interventions=SuppressedIds(request.interventions), deadline=deadline, neighbours=request.neighbours)


def add_class_scores(target, scores: Scores, labels: list[str], k: int) -> None:
    """Append the top-k classes of ``scores``, highest first, to the repeated ClassScore field ``target``."""
    for index, logit, probability in zip(*scores.top(k)):
        target.add(class_index=index, label=labels[index], logit=logit, probability=probability)


def predict_response(request: pb.PredictRequest, result: PredictResult) -> pb.PredictResponse:
    runtime, [scores] = result.runtime, result.rows
    response = pb.PredictResponse(request_id=request.request_id, model=runtime.name, version=runtime.version)
    add_class_scores(response.prediction, scores, runtime.labels, result.top_k)
    return response


def explain_response(request: pb.ExplainRequest, result: ExplainResult) -> pb.ExplainResponse:
    """The one example's explanation as a response: numpy slices and protobuf only (see handlers/rows.py)."""
    runtime, method, k, [row] = result.runtime, result.method, result.top_k, result.rows
    components = runtime.explainers[method].components
    response = pb.ExplainResponse(
        request_id=request.request_id, model=runtime.name, version=runtime.version, method=method,
        target_class=row.target_class, target_logit=row.target_logit, bias=row.bias,
        residual_contribution=row.residual_contribution, residual_share=row.residual_share,
        additive=row.additive, additivity_gap=row.additivity_gap)
    add_class_scores(response.prediction, row.scores, runtime.labels, k)
    reported = [(j, components[c]) for j, c in enumerate(row.component_index.tolist()) if c >= 0]
    weight, contribution = row.weight.tolist(), row.contribution.tolist()
    for j, c in reported:
        response.components.add(id=c.id, label=c.label, class_index=c.class_index, weight=weight[j],
                                contribution=contribution[j])
    if row.heatmaps is not None:
        for j, c in reported:
            response.heatmaps.add(component_id=c.id, map=to_tensor(row.heatmaps[j]))
    if row.residual_heatmap is not None:
        response.residual_heatmap.component_id = RESIDUAL_HEATMAP_ID
        response.residual_heatmap.map.CopyFrom(to_tensor(row.residual_heatmap))
    for intervention, scores in zip(request.interventions, row.intervened):
        answer = response.interventions.add(suppressed=intervention.suppress,
                                            target_logit=float(scores.logits[row.target_class]))
        add_class_scores(answer.prediction, scores, runtime.labels, k)
    if result.neighbours is not None:
        add_neighbours(response, result.neighbours[0], components, runtime.labels)
    return response


def add_neighbours(response: pb.ExplainResponse, found: Neighbours, components: list, labels: list[str]) -> None:
    """The neighbour view: each neighbour, nearest first, with its PNG where the method stored one, and
    the shares of their top components."""
    pngs = found.png if found.png is not None else [b""] * len(found.probe_index)
    for probe, distance, label, top, png in zip(found.probe_index.tolist(), found.distance.tolist(),
                                                found.class_index.tolist(), found.top_component.tolist(), pngs):
        response.neighbours.add(probe_index=probe, distance=distance, class_index=label, label=labels[label],
                                component_id=components[top].id, png=png)
    for c, share in zip(components, found.component_share.tolist()):
        response.neighbour_components.add(component_id=c.id, share=share)


def model_info(runtime: ModelRuntime, with_components: bool) -> pb.ModelInfo:
    """A model version's info; ``with_components`` (GetModel): its components with their exemplars, and the
    archive's held-out samples (at most handlers.archive.MAX_SAMPLES, each of at most MAX_INPUT_ELEMENTS)."""
    spec = runtime.parts.input_spec
    info = pb.ModelInfo(name=runtime.name, version=runtime.version, input_dtype=spec.dtype,
                        input_shape=spec.shape, labels=runtime.labels, default_method=runtime.default_method,
                        layer=runtime.parts.layer, feature_shape=runtime.parts.feature_shape,
                        backend=BACKEND_NAMES[runtime.backend], execution_provider=runtime.execution_provider,
                        image_mode=(spec.image or {}).get("mode", ""))
    samples = runtime.archive.samples
    if with_components and samples is not None:
        for index, (x, label) in enumerate(zip(samples.inputs.numpy(), samples.labels.tolist())):
            info.samples.add(index=index, class_index=label, label=runtime.labels[label], input=to_tensor(x))
    for name, explainer in runtime.explainers.items():
        method = info.methods.add(name=name, additive=explainer.additive,
                                  residual_share_definition=explainer.residual_share_definition,
                                  contribution_definition=explainer.contribution_definition,
                                  presence_maps=explainer.presence_maps,
                                  fit_report_json=json.dumps(explainer.fit_report, sort_keys=True))
        if with_components:
            exemplars = runtime.archive.methods[name].exemplars
            for c in explainer.components:
                method.components.add(id=c.id, label=c.label, class_index=c.class_index,
                                      exemplar_png=exemplars.get(c.id, b""))
    return info
