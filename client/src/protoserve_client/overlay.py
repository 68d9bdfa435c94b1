"""Heatmap overlays drawn with numpy and Pillow only (no matplotlib).

The picture is a row of panels: the input alone, then one panel per component with the
component's heatmap blended over the input, and under them a legend of the colour scale.
Heatmaps are signed (a contribution can be negative), so the colour scale is diverging and
centred on zero: red where a map is positive, blue where it is negative, more opaque the
larger the value, and the input untouched where it is zero. One scale, +-(the largest |value|
among the drawn maps), is shared by all panels, so they can be compared with each other.

Images are scaled to PANEL_SIZE pixels on their longer side (nearest neighbour when
enlarging, so a 28x28 digit stays crisp); 1-D series are drawn as a line plot whose
background carries the heatmap.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from protoserve_client.stubs.protoserve.v1 import explainer_pb2 as pb
from protoserve_client.client import heatmap_arrays, residual_heatmap_array

PANEL_SIZE = 224                 # longer side of an image panel, pixels
SERIES_PANEL = (448, 160)        # width, height of a series panel
TITLE_HEIGHT = 18                # strip above each panel for its title
GAP = 4                          # between panels
MAX_ALPHA = 0.75                 # opacity of the colour at the ends of the scale (+-scale)
MAX_COMPONENT_PANELS = 4
POSITIVE_RGB = np.array([214.0, 39.0, 40.0])   # red: the map is above zero
NEGATIVE_RGB = np.array([31.0, 119.0, 180.0])  # blue: the map is below zero
LEGEND_HEIGHT = 34               # strip under the panels: colour bar and its values
LEGEND_BAR = (257, 10)           # width (odd: one column is exactly zero), height of the colour bar


def shared_scale(heatmaps: Sequence[np.ndarray]) -> float:
    """The largest |value| of all `heatmaps`: the colour scale runs from -scale to +scale."""
    return max((float(np.max(np.abs(heatmap))) for heatmap in heatmaps), default=0.0)


def blend_signed(background: np.ndarray, values: np.ndarray, scale: float) -> np.ndarray:
    """Blend the diverging colour of `values` (shape S) over `background` (uint8 RGB, S + (3,)).

    A value v gets red (v > 0) or blue (v < 0) at opacity MAX_ALPHA * |v| / scale, clipped to
    MAX_ALPHA; zero (and any value when `scale` is 0) leaves the background as it is.
    """
    values = np.asarray(values, dtype=np.float64)
    unit = np.clip(values / scale, -1.0, 1.0) if scale > 0 else np.zeros_like(values)
    alpha = (MAX_ALPHA * np.abs(unit))[..., np.newaxis]
    colour = np.where((unit > 0)[..., np.newaxis], POSITIVE_RGB, NEGATIVE_RGB)
    return np.round(background * (1.0 - alpha) + colour * alpha).astype(np.uint8)


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


def _blend_heatmap(panel: Image.Image, heatmap: np.ndarray, scale: float, *, series: bool) -> Image.Image:
    """Blend `heatmap` (any 2-D grid, or 1-D for series) over `panel`, resized to fit it."""
    grid = np.atleast_2d(np.squeeze(heatmap))
    if series:
        # A series map is a profile along time: stretch it over the panel's full height.
        grid = grid.mean(axis=0, keepdims=True)
    # Resized as signed floats ("F" mode), so interpolation never moves a zero away from zero.
    resized = Image.fromarray(grid.astype(np.float32)).resize(panel.size, Image.Resampling.BILINEAR)
    return Image.fromarray(blend_signed(np.asarray(panel, dtype=np.float64), np.asarray(resized), scale))


def legend_labels(scale: float) -> tuple[str, str, str]:
    """The values written under the colour bar's left end, centre and right end."""
    return f"{-scale:+.3g}", "0", f"{scale:+.3g}"


def _legend(width: int, scale: float) -> Image.Image:
    """The colour bar from -scale (left) through 0 to +scale (right), drawn over white, with its values."""
    legend = Image.new("RGB", (width, LEGEND_HEIGHT), (255, 255, 255))
    bar_width, bar_height = LEGEND_BAR
    values = np.broadcast_to(np.linspace(-1.0, 1.0, bar_width), (bar_height, bar_width))
    bar = blend_signed(np.full((bar_height, bar_width, 3), 255.0), values, 1.0)
    left = (width - bar_width) // 2
    legend.paste(Image.fromarray(bar), (left, 4))
    draw = ImageDraw.Draw(legend)
    low, zero, high = legend_labels(scale)
    text_top = 6 + bar_height
    draw.text((left, text_top), low, fill=(0, 0, 0))
    draw.text((left + (bar_width - draw.textlength(zero)) / 2, text_top), zero, fill=(0, 0, 0))
    draw.text((left + bar_width - draw.textlength(high), text_top), high, fill=(0, 0, 0))
    caption = "heatmap"
    draw.text((left - draw.textlength(caption) - 8, 3), caption, fill=(0, 0, 0))
    return legend


def _with_legend(row: Image.Image, scale: float) -> Image.Image:
    picture = Image.new("RGB", (row.width, row.height + LEGEND_HEIGHT), (255, 255, 255))
    picture.paste(row, (0, 0))
    picture.paste(_legend(row.width, scale), (0, row.height))
    return picture


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
    """The row of panels: the input titled "input", then each (title, heatmap) over it; the legend under them.

    `input_array` is anything `displayable` accepts; a 1-D result is drawn as a line plot.
    All heatmaps share one colour scale centred on zero (`shared_scale`). They are stretched
    over the whole input, which assumes the explained layer's grid covers the input (true for
    convolutional models).
    """
    drawable = displayable(input_array)
    scale = shared_scale([heatmap for _, heatmap in heatmaps])
    if drawable.ndim == 1:
        blank = Image.new("RGB", SERIES_PANEL, (255, 255, 255))
        panels = [("input", _draw_series(blank.copy(), drawable))]
        panels += [(title, _draw_series(_blend_heatmap(blank, heatmap, scale, series=True), drawable))
                   for title, heatmap in heatmaps]
        return _with_legend(_titled_row(panels, SERIES_PANEL), scale)
    base = _image_panel(drawable)
    panels = [("input", base)] + [(title, _blend_heatmap(base, heatmap, scale, series=False))
                                   for title, heatmap in heatmaps]
    return _with_legend(_titled_row(panels, (PANEL_SIZE, PANEL_SIZE)), scale)


def top_component_heatmaps(
    response: pb.ExplainResponse, limit: int = MAX_COMPONENT_PANELS
) -> list[tuple[str, np.ndarray]]:
    """(title, heatmap) of the `limit` components with the largest |contribution| that have a heatmap,
    then, with the presence heatmap modes, the residual's map.

    Titles are "id +contribution" ("residual +contribution").
    """
    maps = heatmap_arrays(response)
    ranked = sorted(response.components, key=lambda component: abs(component.contribution), reverse=True)
    panels = [(f"{component.id} {component.contribution:+.3g}", maps[component.id])
              for component in ranked if component.id in maps][:limit]
    residual = residual_heatmap_array(response)
    if residual is not None:
        panels.append((f"residual {response.residual_contribution:+.3g}", residual))
    return panels


def write_overlay(path: str | os.PathLike[str], input_array: np.ndarray, response: pb.ExplainResponse) -> Image.Image:
    """Render the top components' heatmaps of `response` over `input_array` into a PNG at `path`."""
    heatmaps = top_component_heatmaps(response)
    if not heatmaps:
        raise ValueError("the response has no heatmaps to draw; request them with heatmaps='feature_grid', 'input', "
                         "'presence_feature_grid' or 'presence_input'")
    picture = render_overlay(input_array, heatmaps)
    picture.save(path, format="PNG")
    return picture
