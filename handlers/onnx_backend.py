"""ONNX Runtime as an alternative backend for the model's two parts.

Archives may carry ONNX exports of the upstream and downstream parts (``protoserve
package --backend onnx``); a server started with ``--backend onnx`` (or an archive whose
manifest prefers it) then runs the forward pass, the part every request pays for, in ONNX
Runtime: on a CUDA device with the CUDA provider when ONNX Runtime has it (the ``gpu`` extra,
``onnxruntime-gpu``), else with the CPU provider (the ``cpu`` extra). Explanation math stays
in torch, and methods that need autograd or run the downstream on edited features keep the
torch parts, so both backends give the same explanations (within 1e-4).
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from handlers.errors import ArchiveError

ONNX_OPSET = 17
CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"

log = logging.getLogger(__name__)


def export_part(part: nn.Module, example: torch.Tensor) -> bytes:
    """One part as ONNX bytes, with a dynamic batch dimension. (B, *in) -> (B, *out)."""
    buffer = io.BytesIO()
    part.eval()(example)  # a GraphProgram vets an input shape (in grad mode, as the tracer runs) before it is traced
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter warns that a newer one exists
        torch.onnx.export(part.eval(), (example,), buffer, dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return buffer.getvalue()


def check_onnx_part(data: bytes, part: str) -> None:
    """Refuse ONNX bytes that read tensors from outside themselves (raise :class:`ArchiveError`).

    ONNX Runtime loads a tensor stored as external data from the file it names, relative to the
    server's working directory for a session built from bytes: an archive could read any file the
    server can and return its bytes as logits. Every tensor (initializers, sparse ones, node attributes,
    in subgraphs, functions and training graphs) must hold its data inline.
    """
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.ModelProto.FromString(data)
    except (DecodeError, RecursionError) as exc:
        raise ArchiveError(f"model/{part}.onnx is not an ONNX model: {exc}") from exc
    for tensor in _model_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.external_data:
            raise ArchiveError(f"model/{part}.onnx: tensor {tensor.name[:64]!r} keeps its data outside the archive "
                               "(ONNX external data); every tensor of an ONNX part must be stored in it")


def _model_tensors(model) -> Iterator:
    """Every TensorProto of an ONNX ModelProto."""
    yield from _graph_tensors(model.graph)
    for info in model.training_info:
        yield from _graph_tensors(info.initialization)
        yield from _graph_tensors(info.algorithm)
    for function in model.functions:
        for node in function.node:
            yield from _attribute_tensors(node.attribute)
        yield from _attribute_tensors(function.attribute_proto)


def _graph_tensors(graph) -> Iterator:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        yield from _attribute_tensors(node.attribute)


def _attribute_tensors(attributes) -> Iterator:
    for attribute in attributes:
        yield attribute.t
        yield from attribute.tensors
        for sparse in (attribute.sparse_tensor, *attribute.sparse_tensors):
            yield from (sparse.values, sparse.indices)
        for graph in (attribute.g, *attribute.graphs):
            yield from _graph_tensors(graph)


def choose_providers(device: torch.device, available: Sequence[str]) -> list[str | tuple[str, dict]]:
    """ONNX Runtime's providers for a part on ``device``, best first, from the ``available`` ones.

    The CUDA provider on the device's GPU when the device is CUDA and ONNX Runtime has the
    provider; the CPU provider always, as the fallback.
    """
    if device.type != "cuda":
        return [CPU_PROVIDER]
    if CUDA_PROVIDER not in available:
        log.warning("ONNX Runtime has no %s (available: %s): the forward pass runs on the CPU; install "
                    "protoserve[gpu] (onnxruntime-gpu) to run it on %s", CUDA_PROVIDER, ", ".join(available), device)
        return [CPU_PROVIDER]
    return [(CUDA_PROVIDER, {"device_id": device.index or 0}), CPU_PROVIDER]


def _onnxruntime():
    """The onnxruntime module. It comes from an extra, `cpu` (onnxruntime) or `gpu` (onnxruntime-gpu): the
    two packages provide the same module and exclude each other, so neither is a plain dependency."""
    try:
        import onnxruntime
    except ImportError as error:
        raise ArchiveError("the ONNX backend needs ONNX Runtime: install protoserve[cpu] or protoserve[gpu], "
                           "or serve with --backend torch") from error
    return onnxruntime


class OnnxPart:
    """A part run by ONNX Runtime, called like the torch module it replaces."""

    def __init__(self, model_bytes: bytes, device: torch.device):
        ort = _onnxruntime()
        providers = choose_providers(device, ort.get_available_providers())
        if providers[0] != CPU_PROVIDER:
            # onnxruntime-gpu finds the CUDA and cuDNN libraries that torch's wheels installed.
            ort.preload_dlls()
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # Idle intra-op threads would busy-wait after each run and take the cores from the torch
        # explanation math that follows (BENCHMARKS.md, onnx_over_torch).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(model_bytes, options, providers=providers)
        self.device = device
        # What the session runs on: ONNX Runtime drops a provider it could not start (a CUDA library missing).
        self.provider = self.session.get_providers()[0]
        chosen = providers[0] if isinstance(providers[0], str) else providers[0][0]
        log.log(logging.INFO if self.provider == chosen else logging.WARNING,
                "ONNX Runtime runs a part on %s (device %s, chosen %s)", self.provider, device, chosen)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).numpy()
        (out,) = self.session.run(["output"], {"input": np.ascontiguousarray(array)})
        return torch.from_numpy(out).to(self.device)
