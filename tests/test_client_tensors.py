"""protoserve_client without a server: tensor encoding, request building, response helpers,
overlays, the CLI's input handling and formatting, and the torch-free import."""

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from protoserve_client import (
    TensorFormatError,
    additivity_gap,
    check_additive,
    explain_request,
    from_tensor,
    heatmap_arrays,
    pb,
    predict_request,
    to_tensor,
)
from protoserve_client import cli, overlay


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint8])
@pytest.mark.parametrize("shape", [(), (0,), (5,), (1, 28, 28), (3, 4, 5)])
def test_round_trip(dtype: type, shape: tuple[int, ...]) -> None:
    array = (np.arange(int(np.prod(shape))) % 251).astype(dtype).reshape(shape)
    tensor = to_tensor(array)
    assert tensor.dtype == np.dtype(dtype).name
    assert list(tensor.shape) == list(shape)
    decoded = from_tensor(tensor)
    assert decoded.dtype == dtype and decoded.shape == shape
    np.testing.assert_array_equal(decoded, array)


def test_wire_format_is_little_endian_row_major() -> None:
    array = np.arange(6, dtype=">f4").reshape(2, 3).T  # big-endian and not C-contiguous
    tensor = to_tensor(array)
    assert tensor.data == np.ascontiguousarray(array, dtype="<f4").tobytes()
    np.testing.assert_array_equal(from_tensor(tensor), array)


def test_size_mismatch_names_field_bytes_and_need() -> None:
    tensor = pb.Tensor(dtype="float32", shape=[1, 28, 28], data=b"\0" * 100)
    with pytest.raises(ValueError, match=r"^input\.data has 100 bytes, shape \[1, 28, 28\] float32 needs 3136$") as error:
        from_tensor(tensor, field="input")
    assert error.value.field == "input.data"


def test_shape_mismatch_for_the_right_byte_count_of_another_dtype() -> None:
    data = np.zeros((2, 2), dtype=np.float16).tobytes()
    with pytest.raises(TensorFormatError, match=r"has 8 bytes, shape \[2, 2\] float32 needs 16"):
        from_tensor(pb.Tensor(dtype="float32", shape=[2, 2], data=data))


def test_negative_dimension_is_refused() -> None:
    with pytest.raises(ValueError, match=r"input\.shape \[-1, 4\] has a negative dimension"):
        from_tensor(pb.Tensor(dtype="uint8", shape=[-1, 4], data=b""), field="input")


@pytest.mark.parametrize("dtype", ["float64", "int32", "", "FLOAT32"])
def test_unknown_wire_dtype_is_refused(dtype: str) -> None:
    with pytest.raises(ValueError, match=rf"input\.dtype {dtype!r} is not supported; expected one of float32, float16, uint8") as error:
        from_tensor(pb.Tensor(dtype=dtype, shape=[1], data=b"\0" * 8), field="input")
    assert error.value.field == "input.dtype"


def test_unsupported_array_dtype_is_refused_not_converted() -> None:
    with pytest.raises(ValueError, match=r"dtype float64, not one of float32, float16, uint8"):
        to_tensor(np.zeros(3))


def test_explain_request_fields() -> None:
    request = explain_request(np.zeros((1, 4), np.float32), model="m", target_class=0, heatmaps="input",
                              interventions=[["a", "b"], ("c",)], request_id="r1")
    assert request.HasField("target_class") and request.target_class == 0
    assert request.heatmaps == pb.HEATMAP_MODE_INPUT
    assert [list(i.suppress) for i in request.interventions] == [["a", "b"], ["c"]]
    assert not explain_request(image=b"png", model="m").HasField("target_class")
    with pytest.raises(TypeError, match="list of component ids"):
        explain_request(image=b"png", model="m", interventions=["ab"])
    with pytest.raises(ValueError, match="heatmaps must be one of"):
        explain_request(image=b"png", model="m", heatmaps="grid")  # type: ignore[arg-type]


def test_exactly_one_of_input_and_image() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        predict_request(model="m")
    with pytest.raises(ValueError, match="exactly one"):
        predict_request(np.zeros(2, np.float32), image=b"png", model="m")
    raw = pb.Tensor(dtype="float32", shape=[3], data=b"bad")  # passed through as given
    assert predict_request(raw, model="m").input == raw


def _explanation(n_components: int = 6, grid: tuple[int, ...] = (7, 7)) -> pb.ExplainResponse:
    rng = np.random.default_rng(0)
    contributions = rng.normal(size=n_components).astype(np.float32)
    bias, residual = np.float32(0.25), np.float32(-0.5)
    target = np.float32(contributions.sum(dtype=np.float64) + bias + residual)
    return pb.ExplainResponse(
        target_class=1,
        target_logit=float(target),
        components=[pb.Component(id=f"1/p{i}", class_index=1, contribution=float(c))
                    for i, c in enumerate(contributions)],
        bias=float(bias),
        residual_contribution=float(residual),
        heatmaps=[pb.Heatmap(component_id=f"1/p{i}", map=to_tensor(rng.random(grid, dtype=np.float32)))
                  for i in range(n_components)],
    )


def test_heatmap_arrays_and_additivity() -> None:
    response = _explanation()
    maps = heatmap_arrays(response)
    assert sorted(maps) == [f"1/p{i}" for i in range(6)]
    assert all(m.shape == (7, 7) and m.dtype == np.float32 for m in maps.values())
    assert check_additive(response) == additivity_gap(response) < 1e-6
    response.bias += 1.0
    with pytest.raises(ValueError, match="not additive"):
        check_additive(response)


def test_overlay_png_size_for_an_image() -> None:
    image = np.random.default_rng(1).integers(0, 256, size=(28, 28), dtype=np.uint8)
    heatmaps = [("a", np.random.default_rng(2).random((7, 7))), ("b", np.zeros((7, 7)))]
    buffer = io.BytesIO()
    overlay.render_overlay(image, heatmaps).save(buffer, format="PNG")
    written = Image.open(io.BytesIO(buffer.getvalue()))
    panels = 1 + len(heatmaps)
    assert written.format == "PNG"
    assert written.size == (panels * overlay.PANEL_SIZE + (panels - 1) * overlay.GAP,
                            overlay.TITLE_HEIGHT + overlay.PANEL_SIZE + overlay.LEGEND_HEIGHT)
    # The digit is enlarged by nearest neighbour: each input pixel becomes an 8x8 block.
    first_panel = np.asarray(written.convert("L"))[overlay.TITLE_HEIGHT:overlay.TITLE_HEIGHT + overlay.PANEL_SIZE,
                                                   :overlay.PANEL_SIZE]
    np.testing.assert_array_equal(first_panel[::8, ::8], image)


def test_overlay_file_keeps_the_top_four_components(tmp_path: Path) -> None:
    response = _explanation(n_components=6)
    path = tmp_path / "overlay.png"
    overlay.write_overlay(path, np.zeros((3, 40, 30), np.float32), response)  # channels-first input
    assert Image.open(path).size == (5 * overlay.PANEL_SIZE + 4 * overlay.GAP,
                                     overlay.TITLE_HEIGHT + overlay.PANEL_SIZE + overlay.LEGEND_HEIGHT)
    ranked = sorted(response.components, key=lambda c: -abs(c.contribution))
    titles = [title for title, _ in overlay.top_component_heatmaps(response)]
    assert [t.split()[0] for t in titles] == [c.id for c in ranked[:4]]


def test_overlay_of_a_series_is_a_line_plot_row() -> None:
    series = np.sin(np.linspace(0, 6, 140, dtype=np.float32))[np.newaxis, :]
    picture = overlay.render_overlay(series, [("a", np.random.default_rng(3).random((1, 35)))])
    width, height = overlay.SERIES_PANEL
    assert picture.size == (2 * width + overlay.GAP, overlay.TITLE_HEIGHT + height + overlay.LEGEND_HEIGHT)


def test_overlay_refuses_an_undrawable_input() -> None:
    with pytest.raises(ValueError, match=r"cannot draw an input of shape \[2, 5, 5, 5\]"):
        overlay.render_overlay(np.zeros((2, 5, 5, 5)), [])


def test_cli_inputs(tmp_path: Path) -> None:
    (tmp_path / "ecg.csv").write_text("0.5, 1.5\n-2,3e-1\n")
    series = cli.load_input(tmp_path / "ecg.csv")
    assert series.image is None and series.array.dtype == np.float32
    np.testing.assert_array_equal(series.array, np.array([[0.5, 1.5, -2.0, 0.3]], np.float32))

    np.save(tmp_path / "x.npy", np.ones((1, 8, 8)))  # float64 on disk, float32 on the wire
    assert cli.load_input(tmp_path / "x.npy").array.dtype == np.float32

    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "digit.png")
    digit = cli.load_input(tmp_path / "digit.png")
    assert digit.array is None and digit.image == (tmp_path / "digit.png").read_bytes()
    assert digit.pixels_or_series().shape == (28, 28)

    (tmp_path / "bad.csv").write_text("1,two,3")
    with pytest.raises(ValueError, match="could not convert string to float: 'two'"):
        cli.load_input(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="unsupported input"):
        cli.load_input(tmp_path / "x.txt")


def test_cli_explanation_table_orders_components_by_magnitude() -> None:
    response = _explanation()
    response.interventions.add(suppressed=["1/p0"], target_logit=0.0).prediction.add(class_index=2, label="two")
    text = cli.format_explanation(response)
    ranked = sorted(response.components, key=lambda c: -abs(c.contribution))
    positions = [text.index(f"\n  {c.id} ") for c in ranked]
    assert positions == sorted(positions)
    assert "additivity gap" in text and " ok " in text
    assert "\n  1/p0 " in text.split("interventions")[1]


def test_cli_rpc_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    # Nothing listens on port 1: the channel fails at once with UNAVAILABLE.
    assert cli.main(["models", "--address", "127.0.0.1:1", "--timeout", "5"]) == 2
    assert capsys.readouterr().err.startswith("protoserve-client models: error: the server at 127.0.0.1:1 is "
                                              "unavailable (")


def test_imports_without_torch() -> None:
    code = ("import sys; import protoserve_client.cli, protoserve_client.client; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_more_dimensions_than_max_dims_are_refused_before_numpy_sees_them() -> None:
    from protoserve_client.tensors import MAX_DIMS

    assert from_tensor(pb.Tensor(dtype="uint8", shape=[1] * MAX_DIMS, data=b"\0")).ndim == MAX_DIMS
    for n in (MAX_DIMS + 1, 65, 100_000):
        with pytest.raises(TensorFormatError, match=rf"^input\.shape has {n} dimensions; at most {MAX_DIMS}$") as error:
            from_tensor(pb.Tensor(dtype="uint8", shape=[1] * n, data=b"\0"), field="input")
        assert error.value.field == "input.shape"


def test_a_shape_numpy_cannot_index_is_refused_even_with_a_zero() -> None:
    assert from_tensor(pb.Tensor(dtype="float32", shape=[2 ** 60, 0])).shape == (2 ** 60, 0)
    for dtype, shape in (("float32", [2 ** 61, 0]), ("uint8", [2 ** 31, 2 ** 32, 0]), ("float16", [0] + [2 ** 62] * 3)):
        with pytest.raises(TensorFormatError, match=r"^input\.shape \[.*\] is too large$") as error:
            from_tensor(pb.Tensor(dtype=dtype, shape=shape), field="input")
        assert error.value.field == "input.shape"


def test_a_long_dtype_is_echoed_clipped() -> None:
    with pytest.raises(TensorFormatError) as error:
        from_tensor(pb.Tensor(dtype="x" * 16384, shape=[1], data=b"\0"), field="input")
    assert str(error.value) == ("input.dtype '" + "x" * 32 + "...' is not supported; expected one of "
                                "float32, float16, uint8")
