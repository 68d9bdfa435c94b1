"""protoserve: serve archives, or build them (package a model, fit more methods)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from protoserve_client.cli import EXIT_USER_ERROR, OneLineArgumentParser, UserError

from handlers.errors import ArchiveError, ProtoserveError
from server.settings import AUTOCAST_CHOICES, DEFAULT_HTTP_PORT, Settings

if TYPE_CHECKING:
    from handlers.base import FitData
    from handlers.fitting.streaming import StreamedSource


def _serve(args: argparse.Namespace) -> int:
    import uvloop

    from server.app import App

    settings = Settings(model_store=Path(args.model_store), host=args.host, port=args.port,
                        metrics_port=args.metrics_port, metrics_host=args.metrics_host,
                        metrics_token_file=_path(args.metrics_token_file), metrics_timeout_s=args.metrics_timeout_s,
                        metrics_max_connections=args.metrics_max_connections,
                        http_port=args.http_port, http_timeout_s=args.http_timeout_s,
                        http_max_connections=args.http_max_connections, http_max_body_bytes=args.http_max_body_bytes,
                        http_max_buffered_bytes=args.http_max_buffered_bytes,
                        http_max_json_bytes=args.http_max_json_bytes,
                        http_allowed_hosts=tuple(args.http_allowed_host),
                        max_connections=args.max_connections, handshake_timeout_s=args.handshake_timeout_s,
                        max_concurrent_rpcs=args.max_concurrent_rpcs,
                        max_stream_outstanding=args.max_stream_outstanding, max_streams=args.max_streams,
                        device=args.device, backend=args.backend,
                        autocast=args.autocast, cuda_graphs=args.cuda_graphs, intra_op_threads=args.intra_op_threads,
                        keep_freed_mib=args.keep_freed_mib,
                        max_batch_size=args.max_batch_size,
                        max_delay_ms=args.max_delay_ms, max_queue_size=args.max_queue_size,
                        shutdown_grace_s=args.grace,
                        max_message_bytes=args.max_message_bytes, max_input_bytes=args.max_input_bytes,
                        max_image_pixels=args.max_image_pixels, decode_threads=args.decode_threads,
                        max_decode_backlog=args.max_decode_backlog, decode_timeout_s=args.decode_timeout_s,
                        max_top_k=args.max_top_k, max_interventions=args.max_interventions,
                        tls_cert=_path(args.tls_cert), tls_key=_path(args.tls_key),
                        tls_client_ca=_path(args.tls_client_ca), auth_token_file=_path(args.auth_token_file))
    from server.http_server import ListenError
    from server.security import SecurityConfigError

    try:
        # uvloop's loop costs less per rpc than asyncio's (BENCHMARKS.md: uvloop).
        uvloop.run(App(settings).run_until_signal())
    except (SecurityConfigError, ListenError) as exc:
        print(f"protoserve serve: {exc}", file=sys.stderr)
        return 2
    return 0


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True,
                        help=".npz with x_train, y_train, x_test, y_test (read whole); a directory of x_train.npy, "
                             "y_train.npy, x_test.npy, y_test.npy (memory-mapped); an image folder DIR/train/<label>/*, "
                             "DIR/test/<label>/*; or a CSV/Parquet table of series, one row each")
    parser.add_argument("--method", action="append", required=True, help="method to fit (repeatable)")
    parser.add_argument("--param", action="append", default=[], metavar="METHOD.KEY=VALUE",
                        help="a method hyperparameter, e.g. protonmf.n_prototypes=5")
    parser.add_argument("--out", required=True, help="directory to write the archive into (the model store)")
    data = parser.add_argument_group("data that is not an .npz (read in batches)")
    data.add_argument("--label-column", help="a table's column of labels (values as in --labels)")
    data.add_argument("--test-fraction", type=float,
                      help="hold out this share of each class of an image folder or table without a test split")
    data.add_argument("--cache-dir", default="build/feature-cache",
                      help="the on-disk feature cache; a fit interrupted after featurizing resumes from it")
    data.add_argument("--max-memory-mib", type=int,
                      help="bound the fit's memory: methods that need every row in memory get a uniform sample "
                           "(recorded in the fit report)")
    data.add_argument("--batch-size", type=int, default=64, help="examples per featurization batch")
    data.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1),
                      help="DataLoader workers decoding inputs")
    data.add_argument("--seed", type=int, default=0, help="seed of a --test-fraction split and of the samples")
    parser.add_argument("--engine", default="local", choices=["local", "ray"],
                        help="where the fit runs: in this process, or on a Ray cluster")
    parser.add_argument("--ray-address", help="a Ray cluster's address (--engine ray; default: start a local Ray)")


def _methods(args: argparse.Namespace) -> dict[str, dict]:
    from handlers.methods import METHODS
    from handlers.packaging import parse_params

    unknown = [m for m in args.method if m not in METHODS]
    if unknown:
        raise UserError(f"--method {', '.join(unknown)}: no such method", f"choose from {', '.join(sorted(METHODS))}")
    methods: dict[str, dict] = {m: {} for m in args.method}
    for key, value in parse_params(args.param).items():
        method, _, name = key.partition(".")
        if method not in methods:
            raise UserError(f"--param {key}: method {method!r} is not among --method {list(methods)}",
                            f"add --method {method} or leave out the parameter")
        accepted = METHODS[method].config.keys()
        if name not in accepted:
            raise UserError(f"--param {key}: {method} has no parameter {name!r}",
                            f"use one of {', '.join(accepted)}")
        methods[method][name] = value
    for method, params in methods.items():
        try:
            METHODS[method].config.from_dict(params)
        except ValueError as error:
            raise UserError(f"--param {error}", f"give a value the parameter accepts; {method}'s parameters are "
                                                f"{', '.join(METHODS[method].config.keys())}") from error
    return methods


def _fit_data(args: argparse.Namespace) -> FitData | StreamedSource:
    """An .npz read whole, or any other --data as a source read in batches."""
    from handlers.fitting.streaming import StreamedSource
    from handlers.packaging import load_fit_data

    path = args.data
    if not path.endswith(".npz"):
        return StreamedSource(path, args.cache_dir, label_column=args.label_column, test_fraction=args.test_fraction,
                              max_memory_mib=args.max_memory_mib, batch_size=args.batch_size,
                              num_workers=args.num_workers, seed=args.seed)
    for option in ("label_column", "test_fraction", "max_memory_mib"):
        if getattr(args, option) is not None:
            raise UserError(f"--{option.replace('_', '-')}: an .npz is read whole",
                            "leave the option out, or give --data as a directory of .npy files")
    try:
        return load_fit_data(path)
    except (ValueError, EOFError, zipfile.BadZipFile) as error:  # not an .npz, a damaged one, or keys missing
        raise UserError(f"--data {path}: not a readable .npz of x_train, y_train, x_test, y_test ({error})",
                        "write it with numpy.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)") from error


def _engine(args: argparse.Namespace):
    from handlers.fitting.engine import make_engine

    return make_engine(args.engine, ray_address=args.ray_address)


def _package(args: argparse.Namespace) -> int:
    from handlers.model import InputSpec
    from handlers.packaging import load_model_definition, load_weights, package

    model = load_weights(load_model_definition(args.model_def, json.loads(args.model_kwargs)), args.weights)
    labels = Path(args.labels).read_text().split() if Path(args.labels).is_file() else args.labels.split(",")
    image = None
    if args.image_mode:
        channels = len(args.image_mode) if args.image_mode != "L" else 1
        image = {"mode": args.image_mode, "size": args.input_shape[1:], "scale": args.scale,
                 "mean": args.mean or [0.0] * channels, "std": args.std or [1.0] * channels}
    package(model, layer=args.layer, input_spec=InputSpec(shape=args.input_shape, image=image), labels=labels,
            data=_fit_data(args), methods=_methods(args), name=args.name, version=args.version,
            out_dir=args.out, backend=args.backend, engine=_engine(args))
    return 0


def _fit(args: argparse.Namespace) -> int:
    from handlers.packaging import add_methods

    add_methods(args.archive, _fit_data(args), _methods(args), args.out, version=args.version, engine=_engine(args))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(prog="protoserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve every archive in a model store over gRPC (and HTTP)")
    limits = Settings(model_store=Path("."))  # the documented defaults (docs/limits.md)
    serve.add_argument("--model-store", required=True)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=50051)
    serve.add_argument("--metrics-port", type=int, default=9100, help="0 disables the metrics endpoint")
    serve.add_argument("--metrics-host", default=limits.metrics_host,
                       help="address of the metrics endpoint; loopback whatever --host is (the metrics name "
                            "models and components)")
    serve.add_argument("--metrics-token-file",
                       help="file of bearer tokens, one per line: scrapes need `Authorization: Bearer <token>`")
    serve.add_argument("--metrics-timeout-s", type=float, default=limits.metrics_timeout_s,
                       help="a metrics connection sends its request within this and takes the answer within "
                            "as much again, or is closed")
    serve.add_argument("--metrics-max-connections", type=int, default=limits.metrics_max_connections,
                       help="metrics connections served at once (a thread each); more are closed at once")
    serve.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT,
                       help="HTTP on --host: the Open Inference Protocol's REST binding (/v2) and the explorer "
                            "page (/), with the gRPC side's TLS and tokens; 0 turns it off")
    serve.add_argument("--http-timeout-s", type=float, default=limits.http_timeout_s,
                       help="an HTTP request's head, its body and the taking of its answer: each within this")
    serve.add_argument("--http-max-connections", type=int, default=limits.http_max_connections,
                       help="HTTP connections at once; more are answered 503 and closed")
    serve.add_argument("--http-max-body-bytes", type=int, default=limits.http_max_body_bytes,
                       help="largest HTTP request body (413 beyond, never read)")
    serve.add_argument("--http-allowed-host", action="append", default=[], metavar="NAME",
                       help="a host name the HTTP port answers for (repeatable); default: the loopback names when "
                            "--host is loopback, any otherwise (other names get 421: DNS rebinding)")
    serve.add_argument("--http-max-buffered-bytes", type=int, default=limits.http_max_buffered_bytes,
                       help="HTTP request bodies held at once, over all connections (503 beyond)")
    serve.add_argument("--http-max-json-bytes", type=int, default=limits.http_max_json_bytes,
                       help="largest JSON part of an HTTP request: the body less the binary tensor data after "
                            "Inference-Header-Content-Length (413 beyond, never read)")
    serve.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, …")
    serve.add_argument("--backend", default="archive", choices=["archive", "torch", "onnx"],
                       help="forward pass in torch or ONNX Runtime; archive: as each archive prefers")
    serve.add_argument("--autocast", default="none", choices=AUTOCAST_CHOICES,
                       help="run each model's backbone in reduced precision (GPU); heads and explanations "
                            "stay float32")
    serve.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                       help="on a GPU, capture each method's fixed-shape solvers at load as one CUDA graph per "
                            "batch-size bucket up to --max-batch-size (each checked against the eager result)")
    serve.add_argument("--intra-op-threads", type=int, default=0,
                       help="torch CPU threads; 0: one per core. 1 lowers latency for small models on few cores")
    serve.add_argument("--keep-freed-mib", type=int, default=limits.keep_freed_mib,
                       help="allocations up to this size come from one heap that keeps freed memory for the "
                            "next batch (glibc); 0: glibc's defaults, which page-fault large activations anew")
    serve.add_argument("--max-batch-size", type=int, default=32)
    serve.add_argument("--max-delay-ms", type=float, default=0.0,
                       help="extra wait for a fuller batch; 0 batches what queued while the worker was busy")
    serve.add_argument("--max-queue-size", type=int, default=256)
    serve.add_argument("--grace", type=float, default=10.0, help="seconds in-flight requests get on shutdown")
    serve.add_argument("--max-message-bytes", type=int, default=limits.max_message_bytes,
                       help="largest gRPC message received or sent (gRPC answers RESOURCE_EXHAUSTED beyond)")
    serve.add_argument("--max-connections", type=int, default=limits.max_connections,
                       help="gRPC connections at once; more are closed as they are accepted")
    serve.add_argument("--handshake-timeout-s", type=float, default=limits.handshake_timeout_s,
                       help="a new gRPC connection's TLS handshake and HTTP/2 preface: within this, else closed")
    serve.add_argument("--max-concurrent-rpcs", type=int, default=limits.max_concurrent_rpcs,
                       help="gRPC rpcs in flight at once, streams and health watches included; more: "
                            "RESOURCE_EXHAUSTED")
    serve.add_argument("--max-input-bytes", type=int, default=limits.max_input_bytes,
                       help="largest input tensor data or encoded image per request")
    serve.add_argument("--max-image-pixels", type=int, default=limits.max_image_pixels,
                       help="largest image (width x height, read from its header before decoding)")
    serve.add_argument("--decode-threads", type=int, default=limits.decode_threads,
                       help="threads that decode request images, off the event loop")
    serve.add_argument("--max-decode-backlog", type=int, default=limits.max_decode_backlog,
                       help="images being decoded or waiting at once; more: RESOURCE_EXHAUSTED")
    serve.add_argument("--decode-timeout-s", type=float, default=limits.decode_timeout_s,
                       help="how long a request waits for its image to be decoded; longer: RESOURCE_EXHAUSTED")
    serve.add_argument("--max-stream-outstanding", type=int, default=limits.max_stream_outstanding,
                       help="ExplainStream: requests read and not yet answered; at the bound the stream stops "
                            "reading until the client takes answers")
    serve.add_argument("--max-streams", type=int, default=limits.max_streams,
                       help="ExplainStreams open at once; more: RESOURCE_EXHAUSTED as they open")
    serve.add_argument("--max-top-k", type=int, default=limits.max_top_k)
    serve.add_argument("--max-interventions", type=int, default=limits.max_interventions,
                       help="intervention sets per Explain request")
    serve.add_argument("--tls-cert", help="PEM certificate chain: serve TLS (needs --tls-key)")
    serve.add_argument("--tls-key", help="PEM private key of --tls-cert")
    serve.add_argument("--tls-client-ca", help="PEM CA bundle: require client certificates it signed (mutual TLS)")
    serve.add_argument("--auth-token-file",
                       help="file of bearer tokens, one per line: rpcs need `authorization: Bearer <token>` "
                            "(health and reflection stay open)")
    serve.set_defaults(run=_serve)

    pack = sub.add_parser("package", help="package a model definition + weights with fitted methods")
    pack.add_argument("--model-def", required=True, help="file.py:ClassName or module:ClassName")
    pack.add_argument("--model-kwargs", default="{}", help="JSON constructor arguments")
    pack.add_argument("--weights", required=True, help=".safetensors or a state dict saved by torch.save")
    pack.add_argument("--layer", required=True, help="node of the traced graph to explain (see `protoserve layers`)")
    pack.add_argument("--input-shape", type=int, nargs="+", required=True, help="one example, e.g. 1 28 28")
    pack.add_argument("--labels", required=True, help="a file with one label per line, or a comma-separated list")
    pack.add_argument("--image-mode", default="", help="PIL mode for encoded images (L, RGB); empty: tensors only")
    pack.add_argument("--scale", type=float, default=1 / 255)
    pack.add_argument("--mean", type=float, nargs="*")
    pack.add_argument("--std", type=float, nargs="*")
    pack.add_argument("--backend", default="torch", choices=["torch", "onnx"],
                      help="onnx: also store ONNX exports of the parts and prefer ONNX Runtime for the forward pass")
    pack.add_argument("--name", required=True)
    pack.add_argument("--version", required=True)
    _model_args(pack)
    pack.set_defaults(run=_package)

    fit = sub.add_parser("fit", help="fit more methods against the model inside an archive")
    fit.add_argument("archive")
    fit.add_argument("--version", help="write as this version (default: the archive's)")
    _model_args(fit)
    fit.set_defaults(run=_fit)

    layers = sub.add_parser("layers", help="list the layers a model can be explained at")
    layers.add_argument("--model-def", required=True)
    layers.add_argument("--model-kwargs", default="{}")
    layers.set_defaults(run=_layers)

    health = sub.add_parser("health", help="exit 0 if the server at --address reports SERVING (container probes)")
    health.add_argument("--address", default="127.0.0.1:50051")
    health.add_argument("--service", default="", help="a service name; empty: the whole server")
    health.set_defaults(run=_health)

    for command in sub.choices.values():
        command.add_argument("--verbose", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except Exception as error:
        user_error = _user_error(error, args.command)
        if user_error is None:
            raise
        if args.verbose:
            traceback.print_exc()
        print(f"{parser.prog} {args.command}: error: {user_error}", file=sys.stderr)
        return EXIT_USER_ERROR


# What to do about a refused option or input, by command.
REMEDIES = {
    "serve": "check --model-store (a directory of .psar archives; `make demo` builds one) and the other options",
    "package": "check --layer, --method, --param and --data (`protoserve layers` lists the layers)",
    "fit": "choose --method and --param to suit the archive's layer and --data, or package the model at another "
           "--layer",
    "layers": "check --model-def (file.py:ClassName or module:ClassName) and --model-kwargs",
}


def _user_error(error: Exception, command: str) -> UserError | None:
    """`error` as a user error, or None when it is a bug."""
    if isinstance(error, UserError):
        return error
    if isinstance(error, OSError) and error.filename:
        return UserError(f"{error.filename}: {error.strerror}", "check the path")
    if isinstance(error, ArchiveError):
        return UserError(str(error), "check the path, or give an archive that `protoserve package` wrote")
    # The handlers' checks of options, models and data raise ValueError; archives, ArchiveError.
    if isinstance(error, (OSError, ValueError, ProtoserveError)):
        return UserError(str(error), REMEDIES.get(command, f"see protoserve {command} --help"))
    return None


def _layers(args: argparse.Namespace) -> int:
    from handlers.graph_program import layer_names
    from handlers.packaging import load_model_definition

    print("\n".join(layer_names(load_model_definition(args.model_def, json.loads(args.model_kwargs)))))
    return 0


def _health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(args.address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=args.service),
                                                               timeout=3)
        except grpc.RpcError as exc:
            print(f"unhealthy: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
