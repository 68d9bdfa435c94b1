"""Conversion between numpy arrays and the wire `Tensor` (little-endian, row-major).

The server decodes requests with `from_tensor` too, so its errors name the field at fault
and say exactly what is wrong; they are `TensorFormatError`, a `ValueError`. What they echo of
a tensor is bounded (a shape of at most MAX_DIMS dimensions, a dtype clipped), so an error
message stays small whatever a client sent.
"""

from __future__ import annotations

import math

import numpy as np

from protoserve_client.stubs.protoserve.v1 import explainer_pb2 as pb

# Wire dtype name -> little-endian numpy dtype.
WIRE_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "uint8": np.dtype("u1"),
}
# An array's dtype (either byte order) -> its wire name; a lookup costs a tenth of reading dtype.name.
_WIRE_NAMES: dict[np.dtype, str] = {
    dtype.newbyteorder(order): name for name, dtype in WIRE_DTYPES.items() for order in "<>"
}
_INTP_MAX = np.iinfo(np.intp).max
# NumPy 1's limit (NumPy 2's is 64), so a tensor decodes the same under either.
MAX_DIMS = 32
_ECHO_CHARS = 32  # of a dtype name in an error message


class TensorFormatError(ValueError):
    """A tensor that cannot be encoded or decoded; `field` is the offending field's path."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _supported() -> str:
    return ", ".join(WIRE_DTYPES)


def to_tensor(array: np.ndarray, *, field: str = "array") -> pb.Tensor:
    """Encode `array` (float32, float16 or uint8, any shape) as a `Tensor`.

    Other dtypes are refused rather than converted, so that precision is never lost silently:
    convert first, e.g. ``array.astype(np.float32)``. `field` names the array in errors.
    """
    array = np.asarray(array)
    name = _WIRE_NAMES.get(array.dtype)
    if name is None:
        raise TensorFormatError(
            f"{field}.dtype",
            f"{field} has dtype {array.dtype.name}, not one of {_supported()}; convert it first, e.g. .astype(np.float32)",
        )
    # astype to the little-endian dtype is a no-op on little-endian hosts; tobytes is row-major.
    data = array.astype(WIRE_DTYPES[name], copy=False).tobytes(order="C")
    return pb.Tensor(dtype=name, shape=array.shape, data=data)


def from_tensor(tensor: pb.Tensor, *, field: str = "tensor") -> np.ndarray:
    """Decode a `Tensor` into an array of its dtype and shape.

    The result is a read-only view of `tensor.data` (no copy); use ``.copy()`` for a writable
    array. `field` names the tensor in errors, e.g. ``field="input"`` gives
    "input.data has 100 bytes, shape [1, 28, 28] float32 needs 3136".
    Raises TensorFormatError (a ValueError) for an unknown dtype, more than MAX_DIMS dimensions,
    a negative dimension, a shape too large to index, or a data length that does not match the shape.
    """
    dtype = WIRE_DTYPES.get(tensor.dtype)
    if dtype is None:
        shown = tensor.dtype if len(tensor.dtype) <= _ECHO_CHARS else tensor.dtype[:_ECHO_CHARS] + "..."
        raise TensorFormatError(
            f"{field}.dtype", f"{field}.dtype {shown!r} is not supported; expected one of {_supported()}"
        )
    if len(tensor.shape) > MAX_DIMS:
        raise TensorFormatError(
            f"{field}.shape", f"{field}.shape has {len(tensor.shape)} dimensions; at most {MAX_DIMS}"
        )
    shape = list(tensor.shape)
    if any(dim < 0 for dim in shape):
        raise TensorFormatError(f"{field}.shape", f"{field}.shape {shape} has a negative dimension")
    # NumPy refuses a shape whose nonzero dimensions it cannot index, even when another is 0.
    if math.prod(dim for dim in shape if dim) * dtype.itemsize > _INTP_MAX:
        raise TensorFormatError(f"{field}.shape", f"{field}.shape {shape} is too large")
    # Python ints: a hostile shape cannot overflow the size computation.
    needed = math.prod(shape) * dtype.itemsize
    data = tensor.data  # each read of the field makes a bytes object
    if len(data) != needed:
        raise TensorFormatError(
            f"{field}.data",
            f"{field}.data has {len(data)} bytes, shape {shape} {tensor.dtype} needs {needed}",
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)
