"""PNG exemplars of components: regions of training inputs, drawn for people."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, ImageDraw

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


def example_png(x: torch.Tensor) -> bytes:
    """One input example drawn as a small PNG: an image (C, H, W) at its own size (grey or RGB, min-max
    scaled, as :func:`to_uint8_image`); a series (C, L) or (L,) as a line plot CROP_DISPLAY_PX high and
    L wide (one pixel per sample, min-max scaled over the example, channels in turn in black, red, blue, ...)."""
    x = x.detach().float().cpu()
    if x.dim() == 3:
        return png_bytes(Image.fromarray(to_uint8_image(x)))
    series = x.reshape(-1, x.shape[-1])  # (C, L)
    low, high = float(series.min()), float(series.max())
    top = CROP_DISPLAY_PX - 1
    rows = top - (series - low) / max(high - low, 1e-12) * top  # row 0 is the top: high values up
    image = Image.new("RGB", (series.shape[1], CROP_DISPLAY_PX), "white")
    draw = ImageDraw.Draw(image)
    for channel, row in enumerate(rows.tolist()):
        points = [(i, round(r)) for i, r in enumerate(row)]
        colour = SERIES_COLOURS[channel % len(SERIES_COLOURS)]
        if len(points) == 1:
            draw.point(points, fill=colour)
        else:
            draw.line(points, fill=colour, width=1)
    return png_bytes(image)


SERIES_COLOURS = ("black", "red", "blue", "green", "orange", "purple")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()
