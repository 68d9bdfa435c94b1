"""ONNX Runtime as an alternative backend for the model's two parts.

Archives may carry ONNX exports of the upstream and downstream parts (``protoserve
package --onnx``); a server started with ``--backend onnx`` (or an archive whose manifest
prefers it) then runs the forward pass, the part every request pays for, in ONNX Runtime:
the CUDA provider when present, else the CPU provider. Explanation math stays in torch,
and methods that need autograd or run the downstream on edited features keep the torch
parts, so both backends give the same explanations (within 1e-4).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

ONNX_OPSET = 17


def export_part(part: nn.Module, example: torch.Tensor) -> bytes:
    """One part as ONNX bytes, with a dynamic batch dimension. (B, *in) -> (B, *out)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter warns that a newer one exists
        torch.onnx.export(part.eval(), (example,), buffer, dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return buffer.getvalue()


class OnnxPart:
    """A part run by ONNX Runtime, called like the torch module it replaces."""

    def __init__(self, model_bytes: bytes, device: torch.device):
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # Idle intra-op threads would busy-wait after each run and take the cores from the torch
        # explanation math that follows (BENCHMARKS.md, onnx_over_torch).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(model_bytes, options, providers=providers)
        self.device = device

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).numpy()
        (out,) = self.session.run(["output"], {"input": np.ascontiguousarray(array)})
        return torch.from_numpy(out).to(self.device)
