"""The data plane without a transport: validation of plain values, calls of several examples, and the
field names each transport gives the data plane's errors (server/dataplane.py, server/errors.py)."""

from __future__ import annotations

import asyncio
import threading
from functools import partial

import numpy as np
import pytest
import torch
from protoserve_client import pb

from handlers.errors import InvalidInputError, NotFoundError
from server import convert
from server.dataplane import DataPlane, Example, ExplainCall, PredictCall, decode_input, explain_options, top_k
from server.decode import DecodeBudgetError
from server.errors import field_of, message_of
from server.metrics import Metrics
from server.oip_infer import FIELD_NAMES
from server.registry import ModelRegistry
from server.settings import Settings

DIGIT = np.zeros((1, 28, 28), np.float32)
LIMITS = dict(max_top_k=7, max_interventions=2, max_input_bytes=4096)


@pytest.fixture(scope="module")
def serving(demo_store):
    """A data plane over the demo store, its batchers on an event loop of their own, and a function
    that runs a coroutine there."""
    settings = Settings(model_store=demo_store, port=0, metrics_port=0, **LIMITS)
    registry = ModelRegistry(settings, Metrics())
    registry.load_store(torch.device("cpu"))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(60)

    async def start():
        registry.start()

    run(start())
    yield DataPlane(registry, settings, registry.metrics), run
    run(registry.close(1.0))
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


@pytest.fixture(scope="module")
def plane(serving) -> DataPlane:
    return serving[0]


@pytest.fixture(scope="module")
def run(serving):
    return serving[1]


@pytest.fixture(scope="module")
def runtime(plane):
    return plane.model("mnist")


def _call(**changes) -> ExplainCall:
    return ExplainCall(**{"model": "mnist", "version": "", "examples": [Example(tensor=DIGIT)], **changes})


def _stage_count(plane, stage: str) -> float:
    return plane.metrics.registry.get_sample_value("protoserve_stage_duration_seconds_count",
                                                   {"model": "mnist", "stage": stage}) or 0.0


def test_top_k_is_the_default_at_0_and_at_most_the_classes(plane, runtime):
    assert top_k(0, runtime, plane.settings) == plane.settings.default_top_k
    assert top_k(7, runtime, plane.settings) == 7
    for requested in (-1, 8):
        with pytest.raises(InvalidInputError) as refused:
            top_k(requested, runtime, plane.settings)
        assert refused.value.field == "top_k"


def test_explain_options_of_plain_values(plane, runtime):
    key, target, suppress = explain_options(_call(method="protonmf", target_class=3, heatmaps="input",
                                                  interventions=[["c0.p0"], ["c1.p0", "c0.p0"]]),
                                            runtime, plane.settings)
    ids = runtime.explainers["protonmf"].component_ids
    assert (key.method, key.heatmaps, target) == ("protonmf", "input", 3)
    assert suppress == [[ids["c0.p0"]], [ids["c1.p0"], ids["c0.p0"]]]
    key, target, suppress = explain_options(_call(), runtime, plane.settings)
    assert (key.method, key.heatmaps, target, suppress) == (runtime.default_method, "none", None, [])


@pytest.mark.parametrize("changes, field, detail", [
    (dict(heatmaps="everywhere"), "heatmaps",
     "'everywhere' is not one of none, feature_grid, input, presence_feature_grid, presence_input"),
    (dict(target_class=10), "target_class", "must be in [0, 10), got 10"),
    (dict(target_class=-1), "target_class", "must be in [0, 10), got -1"),
    (dict(interventions=[["c0.p0"]] * 3), "interventions", "at most 2 per request, got 3"),
])
def test_bad_options_name_their_field_apart_from_the_detail(plane, runtime, changes, field, detail):
    with pytest.raises(InvalidInputError) as refused:
        explain_options(_call(**changes), runtime, plane.settings)
    assert (refused.value.field, refused.value.detail) == (field, detail)
    assert str(refused.value) == f"{field}: {detail}"


@pytest.mark.parametrize("changes", [dict(method="nope"), dict(interventions=[["c0.p0", "zz"]])])
def test_an_unknown_method_or_component_is_not_found(plane, runtime, changes):
    with pytest.raises(NotFoundError):
        explain_options(_call(**changes), runtime, plane.settings)


def test_interventions_are_counted_before_any_is_read(plane, runtime):
    class Unread(list):
        def __getitem__(self, index):
            raise AssertionError("an intervention was read")

        def __iter__(self):
            raise AssertionError("an intervention was read")

    with pytest.raises(InvalidInputError, match="^interventions: at most 2"):
        explain_options(_call(interventions=Unread([[]] * 10 ** 6)), runtime, plane.settings)


@pytest.mark.parametrize("example, field", [
    (Example(), "input"),
    (Example(tensor=DIGIT, image=b"\x89PNG"), "input"),
    (Example(tensor=np.zeros((2, 28, 28), np.float32)), "input.data"),  # over max_input_bytes
    (Example(image=b"\x89PNG" + bytes(4096)), "image"),
    (Example(tensor=np.zeros((28, 28), np.float32)), "input.shape"),
    (Example(tensor=np.full((1, 28, 28), np.inf, np.float32)), "input.data"),
    (Example(image=b"not an image"), "image"),
])
def test_bad_inputs_name_their_field(plane, run, runtime, example, field):
    with pytest.raises(InvalidInputError) as refused:
        run(decode_input(example, runtime, plane.settings, plane.registry.images))
    assert refused.value.field == field


def test_inputs_of_every_kind_become_model_inputs(plane, run, runtime):
    def decode(example: Example) -> torch.Tensor:
        return run(decode_input(example, runtime, plane.settings, plane.registry.images))

    pixels = np.full((1, 28, 28), 255, np.uint8)
    np.testing.assert_allclose(decode(Example(tensor=pixels)), np.ones((1, 28, 28), np.float32))
    assert decode(Example(tensor=DIGIT.astype(np.float16))).dtype == torch.float32
    assert decode(Example(tensor=DIGIT)).shape == (1, 28, 28)


def test_the_examples_of_one_call_are_answered_each_with_its_own_row(plane, run):
    examples = [Example(tensor=np.full((1, 28, 28), v, np.float32)) for v in (0.0, 0.5, 1.0)]
    before = {stage: _stage_count(plane, stage) for stage in ("preprocess", "encode")}
    result = run(plane.explain(_call(examples=examples, interventions=[["c0.p0"]], heatmaps="feature_grid",
                                           top_k=3), lambda result: result))
    assert (result.runtime.name, result.method, result.top_k, len(result.rows)) == ("mnist", "protonmf", 3, 3)
    for row in result.rows:
        assert len(row.intervened) == 1 and row.heatmaps is not None and row.additive
    assert not np.array_equal(result.rows[0].scores.logits, result.rows[2].scores.logits)
    assert {stage: _stage_count(plane, stage) for stage in before} == {s: n + 1 for s, n in before.items()}
    predicted = run(plane.predict(PredictCall("mnist", "", examples), lambda result: result))
    for scores, row in zip(predicted.rows, result.rows):
        np.testing.assert_allclose(scores.logits, row.scores.logits, rtol=1e-5, atol=1e-5)


def test_one_bad_example_fails_its_call(plane, run):
    examples = [Example(tensor=DIGIT), Example(tensor=np.full((1, 28, 28), np.nan, np.float32))]
    with pytest.raises(InvalidInputError, match="^input.data: contains NaN"):
        run(plane.explain(_call(examples=examples), lambda result: result))


def test_readiness(plane):
    assert plane.ready() and plane.ready("mnist") and plane.ready("mnist", "1")
    assert not plane.ready("nope") and not plane.ready("mnist", "9")


# ------------------------------------------------------------------ field names per transport


@pytest.mark.parametrize("field, oip_field", [
    ("input", "inputs[0]"),
    ("input.data", "inputs[0].data"),
    ("input.shape", "inputs[0].shape"),
    ("target_class", "parameters.target_class"),
    ("heatmaps", "parameters.heatmaps"),
    ("interventions", "parameters.suppress"),
    # The OIP servicer's own fields are left as they are.
    ("inputs[0].datatype", "inputs[0].datatype"),
    ("inputs", "inputs"),
    ("parameters.method", "parameters.method"),
    ("outputs[0].name", "outputs[0].name"),
    ("raw_input_contents[0]", "raw_input_contents[0]"),
])
def test_each_transport_names_the_data_planes_fields_its_own_way(field, oip_field):
    error = InvalidInputError(field, "what is wrong")
    assert (field_of(error), message_of(error)) == (field, f"{field}: what is wrong")  # protoserve.v1
    assert (field_of(error, FIELD_NAMES), message_of(error, FIELD_NAMES)) == (oip_field, f"{oip_field}: what is wrong")


def test_errors_without_a_field_keep_their_message():
    error = NotFoundError("model", "nope", ["mnist"])
    assert (field_of(error, FIELD_NAMES), message_of(error, FIELD_NAMES)) == ("", str(error))
    budget = DecodeBudgetError("image", "the decode pool is full")
    assert (field_of(budget), message_of(budget)) == ("image", "image: the decode pool is full")


# ------------------------------------------------------------------ protoserve.v1 conversion


def test_protoserve_v1_requests_convert_to_plain_calls():
    request = pb.ExplainRequest(model="mnist", version="1", method="srae", input=pb.Tensor(
        dtype="uint8", shape=[1, 28, 28], data=bytes(784)), top_k=4, target_class=0, heatmaps=pb.HEATMAP_MODE_INPUT,
        interventions=[pb.Intervention(suppress=["a", "b"]), pb.Intervention()])
    call = convert.explain_call(request, deadline=12.5)
    assert (call.model, call.version, call.method, call.top_k, call.target_class, call.heatmaps, call.deadline) == (
        "mnist", "1", "srae", 4, 0, "input", 12.5)
    [example] = call.examples
    assert example.tensor.dtype == np.uint8 and example.tensor.shape == (1, 28, 28) and example.image == b""
    assert [list(ids) for ids in call.interventions] == [["a", "b"], []]
    assert convert.explain_call(pb.ExplainRequest(), None).target_class is None
    # A heatmap mode this server does not know goes on as its number, for the data plane to refuse.
    assert convert.explain_call(pb.ExplainRequest(heatmaps=7), None).heatmaps == "7"
    with pytest.raises(InvalidInputError) as refused:
        convert.predict_call(pb.PredictRequest(input=pb.Tensor(dtype="int7", shape=[1])), None)
    assert refused.value.field == "input.dtype"


def test_protoserve_v1_answers_are_built_from_rows(plane, run):
    request = pb.ExplainRequest(request_id="r1", interventions=[pb.Intervention(suppress=["c0.p0"])])
    call = _call(interventions=[["c0.p0"]], top_k=2, heatmaps="feature_grid")
    response = run(plane.explain(call, partial(convert.explain_response, request)))
    assert (response.request_id, response.model, response.method, len(response.prediction)) == (
        "r1", "mnist", "protonmf", 2)
    assert response.additive and len(response.heatmaps) == len(response.components) > 0
    assert [list(i.suppressed) for i in response.interventions] == [["c0.p0"]]


@pytest.mark.parametrize("changes, detail", [
    (dict(method="protonmf", neighbours=1), "method 'protonmf' has no probe examples to search; ask for 0, "
                                            "or use a method that has (coupled_nmf)"),
    (dict(method="coupled_nmf", neighbours=65), "must be in [0, 64], got 65"),
    (dict(method="coupled_nmf", neighbours=-1), "must be in [0, 64], got -1"),
])
def test_neighbours_are_bounded_and_only_for_methods_with_probe_examples(plane, runtime, changes, detail):
    with pytest.raises(InvalidInputError) as refused:
        explain_options(_call(**changes), runtime, plane.settings)
    assert (refused.value.field, refused.value.detail) == ("neighbours", detail)
    explain_options(_call(method="coupled_nmf", neighbours=64), runtime, plane.settings)
    explain_options(_call(method="protonmf", neighbours=0), runtime, plane.settings)


def test_neighbours_come_with_each_example_of_a_call(plane, run):
    images = [np.full((1, 28, 28), v, np.float32) for v in (0.0, 0.5)]
    result = run(plane.explain(_call(examples=[Example(tensor=t) for t in images], method="coupled_nmf",
                                     neighbours=5), lambda r: r))
    assert len(result.neighbours) == 2 and all(len(n.probe_index) == 5 for n in result.neighbours)
    assert run(plane.explain(_call(method="coupled_nmf"), lambda r: r)).neighbours is None
