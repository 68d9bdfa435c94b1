"""protoserve-client: a torch-free client for the protoserve explanation service.

`pb` and `pb_grpc` are the generated messages and service stubs of `protoserve.v1`
(``from protoserve_client import pb, pb_grpc``); `ExplainerClient` is the typed client, and
every rpc it makes that fails raises `ExplainerError` (status code, field at fault, message).
"""

from protoserve_client.stubs.protoserve.v1 import explainer_pb2 as pb
from protoserve_client.stubs.protoserve.v1 import explainer_pb2_grpc as pb_grpc
from protoserve_client.client import (
    ADDITIVITY_RTOL,
    ExplainerClient,
    ExplainerError,
    ExplainStream,
    additivity_gap,
    check_additive,
    explain_request,
    heatmap_arrays,
    predict_request,
)
from protoserve_client.tensors import TensorFormatError, from_tensor, to_tensor

__all__ = [
    "ADDITIVITY_RTOL",
    "ExplainStream",
    "ExplainerClient",
    "ExplainerError",
    "TensorFormatError",
    "additivity_gap",
    "check_additive",
    "explain_request",
    "from_tensor",
    "heatmap_arrays",
    "pb",
    "pb_grpc",
    "predict_request",
    "to_tensor",
]
