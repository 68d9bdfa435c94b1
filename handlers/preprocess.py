"""Turn a request's tensor or encoded image into one model input, or say what is wrong."""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image

from handlers.errors import InvalidInputError
from handlers.model import InputSpec

MAX_IMAGE_PIXELS = 4096 * 4096
_IMAGE_FORMATS = {"PNG", "JPEG"}


def input_from_array(array: np.ndarray, spec: InputSpec, field: str = "input") -> torch.Tensor:
    """A decoded request tensor -> float32 (*spec.shape).

    float32 and float16 are taken as model inputs; uint8 as raw pixels, scaled like an
    image (``spec.image["scale"]``, default 1/255).
    """
    if array.size == 0:
        raise InvalidInputError(f"{field}.shape", "the input is empty")
    if list(array.shape) != list(spec.shape):
        raise InvalidInputError(f"{field}.shape", f"expected {list(spec.shape)} (one example, no batch "
                                                  f"dimension), got {list(array.shape)}")
    if array.dtype == np.uint8:
        scale = (spec.image or {}).get("scale", 1 / 255)
        return torch.from_numpy(array.astype(np.float32) * np.float32(scale))
    values = array.astype(np.float32, copy=True)  # the wire buffer is read-only
    if not np.isfinite(values).all():
        raise InvalidInputError(f"{field}.data", "contains NaN or infinity")
    return torch.from_numpy(values)


def input_from_image(data: bytes, spec: InputSpec, field: str = "image") -> torch.Tensor:
    """An encoded PNG/JPEG -> float32 (*spec.shape), by the archive's preprocessing."""
    if spec.image is None:
        raise InvalidInputError(field, "this model takes tensors only (its archive defines no image preprocessing)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in _IMAGE_FORMATS:
                raise InvalidInputError(field, f"format {image.format} is not PNG or JPEG")
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise InvalidInputError(field, f"{image.width}x{image.height} is larger than {MAX_IMAGE_PIXELS} pixels")
            image = image.convert(spec.image["mode"])
            width, height = spec.image["size"][1], spec.image["size"][0]
            image = image.resize((width, height), Image.BILINEAR)
    except InvalidInputError:
        raise
    # Hostile bytes reach PIL's decoders, which raise many kinds (OSError, SyntaxError, EOFError,
    # struct.error, …): whatever they raise, the image is what is wrong.
    except Exception as exc:
        raise InvalidInputError(field, f"cannot decode the image: {exc}") from exc
    array = np.asarray(image, dtype=np.float32) * np.float32(spec.image.get("scale", 1 / 255))
    array = array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)
    mean = np.asarray(spec.image.get("mean", [0.0] * array.shape[0]), dtype=np.float32)[:, None, None]
    std = np.asarray(spec.image.get("std", [1.0] * array.shape[0]), dtype=np.float32)[:, None, None]
    return torch.from_numpy(np.ascontiguousarray((array - mean) / std))
