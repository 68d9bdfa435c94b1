"""Turn a request's tensor or encoded image into one model input, or say what is wrong."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from handlers.errors import InvalidInputError
from handlers.model import InputSpec

_IMAGE_FORMATS = ("PNG", "JPEG")  # PIL tries no other decoder on a request's bytes
SIXTEEN_BIT_GRAY_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


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


def input_from_image(data: bytes, spec: InputSpec, *, max_pixels: int, field: str = "image") -> torch.Tensor:
    """An encoded PNG/JPEG of at most ``max_pixels`` pixels -> float32 (*spec.shape), by the archive's
    preprocessing.

    16-bit grayscale PNGs (PIL modes ``I;16*``, ``I``) are brought to the 8-bit scale the preprocessing
    is written for (value / 257, so 16-bit 257·v reads as 8-bit v) instead of being clipped to white;
    PIL itself reads 16-bit RGB(A) PNGs as 8-bit (the high byte of each sample).
    """
    if spec.image is None:
        raise InvalidInputError(field, "this model takes tensors only (its archive defines no image preprocessing)")
    mode, size = spec.image["mode"], (spec.image["size"][1], spec.image["size"][0])
    try:
        # Opening reads the header only: the size is checked before any pixel is decoded. (PIL's own
        # decompression-bomb check, at a larger size, only warns below twice its limit.)
        image = Image.open(io.BytesIO(data), formats=_IMAGE_FORMATS)
        if image.width * image.height > max_pixels:
            raise InvalidInputError(field, f"{image.width}x{image.height} is larger than {max_pixels} pixels")
        if image.mode in SIXTEEN_BIT_GRAY_MODES:
            pixels = _sixteen_bit_gray_pixels(image, mode, size, field)
        else:
            pixels = np.asarray(image.convert(mode).resize(size, Image.BILINEAR), dtype=np.float32)
    except InvalidInputError:
        raise
    # Hostile bytes reach PIL's decoders, which raise many kinds (OSError, SyntaxError, EOFError,
    # struct.error, …): whatever they raise, the image is what is wrong.
    except Exception as exc:
        raise InvalidInputError(field, f"cannot decode the image as PNG or JPEG: {exc}") from exc
    array = pixels * np.float32(spec.image.get("scale", 1 / 255))
    array = array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)
    mean = np.asarray(spec.image.get("mean", [0.0] * array.shape[0]), dtype=np.float32)[:, None, None]
    std = np.asarray(spec.image.get("std", [1.0] * array.shape[0]), dtype=np.float32)[:, None, None]
    return torch.from_numpy(np.ascontiguousarray((array - mean) / std))


def _sixteen_bit_gray_pixels(image: Image.Image, mode: str, size: tuple[int, int], field: str) -> np.ndarray:
    """A 16-bit grayscale image resized (in float, unrounded) and on the 8-bit scale: (H, W) for ``L``,
    (H, W, 3) for ``RGB``. PIL's own conversion to 8 bits clips every value above 255 to white."""
    if mode not in ("L", "RGB"):
        raise InvalidInputError(field, f"a 16-bit grayscale image cannot be converted to this model's mode "
                                        f"{mode}; send an 8-bit image")
    gray = np.asarray(image.convert("F").resize(size, Image.BILINEAR), dtype=np.float32) / np.float32(257)
    return gray if mode == "L" else np.repeat(gray[..., None], 3, axis=-1)
