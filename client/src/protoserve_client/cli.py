"""`protoserve-client`: predictions and explanations from the command line.

    protoserve-client explain INPUT --model M [--suppress ID ...] [--overlay out.png] [--neighbours K] ...
    protoserve-client explain --sample 3 --model M
    protoserve-client predict INPUT --model M
    protoserve-client models

INPUT is an image (.png/.jpg/.jpeg, sent as `image` bytes for the server to preprocess),
a .npy array (sent as a float32 `input` tensor) or a .csv of numbers (one series, sent as
a float32 tensor [1, length]). Instead of INPUT, `--sample N` sends the model's held-out
sample N (`GetModel` lists them, and `protoserve-client models`).

Exit status: 0 on success; 2 for a user error (a bad option, a missing or unreadable INPUT,
a request the server refused, a server that cannot be reached), printed as one line
``protoserve-client COMMAND: error: PROBLEM — WHAT TO DO`` (``--verbose`` adds the traceback).
Anything else is a bug and ends with its traceback.
"""

from __future__ import annotations

import argparse
import io
import re
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.message import Message
from PIL import Image

from protoserve_client.stubs.protoserve.v1 import explainer_pb2 as pb
from protoserve_client.client import (
    ADDITIVITY_RTOL,
    DEFAULT_ADDRESS,
    HEATMAP_MODES,
    ExplainerClient,
    ExplainerError,
    additivity_gap,
)
from protoserve_client.overlay import write_overlay
from protoserve_client.tensors import from_tensor

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}

EXIT_USER_ERROR = 2  # argparse's status for a usage error; every user error exits with it


class UserError(ValueError):
    """A value the user can fix (an INPUT file, options): printed as one line, the problem and what to do."""

    def __init__(self, problem: str, remedy: str):
        # One line whatever the parts hold (a server's details may carry newlines).
        super().__init__(" ".join(f"{problem} — {remedy}".split()))


class OneLineArgumentParser(argparse.ArgumentParser):
    """Reports a bad option in one line, like every other user error, instead of the full usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} — see {self.prog} --help\n")


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
        raise UserError(f"{path}: not a series of numbers ({error})",
                        "write the series as numbers separated by commas or whitespace") from error
    return np.asarray(values, dtype=np.float32)[np.newaxis, :]


def _read_array(path: Path) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, EOFError) as error:  # not a .npy file, a truncated one, or one of Python objects
        raise UserError(f"{path}: not a readable .npy array ({error})",
                        "save the input with numpy.save, as numbers") from error
    return array.astype(np.float32)


def load_input(path: Path) -> LoadedInput:
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return LoadedInput(image=path.read_bytes())
    if suffix == ".npy":
        return LoadedInput(array=_read_array(path))
    if suffix == ".csv":
        return LoadedInput(array=_read_series(path))
    raise UserError(f"{path}: unsupported input type {suffix or '(no suffix)'}",
                    "give an image (.png, .jpg, .jpeg), a .npy array or a .csv series")


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
    if response.neighbours:
        rows = [[str(rank), str(n.probe_index), f"{n.distance:.4f}", str(n.class_index), n.label, n.component_id]
                for rank, n in enumerate(response.neighbours, 1)]
        shares = ", ".join(f"{c.component_id} {c.share:.2f}" for c in response.neighbour_components if c.share > 0)
        lines += ["", f"neighbours ({len(rows)} nearest probe examples)",
                  _table(["rank", "probe", "distance", "class", "label", "component"], rows, numeric={0, 1, 2, 3}),
                  f"their components: {shares}"]
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
        samples = (f"\n  samples (--sample N): {', '.join(f'{s.index}: {s.label}' for s in info.samples)}"
                   if info.samples else "")
        blocks.append(header + "\n" + _table(["method", "additive", "components"], rows, numeric={2}) + samples)
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
    connection.add_argument("--verbose", action="store_true", help="show the traceback of an error")

    parser = OneLineArgumentParser(prog="protoserve-client", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def add_input_command(name: str, help: str) -> argparse.ArgumentParser:
        command = commands.add_parser(name, parents=[connection], help=help)
        command.add_argument("input", type=Path, metavar="INPUT", nargs="?",
                             help="image (.png/.jpg), .npy array or .csv series")
        command.add_argument("--sample", type=int, metavar="N",
                             help="instead of INPUT: the model's held-out sample N (protoserve-client models)")
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
                         help="heatmap mode: contribution densities (feature_grid, input) or the paper's presence "
                              "maps with the residual's map (presence_feature_grid, presence_input; methods whose "
                              "model info says presence_maps); default: feature_grid with --overlay, else none")
    explain.add_argument("--neighbours", type=int, default=0, metavar="K",
                         help="also the K nearest probe examples in the method's component space and their "
                              "components (methods with a neighbour view: coupled_nmf; the paper shows about 30)")
    explain.add_argument("--neighbour-pngs", type=Path, metavar="DIR",
                         help="write each neighbour's example to DIR/neighbour-RANK-probe-INDEX.png")
    explain.add_argument("--overlay", type=Path, metavar="OUT.png",
                         help="write the input with the top components' heatmaps (of the --heatmaps mode) to "
                              "this PNG")

    commands.add_parser("models", parents=[connection], help="served models, their methods and components")
    return parser


def _sample(client: ExplainerClient, args: argparse.Namespace) -> LoadedInput:
    """The model's held-out sample ``args.sample``, as GetModel lists it."""
    samples = client.get_model(args.model, args.version).samples
    if not 0 <= args.sample < len(samples):
        raise UserError(f"--sample {args.sample}: model {args.model} has "
                        f"{f'samples 0 to {len(samples) - 1}' if samples else 'no held-out samples'}",
                        "`protoserve-client models` lists them" if samples else "give an INPUT file")
    sample = samples[args.sample]
    print(f"sample {sample.index}: class {sample.class_index} ({sample.label})", file=sys.stderr)
    return LoadedInput(array=from_tensor(sample.input, field=f"samples[{sample.index}].input"))


def _run(args: argparse.Namespace) -> None:
    if args.command in ("predict", "explain") and (args.input is None) == (args.sample is None):
        raise UserError("give INPUT or --sample N (one of them)", "see protoserve-client explain --help")
    if args.command == "explain" and args.overlay and args.heatmaps == "none":
        raise UserError("--overlay draws heatmaps, but --heatmaps none asks for none", "leave out --heatmaps none")
    if args.command == "explain" and args.neighbour_pngs and args.neighbours <= 0:
        raise UserError("--neighbour-pngs writes the neighbours' examples, but none are asked for", "add --neighbours K")
    with ExplainerClient(args.address, timeout=args.timeout) as client:
        if args.command == "models":
            # ListModels may leave components out; GetModel has them.
            infos = [client.get_model(info.name, info.version) for info in client.list_models().models]
            print(format_models(infos))
            return
        loaded = _sample(client, args) if args.sample is not None else load_input(args.input)
        if args.command == "predict":
            response = client.predict(loaded.array, image=loaded.image, model=args.model,
                                      version=args.version, top_k=args.top_k)
            print(_to_json(response) if args.json else format_prediction(response))
            return
        interventions = ([args.suppress] if args.suppress else []) + args.intervention
        heatmaps = args.heatmaps or ("feature_grid" if args.overlay else "none")
        response = client.explain(loaded.array, image=loaded.image, model=args.model, version=args.version,
                                  method=args.method, top_k=args.top_k, target_class=args.target_class,
                                  heatmaps=heatmaps, interventions=interventions, neighbours=args.neighbours)
        print(_to_json(response) if args.json else format_explanation(response))
        if args.neighbour_pngs:
            args.neighbour_pngs.mkdir(parents=True, exist_ok=True)
            drawn = [(rank, n) for rank, n in enumerate(response.neighbours, 1) if n.png]  # old archives: none
            for rank, neighbour in drawn:
                (args.neighbour_pngs / f"neighbour-{rank}-probe-{neighbour.probe_index}.png").write_bytes(neighbour.png)
            print(f"{len(drawn)} neighbour PNGs written to {args.neighbour_pngs}", file=sys.stderr)
        if args.overlay:
            try:
                write_overlay(args.overlay, loaded.pixels_or_series(), response)
            except ValueError as error:  # no heatmaps in the response, or an input that cannot be drawn
                raise UserError(f"cannot draw the overlay: {error}", "leave out --overlay") from error
            print(f"overlay written to {args.overlay}", file=sys.stderr)


# What to do about each status a server (or the channel) answers with; the rest: see the server's log.
RPC_REMEDIES = {
    grpc.StatusCode.INVALID_ARGUMENT: "check INPUT and the options against the model (protoserve-client models)",
    grpc.StatusCode.NOT_FOUND: "`protoserve-client models` lists the models, methods and component ids",
    grpc.StatusCode.DEADLINE_EXCEEDED: "retry with a longer --timeout",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "the server is busy or the message too large: retry, or send a smaller input",
    grpc.StatusCode.UNAUTHENTICATED: "this command line sends no bearer token: use ExplainerClient(token=...)",
}


def _rpc_user_error(error: ExplainerError, address: str) -> UserError:
    code, details = error.code(), error.details()
    if code is grpc.StatusCode.UNAVAILABLE:
        return UserError(f"the server at {address} is unavailable ({details})",
                         "start it (make run) or point --address at a running one")
    return UserError(f"{code.name}: {details}", RPC_REMEDIES.get(code, "see the server's log"))


def _user_error(error: Exception, args: argparse.Namespace) -> UserError | None:
    """`error` as a user error, or None when it is a bug."""
    if isinstance(error, UserError):
        return error
    if isinstance(error, ExplainerError):
        return _rpc_user_error(error, args.address)
    if isinstance(error, OSError):  # reading INPUT or writing the overlay
        problem = f"{error.filename}: {error.strerror}" if error.filename else str(error)
        return UserError(problem, "check the path")
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _run(args)
    except Exception as error:
        user_error = _user_error(error, args)
        if user_error is None:
            raise
        if args.verbose:
            traceback.print_exc()
        print(f"{parser.prog} {args.command}: error: {user_error}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
