"""`protoserve-client`: predictions and explanations from the command line.

    protoserve-client explain INPUT --model M [--suppress ID ...] [--overlay out.png] ...
    protoserve-client predict INPUT --model M
    protoserve-client models

INPUT is an image (.png/.jpg/.jpeg, sent as `image` bytes for the server to preprocess),
a .npy array (sent as a float32 `input` tensor) or a .csv of numbers (one series, sent as
a float32 tensor [1, length]). Exit status: 0 on success, 1 for a local problem (unreadable
input, overlay that cannot be drawn), 2 for a gRPC error, printed as
``error: <STATUS_CODE>: <details>``.
"""

from __future__ import annotations

import argparse
import io
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.message import Message
from PIL import Image

from protoserve_client._stubs.protoserve.v1 import explainer_pb2 as pb
from protoserve_client.client import (
    ADDITIVITY_RTOL,
    DEFAULT_ADDRESS,
    HEATMAP_MODES,
    ExplainerClient,
    additivity_gap,
)
from protoserve_client.overlay import write_overlay

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}

EXIT_LOCAL_ERROR = 1
EXIT_RPC_ERROR = 2


@dataclass(frozen=True)
class LoadedInput:
    """An INPUT file as it goes on the wire: exactly one of `array` and `image` is set."""

    array: np.ndarray | None = None
    image: bytes | None = None

    def pixels_or_series(self) -> np.ndarray:
        """What the overlay draws: the decoded image, or the array as sent."""
        if self.image is None:
            return self.array
        with Image.open(io.BytesIO(self.image)) as decoded:
            return np.asarray(decoded if decoded.mode in ("L", "RGB") else decoded.convert("RGB"))


def _read_series(path: Path) -> np.ndarray:
    """Every number in the file, in order, as one float32 series of shape [1, length]."""
    tokens = re.split(r"[,\s]+", path.read_text().strip())
    try:
        values = [float(token) for token in tokens]
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    return np.asarray(values, dtype=np.float32)[np.newaxis, :]


def load_input(path: Path) -> LoadedInput:
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return LoadedInput(image=path.read_bytes())
    if suffix == ".npy":
        return LoadedInput(array=np.load(path, allow_pickle=False).astype(np.float32))
    if suffix == ".csv":
        return LoadedInput(array=_read_series(path))
    raise ValueError(f"{path}: unsupported input; expected .png, .jpg, .jpeg, .npy or .csv")


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: set[int]) -> str:
    """A plain-text table, two-space indented; columns in `numeric` are right-aligned."""
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows)]

    def line(cells: Sequence[str]) -> str:
        return "  " + "  ".join(
            cell.rjust(width) if index in numeric else cell.ljust(width)
            for index, (cell, width) in enumerate(zip(cells, widths))
        ).rstrip()

    return "\n".join([line(headers), *(line(row) for row in rows)])


def _scores_table(scores: Sequence[pb.ClassScore]) -> str:
    rows = [[str(s.class_index), s.label, f"{s.logit:.4f}", f"{s.probability:.4f}"] for s in scores]
    return _table(["class", "label", "logit", "probability"], rows, numeric={0, 2, 3})


def format_prediction(response: pb.PredictResponse) -> str:
    return "\n".join([
        f"model {response.model} version {response.version}",
        "prediction",
        _scores_table(response.prediction),
    ])


def format_explanation(response: pb.ExplainResponse) -> str:
    labels = {score.class_index: score.label for score in response.prediction}
    target_label = labels.get(response.target_class, "")
    components = sorted(response.components, key=lambda c: abs(c.contribution), reverse=True)
    component_rows = [
        [c.id, c.label, str(c.class_index), f"{c.weight:.4f}", f"{c.contribution:+.4f}"] for c in components
    ]
    gap = additivity_gap(response)
    verdict = (f"ok (<= {ADDITIVITY_RTOL:g})" if gap <= ADDITIVITY_RTOL
               else f"exceeds {ADDITIVITY_RTOL:g} (expected only if the method is not additive)")
    lines = [
        f"model {response.model} version {response.version}, method {response.method}",
        "prediction",
        _scores_table(response.prediction),
        f"target class {response.target_class}" + (f" ({target_label})" if target_label else "")
        + f", logit {response.target_logit:.4f}",
        "",
        f"components ({len(components)}, by |contribution|)",
        _table(["id", "label", "class", "weight", "contribution"], component_rows, numeric={2, 3, 4}),
        f"bias                   {response.bias:+.4f}",
        f"residual contribution  {response.residual_contribution:+.4f}",
        f"residual share         {response.residual_share:.4f}",
        f"additivity gap         {gap:.2e} {verdict}",
    ]
    if response.interventions:
        rows = []
        for result in response.interventions:
            top = result.prediction[0] if result.prediction else pb.ClassScore()
            rows.append([",".join(result.suppressed), str(top.class_index), top.label,
                         f"{top.logit:.4f}", f"{top.probability:.4f}",
                         f"{result.target_logit:.4f}", f"{result.target_logit - response.target_logit:+.4f}"])
        lines += ["", "interventions",
                  _table(["suppressed", "top class", "label", "logit", "probability", "target logit", "change"],
                         rows, numeric={1, 3, 4, 5, 6})]
    return "\n".join(lines)


def format_models(models: Sequence[pb.ModelInfo]) -> str:
    blocks = []
    for info in models:
        header = (f"{info.name} version {info.version}: input {info.input_dtype} {list(info.input_shape)}, "
                  f"{len(info.labels)} classes, layer {info.layer or '-'}, default method {info.default_method}")
        rows = [[m.name, "yes" if m.additive else "no", str(len(m.components))] for m in info.methods]
        blocks.append(header + "\n" + _table(["method", "additive", "components"], rows, numeric={2}))
    return "\n\n".join(blocks) if blocks else "no models"


def _to_json(message: Message) -> str:
    return json_format.MessageToJson(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,  # class 0 and a zero bias are answers too
        unquote_int64_if_possible=True,
    )


def _parse_id_list(text: str) -> list[str]:
    ids = [part.strip() for part in text.split(",") if part.strip()]
    if not ids:
        raise argparse.ArgumentTypeError(f"no component id in {text!r}")
    return ids


def build_parser() -> argparse.ArgumentParser:
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument("--address", default=DEFAULT_ADDRESS, help="server HOST:PORT (default %(default)s)")
    connection.add_argument("--timeout", type=float, default=10.0, help="seconds per call (default %(default)s)")

    parser = argparse.ArgumentParser(prog="protoserve-client", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def add_input_command(name: str, help: str) -> argparse.ArgumentParser:
        command = commands.add_parser(name, parents=[connection], help=help)
        command.add_argument("input", type=Path, metavar="INPUT", help="image (.png/.jpg), .npy array or .csv series")
        command.add_argument("--model", required=True)
        command.add_argument("--version", default="", help="default: the newest")
        command.add_argument("--top-k", type=int, default=5)
        command.add_argument("--json", action="store_true", help="print the response as JSON instead of tables")
        return command

    add_input_command("predict", "the bare prediction")
    explain = add_input_command("explain", "the prediction with its explanation")
    explain.add_argument("--method", default="", help="default: the model's default method")
    explain.add_argument("--target-class", type=int, help="class to explain (default: the predicted one)")
    explain.add_argument("--suppress", nargs="+", action="extend", default=[], metavar="ID",
                         help="component ids suppressed together in one intervention (put INPUT before this option)")
    explain.add_argument("--intervention", type=_parse_id_list, action="append", default=[], metavar="ID,ID",
                         help="one more intervention: comma-separated ids suppressed together (repeatable)")
    explain.add_argument("--heatmaps", choices=list(HEATMAP_MODES),
                         help="heatmap mode (default: feature_grid with --overlay, else none)")
    explain.add_argument("--overlay", type=Path, metavar="OUT.png",
                         help="write the input with the top components' heatmaps to this PNG")

    commands.add_parser("models", parents=[connection], help="served models, their methods and components")
    return parser


def _run(args: argparse.Namespace) -> None:
    with ExplainerClient(args.address, timeout=args.timeout) as client:
        if args.command == "models":
            # ListModels may leave components out; GetModel has them.
            infos = [client.get_model(info.name, info.version) for info in client.list_models().models]
            print(format_models(infos))
            return
        loaded = load_input(args.input)
        if args.command == "predict":
            response = client.predict(loaded.array, image=loaded.image, model=args.model,
                                      version=args.version, top_k=args.top_k)
            print(_to_json(response) if args.json else format_prediction(response))
            return
        interventions = ([args.suppress] if args.suppress else []) + args.intervention
        heatmaps = args.heatmaps or ("feature_grid" if args.overlay else "none")
        response = client.explain(loaded.array, image=loaded.image, model=args.model, version=args.version,
                                  method=args.method, top_k=args.top_k, target_class=args.target_class,
                                  heatmaps=heatmaps, interventions=interventions)
        print(_to_json(response) if args.json else format_explanation(response))
        if args.overlay:
            write_overlay(args.overlay, loaded.pixels_or_series(), response)
            print(f"overlay written to {args.overlay}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _run(args)
    except grpc.RpcError as error:
        code = error.code().name if hasattr(error, "code") else "UNKNOWN"
        details = error.details() if hasattr(error, "details") else str(error)
        print(f"error: {code}: {details}", file=sys.stderr)
        return EXIT_RPC_ERROR
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_LOCAL_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
