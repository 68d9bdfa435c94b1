"""The client raises one exception type, ExplainerError, for every failed rpc (a real server on loopback)."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from protoserve_client import ExplainerClient, ExplainerError, pb

from conftest import free_port

DIGIT = np.zeros((1, 28, 28), np.float32)


def _raised(call) -> ExplainerError:
    with pytest.raises(ExplainerError) as caught:
        call()
    return caught.value


def test_an_unknown_model_is_not_found_with_no_field(client):
    error = _raised(lambda: client.explain(DIGIT, model="no-such-model"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.field() == ""
    assert error.details() == "model 'no-such-model' not found; known: ecg, mnist"
    assert str(error) == "NOT_FOUND: model 'no-such-model' not found; known: ecg, mnist"
    # Code written against the raw stubs' errors keeps working.
    assert isinstance(error, grpc.RpcError)


def test_a_bad_field_is_invalid_argument_naming_the_field(client):
    error = _raised(lambda: client.predict(np.zeros((3, 3), np.float32), model="mnist"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.field() == "input.shape"
    assert error.details().startswith("input.shape: ")


def test_get_model_and_list_models_raise_it_too(client):
    assert _raised(lambda: client.get_model("mnist", version="999")).code() == grpc.StatusCode.NOT_FOUND


def test_a_closed_port_is_unavailable():
    with ExplainerClient(f"127.0.0.1:{free_port()}", timeout=5) as unreachable:
        error = _raised(unreachable.list_models)
        assert error.code() == grpc.StatusCode.UNAVAILABLE and error.field() == ""
        stream = unreachable.explain_stream([pb.ExplainRequest(model="mnist")], timeout=5)
        assert _raised(lambda: list(stream)).code() == grpc.StatusCode.UNAVAILABLE
