"""What running a model as archives store it costs: interpreted parts vs the model's own forward.

    python -m bench.graph_interpreter

Archives' graphs run in an interpreter (``handlers.graph_program.GraphProgram``) instead of
fx-generated code. This times ``downstream(upstream(x))`` against the eager ``model(x)`` it
was split from, in alternating rounds on one thread, and prints the ratio of medians per model
with the spread of the per-round ratios.
"""

from __future__ import annotations

import statistics
import time

import torch
import torchvision

from handlers.graph_program import split
from model_store.recipes.mnist import MNIST_LAYER, MnistCNN

ROUNDS, CALLS = 9, 50


def _per_call(fn, x) -> float:
    start = time.perf_counter()
    for _ in range(CALLS):
        fn(x)
    return (time.perf_counter() - start) / CALLS


def main() -> None:
    torch.set_num_threads(1)
    cases = [("mnist cnn, batch 8", MnistCNN().eval(), MNIST_LAYER, torch.randn(8, 1, 28, 28)),
             ("resnet-18 64x64, batch 1", torchvision.models.resnet18(weights=None).eval(), "layer4_1_relu_1",
              torch.randn(1, 3, 64, 64))]
    for name, model, layer, x in cases:
        upstream, downstream = split(model, layer)
        steps = len(upstream.program.steps) + len(downstream.program.steps)
        ratios, eager_times = [], []
        with torch.inference_mode():
            for _ in range(ROUNDS):
                eager = _per_call(model, x)
                interpreted = _per_call(lambda v: downstream(upstream(v)), x)
                ratios.append(interpreted / eager)
                eager_times.append(eager)
        print(f"{name}: interpreted_over_eager {statistics.median(ratios):.3f} "
              f"(rounds {min(ratios):.3f}-{max(ratios):.3f}); eager {statistics.median(eager_times) * 1e3:.2f} ms; "
              f"{steps} steps")


if __name__ == "__main__":
    main()
