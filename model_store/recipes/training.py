"""What every demo recipe shares: writing a trained model, and its command line."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from safetensors.torch import save_file
from torch import nn


def save_trained(out: Path, stem: str, model: nn.Module, metrics: dict) -> None:
    """Write ``out/<stem>.safetensors`` (the state dict) and ``out/<stem>.metrics.json``."""
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(out / f"{stem}.safetensors"))
    (out / f"{stem}.metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


def recipe_main(argv: list[str] | None, description: str, stem: str, train: Callable, default_epochs: int) -> None:
    """``python -m model_store.recipes.<name> --out DIR [--seed N] [--epochs N]``: train and save."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="seed of everything random")
    parser.add_argument("--epochs", type=int, default=default_epochs, help="training epochs")
    args = parser.parse_args(argv)
    model, metrics = train(seed=args.seed, epochs=args.epochs)
    save_trained(args.out, stem, model, metrics)
    print(f"test accuracy {metrics['test_accuracy']:.4f}  train accuracy {metrics['train_accuracy']:.4f}  "
          f"time {metrics['train_seconds']:.1f}s  -> {args.out}")
