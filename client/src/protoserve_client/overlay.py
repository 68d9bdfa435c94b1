"""Heatmap overlays drawn with numpy and Pillow only (no matplotlib).

The picture is a row of panels: the input alone, then one panel per component with the
component's heatmap blended over the input as a colour map. Images are scaled to
PANEL_SIZE pixels on their longer side (nearest neighbour when enlarging, so a 28x28 digit
stays crisp); 1-D series are drawn as a line plot whose background carries the heatmap.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from protoserve_client._stubs.protoserve.v1 import explainer_pb2 as pb
from protoserve_client.client import heatmap_arrays

PANEL_SIZE = 224                 # longer side of an image panel, pixels
SERIES_PANEL = (448, 160)        # width, height of a series panel
TITLE_HEIGHT = 18                # strip above each panel for its title
GAP = 4                          # between panels
HEATMAP_ALPHA = 0.5              # opacity of the colour map over the input
MAX_COMPONENT_PANELS = 4

# A jet-like colour map: (position in [0, 1], RGB in [0, 1]) anchors, linearly interpolated.
_COLORMAP_POSITIONS = np.array([0.0, 0.125, 0.375, 0.625, 0.875, 1.0])
_COLORMAP_COLORS = np.array([
    [0.0, 0.0, 0.5],   # dark blue: lowest
    [0.0, 0.0, 1.0],
    [0.0, 1.0, 1.0],
    [1.0, 1.0, 0.0],
    [1.0, 0.0, 0.0],
    [0.5, 0.0, 0.0],   # dark red: highest
])


def colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (any shape S) to uint8 RGB colours of shape S + (3,)."""
    values = np.clip(values, 0.0, 1.0)
    channels = [np.interp(values, _COLORMAP_POSITIONS, _COLORMAP_COLORS[:, c]) for c in range(3)]
    return np.round(np.stack(channels, axis=-1) * 255).astype(np.uint8)


def _rescale_to_unit(values: np.ndarray) -> np.ndarray:
    """Min-max scale to [0, 1]; a constant array maps to zeros."""
    values = np.asarray(values, dtype=np.float64)
    low, high = values.min(), values.max()
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def displayable(array: np.ndarray) -> np.ndarray:
    """An input array as something drawable: a 1-D series, a 2-D gray or an [H, W, 3] image.

    Accepts model inputs such as [1, 28, 28], [3, H, W] (channels first), [H, W, 3] or
    [1, length]; singleton dimensions are dropped.
    """
    squeezed = np.squeeze(np.asarray(array))
    if squeezed.ndim == 3 and squeezed.shape[0] == 3 and squeezed.shape[-1] != 3:
        squeezed = np.moveaxis(squeezed, 0, -1)
    if squeezed.ndim in (1, 2) or (squeezed.ndim == 3 and squeezed.shape[-1] == 3):
        return squeezed
    raise ValueError(f"cannot draw an input of shape {list(np.shape(array))}")


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    # Model inputs are often normalized floats; stretch them to the full gray range.
    if pixels.dtype == np.uint8:
        return pixels
    return np.round(_rescale_to_unit(pixels) * 255).astype(np.uint8)


def _image_panel(pixels: np.ndarray) -> Image.Image:
    image = Image.fromarray(_to_uint8(pixels)).convert("RGB")
    scale = PANEL_SIZE / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BILINEAR)


def _series_points(series: np.ndarray) -> list[tuple[float, float]]:
    width, height = SERIES_PANEL
    margin = 6
    x = np.linspace(margin, width - 1 - margin, num=len(series))
    y = height - 1 - margin - _rescale_to_unit(series) * (height - 1 - 2 * margin)
    return list(zip(x.tolist(), y.tolist()))


def _draw_series(background: Image.Image, series: np.ndarray) -> Image.Image:
    ImageDraw.Draw(background).line(_series_points(series), fill=(0, 0, 0), width=2)
    return background


def _blend_heatmap(panel: Image.Image, heatmap: np.ndarray, *, series: bool) -> Image.Image:
    """Blend `heatmap` (any 2-D grid, or 1-D for series) over `panel`, resized to fit it."""
    grid = np.atleast_2d(np.squeeze(heatmap))
    if series:
        # A series map is a profile along time: stretch it over the panel's full height.
        grid = grid.mean(axis=0, keepdims=True)
    unit = _rescale_to_unit(grid).astype(np.float32)
    resized = Image.fromarray(unit).resize(panel.size, Image.Resampling.BILINEAR)
    colors = Image.fromarray(colormap(np.asarray(resized)))
    return Image.blend(panel, colors, HEATMAP_ALPHA)


def _titled_row(panels: Sequence[tuple[str, Image.Image]], cell: tuple[int, int]) -> Image.Image:
    cell_width, cell_height = cell
    canvas = Image.new(
        "RGB",
        (len(panels) * cell_width + (len(panels) - 1) * GAP, TITLE_HEIGHT + cell_height),
        (255, 255, 255),
    )
    draw = ImageDraw.Draw(canvas)
    for index, (title, panel) in enumerate(panels):
        left = index * (cell_width + GAP)
        # Centre the panel in its cell: a non-square image leaves a white margin.
        canvas.paste(panel, (left + (cell_width - panel.width) // 2,
                             TITLE_HEIGHT + (cell_height - panel.height) // 2))
        while title and draw.textlength(title) > cell_width - 4:
            title = title[:-1]
        draw.text((left + 2, 3), title, fill=(0, 0, 0))
    return canvas


def render_overlay(input_array: np.ndarray, heatmaps: Sequence[tuple[str, np.ndarray]]) -> Image.Image:
    """The row of panels: the input titled "input", then each (title, heatmap) over it.

    `input_array` is anything `displayable` accepts; a 1-D result is drawn as a line plot.
    Heatmaps are min-max scaled per panel and stretched over the whole input, which assumes
    the explained layer's grid covers the input (true for convolutional models).
    """
    drawable = displayable(input_array)
    if drawable.ndim == 1:
        blank = Image.new("RGB", SERIES_PANEL, (255, 255, 255))
        panels = [("input", _draw_series(blank.copy(), drawable))]
        panels += [(title, _draw_series(_blend_heatmap(blank, heatmap, series=True), drawable))
                   for title, heatmap in heatmaps]
        return _titled_row(panels, SERIES_PANEL)
    base = _image_panel(drawable)
    panels = [("input", base)] + [(title, _blend_heatmap(base, heatmap, series=False))
                                   for title, heatmap in heatmaps]
    return _titled_row(panels, (PANEL_SIZE, PANEL_SIZE))


def top_component_heatmaps(
    response: pb.ExplainResponse, limit: int = MAX_COMPONENT_PANELS
) -> list[tuple[str, np.ndarray]]:
    """(title, heatmap) of the `limit` components with the largest |contribution| that have a heatmap.

    Titles are "id +contribution".
    """
    maps = heatmap_arrays(response)
    ranked = sorted(response.components, key=lambda component: abs(component.contribution), reverse=True)
    return [(f"{component.id} {component.contribution:+.3g}", maps[component.id])
            for component in ranked if component.id in maps][:limit]


def write_overlay(path: str | os.PathLike[str], input_array: np.ndarray, response: pb.ExplainResponse) -> Image.Image:
    """Render the top components' heatmaps of `response` over `input_array` into a PNG at `path`."""
    heatmaps = top_component_heatmaps(response)
    if not heatmaps:
        raise ValueError("the response has no heatmaps to draw; request them with heatmaps='feature_grid' or 'input'")
    picture = render_overlay(input_array, heatmaps)
    picture.save(path, format="PNG")
    return picture
