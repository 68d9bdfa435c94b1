"""Service settings: one place for every knob, with documented defaults."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    model_store: Path
    host: str = "127.0.0.1"          # loopback unless told otherwise
    port: int = 50051
    metrics_port: int = 9100         # 0: no metrics endpoint
    device: str = "auto"             # "auto": CUDA when present, else CPU
    max_batch_size: int = 32
    max_delay_ms: float = 2.0        # how long a batch waits for more requests after its first
    max_queue_size: int = 256        # per model; a full queue answers RESOURCE_EXHAUSTED at once
    max_message_bytes: int = 64 << 20
    max_top_k: int = 1000
    max_interventions: int = 64      # intervention sets per request
    default_top_k: int = 5
    shutdown_grace_s: float = 10.0
