"""PNG exemplars of components: regions of training inputs, drawn for people."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

CROP_DISPLAY_PX = 64


def grid_cell_box(input_hw: tuple[int, int], grid_hw: tuple[int, int], row: int, col: int,
                  context: int = 1) -> tuple[int, int, int, int]:
    """The input region (top, left, bottom, right) under feature-grid cell (row, col),
    widened by ``context`` cells on each side (a rough receptive field)."""
    cell_h, cell_w = input_hw[0] / grid_hw[0], input_hw[1] / grid_hw[1]
    top = int(max(0, (row - context) * cell_h))
    left = int(max(0, (col - context) * cell_w))
    bottom = int(min(input_hw[0], round((row + 1 + context) * cell_h)))
    right = int(min(input_hw[1], round((col + 1 + context) * cell_w)))
    return top, left, bottom, right


def to_uint8_image(x: torch.Tensor) -> np.ndarray:
    """(C, H, W) float -> (H, W) or (H, W, 3) uint8, min-max scaled for display."""
    x = x.detach().float().cpu()
    x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-12)
    arr = (x.numpy() * 255).round().astype(np.uint8)
    return arr[0] if arr.shape[0] == 1 else np.moveaxis(arr[:3], 0, -1)


def crops_png(images: list[torch.Tensor], boxes: list[tuple[int, int, int, int]]) -> bytes:
    """A row of crops (each scaled to CROP_DISPLAY_PX high), as PNG bytes."""
    tiles = []
    for image, (top, left, bottom, right) in zip(images, boxes):
        tile = Image.fromarray(to_uint8_image(image[:, top:bottom, left:right]))
        scale = CROP_DISPLAY_PX / tile.height
        tiles.append(tile.convert("RGB").resize((max(1, round(tile.width * scale)), CROP_DISPLAY_PX), Image.NEAREST))
    gap = 4
    strip = Image.new("RGB", (sum(t.width for t in tiles) + gap * (len(tiles) - 1), CROP_DISPLAY_PX), "white")
    x = 0
    for tile in tiles:
        strip.paste(tile, (x, 0))
        x += tile.width + gap
    return png_bytes(strip)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()
