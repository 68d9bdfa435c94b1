"""Overlays: a diverging colour scale centred on zero, shared by the panels of a response, with a legend."""

from __future__ import annotations

import numpy as np

from protoserve_client import pb, to_tensor
from protoserve_client.overlay import (
    GAP,
    LEGEND_BAR,
    LEGEND_HEIGHT,
    PANEL_SIZE,
    SERIES_PANEL,
    TITLE_HEIGHT,
    legend_labels,
    render_overlay,
    top_component_heatmaps,
    write_overlay,
)

GRAY = 100
# The blends of MAX_ALPHA (0.75) * |value| / scale: red (214, 39, 40) above zero, blue (31, 119, 180) below.
FULL_RED_OVER_GRAY = (186, 54, 55)      # value +scale over gray 100
HALF_BLUE_OVER_GRAY = (74, 107, 130)    # value -scale/2 over gray 100
FULL_RED_OVER_WHITE = (224, 93, 94)
FULL_BLUE_OVER_WHITE = (87, 153, 199)


def _response(*components: tuple[str, float, np.ndarray]) -> pb.ExplainResponse:
    response = pb.ExplainResponse()
    for component_id, contribution, heatmap in components:
        response.components.add(id=component_id, contribution=contribution)
        response.heatmaps.add(component_id=component_id, map=to_tensor(heatmap.astype(np.float32)))
    return response


def _pixel(picture, x: int, y: int) -> tuple[int, int, int]:
    return picture.getpixel((x, y))


def test_signed_maps_share_one_scale_centred_on_zero(tmp_path):
    positive = np.zeros((4, 4))
    positive[:, :2] = 1.0     # left half +1, right half 0
    negative = np.zeros((4, 4))
    negative[:2, :] = -0.5    # top half -0.5, bottom half 0: the map is <= 0 everywhere
    response = _response(("pos", 2.0, positive), ("neg", -1.0, negative))
    picture = write_overlay(tmp_path / "overlay.png", np.full((28, 28), GRAY, np.uint8), response)

    cell = PANEL_SIZE + GAP
    assert picture.size == (3 * PANEL_SIZE + 2 * GAP, TITLE_HEIGHT + PANEL_SIZE + LEGEND_HEIGHT)
    quarter, three_quarters = PANEL_SIZE // 8, PANEL_SIZE * 7 // 8  # centres of the grid's first and last cells
    top, bottom = TITLE_HEIGHT + quarter, TITLE_HEIGHT + three_quarters
    assert _pixel(picture, quarter, top) == (GRAY, GRAY, GRAY)  # the input panel
    # Panels by |contribution|: "pos" then "neg". Positive is red at full strength (+1 is the scale's end).
    assert _pixel(picture, cell + quarter, top) == FULL_RED_OVER_GRAY
    assert _pixel(picture, cell + three_quarters, top) == (GRAY, GRAY, GRAY)  # zero: the input as it is
    # Negative is blue; -0.5 is half the shared scale, so half as opaque (its own scale would make it full).
    assert _pixel(picture, 2 * cell + quarter, top) == HALF_BLUE_OVER_GRAY
    assert _pixel(picture, 2 * cell + quarter, bottom) == (GRAY, GRAY, GRAY)  # zero stays untouched

    bar_width, bar_height = LEGEND_BAR
    bar_left, bar_y = (picture.width - bar_width) // 2, TITLE_HEIGHT + PANEL_SIZE + 4 + bar_height // 2
    assert _pixel(picture, bar_left, bar_y) == FULL_BLUE_OVER_WHITE
    assert _pixel(picture, bar_left + bar_width // 2, bar_y) == (255, 255, 255)
    assert _pixel(picture, bar_left + bar_width - 1, bar_y) == FULL_RED_OVER_WHITE
    assert legend_labels(1.0) == ("-1", "0", "+1")
    assert (tmp_path / "overlay.png").read_bytes().startswith(b"\x89PNG")


def test_a_series_background_carries_the_signed_map():
    profile = np.array([[1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0]])
    picture = render_overlay(np.zeros(32, np.float32), top_component_heatmaps(_response(("c", 1.0, profile))))
    width, _ = SERIES_PANEL
    left = width + GAP
    # Above the line (a constant series is drawn along the bottom): red at the start, blue at the end.
    assert _pixel(picture, left + width // 16, TITLE_HEIGHT + 10) == FULL_RED_OVER_WHITE
    assert _pixel(picture, left + width * 15 // 16, TITLE_HEIGHT + 10) == FULL_BLUE_OVER_WHITE


def test_legend_labels_name_the_scale():
    assert legend_labels(0.0123) == ("-0.0123", "0", "+0.0123")
