"""Service settings: one place for every knob, with documented defaults.

Per-request limits (docs/limits.md has the full table): ``max_message_bytes`` (gRPC itself,
RESOURCE_EXHAUSTED), ``max_input_bytes`` (the ``input.data`` / ``image`` bytes of one request),
``max_top_k``, ``max_interventions``; heatmaps are returned only for the reported components,
so their number is bounded by the method's components. Security: ``tls_*`` and
``auth_token_file`` (see server/security.py); the server binds to loopback unless told otherwise, and the
metrics endpoint to loopback whatever ``host`` is (``metrics_host``; server/metrics_http.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

AUTOCAST_CHOICES = ("none", "float16", "bfloat16")
DEFAULT_HTTP_PORT = 8000  # `protoserve serve --http-port`'s default (Settings' is 0: off unless asked for)


@dataclass(frozen=True)
class Settings:
    model_store: Path
    host: str = "127.0.0.1"          # loopback unless told otherwise
    port: int = 50051
    metrics_port: int = 9100         # 0: no metrics endpoint
    metrics_host: str = "127.0.0.1"  # loopback whatever `host` is: the metrics name models and components
    metrics_token_file: Path | None = None  # bearer tokens for /metrics (same format as auth_token_file)
    metrics_timeout_s: float = 5.0   # a metrics connection sends its request within this, takes the answer within
                                     # as much again, or is closed
    metrics_max_connections: int = 8  # metrics connections (one thread each) at once; more are closed at once
    # HTTP (server/http_server.py): the Open Inference Protocol's REST binding and the explorer page, on `host`
    # with the gRPC side's TLS and tokens. 0: off (`protoserve serve` defaults to 8000).
    http_port: int = 0
    http_timeout_s: float = 10.0     # a request head, its body, and the taking of the answer: each within this;
                                     # also how long an idle keep-alive connection stays open
    http_max_connections: int = 64   # HTTP connections at once (TLS handshakes included); more: 503 and closed
    http_max_body_bytes: int = 64 << 20  # a request body (Content-Length); more: 413, never read
    http_max_buffered_bytes: int = 256 << 20  # request bodies held at once, over all connections; more: 503
    # A request's JSON (the body less the binary tensor data after Inference-Header-Content-Length): its
    # numbers take many times their bytes as Python objects while they are parsed; more: 413, never read
    http_max_json_bytes: int = 8 << 20
    # Host names the HTTP port answers for (DNS rebinding); empty: the loopback names when `host` is
    # loopback, any name otherwise
    http_allowed_hosts: tuple[str, ...] = ()
    device: str = "auto"             # "auto": CUDA when present, else CPU
    backend: str = "archive"         # forward pass: "torch", "onnx", or "archive" (what each archive prefers)
    autocast: str = "none"           # "float16" / "bfloat16": the backbone in reduced precision (GPU), math in float32
    cuda_graphs: bool = True         # on a GPU, capture each method's fixed-shape solvers at load as one CUDA graph
                                     # per batch-size bucket (handlers/device_graphs.py); no effect on the CPU
    intra_op_threads: int = 0        # torch CPU threads; 0: torch's default (one per core). 1 suits small models
                                     # on few cores: their ops gain nothing from a second thread, which would
                                     # compete with gRPC's threads for the cores
    keep_freed_mib: int = 1024       # allocations up to this size come from one heap that keeps freed memory
                                     # for the next batch (glibc; server/memory.py); 0: glibc's defaults
    max_batch_size: int = 32
    max_delay_ms: float = 0.0        # extra wait for more requests after the first; 0: take what queued while busy
    max_queue_size: int = 256        # per model; a full queue answers RESOURCE_EXHAUSTED at once
    max_message_bytes: int = 64 << 20
    # gRPC connections (server/app.py): at once (more are closed as they are accepted), the time a new one has
    # for its TLS handshake and HTTP/2 preface (else closed), and rpcs in flight over all of them, health
    # watches and streams included (more: RESOURCE_EXHAUSTED from gRPC itself)
    max_connections: int = 1024
    handshake_timeout_s: float = 10.0
    max_concurrent_rpcs: int = 1024
    max_top_k: int = 1000
    max_interventions: int = 64      # intervention sets per request
    default_top_k: int = 5
    shutdown_grace_s: float = 10.0
    max_input_bytes: int = 16 << 20  # bytes of `input.data` or `image` per request; more: INVALID_ARGUMENT
    # Images are decoded off the event loop (server/decode.py): pixels per image (read from the header,
    # before decoding), decoding threads, decodes in the pool at once (more: RESOURCE_EXHAUSTED), and
    # how long a request waits for its decode (queued and running; past it: RESOURCE_EXHAUSTED).
    max_image_pixels: int = 4096 * 4096
    decode_threads: int = 2
    max_decode_backlog: int = 16
    decode_timeout_s: float = 5.0
    tls_cert: Path | None = None     # PEM certificate chain; with tls_key: serve TLS only
    tls_key: Path | None = None      # PEM private key
    tls_client_ca: Path | None = None  # PEM CA bundle: require client certificates signed by it (mutual TLS)
    auth_token_file: Path | None = None  # bearer tokens, one per line; rpcs without one: UNAUTHENTICATED
    drain_quiet_s: float = 0.5       # shutdown: refuse new rpcs until none came for this long (within the grace)
    max_stream_outstanding: int = 64  # ExplainStream: requests read and not yet answered; at the bound the
                                      # stream stops reading until the client takes answers
    max_streams: int = 128           # ExplainStreams open at once; more: RESOURCE_EXHAUSTED as they open
    restart_backoff_s: float = 0.5   # a crashed batch worker is restarted after this (doubling while it keeps crashing)

    def __post_init__(self) -> None:
        if self.autocast not in AUTOCAST_CHOICES:
            raise ValueError(f"autocast must be one of {', '.join(AUTOCAST_CHOICES)}, got {self.autocast!r}")
        if self.autocast != "none" and self.backend == "onnx":
            raise ValueError("autocast applies to the torch backend; it cannot be combined with backend='onnx'")
        if self.intra_op_threads < 0:
            raise ValueError(f"intra_op_threads must be >= 0 (0: torch's default), got {self.intra_op_threads}")
        if self.keep_freed_mib < 0:
            raise ValueError(f"keep_freed_mib must be >= 0 (0: glibc's defaults), got {self.keep_freed_mib}")
        if self.max_connections < 1 or self.max_concurrent_rpcs < 1 or not self.handshake_timeout_s > 0:
            raise ValueError("max_connections and max_concurrent_rpcs must be >= 1 and handshake_timeout_s > 0")
        for name in ("max_stream_outstanding", "max_streams"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.http_max_connections < 1 or not self.http_timeout_s > 0 or self.http_max_body_bytes < 1 \
                or self.http_max_buffered_bytes < self.http_max_body_bytes or self.http_max_json_bytes < 1:
            raise ValueError("http_max_connections, http_max_body_bytes and http_max_json_bytes must be >= 1, "
                             "http_timeout_s > 0, and http_max_buffered_bytes at least http_max_body_bytes")
        if self.metrics_max_connections < 1 or not self.metrics_timeout_s > 0:
            raise ValueError("metrics_max_connections must be >= 1 and metrics_timeout_s > 0")
        for name in ("max_image_pixels", "decode_threads", "max_decode_backlog"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.decode_timeout_s > 0:
            raise ValueError(f"decode_timeout_s must be > 0, got {self.decode_timeout_s}")
