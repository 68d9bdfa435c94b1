"""A typed client for the `protoserve.v1.Explainer` service.

Responses are returned as the protobuf messages themselves: they are the typed contract
(see explainer_pb2.pyi). Every failed rpc raises `ExplainerError`, which carries the status
code, the request field at fault and the server's message.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Literal, TypeVar

import grpc
import numpy as np
from google.protobuf.message import Message

from protoserve_client.stubs.protoserve.v1 import explainer_pb2 as pb
from protoserve_client.stubs.protoserve.v1 import explainer_pb2_grpc as pb_grpc
from protoserve_client.tensors import from_tensor, to_tensor

DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# float32 rounding over a few hundred components stays far below this.
ADDITIVITY_RTOL = 1e-4

# The trailer in which the server names the request field at fault (INVALID_ARGUMENT).
FIELD_TRAILER = "protoserve-field"

# feature_grid and input: contribution densities; presence_*: where each component is present, and the
# residual's map (ExplainResponse.residual_heatmap), for methods whose MethodInfo says presence_maps.
HeatmapName = Literal["feature_grid", "input", "none", "presence_feature_grid", "presence_input"]
HEATMAP_MODES: dict[str, int] = {
    "none": pb.HEATMAP_MODE_NONE,
    "feature_grid": pb.HEATMAP_MODE_FEATURE_GRID,
    "input": pb.HEATMAP_MODE_INPUT,
    "presence_feature_grid": pb.HEATMAP_MODE_PRESENCE_FEATURE_GRID,
    "presence_input": pb.HEATMAP_MODE_PRESENCE_INPUT,
}

InputArray = np.ndarray | pb.Tensor
Response = TypeVar("Response", bound=Message)


class ExplainerError(grpc.RpcError):
    """An rpc that failed: refused by the server, or the server could not be reached.

    ``code()`` is the `grpc.StatusCode` (e.g. INVALID_ARGUMENT, NOT_FOUND, UNAVAILABLE),
    ``field()`` the request field at fault ("" when the error is not about one field) and
    ``details()`` the message. It is a `grpc.RpcError` with the methods of a failed call, so
    code written against the raw stubs' errors keeps working.
    """

    def __init__(self, code: grpc.StatusCode, details: str, field: str = ""):
        super().__init__(f"{code.name}: {details}")
        self._code, self._details, self._field = code, details, field

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> ExplainerError:
        """Read the status, details and field trailer of a failed call."""
        # A failed call is also a grpc.Call; a bare RpcError (never raised by grpcio itself) has no status.
        if not isinstance(error, grpc.Call):
            return cls(grpc.StatusCode.UNKNOWN, str(error))
        field = dict(error.trailing_metadata() or ()).get(FIELD_TRAILER, "")
        return cls(error.code(), error.details() or "", field)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def field(self) -> str:
        return self._field


def _input_fields(input: InputArray | None, image: bytes | None) -> dict[str, object]:
    """The request's `input` or `image` field: exactly one of them must be given."""
    if (input is None) == (image is None):
        raise ValueError("give exactly one of `input` (an array) and `image` (encoded PNG/JPEG bytes)")
    if image is not None:
        return {"image": bytes(image)}
    # A ready Tensor is passed through untouched, so callers can send any bytes they like.
    return {"input": input if isinstance(input, pb.Tensor) else to_tensor(input, field="input")}


def predict_request(
    input: InputArray | None = None,
    *,
    image: bytes | None = None,
    model: str,
    version: str = "",
    top_k: int = 5,
    request_id: str = "",
) -> pb.PredictRequest:
    """Build a PredictRequest; `input` is one example without batch dimension."""
    return pb.PredictRequest(
        model=model, version=version, top_k=top_k, request_id=request_id, **_input_fields(input, image)
    )


def explain_request(
    input: InputArray | None = None,
    *,
    image: bytes | None = None,
    model: str,
    version: str = "",
    method: str = "",
    top_k: int = 5,
    target_class: int | None = None,
    heatmaps: HeatmapName = "feature_grid",
    interventions: Iterable[Sequence[str]] = (),
    request_id: str = "",
    neighbours: int = 0,
) -> pb.ExplainRequest:
    """Build an ExplainRequest (also what `ExplainerClient.explain_stream` consumes).

    `target_class=None` leaves the target unset (the predicted class); `interventions` is a
    list of sets of component ids, each set suppressed together in one intervened prediction;
    `neighbours` asks for that many nearest probe examples (methods with a neighbour view, e.g.
    coupled_nmf), each with its PNG.
    """
    if heatmaps not in HEATMAP_MODES:
        raise ValueError(f"heatmaps must be one of {', '.join(HEATMAP_MODES)}, not {heatmaps!r}")
    suppress_sets = []
    for ids in interventions:
        # A bare string would silently become one id per character.
        if isinstance(ids, str):
            raise TypeError(f"each intervention is a list of component ids, got the string {ids!r}")
        suppress_sets.append(pb.Intervention(suppress=list(ids)))
    request = pb.ExplainRequest(
        model=model,
        version=version,
        method=method,
        top_k=top_k,
        heatmaps=HEATMAP_MODES[heatmaps],
        interventions=suppress_sets,
        request_id=request_id,
        neighbours=neighbours,
        **_input_fields(input, image),
    )
    if target_class is not None:
        request.target_class = target_class
    return request


class ExplainerClient:
    """Client for one server; use as a context manager, or call `close()`.

    `timeout` (seconds, None for none) is the deadline of every unary call. `credentials`
    switch to a TLS channel; `token` is sent as ``authorization: Bearer <token>`` metadata on
    every call (over an insecure channel it travels in clear text).
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout: float | None = 10.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
    ) -> None:
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        if credentials is None:
            self._channel = grpc.insecure_channel(address, options=options)
        else:
            self._channel = grpc.secure_channel(address, credentials, options=options)
        self._stub = pb_grpc.ExplainerStub(self._channel)
        self._timeout = timeout
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()

    @property
    def stub(self) -> pb_grpc.ExplainerStub:
        """The generated stub on this channel, for requests built by hand."""
        return self._stub

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ExplainerClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def predict(
        self,
        input: InputArray | None = None,
        *,
        image: bytes | None = None,
        model: str,
        version: str = "",
        top_k: int = 5,
        request_id: str = "",
    ) -> pb.PredictResponse:
        """The bare prediction for one example: `input` (array or Tensor) or `image` bytes."""
        request = predict_request(
            input, image=image, model=model, version=version, top_k=top_k, request_id=request_id
        )
        return self._unary(self._stub.Predict, request)

    def explain(
        self,
        input: InputArray | None = None,
        *,
        image: bytes | None = None,
        model: str,
        version: str = "",
        method: str = "",
        top_k: int = 5,
        target_class: int | None = None,
        heatmaps: HeatmapName = "feature_grid",
        interventions: Iterable[Sequence[str]] = (),
        request_id: str = "",
        neighbours: int = 0,
    ) -> pb.ExplainResponse:
        """The prediction for one example with its explanation; arguments as in `explain_request`."""
        request = explain_request(
            input,
            image=image,
            model=model,
            version=version,
            method=method,
            top_k=top_k,
            target_class=target_class,
            heatmaps=heatmaps,
            interventions=interventions,
            request_id=request_id,
            neighbours=neighbours,
        )
        return self._unary(self._stub.Explain, request)

    def explain_stream(
        self, requests: Iterable[pb.ExplainRequest], *, timeout: float | None = None
    ) -> ExplainStream:
        """Send `requests` over one bidirectional stream; yields answers as they finish.

        Answers are matched to requests by `request_id`; a bad request yields an answer whose
        `error` is set and the stream goes on. The stream has no deadline unless `timeout` is
        given (the client's unary timeout would cut long streams). A stream that fails as a
        whole raises `ExplainerError`; `cancel()` ends it early.
        """
        return ExplainStream(self._stub.ExplainStream(iter(requests), timeout=timeout, metadata=self._metadata))

    def list_models(self) -> pb.ListModelsResponse:
        return self._unary(self._stub.ListModels, pb.ListModelsRequest())

    def get_model(self, model: str, version: str = "") -> pb.ModelInfo:
        """The model's info with every method's components; `version=""` is the newest."""
        return self._unary(self._stub.GetModel, pb.GetModelRequest(model=model, version=version))

    def _unary(self, rpc: Callable[..., Response], request: Message) -> Response:
        try:
            return rpc(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise ExplainerError.from_rpc_error(error) from error


class ExplainStream(Iterator[pb.ExplainStreamResponse]):
    """The answers of one ExplainStream call, in the order they finish."""

    def __init__(self, call: grpc.Call):
        self._call = call  # the stub's answer: an iterator of responses and a grpc.Call

    def __next__(self) -> pb.ExplainStreamResponse:
        try:
            return next(self._call)
        except grpc.RpcError as error:
            raise ExplainerError.from_rpc_error(error) from error

    def cancel(self) -> bool:
        """End the stream now; the server stops working on it."""
        return self._call.cancel()


def heatmap_arrays(response: pb.ExplainResponse) -> dict[str, np.ndarray]:
    """Each heatmap of `response` as a float array [H, W], keyed by component id."""
    return {
        heatmap.component_id: from_tensor(heatmap.map, field=f"heatmaps[{index}].map")
        for index, heatmap in enumerate(response.heatmaps)
    }


def residual_heatmap_array(response: pb.ExplainResponse) -> np.ndarray | None:
    """The residual's map [H, W] (presence heatmap modes), or None when the response has none."""
    if not response.HasField("residual_heatmap"):
        return None
    return from_tensor(response.residual_heatmap.map, field="residual_heatmap.map")


def additivity_gap(response: pb.ExplainResponse) -> float:
    """|sum(contribution) + residual_contribution + bias - target_logit| / max(1, |target_logit|)."""
    # math.fsum: the sum is exact, so the gap measures the server's rounding, not ours.
    total = math.fsum([c.contribution for c in response.components]
                      + [response.residual_contribution, response.bias, -response.target_logit])
    return abs(total) / max(1.0, abs(response.target_logit))


def check_additive(response: pb.ExplainResponse, rtol: float = ADDITIVITY_RTOL) -> float:
    """Return `additivity_gap(response)`; raise ValueError if it exceeds `rtol`.

    Only meaningful for methods whose MethodInfo says `additive`.
    """
    gap = additivity_gap(response)
    if not gap <= rtol:  # also catches NaN
        raise ValueError(
            f"not additive: sum of {len(response.components)} contributions + residual "
            f"{response.residual_contribution:.6g} + bias {response.bias:.6g} misses target logit "
            f"{response.target_logit:.6g} by a relative {gap:.3g} > rtol {rtol:g}"
        )
    return gap
