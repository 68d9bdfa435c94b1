"""Graphs per batch-size bucket (handlers/device_graphs.py): the buffer discipline, the check that drops a
graph that does not replay its function, and ProtoFac's solvers served through them, on the CPU with the
eager stand-in; and what makes the GPU path capturable at all: no op of any method's explain stage waits
for the host."""

from __future__ import annotations

import logging
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench.run import _issuing_line, gpu_path
from handlers.archive import read_archive
from handlers.device_graphs import BucketGraphs, bucket_sizes, eager_replay
from handlers.runtime import ExplainItem, ModelRuntime
from server.metrics import Metrics
from server.registry import ModelRegistry
from server.settings import Settings


def row_wise(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    return (2 * x + shift[:, None]).cumsum(1)


def stale_capture(fn, inputs):
    """A broken capture: its replay recomputes nothing."""
    output = fn(*inputs)
    return (lambda: None), output


@pytest.fixture
def examples():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(16, 5, generator=generator), torch.randint(0, 9, (16,), generator=generator).float()


def test_bucket_sizes():
    assert bucket_sizes(32) == (1, 2, 4, 8, 16, 32)
    assert bucket_sizes(5) == (1, 2, 4, 5)
    assert bucket_sizes(1) == (1,)


def test_the_server_asks_for_every_bucket_up_to_its_largest_batch(tmp_path):
    sizes = {name: ModelRegistry(settings, Metrics())._graph_batch_sizes()
             for name, settings in {"on": Settings(model_store=tmp_path, max_batch_size=12),
                                    "off": Settings(model_store=tmp_path, max_batch_size=12, cuda_graphs=False)}.items()}
    assert sizes == {"on": (1, 2, 4, 8, 12), "off": ()}


def test_calls_of_every_size_give_the_function(examples):
    replays = []

    def counted(fn, inputs):
        replay, output = eager_replay(fn, inputs)
        return (lambda: replays.append(len(inputs[0])) or replay()), output

    graphs = BucketGraphs(row_wise, counted)
    report = graphs.capture_buckets(examples, (1, 2, 4, 8))
    assert report.captured == (1, 2, 4, 8) and report.dropped == () and report.seconds >= 0
    x, shift = examples
    answers = {}
    replays.clear()  # the checks at capture replayed once per bucket
    for n in range(1, 11):  # within buckets, between them (padded) and beyond the largest (eager)
        answers[n] = graphs(x[-n:], shift[-n:])
        assert torch.equal(answers[n], row_wise(x[-n:], shift[-n:])), n
    assert replays == [1, 2, 4, 4, 8, 8, 8, 8]  # each call up to 8 rows replayed the smallest bucket holding it
    # Each answer is the caller's own: later calls through the same bucket do not overwrite it.
    assert torch.equal(answers[3], row_wise(x[-3:], shift[-3:]))
    assert answers[3].data_ptr() != graphs.buckets_[4].output.data_ptr()


def test_a_graph_that_does_not_replay_its_function_is_dropped(examples, caplog):
    graphs = BucketGraphs(row_wise, stale_capture)
    with caplog.at_level(logging.WARNING, logger="handlers.device_graphs"):
        report = graphs.capture_buckets(examples, (2, 4))
    assert report.captured == () and report.dropped == (2, 4)
    assert "batch size 2 does not reproduce it" in caplog.text
    x, shift = examples
    assert torch.equal(graphs(x[:3], shift[:3]), row_wise(x[:3], shift[:3]))  # eagerly


@pytest.fixture(scope="module")
def demo_archive(demo_store):
    return read_archive(demo_store / "mnist-1.psar")


@pytest.fixture(scope="module")
def demo_items(mnist_fit_data):
    x = mnist_fit_data.x_test[:9]
    return [ExplainItem(x[i], None if i % 3 else 7, [[0], [1, 2]]) for i in range(9)]


def test_protofac_served_through_graphs_answers_as_eager(demo_archive, demo_items):
    eager = ModelRuntime(demo_archive, graph_batch_sizes=(1, 2, 4, 8))  # on the CPU no capture by default
    graphed = ModelRuntime(demo_archive, graph_batch_sizes=(1, 2, 4, 8), capture=eager_replay)
    assert eager.graph_reports == {} and eager.explainers["protofac"].graphs_ is None
    assert set(graphed.graph_reports) == {"protofac"}  # the one method with graphs
    assert graphed.graph_reports["protofac"].captured == (1, 2, 4, 8)
    assert graphed.explainers["protofac"].graphs_ is not None
    for n in (1, 3, 8, 9):  # a bucket, padded, the largest, beyond it
        _, expected, _ = eager.explain("protofac", demo_items[:n], "feature_grid")
        _, answer, _ = graphed.explain("protofac", demo_items[:n], "feature_grid")
        for name, value in vars(expected).items():
            if torch.is_tensor(value):
                assert torch.allclose(getattr(answer, name), value, rtol=1e-5, atol=1e-6), (n, name)


def test_a_capture_that_fails_leaves_the_method_eager(demo_archive, demo_items, caplog):
    def failing(fn, inputs):
        raise RuntimeError("operation not permitted when stream is capturing")

    with caplog.at_level(logging.WARNING, logger="handlers.runtime"):
        model = ModelRuntime(demo_archive, graph_batch_sizes=(1, 2), capture=failing)
    assert model.graph_reports == {} and model.explainers["protofac"].graphs_ is None
    assert "protofac runs eagerly, its graphs could not be captured" in caplog.text
    _, explanation, _ = model.explain("protofac", demo_items[:2], "none")
    assert torch.allclose(explanation.weight.sum(1), torch.ones(2))


# Ops that wait for the device to hand a value to the host: none may run inside a CUDA graph, and on
# a GPU each stalls the launch queue.
HOST_SYNC_OPS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
                 "aten.equal.default", "aten.is_nonzero.default", "aten.item.default", "aten._unique2.default",
                 "aten.unique_consecutive.default", "aten.unique_dim.default", "aten.repeat_interleave.Tensor"}


class HostSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.found: list[tuple[str, str | None]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in HOST_SYNC_OPS:
            self.found.append((str(func), _issuing_line(sys._getframe(1))))
        return func(*args, **(kwargs or {}))


def test_the_host_sync_detector_sees_a_sync():
    with HostSyncs() as syncs:
        bool(torch.ones(3).sum() > 1)
        torch.ones(3).nonzero()
    assert [name for name, _ in syncs.found] == ["aten._local_scalar_dense.default", "aten.nonzero.default"]


def test_no_explain_stage_waits_for_the_host_on_the_gpu_path(demo_archive, demo_items):
    model = ModelRuntime(demo_archive)
    for method in model.explainers:
        model.explain(method, demo_items[:8], "feature_grid")  # caches filled on first use
        syncs, marks = HostSyncs(), []
        model._clock = lambda: marks.append(len(syncs.found)) or 0.0  # the stage boundaries
        try:
            with gpu_path(), syncs:
                model.explain(method, demo_items[:8], "feature_grid")
        finally:
            del model._clock
        assert syncs.found[marks[1]:marks[2]] == [], method


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_on_a_cuda_device_protofac_replays_its_cuda_graphs(demo_archive, demo_items):
    """The capture itself (the CPU tests use the stand-in): every bucket kept, the answers the eager CPU's."""
    on_cpu = ModelRuntime(demo_archive)
    on_gpu = ModelRuntime(demo_archive, "cuda", graph_batch_sizes=(1, 2, 4, 8))  # CUDA graphs by default there
    report = on_gpu.graph_reports["protofac"]
    assert report.captured == (1, 2, 4, 8) and report.dropped == ()
    for n in (1, 3, 8, 9):
        _, expected, _ = on_cpu.explain("protofac", demo_items[:n], "feature_grid")
        _, answer, _ = on_gpu.explain("protofac", demo_items[:n], "feature_grid")
        for name, value in vars(expected).items():
            if torch.is_tensor(value):
                assert torch.allclose(getattr(answer, name), value, rtol=1e-4, atol=1e-4), (n, name)
