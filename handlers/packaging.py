"""Offline: a user's model definition and weights in, an archive out.

This is the only place that imports user code (the model definition), and it runs
offline, on the packager's machine. Serving reads archives and imports nothing from them.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from handlers.archive import HeldOutSamples, read_archive, write_archive
from handlers.base import FitData, FittedMethod
from handlers.fitting.engine import Engine, LocalEngine
from handlers.fitting.streaming import StreamedSource, streams
from handlers.methods import METHODS
from handlers.model import InputSpec, ModelParts


def load_model_definition(spec: str, kwargs: dict | None = None) -> nn.Module:
    """``path/to/file.py:ClassName`` or ``package.module:ClassName`` -> an instance."""
    location, _, attr = spec.rpartition(":")
    if not location or not attr:
        raise ValueError(f"model definition {spec!r} must look like file.py:ClassName or module:ClassName")
    if location.endswith(".py"):
        module_spec = importlib.util.spec_from_file_location(Path(location).stem, location)
        if module_spec is None or module_spec.loader is None:
            raise ValueError(f"cannot import {location}")
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(location)
    return getattr(module, attr)(**(kwargs or {}))


def load_weights(model: nn.Module, path: Path | str) -> nn.Module:
    """Load a state dict from ``.safetensors`` or a ``torch.save`` file (weights only, never pickle code)."""
    path = Path(path)
    state = load_file(path) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def load_fit_data(path: Path | str) -> FitData:
    """An ``.npz`` with ``x_train, y_train, x_test, y_test`` (inputs preprocessed as the model expects)."""
    with np.load(path, allow_pickle=False) as npz:
        missing = {"x_train", "y_train", "x_test", "y_test"} - set(npz.files)
        if missing:
            raise ValueError(f"{path} lacks {sorted(missing)}")
        return FitData(*(torch.from_numpy(npz[k]).to(torch.float32 if k.startswith("x") else torch.int64)
                         for k in ("x_train", "y_train", "x_test", "y_test")))


def fit_methods(parts: ModelParts, data: FitData, methods: dict[str, dict], log=print,
                engine: Engine | None = None) -> list[FittedMethod]:
    """Fit each named method with its hyperparameters, e.g. ``{"protonmf": {"n_prototypes": 3}}``
    (checked by the method's config: ValueError naming the allowed keys), each a task of ``engine``
    (default: in process). A method fitted on in-memory samples of a larger source records the
    sample (``data.sample``) in its fit report."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {sorted(METHODS)}")
    configs = [(name, METHODS[name].config.from_dict(params)) for name, params in methods.items()]
    fitted = (engine or LocalEngine()).map(_fit_method, [(parts, data, name, config, log) for name, config in configs],
                                           desc="fit methods")
    for method in fitted:
        if data.sample is not None and not streams(method.name):
            method.fit_report["sample"] = data.sample
    return fitted


def _fit_method(task: tuple) -> FittedMethod:
    """One method's fit (an engine task): ``(parts, data, name, config, log)``."""
    parts, data, name, config, log = task
    return METHODS[name].fit(parts, data, config, log=log)


def _resolve(data: FitData | StreamedSource, parts: ModelParts, methods: dict[str, dict], engine: Engine,
             log) -> FitData:
    return data.fit_data(parts, list(methods), engine, log) if isinstance(data, StreamedSource) else data


def held_out_samples(data: FitData, per_class: int = 2, limit: int = 32) -> HeldOutSamples | None:
    """A few held-out examples of each class (the first of each in ``data.x_test``), at most ``limit``;
    None without held-out data.

    Taken round by round, one per class each round, so with many classes every class gets one
    before any gets a second.
    """
    by_class = [(data.y_test == c).nonzero().flatten()[:per_class].tolist() for c in data.y_test.unique().tolist()]
    chosen = [members[rank] for rank in range(per_class) for members in by_class if rank < len(members)][:limit]
    if not chosen:
        return None
    index = torch.tensor(sorted(chosen), dtype=torch.int64)
    return HeldOutSamples(data.x_test[index].float(), data.y_test[index].long())


def package(model: nn.Module, *, layer: str, input_spec: InputSpec, labels: list[str],
            data: FitData | StreamedSource, methods: dict[str, dict], name: str, version: str, out_dir: Path | str,
            model_card: dict | None = None, backend: str = "torch", engine: Engine | None = None,
            log=print) -> Path:
    """Split ``model`` at ``layer``, fit ``methods`` on ``data`` (in memory, or a source read in
    batches) with ``engine`` (default: in process) and write the archive into ``out_dir``."""
    parts = ModelParts.from_model(model, layer, input_spec, labels)
    log(f"split at {layer!r}: features {parts.feature_shape}; weights sha256 {parts.weights_sha256[:12]}…")
    engine = engine or LocalEngine()
    data = _resolve(data, parts, methods, engine, log)
    fitted = fit_methods(parts, data, methods, log=log, engine=engine)
    path = write_archive(out_dir, name, version, parts, fitted, model_card=model_card, backend=backend,
                         samples=held_out_samples(data))
    log(f"wrote {path}")
    return path


def add_methods(archive_path: Path | str, data: FitData | StreamedSource, methods: dict[str, dict],
                out_dir: Path | str, version: str | None = None, engine: Engine | None = None, log=print) -> Path:
    """Fit more methods against the model inside an archive; write it again (optionally as a new version).

    The archive keeps its held-out samples; one written before they were stored gets them from ``data``.
    """
    archive = read_archive(archive_path)
    engine = engine or LocalEngine()
    data = _resolve(data, archive.parts, methods, engine, log)
    fitted = {**archive.methods,
              **{m.name: m for m in fit_methods(archive.parts, data, methods, log=log, engine=engine)}}
    path = write_archive(out_dir, archive.name, version or archive.version, archive.parts, list(fitted.values()),
                         default_method=archive.default_method, model_card=archive.manifest.get("model_card"),
                         backend=archive.manifest.get("backend", "torch"),
                         samples=archive.samples or held_out_samples(data))
    log(f"wrote {path}")
    return path


def parse_params(pairs: list[str]) -> dict:
    """``["n_prototypes=5", "solver=\\"mu\\""]`` -> dict; values are JSON, else strings."""
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"parameter {pair!r} must look like key=value")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params
