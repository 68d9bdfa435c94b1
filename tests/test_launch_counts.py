"""The explanation stage's kernel launches (issue 20): the counter `make bench` reports them with, the GPU
path it counts on the CPU, and every method keeping to the goal there (ProtoFac through its graph)."""

from __future__ import annotations

import pytest
import torch

from bench.run import EXPLAIN_STAGE_OPS_GOAL, OpCounter, count_stage_ops, counted_capture, gpu_path
from handlers import rows
from handlers.archive import read_archive
from handlers.device_graphs import eager_replay
from handlers.explainers import gradcam_rules
from handlers.runtime import ExplainItem, ModelRuntime
from handlers.solvers import active_set, compiled_rows, simplex


def test_op_counter_counts_launches_not_views():
    a, b = torch.ones(4, 3), torch.ones(3, 2)
    with OpCounter() as counter:
        a.unsqueeze(0)  # a view: no kernel
        (torch.matmul(a, b) * 2).sum()  # matmul is a composite: its mm is what runs
    launched = [name for name, launch, _ in counter.ops if launch]
    assert launched == ["aten.mm.default", "aten.mul.Tensor", "aten.sum.default"]
    assert [name for name, launch, _ in counter.ops if not launch] == ["aten.unsqueeze.default"]


def _defaults():
    return (dict(active_set.active_set_codes.__kwdefaults__), simplex.simplex_least_squares.__defaults__,
            dict(gradcam_rules.scan_patches.__kwdefaults__), compiled_rows.serve_on_cpu)


def test_gpu_path_sets_the_defaults_and_restores_them():
    before = _defaults()
    with pytest.raises(RuntimeError, match="inside"), gpu_path():
        assert active_set.active_set_codes.__kwdefaults__["stop_when_optimal"] is False
        assert simplex.simplex_least_squares.__defaults__ == (False,)
        assert compiled_rows.serve_on_cpu is False
        assert gradcam_rules.scan_patches.__kwdefaults__["fewest_launches"] is True
        raise RuntimeError("inside")
    assert _defaults() == before


def test_explain_stage_launches(demo_store, mnist_fit_data):
    model = ModelRuntime(read_archive(demo_store / "mnist-1.psar"))
    x = mnist_fit_data.x_test[:8]
    items = [ExplainItem(x[i], None, [[0]]) for i in range(8)]
    cpu, gpu = {}, {}
    for method in model.explainers:
        model.explain(method, items, "feature_grid")  # caches filled on first use
        cpu[method] = sum(launch for _, launch, _ in count_stage_ops(model, method, items)["explain"])
        with gpu_path():
            model.explain(method, items, "feature_grid")  # the GPU path's caches (the search's tables) too
            gpu[method] = sum(launch for _, launch, _ in count_stage_ops(model, method, items)["explain"])
    for method in ("protonmf", "srae", "coupled_nmf", "gradcam_rules"):
        assert gpu[method] <= EXPLAIN_STAGE_OPS_GOAL, (method, gpu)
    # The GPU path is another path: ProtoFac's solvers, coupled NMF's fold-in and removals, Grad-CAM rules'
    # patch search and every method's bookkeeping (a removal method's sets, an additive method's residual and
    # interventions) are tensor ops there instead of compiled row loops.
    for method in model.explainers:
        assert gpu[method] > cpu[method], (method, gpu, cpu)


def test_protofac_through_its_graph_meets_the_goal(demo_store, mnist_fit_data):
    """What make bench's explain_stage_ops counts for ProtoFac: each replay one launch."""
    archive = read_archive(demo_store / "mnist-1.psar")
    x = mnist_fit_data.x_test[:8]
    items = [ExplainItem(x[i], None, [[0]]) for i in range(8)]
    with gpu_path():
        eager = ModelRuntime(archive)
        graphed = ModelRuntime(archive, graph_batch_sizes=(8,), capture=counted_capture(eager_replay))
        counts = {}
        for name, model in (("eager", eager), ("graphed", graphed)):
            model.explain("protofac", items, "feature_grid")
            ops = count_stage_ops(model, "protofac", items)["explain"]
            counts[name] = [op for op, launch, _ in ops if launch]
    assert counts["graphed"].count("cuda graph replay") == 1
    assert len(counts["graphed"]) <= EXPLAIN_STAGE_OPS_GOAL < len(counts["eager"])


def test_requests_compile_nothing(demo_store, mnist_fit_data, monkeypatch):
    """The CPU's compiled kernels are ready when the model has loaded, and no request compiles one again (numba
    compiles a kernel anew for other argument types or layouts): every method, batches of 1, 3 and 8, every
    heatmap kind, with and without interventions, and the host rows of each answer; every method runs them (its
    bookkeeping at least), and every answer's rows."""
    kernels = compiled_rows.KERNELS + rows.KERNELS
    model = ModelRuntime(read_archive(demo_store / "mnist-1.psar"))
    loaded = [list(kernel.signatures) for kernel in kernels]
    assert all(loaded)
    serves, ran = compiled_rows.serves, []
    monkeypatch.setattr(compiled_rows, "serves", lambda device: ran.append(serves(device)) or ran[-1])
    x = mnist_fit_data.x_test[:8]
    for method in model.explainers:
        ran.clear()
        for n in (1, 3, 8):
            for heatmaps in ("none", "feature_grid", "input"):
                items = [ExplainItem(x[i], None, [[0], [1, 2]] if i % 2 else []) for i in range(n)]
                model.explain_rows(method, items, heatmaps)
                model.predict_rows(list(x[:n]))
        assert ran and all(ran), method
    assert [list(kernel.signatures) for kernel in kernels] == loaded
