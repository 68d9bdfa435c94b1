"""Serving options: autocast of the backbone (explanations stay exact), torch's thread count, and the
heap that keeps freed memory for the next batch."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from protoserve_client import ExplainerClient, additivity_gap

from conftest import RunningServer
from handlers.archive import read_archive
from handlers.runtime import ExplainItem, ModelRuntime
from server.settings import Settings


@pytest.fixture(scope="module")
def digits(mnist_split) -> torch.Tensor:
    return mnist_split["x_test"][:64]


@pytest.fixture(scope="module")
def archive(demo_store):
    return read_archive(demo_store / "mnist-1.psar")


@pytest.mark.parametrize("method", ["protonmf", "srae"])
def test_bfloat16_backbone_keeps_additive_explanations_exact(archive, digits, method):
    full, reduced = ModelRuntime(archive), ModelRuntime(archive, autocast="bfloat16")
    items = [ExplainItem(x, None, [[0, 1]]) for x in digits]
    logits, explanation, _ = reduced.explain(method, items, "feature_grid")
    reference_logits, _, _ = full.explain(method, items, "feature_grid")

    # The head and the method's math run in float32 on the cast-back features, so the
    # explanation adds up to the logit it reports, exactly as without autocast ...
    total = explanation.contribution.sum(1) + explanation.residual_contribution + explanation.bias
    torch.testing.assert_close(total, explanation.target_logit, rtol=0, atol=1e-4)
    torch.testing.assert_close(explanation.target_logit, logits.gather(1, explanation.target_class[:, None])[:, 0])
    assert explanation.contribution.dtype == logits.dtype == torch.float32
    # ... while the logits themselves move by the backbone's bfloat16 rounding, and the
    # predictions barely change.
    assert not torch.equal(logits, reference_logits)
    assert (logits - reference_logits).abs().max() < 0.1 * reference_logits.abs().max()
    assert (logits.argmax(1) == reference_logits.argmax(1)).float().mean() >= 0.95


def test_invalid_autocast_settings_are_refused(archive, tmp_path):
    with pytest.raises(ValueError, match="autocast must be"):
        Settings(model_store=tmp_path, autocast="int8")
    with pytest.raises(ValueError, match="torch backend"):
        Settings(model_store=tmp_path, autocast="float16", backend="onnx")
    with pytest.raises(ValueError, match="autocast must be"):
        ModelRuntime(archive, autocast="fp8")
    with pytest.raises(ValueError, match="intra_op_threads"):
        Settings(model_store=tmp_path, intra_op_threads=-1)
    with pytest.raises(ValueError, match="keep_freed_mib"):
        Settings(model_store=tmp_path, keep_freed_mib=-1)


# Page faults of each of four ResNet-18 forwards (batch 16: activations of 3-13 MiB, past glibc's
# default mmap threshold of 128 KiB) on a thread started after the setting, as a compute thread is.
FORWARD_FAULTS = """
import json, resource, sys, threading, torch, torchvision
from server.memory import keep_freed_memory
applied = keep_freed_memory(int(sys.argv[1]))
torch.set_num_threads(1)
model, x, faults = torchvision.models.resnet18(weights=None).eval(), torch.rand(16, 3, 224, 224), []
def forwards():
    with torch.inference_mode():
        for _ in range(4):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            model(x)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=forwards)
thread.start()
thread.join()
print(json.dumps({"applied": applied, "faults": faults}))
"""


def forward_faults(keep_freed_mib: int) -> dict:
    run = subprocess.run([sys.executable, "-c", FORWARD_FAULTS, str(keep_freed_mib)], capture_output=True,
                         text=True, check=True, cwd=Path(__file__).resolve().parent.parent, timeout=120)
    return json.loads(run.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_kept_heap_serves_later_batches_without_page_faults():
    kept, default = forward_faults(Settings(model_store=Path(".")).keep_freed_mib), forward_faults(0)
    assert kept["applied"] and not default["applied"]
    # With glibc's defaults each forward maps and faults its activations afresh ...
    assert min(default["faults"][1:]) > 0.2 * default["faults"][0]
    # ... while with the heap kept the later forwards reuse the pages the first ones touched: usually no
    # fault at all by the fourth; a few hundred (e.g. a page reclaimed under a loaded suite's memory
    # pressure) are still far below the default's tens of thousands.
    assert kept["faults"][-1] < 0.1 * min(default["faults"][1:])


def test_server_with_one_thread_and_a_bfloat16_backbone(demo_store: Path, digits):
    previous = torch.get_num_threads()
    running = RunningServer(Settings(model_store=demo_store, port=0, metrics_port=0, shutdown_grace_s=2.0,
                                     intra_op_threads=1, autocast="bfloat16"))
    try:
        # Process-wide: every thread started from now on, like the model's compute thread,
        # runs torch ops on one thread. (A thread that set its own count keeps it.)
        with ThreadPoolExecutor(1) as fresh_thread:
            assert fresh_thread.submit(torch.get_num_threads).result() == 1
        local = ModelRuntime(read_archive(demo_store / "mnist-1.psar"), autocast="bfloat16")
        with ExplainerClient(running.address, timeout=30) as client:
            for x in digits[:4]:
                response = client.explain(x.numpy(), model="mnist", method="protonmf", heatmaps="none")
                assert additivity_gap(response) < 1e-5
                logits, _, _ = local.explain("protonmf", [ExplainItem(x, None, [])], "none")
                assert response.target_logit == pytest.approx(float(logits[0].max()), abs=1e-4)
    finally:
        running.stop()
        torch.set_num_threads(previous)
