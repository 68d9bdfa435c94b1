"""Fixed-shape work replayed as one CUDA graph per batch-size bucket.

On a GPU each op costs 5-10 µs of host time to launch, whatever its size, so a loop of fixed trip
count over small tensors (ProtoFac's active-set start and projected Adam steps: about 2400 launches
for a batch of 8) is bound by the host. Captured once per batch-size bucket when the model loads,
never in a request, the whole loop replays as one launch (``torch.cuda.CUDAGraph``).

A graph reads its inputs from, and writes its output to, the buffers it was captured with. A call
copies its rows into the smallest bucket that holds them and copies the output's rows out; the
bucket's other rows keep what an earlier call left there, which is harmless because every function
graphed here works row by row (a row's output depends on that row's inputs only). A batch larger
than the largest bucket runs eagerly. Each bucket's graph is checked when it is captured: it
replays on other rows than those it was captured on, and must give the eager function's output on
them; one that does not is dropped (logged), and its batches take the next bucket kept or run eagerly.

:func:`eager_replay` captures nothing: its replay calls the function again on the buffers and writes
the output in place, which is a graph's buffer discipline without a GPU. The tests and the bench's
launch count run the same code path with it on the CPU.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

GraphedFn = Callable[..., torch.Tensor]
"""``fn(*inputs) -> output``: every input and the output have the batch on dim 0, row by row."""

Capture = Callable[[GraphedFn, tuple[torch.Tensor, ...]], tuple[Callable[[], None], torch.Tensor]]
"""``capture(fn, inputs) -> (replay, output)``: ``replay()`` recomputes ``output`` in place from ``inputs``."""

# Warm-up runs before a capture, on a side stream, as torch.cuda.graph's documentation asks: they
# fill the caches (cuBLAS workspaces, lru-cached constants) outside the graph's memory pool.
CUDA_WARMUP_RUNS = 3


def cuda_graph_capture(fn: GraphedFn, inputs: tuple[torch.Tensor, ...]) -> tuple[Callable[[], None], torch.Tensor]:
    """:data:`Capture` by ``torch.cuda.CUDAGraph`` (the inputs on a CUDA device, which need not be the
    current one: ``--device cuda:1``)."""
    device = inputs[0].device
    with torch.cuda.device(device):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(CUDA_WARMUP_RUNS):
                fn(*inputs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = fn(*inputs)

    def replay() -> None:
        with torch.cuda.device(device):  # on that device's current stream
            graph.replay()
    return replay, output


def eager_replay(fn: GraphedFn, inputs: tuple[torch.Tensor, ...]) -> tuple[Callable[[], None], torch.Tensor]:
    """:data:`Capture` without a GPU: the replay runs ``fn`` on the buffers and overwrites the output."""
    output = fn(*inputs)
    return lambda: output.copy_(fn(*inputs)), output


def bucket_sizes(max_batch_size: int) -> tuple[int, ...]:
    """The powers of two below ``max_batch_size``, and it: the batch sizes one graph is captured for."""
    sizes = []
    size = 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    return (*sizes, max_batch_size)


def example_count(sizes: tuple[int, ...]) -> int:
    """How many example rows :meth:`BucketGraphs.capture_buckets` takes for ``sizes``: the largest size (a
    bucket's rows all differ) within 2 (the check shifts them by one) and 64."""
    return max(2, min(64, max(sizes)))


@dataclass
class _Bucket:
    inputs: tuple[torch.Tensor, ...]
    output: torch.Tensor
    replay: Callable[[], None]


@dataclass(frozen=True)
class CaptureReport:
    """What :meth:`BucketGraphs.capture_buckets` did: the buckets captured and dropped, and the seconds it took."""

    captured: tuple[int, ...]
    dropped: tuple[int, ...]
    seconds: float


@dataclass
class BucketGraphs:
    """``fn`` replayed from one graph per batch-size bucket (module docstring).

    Parameters
    ----------
    fn : :data:`GraphedFn`, row by row, with a fixed sequence of ops (no host synchronisation, no
        shape that depends on the values)
    capture : :data:`Capture`, :func:`cuda_graph_capture` on a GPU
    rtol, atol : how close a replay must come to the eager output to be kept

    Call it as ``fn``; one call at a time (the buffers are shared; a lock serializes calls).
    """

    fn: GraphedFn
    capture: Capture
    rtol: float = 1e-4
    atol: float = 1e-6
    buckets_: dict[int, _Bucket] = field(default_factory=dict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def capture_buckets(self, examples: tuple[torch.Tensor, ...], sizes: tuple[int, ...]) -> CaptureReport:
        """Capture a graph of ``fn`` for each batch size of ``sizes`` and keep those that replay right.

        ``examples``: inputs of ``fn`` with at least two rows; each bucket's buffers are filled with
        its rows repeated, and its replay is checked on the rows shifted by one.
        """
        start = time.perf_counter()
        captured, dropped = [], []
        for size in sizes:
            rows = torch.arange(size, device=examples[0].device) % len(examples[0])
            inputs = tuple(example[rows].clone() for example in examples)
            replay, output = self.capture(self.fn, inputs)
            shifted = tuple(example[(rows + 1) % len(example)] for example in examples)
            for buffer, value in zip(inputs, shifted):
                buffer.copy_(value)
            replay()
            expected = self.fn(*shifted)
            if torch.allclose(output, expected, rtol=self.rtol, atol=self.atol):
                self.buckets_[size] = _Bucket(inputs, output, replay)
                captured.append(size)
            else:
                gap = (output - expected).abs().max().item()
                log.warning("the graph of %s for batch size %d does not reproduce it (largest gap %.3g): "
                            "that batch size runs eagerly", getattr(self.fn, "__qualname__", self.fn), size, gap)
                dropped.append(size)
        return CaptureReport(tuple(captured), tuple(dropped), time.perf_counter() - start)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        n = len(inputs[0])
        size = min((s for s in self.buckets_ if s >= n), default=None)
        if size is None:
            return self.fn(*inputs)
        bucket = self.buckets_[size]
        with self._lock:
            for buffer, value in zip(bucket.inputs, inputs):
                buffer[:n].copy_(value)
            bucket.replay()
            return bucket.output[:n].clone()
