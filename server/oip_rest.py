"""The Open Inference Protocol's HTTP/REST binding (KServe v2), JSON and Triton's binary tensor extension:
conversion only, between a request body and server/oip_infer.py's plain values, and back.

Infer request: a JSON object ``{"id", "parameters", "inputs": [{"name", "shape", "datatype",
"parameters", "data"}], "outputs": [{"name", "parameters"}]}``; ``data`` holds the tensor's numbers
row-major, flat or nested. With the binary extension, the body is that JSON (its length in the
``Inference-Header-Content-Length`` header) followed by the inputs' bytes in order, each input naming
its length in ``parameters.binary_data_size`` instead of sending ``data``.

Infer response: ``{"id", "model_name", "model_version", "parameters": {"method"}, "outputs": [{"name",
"datatype", "shape", "data"}]}``; an output asked for in binary (``parameters.binary_data: true`` on
the output, or ``binary_data_output: true`` on the request for every output) has
``parameters.binary_data_size`` instead of ``data``, its bytes after the JSON, and the response names
the JSON's length in ``Inference-Header-Content-Length``. BYTES travel as 4-byte little-endian
length-prefixed strings in binary, as strings in JSON.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from handlers.errors import InvalidInputError, clip, echo
from handlers.runtime import ModelRuntime
from server import oip_infer
from server.http_server import byte_count
from server.oip_infer import InferOutputs, InferRequest, InputTensor

HEADER_LENGTH = "inference-header-content-length"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"
EXTENSIONS = ["parameters", "binary_tensor_data"]
# An answer's numbers are written this many to a json.dumps call: one call holds the GIL throughout (so
# the event loop too, from any thread); this many take a few ms.
JSON_CHUNK_NUMBERS = 1 << 13
# At most the characters of a number in JSON with its comma: a float32 as its double's shortest repr.
JSON_NUMBER_BYTES = 25


@dataclass(frozen=True)
class RestInferRequest:
    """An infer request, and in which outputs the answer goes in binary (by name; None: the request's
    ``binary_data_output``)."""

    request: InferRequest
    binary_output: bool
    binary_outputs: dict[str, bool]

    def in_binary(self, output: str) -> bool:
        return self.binary_outputs.get(output, self.binary_output)


def parse_infer(model: str, version: str, body: bytes, header_length: str) -> RestInferRequest:
    """A request body (``header_length``: the Inference-Header-Content-Length header, "" if absent)."""
    if header_length:
        split = byte_count(header_length)
        if split is None or split > len(body):
            raise InvalidInputError("Inference-Header-Content-Length",
                                    f"must be a number of bytes of at most the body's {len(body)}")
        head, binary = body[:split], memoryview(body)[split:]
    else:
        head, binary = body, memoryview(b"")
    try:
        document = json.loads(head)
    except (ValueError, RecursionError) as error:  # not UTF-8, not JSON, or nested past the parser's depth
        raise InvalidInputError("request", f"not a JSON object: {echo(str(error))}") from None
    _check(document, dict, "request", "an object")
    _check(document.get("id", ""), str, "id", "a string")
    parameters = _parameters(document.get("parameters", {}), "parameters")
    binary_output = parameters.pop("binary_data_output", False)
    _check(binary_output, bool, "parameters.binary_data_output", "a bool")
    inputs = _check(document.get("inputs"), list, "inputs", "a list of tensors")
    tensors, offset = [], 0
    for i, entry in enumerate(inputs):
        tensor, size = _input(entry, i, binary, offset)
        tensors.append(tensor)
        offset += size
    if offset != len(binary):
        raise InvalidInputError("Inference-Header-Content-Length",
                                f"the body has {len(binary)} bytes of binary data, the inputs name {offset}")
    names, binary_outputs = [], {}
    for i, entry in enumerate(_check(document.get("outputs", []), list, "outputs", "a list")):
        _check(entry, dict, f"outputs[{i}]", "an object")
        names.append(_check(entry.get("name"), str, f"outputs[{i}].name", "a string"))
        output_parameters = _parameters(entry.get("parameters", {}), f"outputs[{i}].parameters")
        if "binary_data" in output_parameters:
            binary_outputs[names[-1]] = _check(output_parameters.pop("binary_data"), bool,
                                               f"outputs[{i}].parameters.binary_data", "a bool")
        if output_parameters:
            raise InvalidInputError(f"outputs[{i}].parameters.{clip(next(iter(output_parameters)))}",
                                    "unknown output parameter; known: binary_data")
    request = InferRequest(model, version, document.get("id", ""), tensors, parameters, names)
    return RestInferRequest(request, binary_output, binary_outputs)


def _check(value, kind: type, field: str, what: str):
    if type(value) is not kind:  # not isinstance: a bool is no int
        raise InvalidInputError(field, f"must be {what}")
    return value


def _parameters(value, field: str) -> dict[str, object]:
    _check(value, dict, field, "an object")
    for name, parameter in value.items():
        if type(parameter) not in (str, bool, int, float):
            raise InvalidInputError(f"{field}.{clip(name)}", "must be a string, bool or number")
    return dict(value)


def _input(entry, i: int, binary: memoryview, offset: int) -> tuple[InputTensor, int]:
    """An input tensor, and the number of bytes of binary data it takes from ``offset``."""
    _check(entry, dict, f"inputs[{i}]", "an object")
    name = _check(entry.get("name"), str, f"inputs[{i}].name", "a string")
    datatype = _check(entry.get("datatype"), str, f"inputs[{i}].datatype", "a string")
    shape = _check(entry.get("shape"), list, f"inputs[{i}].shape", "a list of integers")
    if not all(type(n) is int for n in shape):
        raise InvalidInputError(f"inputs[{i}].shape", "must be a list of integers")
    parameters = _parameters(entry.get("parameters", {}), f"inputs[{i}].parameters")
    size = parameters.pop("binary_data_size", None)
    if parameters:
        raise InvalidInputError(f"inputs[{i}].parameters.{clip(next(iter(parameters)))}",
                                "unknown input parameter; known: binary_data_size")
    if size is not None:
        if type(size) is not int or not 0 <= size <= len(binary) - offset:
            raise InvalidInputError(f"inputs[{i}].parameters.binary_data_size",
                                    f"must be a number of bytes of at most the {len(binary) - offset} left in the body")
        if "data" in entry:
            raise InvalidInputError(f"inputs[{i}].data", "send data or parameters.binary_data_size, not both")
        return InputTensor(name, datatype, shape, raw=bytes(binary[offset:offset + size]),
                           field=f"inputs[{i}].parameters.binary_data_size"), size
    if "data" not in entry:
        return InputTensor(name, datatype, shape, field=f"inputs[{i}].data",
                           absent="no data (send data, or binary data with parameters.binary_data_size)"), 0
    return InputTensor(name, datatype, shape, values=_numbers(entry["data"], datatype, f"inputs[{i}].data"),
                       field=f"inputs[{i}].data"), 0


def _numbers(data, datatype: str, field: str) -> np.ndarray:
    """``data`` (numbers, flat or nested in lists) -> a flat array of ``datatype``'s dtype (float64 for a
    datatype the model refuses), each number checked. Iterative: nesting costs no recursion (the body's
    size bounds it). The array takes 1 to 4 bytes a number where Python's floats took 32 (docs/limits.md)."""
    if type(data) is not list:
        raise InvalidInputError(field, "must be a list of numbers (flat, or nested row-major)")
    integers = datatype == "UINT8"
    flat, stack = [], [iter(data)]
    while stack:
        for value in stack[-1]:
            kind = type(value)  # not isinstance: a bool is no number here
            if kind is list:
                stack.append(iter(value))
                break
            if not (kind is int or (kind is float and not integers)):
                raise InvalidInputError(field, f"{datatype} data must be {'integers' if integers else 'numbers'}, "
                                               f"got {echo(json.dumps(value))}")
            if integers and not 0 <= value <= 255:
                raise InvalidInputError(field, f"{datatype} values must be in [0, 255]")
            flat.append(value)
        else:
            stack.pop()
    try:
        with np.errstate(over="ignore"):  # a number beyond float32 becomes inf, which the data plane refuses
            return np.array(flat, dtype=oip_infer.INPUT_DATATYPES.get(datatype, np.float64))
    except OverflowError:  # an integer that no float holds
        raise InvalidInputError(field, "a value is beyond any float") from None


# ------------------------------------------------------------------------ responses


def infer_response(request: RestInferRequest, result: InferOutputs) -> tuple[bytes, int | None]:
    """The response body, and the length of its JSON part when binary data follows it (else None)."""
    runtime = result.runtime
    document: dict = {"id": request.request.id, "model_name": runtime.name, "model_version": runtime.version}
    if result.method:
        document["parameters"] = {"method": result.method}
    # The JSON in pieces, joined once: a copy of a large answer holds the GIL too.
    head, binaries = [_open_object(document), b',"outputs":['], []
    for i, output in enumerate(result.outputs):
        entry = {"name": output.name, "datatype": output.datatype, "shape": list(output.array.shape)}
        head.append(b"," if i else b"")
        if request.in_binary(output.name):
            raw = output.raw()
            entry["parameters"] = {"binary_data_size": len(raw)}
            binaries.append(raw)
            head += [_open_object(entry), b"}"]
        else:
            head += [_open_object(entry), b',"data":[', *_json_numbers(output.array), b"]}"]
    head.append(b"]}")
    if not binaries:
        return b"".join(head), None
    return b"".join(head + binaries), sum(map(len, head))


def answer_json_bytes(request: RestInferRequest, result: InferOutputs) -> int:
    """At most about how many bytes the answer's JSON takes: its numbers (and component ids, as short)."""
    return JSON_NUMBER_BYTES * sum(output.array.size for output in result.outputs if not request.in_binary(output.name))


def _open_object(fields: dict) -> bytes:
    """The JSON object of ``fields`` (not empty) without its closing brace: more members follow."""
    return json.dumps(fields, separators=(",", ":"), allow_nan=False)[:-1].encode()


def _json_numbers(array: np.ndarray) -> list[bytes]:
    """``array``'s values, flat, as the items of a JSON list, in pieces of JSON_CHUNK_NUMBERS (a
    json.dumps call each)."""
    flat = array.reshape(-1)
    return [(b"," if start else b"") + json.dumps(flat[start:start + JSON_CHUNK_NUMBERS].tolist(),
                                                  separators=(",", ":"), allow_nan=False)[1:-1].encode()
            for start in range(0, flat.size, JSON_CHUNK_NUMBERS)]


def model_metadata(runtime: ModelRuntime, versions: Sequence[str]) -> dict:
    name, datatype, shape = oip_infer.input_metadata(runtime)
    return {"name": runtime.name, "versions": list(versions), "platform": oip_infer.PLATFORM,
            "inputs": [{"name": name, "datatype": datatype, "shape": shape}],
            "outputs": [{"name": n, "datatype": d, "shape": s} for n, d, s in oip_infer.output_metadata(runtime)]}


def server_metadata() -> dict:
    return {"name": oip_infer.SERVER_NAME, "version": oip_infer.server_version(), "extensions": EXTENSIONS}
