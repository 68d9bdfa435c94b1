"""A loaded archive ready to compute: batched predictions and explanations as host rows, no transport."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from handlers.archive import Archive, HeldOutSamples
from handlers.base import ExplainBatch, Explainer, Explanation
from handlers.device_graphs import Capture, CaptureReport, cuda_graph_capture
from handlers.errors import ArchiveError, InvalidInputError
from handlers.methods import METHODS
from handlers.model import InputSpec
from handlers.onnx_backend import OnnxPart
from handlers.rows import (ExplainedRow, Scores, additivity_gaps, compile_row_kernels, explained_rows,
                           predicted_rows)

log = logging.getLogger(__name__)


@dataclass
class ExplainItem:
    """One example's explanation request, already validated.

    input    : (*input_shape) float32
    target   : the class to explain, or None for the predicted class
    suppress : intervention sets, each a list of component indices
    """

    input: torch.Tensor
    target: int | None
    suppress: list[list[int]]


# Reduced precision for the backbone (the parts up to the explained layer); see ModelRuntime.
AUTOCAST_DTYPES = {"none": None, "float16": torch.float16, "bfloat16": torch.bfloat16}

SYNTHETIC_CHECK_INPUTS = 8
CHECK_BATCH = 8
# How far ONNX parts may stray from the torch parts at load, relative to the largest output: far above float32
# rounding and a GPU's TF32 (1e-4 on the demos), far below parts that compute something else.
ONNX_AGREEMENT_RTOL = 1e-2


def synthetic_inputs(spec: InputSpec, count: int = SYNTHETIC_CHECK_INPUTS) -> torch.Tensor:
    """Deterministic stand-ins (seed 0) for held-out inputs: (count, *spec.shape) float32.

    Uniform pixels in [0, 1] put through the image normalization when the model takes images,
    else standard normal values.
    """
    generator = torch.Generator().manual_seed(0)
    if spec.image is None or len(spec.shape) != 3:
        return torch.randn(count, *spec.shape, generator=generator)
    pixels = torch.rand(count, *spec.shape, generator=generator)
    mean = torch.tensor(spec.image.get("mean", [0.0] * spec.shape[0]), dtype=torch.float32).reshape(-1, 1, 1)
    std = torch.tensor(spec.image.get("std", [1.0] * spec.shape[0]), dtype=torch.float32).reshape(-1, 1, 1)
    return (pixels - mean) / std


class ModelRuntime:
    """One model version's compute: its parts and explainers on one device."""

    def __init__(self, archive: Archive, device: torch.device | str = "cpu", backend: str = "archive",
                 autocast: str = "none", graph_batch_sizes: tuple[int, ...] = (), capture: Capture | None = None):
        """``backend``: "torch", "onnx" (ONNX Runtime for the forward pass; the archive must carry
        ONNX parts) or "archive" (what the archive prefers). ``autocast``: "float16" or "bfloat16"
        runs the backbone (input to the explained layer) under :func:`torch.autocast`; its features
        are cast back to float32, so the head and every method's math stay in float32 and the
        explanation stays exact for the logits it reports (torch backend only).

        ``graph_batch_sizes``: the batch sizes for which each method's fixed-shape work is captured
        as a graph, here at load (:meth:`Explainer.capture_graphs`; ``graph_reports`` says what and how
        long), with ``capture``: default CUDA graphs on a CUDA device and none on the CPU, where an op
        costs its Python call whatever is launched."""
        if autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast must be one of {sorted(AUTOCAST_DTYPES)}, got {autocast!r}")
        self.name, self.version = archive.name, archive.version
        self.archive = archive
        self.device = torch.device(device)
        self.parts = archive.parts.to(self.device)
        self.default_method = archive.default_method
        self.backend = archive.manifest.get("backend", "torch") if backend == "archive" else backend
        if self.backend == "onnx":
            if archive.onnx_parts is None:
                raise ArchiveError(f"{self.name}-{self.version}: no ONNX parts; package it with --backend onnx")
            self._upstream = OnnxPart(archive.onnx_parts["upstream"], self.device)
            self._downstream = OnnxPart(archive.onnx_parts["downstream"], self.device)
            self._check_onnx_parts(archive.samples)
        elif self.backend == "torch":
            self._upstream, self._downstream = self.parts.upstream, self.parts.downstream
        else:
            raise ValueError(f"unknown backend {backend!r}")
        self.autocast_dtype = AUTOCAST_DTYPES[autocast]
        if self.autocast_dtype is not None and self.backend != "torch":
            raise ArchiveError(f"{self.name}-{self.version}: autocast needs the torch backend, not {self.backend!r}")
        self.explainers: dict[str, Explainer] = {}
        for method, fitted in archive.methods.items():
            if method not in METHODS:
                raise ArchiveError(f"{self.name}-{self.version}: unknown method {method!r}")
            try:
                self.explainers[method] = METHODS[method].explainer(self.parts, fitted).to(self.device)
            except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as exc:
                raise ArchiveError(f"{self.name}-{self.version}: method {method!r} does not fit the model "
                                   f"({type(exc).__name__}): {exc}") from exc
        compile_row_kernels()  # host rows are made on the CPU whatever the device: compiled now, not in a request
        # Additive methods are checked before serving; one that does not add up is refused alone.
        self.additivity_inputs = ""  # what they were checked on, for the log
        self.refused_methods: dict[str, str] = self._check_additivity(archive.samples)
        if not self.explainers:
            raise ArchiveError(f"{self.name}-{self.version}: no method left to serve: "
                               + "; ".join(self.refused_methods.values()))
        if self.default_method not in self.explainers:
            self.default_method = next(iter(self.explainers))
        self.graph_reports: dict[str, CaptureReport] = {}
        if capture is None and self.device.type == "cuda":
            capture = cuda_graph_capture
        if capture is not None and graph_batch_sizes:
            self._capture_graphs(graph_batch_sizes, capture)

    @property
    def labels(self) -> list[str]:
        return self.parts.labels

    @property
    def execution_provider(self) -> str:
        """Where the forward pass runs: ONNX Runtime's provider (e.g. "CUDAExecutionProvider"), or torch's device."""
        return self._upstream.provider if self.backend == "onnx" else str(self.device)

    def predict(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, *input_shape) -> logits (B, K) on the CPU."""
        with torch.inference_mode():
            return self._downstream(self._backbone(self._upstream, self._to_device(inputs))).float().cpu()

    def predict_rows(self, inputs: list[torch.Tensor]) -> tuple[list[Scores | InvalidInputError], dict[str, float]]:
        """A batch of inputs, each (*input_shape) -> per input its ranked logits, or an error where they are
        not finite; and the seconds spent in the "forward" stage and in making the host rows ("rows")."""
        start = self._clock()
        logits = self.predict(torch.stack(inputs))
        forward_done = time.perf_counter()
        rows = predicted_rows(logits)
        return rows, {"forward": forward_done - start, "rows": time.perf_counter() - forward_done}

    def explain_rows(self, method: str, items: list[ExplainItem], heatmaps: str,
                     ) -> tuple[list[ExplainedRow | InvalidInputError], dict[str, float]]:
        """A batch explained with one method -> per item its row (with its own interventions only, and
        whether an additive method adds up), or an error where its numbers are not finite; and the
        seconds spent in the "forward" and "explain" stages (see :meth:`explain`) and in making the host
        rows ("rows")."""
        logits, explanation, timings = self.explain(method, items, heatmaps)
        start = time.perf_counter()
        n_interventions = [len(item.suppress) for item in items]
        rows = explained_rows(logits, explanation, n_interventions, self.explainers[method].additive)
        return rows, {**timings, "rows": time.perf_counter() - start}

    def explain(self, method: str, items: list[ExplainItem], heatmaps: str,
                ) -> tuple[torch.Tensor, Explanation, dict[str, float]]:
        """Explain a batch with one method.

        ``heatmaps`` is "none", "feature_grid" or "input" (contribution densities), or "presence_feature_grid"
        or "presence_input" (presence maps, for an explainer that draws them). Returns the logits (B, K) and the
        explanation, both on the CPU, and the seconds spent in the "forward" and "explain"
        stages (the device synchronized at each boundary, so GPU time is counted where it is spent).
        """
        start = self._clock()
        explainer = self.explainers[method]
        inputs = self._to_device(torch.stack([item.input for item in items]))
        n_interventions = max((len(item.suppress) for item in items), default=0)
        # Filled in numpy: an indexed assignment costs about 1 µs there and 5-10 in torch.
        suppress = np.zeros((len(items), n_interventions, len(explainer.components)), dtype=bool)
        for b, item in enumerate(items):
            for m, indices in enumerate(item.suppress):
                suppress[b, m, indices] = True
        suppress = self._to_device(torch.from_numpy(suppress))
        # The components some intervention names, read on the host (no nonzero on the device), for an additive
        # method: only those decompose them; a removal method runs each intervention as it is.
        suppressed = None
        if explainer.additive:
            n_components = len(explainer.components)
            suppressed = self._to_device(torch.tensor(sorted({int(index) % n_components for item in items
                                                              for indices in item.suppress for index in indices}),
                                                      dtype=torch.int64))
        # The targets given, and whether the predicted class is needed (a target of None or below 0).
        given = [item.target if item.target is not None and item.target >= 0 else None for item in items]
        predicted = [target is None for target in given]
        # Gradient methods (Grad-CAM rules before a head that is not linear) need the torch parts.
        torch_parts = explainer.needs_grad or self.backend == "torch"
        upstream, downstream = ((self.parts.upstream, self.parts.downstream) if torch_parts
                                else (self._upstream, self._downstream))
        # A method that reads other layers gets them from the same forward pass (torch parts only).
        tapped = torch_parts and explainer.tapped_upstream is not None
        # Gradients are taken from the explained layer on (Grad-CAM): the upstream records no graph.
        with torch.no_grad() if explainer.needs_grad else torch.inference_mode():
            out = self._backbone(explainer.tapped_upstream if tapped else upstream, inputs)
        with torch.enable_grad() if explainer.needs_grad else torch.inference_mode():
            features, taps = (out[0], tuple(out[1:])) if tapped else (out, None)
            if explainer.needs_grad:
                features.requires_grad_(True)
            logits = downstream(features)
            forward_done = self._clock()
            target_logit = None
            if all(predicted):  # the predicted classes and their logits in one op
                target_logit, targets = logits.detach().float().max(1)
            elif not any(predicted):
                targets = torch.tensor(given, device=self.device)
            else:
                targets = torch.tensor([-1 if target is None else target for target in given], device=self.device)
                targets = torch.where(targets < 0, logits.argmax(1), targets)
            presence = heatmaps.startswith("presence_")
            explanation = explainer.explain(ExplainBatch(
                inputs=inputs, features=features, logits=logits, targets=targets,
                suppress=suppress, heatmaps=heatmaps != "none", taps=taps,
                heatmap_kind="presence" if presence else "contribution", suppressed=suppressed,
                target_logit=target_logit))
            if heatmaps.endswith("input") and explanation.heatmaps is not None:
                # A density keeps its sum (its contribution); a presence map its values.
                explanation.heatmaps = self._to_input_size(explanation.heatmaps, keep_sum=not presence)
                if explanation.residual_heatmap is not None:
                    explanation.residual_heatmap = self._to_input_size(
                        explanation.residual_heatmap.unsqueeze(1), keep_sum=False).squeeze(1)
        result = _to_host(logits, explanation)
        return *result, {"forward": forward_done - start, "explain": self._clock() - forward_done}

    def _capture_graphs(self, sizes: tuple[int, ...], capture: Capture) -> None:
        """Each method's graphs; a method whose capture fails runs eagerly (logged): graphs only save launches."""
        for method, explainer in self.explainers.items():
            try:
                report = explainer.capture_graphs(sizes, capture)
            except RuntimeError as exc:
                log.warning("%s-%s: %s runs eagerly, its graphs could not be captured: %s",
                            self.name, self.version, method, exc)
                continue
            if report is not None:
                self.graph_reports[method] = report

    def _check_onnx_parts(self, samples: HeldOutSamples | None) -> None:
        """Refuse ONNX parts that do not compute what the torch parts do: the weight hash, the layer shape and the
        factorizations are checked against the torch parts, and nothing else binds the ONNX ones to them. Both run
        on the held-out samples (else synthetic inputs); features and logits must agree within
        ``ONNX_AGREEMENT_RTOL`` of the torch part's largest magnitude."""
        inputs = self._to_device(samples.inputs if samples is not None else synthetic_inputs(self.parts.input_spec))
        with torch.inference_mode():
            features = self.parts.upstream(inputs)
            expected = {"upstream": features, "downstream": self.parts.downstream(features)}
            try:
                computed = {"upstream": self._upstream(inputs), "downstream": self._downstream(features)}
            except Exception as exc:  # ONNX Runtime's errors derive from Exception alone
                raise ArchiveError(f"{self.name}-{self.version}: the ONNX parts do not run on the model's inputs and "
                                   f"features: {type(exc).__name__}: {exc}") from exc
        for part, want in expected.items():
            want, got = want.float(), computed[part].float()
            if got.shape != want.shape:
                raise ArchiveError(f"{self.name}-{self.version}: the ONNX {part} part gives shape {list(got.shape[1:])}, "
                                   f"the torch part {list(want.shape[1:])}")
            gap, scale = float((got - want).abs().max()), float(want.abs().max())
            if not gap <= ONNX_AGREEMENT_RTOL * scale:  # NaN fails too
                raise ArchiveError(f"{self.name}-{self.version}: the ONNX {part} part differs from the torch part by "
                                   f"{gap:.4g}, more than {ONNX_AGREEMENT_RTOL} of its largest magnitude {scale:.4g}")

    def _check_additivity(self, samples: HeldOutSamples | None) -> dict[str, str]:
        """Explain the held-out samples (their true classes), else synthetic inputs, with every
        additive method; remove each one that does not add up. Returns method -> why."""
        additive = [method for method, explainer in self.explainers.items() if explainer.additive]
        if not additive:
            return {}
        if samples is not None:
            inputs, targets = samples.inputs, samples.labels.tolist()
            self.additivity_inputs = f"{len(inputs)} held-out samples"
        else:
            inputs = synthetic_inputs(self.parts.input_spec)
            targets = [None] * len(inputs)
            self.additivity_inputs = f"{len(inputs)} synthetic inputs (seeded; the archive has no held-out samples)"
        items = [ExplainItem(x, target, []) for x, target in zip(inputs, targets)]
        refused = {}
        for method in additive:
            gaps, adds_up = [], []
            for start in range(0, len(items), CHECK_BATCH):
                _, explanation, _ = self.explain(method, items[start:start + CHECK_BATCH], "none")
                gap, ok = additivity_gaps(explanation)
                gaps.append(gap)
                adds_up.append(ok)
            gap, ok = np.concatenate(gaps), np.concatenate(adds_up)
            if not ok.all():
                refused[method] = (f"method {method!r} is additive, but on {int((~ok).sum())} of "
                                   f"{self.additivity_inputs} its contributions + residual + bias miss the target "
                                   f"logit (largest gap {gap.max():.4g}); {self._likely_cause(inputs)}")
                del self.explainers[method]
        return refused

    def _likely_cause(self, inputs: torch.Tensor) -> str:
        negative = (self.parts.features(inputs) < 0).float().mean().item()
        if negative > 0:
            return (f"cause: the explained layer {self.parts.layer!r} is signed ({negative:.0%} of its features "
                    f"are negative there), and the decomposition holds only for non-negative features: package "
                    f"the method at a layer after a ReLU")
        return "cause: the factorization does not reproduce the model's head; refit the method"

    def _to_device(self, inputs: torch.Tensor) -> torch.Tensor:
        """Host tensor -> device; to a GPU from page-locked memory, so the copy is asynchronous."""
        if self.device.type != "cuda":
            return inputs
        return inputs.pin_memory().to(self.device, non_blocking=True)

    def _backbone(self, upstream, inputs: torch.Tensor):
        """The explained layer's features (and any taps), float32; computed under autocast when configured."""
        if self.autocast_dtype is None:
            return upstream(inputs)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype):
            out = upstream(inputs)
        return tuple(t.float() for t in out) if isinstance(out, tuple) else out.float()

    def _clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _to_input_size(self, maps: torch.Tensor, keep_sum: bool = True) -> torch.Tensor:
        """(B, C, h, w) -> (B, C, H, W) at the input's size, bilinear; ``keep_sum``: rescaled so each map
        keeps its sum."""
        shape = self.parts.input_spec.shape
        if len(shape) != 3:
            return maps
        size = tuple(shape[1:])
        up = F.interpolate(maps.float(), size=size, mode="bilinear", align_corners=False)
        return up * (maps.shape[2] * maps.shape[3]) / (size[0] * size[1]) if keep_sum else up


def _to_host(logits: torch.Tensor, explanation: Explanation) -> tuple[torch.Tensor, Explanation]:
    """The logits and the explanation on the CPU, detached, floating fields as float32. From a GPU every
    field is copied without waiting (into page-locked memory) and the host waits once, not once a field."""
    def host(t: torch.Tensor) -> torch.Tensor:
        if t.device.type == "cpu" and not t.requires_grad and (t.dtype == torch.float32 or not t.is_floating_point()):
            return t  # as it is: three calls fewer a field on the CPU
        return (t.detach().float() if t.is_floating_point() else t.detach()).to("cpu", non_blocking=True)

    fields = {k: host(v) if torch.is_tensor(v) else v for k, v in vars(explanation).items()}
    logits = host(logits)
    if explanation.target_class.is_cuda:
        torch.cuda.current_stream(explanation.target_class.device).synchronize()  # the copies have landed
    return logits, Explanation(**fields)
