"""Model archives: one file per model version, read without executing anything from it.

An archive is an uncompressed zip holding

* ``manifest.json``: format version, model name and version, input spec and
  preprocessing, class labels, the explained layer and its feature shape, the model's
  weight hash, each method's hyperparameters, fit report and components, the versions of
  the tools that wrote it, and the sha256 of every other member;
* ``model/{upstream,downstream}.graph.json`` and ``.safetensors``: the model's two parts
  (see :mod:`handlers.graph_program`);
* ``methods/<name>/factors.safetensors`` and ``methods/<name>/exemplars/<id>.png``;
* ``samples/inputs.safetensors``: a few held-out inputs per class with their labels (archives
  written before it have none): the server checks additive methods on them at load.

Reading checks, before anything is built: member names (no absolute paths, no ``..``), that
members are stored uncompressed, that their bytes do not overlap, that they are exactly those the
manifest lists, sizes (the manifest's too: every read is capped, so no member is inflated or read
past its limit), and every sha256; then the input shape against the model, the class count against
its logits, that each factorization was fitted against this model's weights and layer shape, that
component class indices are classes, and that ONNX parts hold all their tensors.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import re
import struct
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import safetensors
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from handlers.base import Component, FittedMethod
from handlers.errors import ArchiveError, clip
from handlers.graph_program import (
    UnsafeGraphError,
    dump_graph_module,
    load_graph_module,
)
from handlers.model import InputSpec, ModelParts
from handlers.onnx_backend import check_onnx_part, export_part

FORMAT = "protoserve-archive"
FORMAT_VERSION = 1
ARCHIVE_SUFFIX = ".psar"
MANIFEST = "manifest.json"
SAMPLES = "samples/inputs.safetensors"
MAX_MEMBER_BYTES = 4 << 30
MAX_MANIFEST_BYTES = 32 << 20
MAX_MEMBERS = 100_000
MAX_INPUT_ELEMENTS = 1 << 24  # one example; 64 MiB of float32
MAX_SAMPLES = 64
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed timestamps: the same inputs give the same bytes
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*$")


@dataclass(frozen=True)
class HeldOutSamples:
    """A few held-out examples per class: checked against at load, and shown to users.

    inputs : (S, *input_shape) float32, preprocessed as the model expects
    labels : (S,) int64, their true classes
    """

    inputs: torch.Tensor
    labels: torch.Tensor


@dataclass
class Archive:
    """A loaded archive: the model's parts and each method's fitted state."""

    name: str
    version: str
    parts: ModelParts
    methods: dict[str, FittedMethod]
    default_method: str
    manifest: dict
    onnx_parts: dict[str, bytes] | None = None  # "upstream"/"downstream" -> ONNX bytes, when packaged with them
    samples: HeldOutSamples | None = None  # None in archives written before samples were stored


def archive_filename(name: str, version: str) -> str:
    return f"{name}-{version}{ARCHIVE_SUFFIX}"


def write_archive(directory: Path | str, name: str, version: str, parts: ModelParts,
                  methods: list[FittedMethod], default_method: str | None = None,
                  model_card: dict | None = None, backend: str = "torch",
                  samples: HeldOutSamples | None = None) -> Path:
    """Write ``directory/<name>-<version>.psar`` and return its path.

    ``model_card`` is free-form JSON about the model (training data, held-out accuracy).
    ``samples``: held-out inputs with their labels (see :func:`handlers.packaging.held_out_samples`).
    ``backend="onnx"`` also stores ONNX exports of the parts and makes ONNX Runtime the
    archive's preferred backend for the forward pass.
    """
    if backend not in ("torch", "onnx"):
        raise ValueError(f"backend must be 'torch' or 'onnx', got {backend!r}")
    for label, value in (("name", name), ("version", version)):
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", value):
            raise ValueError(f"model {label} {value!r} may hold only letters, digits, '.', '_' and '-'")
    if not methods:
        raise ValueError("an archive needs at least one fitted method")
    members: dict[str, bytes] = {}
    for part_name, module in (("upstream", parts.upstream), ("downstream", parts.downstream)):
        graph, weights = dump_graph_module(module.to("cpu"))
        members[f"model/{part_name}.graph.json"] = graph
        members[f"model/{part_name}.safetensors"] = weights
    if backend == "onnx":
        example = torch.zeros(2, *parts.input_spec.shape)
        with torch.no_grad():
            features = parts.upstream(example)
        members["model/upstream.onnx"] = export_part(parts.upstream, example)
        members["model/downstream.onnx"] = export_part(parts.downstream, features)
    if samples is not None:
        members[SAMPLES] = save_safetensors({"inputs": samples.inputs.detach().cpu().float().contiguous(),
                                             "labels": samples.labels.detach().cpu().long().contiguous()})
    method_entries = {}
    for fitted in methods:
        prefix = f"methods/{fitted.name}"
        members[f"{prefix}/factors.safetensors"] = save_safetensors(
            {k: v.detach().cpu().contiguous() for k, v in fitted.factors.items()})
        components = []
        for component in fitted.components:
            entry = {"id": component.id, "label": component.label, "class_index": component.class_index}
            if component.id in fitted.exemplars:
                if not _SAFE_NAME.match(component.id):
                    raise ValueError(f"component id {component.id!r} cannot name an archive member")
                entry["exemplar"] = f"{prefix}/exemplars/{component.id}.png"
                members[entry["exemplar"]] = fitted.exemplars[component.id]
            components.append(entry)
        method_entries[fitted.name] = {
            "hyperparameters": fitted.hyperparameters,
            "fit_report": fitted.fit_report,
            "components": components,
            "model_weights_sha256": parts.weights_sha256,
            "feature_shape": list(parts.feature_shape),
        }
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "version": version,
        "input": parts.input_spec.to_json(),
        "labels": list(parts.labels),
        "layer": {"name": parts.layer, "feature_shape": list(parts.feature_shape)},
        "model_weights_sha256": parts.weights_sha256,
        "methods": method_entries,
        "default_method": default_method or methods[0].name,
        "model_card": model_card or {},
        "backend": backend,
        "written_by": _tool_versions(),
        "members": {path: hashlib.sha256(data).hexdigest() for path, data in sorted(members.items())},
    }
    path = Path(directory) / archive_filename(name, version)
    path.parent.mkdir(parents=True, exist_ok=True)
    manifest_bytes = json.dumps(manifest, indent=1, sort_keys=True).encode()
    if len(manifest_bytes) > MAX_MANIFEST_BYTES:
        raise ValueError(f"the manifest would be {len(manifest_bytes)} bytes, more than readers accept "
                         f"({MAX_MANIFEST_BYTES}); shorten the model card or the fit reports")
    # Written under a temporary name of its own in the same directory (not an archive's suffix, so a
    # server never loads it), then renamed over the archive: readers see the old archive or the whole
    # new one, and Ctrl-C or a crash while writing leaves neither a half-written archive nor the file.
    descriptor, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(descriptor, "wb") as f:
            with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as zf:
                for member, data in [(MANIFEST, manifest_bytes), *sorted(members.items())]:
                    zf.writestr(zipfile.ZipInfo(member, date_time=_ZIP_EPOCH), data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the archive from a server running as another user
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_archive(path: Path | str) -> Archive:
    """Read and verify an archive; raise :class:`ArchiveError` on anything amiss."""
    path = Path(path)
    try:
        with open(path, "rb") as file, zipfile.ZipFile(file) as zf:
            members = _read_members(zf, file)
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise ArchiveError(f"{path.name}: not a readable archive (truncated or corrupt?): {exc}") from exc
    except ArchiveError as exc:
        raise ArchiveError(f"{path.name}: {exc}") from exc
    try:
        return _build(members)
    except ArchiveError as exc:
        raise ArchiveError(f"{path.name}: {exc}") from exc
    # RuntimeError: torch refusing the stored graph or weights (shapes that do not fit).
    except (UnsafeGraphError, safetensors.SafetensorError, KeyError, TypeError, ValueError, IndexError,
            AttributeError, RuntimeError) as exc:
        raise ArchiveError(f"{path.name}: invalid content ({type(exc).__name__}): {exc}") from exc


def _check_layout(file: BinaryIO, infos: list[zipfile.ZipInfo]) -> None:
    """Refuse members whose bytes overlap, before any is read: the central directory can point many members
    at one range of the file, each with a correct checksum, so that a small file reads as gigabytes (a zip
    bomb without compression). Each member's local header, name, extra field and data must end before the
    next member's header starts; the members then hold at most the file's size."""
    end = 0
    for info in sorted(infos, key=lambda i: i.header_offset):
        if info.header_offset < end:
            raise ArchiveError(f"member {info.filename} overlaps the member before it in the file (a zip bomb?)")
        file.seek(info.header_offset)
        header = file.read(zipfile.sizeFileHeader)
        if len(header) != zipfile.sizeFileHeader:
            raise ArchiveError(f"member {info.filename}'s header lies past the end of the file")
        *_, name_length, extra_length = struct.unpack(zipfile.structFileHeader, header)
        end = info.header_offset + zipfile.sizeFileHeader + name_length + extra_length + info.compress_size


def _read_members(zf: zipfile.ZipFile, file: BinaryIO) -> dict[str, bytes]:
    infos = zf.infolist()
    if len(infos) > MAX_MEMBERS:
        raise ArchiveError(f"{len(infos)} members is more than the limit of {MAX_MEMBERS}")
    _check_layout(file, infos)
    names = [info.filename for info in infos]
    for name in names:
        if not _SAFE_NAME.match(name) or ".." in name.split("/"):
            raise ArchiveError(f"member name {name!r} is not allowed (absolute, escaping or odd characters)")
    if len(set(names)) != len(names):
        raise ArchiveError("duplicate member names")
    if MANIFEST not in names:
        raise ArchiveError("no manifest.json")
    for info in infos:
        # Stored members take their size in the file: nothing inflates beyond what is on disk.
        if info.compress_type != zipfile.ZIP_STORED:
            raise ArchiveError(f"member {info.filename} is compressed (method {info.compress_type}); archives "
                               "store members uncompressed")
    manifest_bytes = _read_capped(zf, zf.getinfo(MANIFEST), MAX_MANIFEST_BYTES)
    try:
        manifest = json.loads(manifest_bytes)
    except (ValueError, RecursionError) as exc:  # ValueError: also an integer of more than 4300 digits
        raise ArchiveError(f"manifest.json is not JSON: {type(exc).__name__}: {exc}") from exc
    if not isinstance(manifest, dict):
        raise ArchiveError(f"manifest.json holds a {type(manifest).__name__}, not an object")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ArchiveError(f"format {manifest.get('format')!r} v{manifest.get('format_version')!r} is not "
                           f"{FORMAT} v{FORMAT_VERSION}")
    listed = manifest.get("members", {})
    if not isinstance(listed, dict):
        raise ArchiveError("the manifest's members are not an object of sha256 by name")
    if set(names) - {MANIFEST} != set(listed):
        extra, missing = sorted(set(names) - {MANIFEST} - set(listed)), sorted(set(listed) - set(names))
        raise ArchiveError(f"members differ from the manifest: unlisted {extra}, missing {missing}")
    data = {MANIFEST: manifest_bytes}
    for info in infos:
        if info.filename == MANIFEST:
            continue
        content = _read_capped(zf, info, MAX_MEMBER_BYTES)
        if hashlib.sha256(content).hexdigest() != listed[info.filename]:
            raise ArchiveError(f"member {info.filename} fails its sha256 check (tampered or corrupt)")
        data[info.filename] = content
    return data


def _read_capped(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    """A member's bytes; refused, without reading more than ``limit + 1`` bytes, when larger than ``limit``."""
    if info.file_size > limit:
        raise ArchiveError(f"member {info.filename} is {info.file_size} bytes, more than the limit of {limit}")
    with zf.open(info) as stream:
        content = stream.read(limit + 1)  # the header's size could lie: the read is capped too
    if len(content) > limit:
        raise ArchiveError(f"member {info.filename} is more than the limit of {limit} bytes")
    return content


def _build(members: dict[str, bytes]) -> Archive:
    manifest = json.loads(members[MANIFEST])
    spec = InputSpec.from_json(manifest["input"])
    labels = list(manifest["labels"])
    if not all(isinstance(label, str) for label in labels):
        raise ArchiveError("the manifest's labels must be strings")
    if not spec.shape or min(spec.shape) < 1 or math.prod(spec.shape) > MAX_INPUT_ELEMENTS:
        raise ArchiveError(f"input shape {spec.shape} must have positive sizes and at most {MAX_INPUT_ELEMENTS} "
                           "elements")
    upstream = load_graph_module(members["model/upstream.graph.json"], members["model/upstream.safetensors"])
    downstream = load_graph_module(members["model/downstream.graph.json"], members["model/downstream.safetensors"])
    try:
        parts = ModelParts(upstream, downstream, spec, labels, manifest["layer"]["name"])
    except RuntimeError as exc:
        raise ArchiveError(f"the model does not take inputs of the manifest's shape {spec.shape}: {exc}") from exc
    if parts.weights_sha256 != manifest["model_weights_sha256"]:
        raise ArchiveError("the model's weights do not match the manifest's weight hash")
    if parts.feature_shape != manifest["layer"]["feature_shape"]:
        raise ArchiveError(f"layer shape {parts.feature_shape} differs from the manifest's "
                           f"{manifest['layer']['feature_shape']}")
    with torch.inference_mode():
        logits_shape = list(downstream(torch.zeros(1, *parts.feature_shape)).shape)
    if logits_shape != [1, len(labels)]:
        raise ArchiveError(f"the model gives logits of shape {logits_shape[1:]} for the manifest's "
                           f"{len(labels)} labels")
    methods = {}
    for method_name, entry in manifest["methods"].items():
        if entry["model_weights_sha256"] != parts.weights_sha256 or entry["feature_shape"] != parts.feature_shape:
            raise ArchiveError(f"method {method_name!r} was fitted against another model (weight hash or layer "
                               "shape differs); refit it")
        factors = load_safetensors(members[f"methods/{method_name}/factors.safetensors"])
        components = [_component(c, len(labels)) for c in entry["components"]]
        exemplars = {c["id"]: members[c["exemplar"]] for c in entry["components"] if "exemplar" in c}
        methods[method_name] = FittedMethod(method_name, factors, components, entry["hyperparameters"],
                                            entry["fit_report"], exemplars)
    if manifest["default_method"] not in methods:
        raise ArchiveError(f"default method {manifest['default_method']!r} is not in the archive")
    onnx_parts = None
    if manifest.get("backend") == "onnx":
        onnx_parts = {part: members[f"model/{part}.onnx"] for part in ("upstream", "downstream")}
        for part, data in onnx_parts.items():
            check_onnx_part(data, part)
    samples = _samples(members[SAMPLES], spec, len(labels)) if SAMPLES in members else None
    return Archive(manifest["name"], manifest["version"], parts, methods, manifest["default_method"], manifest,
                   onnx_parts, samples)


def _component(entry: dict, num_classes: int) -> Component:
    """A component of the manifest. Its class index is -1 (shared) or a class: methods index the logits
    with it, some in compiled kernels that do not check bounds."""
    index = entry["class_index"]
    if not isinstance(index, int) or isinstance(index, bool) or not -1 <= index < num_classes:
        raise ArchiveError(f"component {clip(str(entry['id']))!r} has class_index {clip(repr(index))}, not -1 or a "
                           f"class in [0, {num_classes})")
    return Component(entry["id"], entry["label"], index)


def _samples(data: bytes, spec: InputSpec, num_classes: int) -> HeldOutSamples:
    tensors = load_safetensors(data)
    if set(tensors) != {"inputs", "labels"}:
        raise ArchiveError(f"{SAMPLES} holds {sorted(tensors)}, not inputs and labels")
    inputs, labels = tensors["inputs"], tensors["labels"]
    count = len(labels)
    if not (inputs.dtype == torch.float32 and labels.dtype == torch.int64 and labels.dim() == 1
            and list(inputs.shape) == [count, *spec.shape] and 1 <= count <= MAX_SAMPLES):
        raise ArchiveError(f"{SAMPLES}: expected 1 to {MAX_SAMPLES} float32 inputs of shape {spec.shape} and int64 "
                           f"labels, got inputs {inputs.dtype} {list(inputs.shape)}, labels {labels.dtype} "
                           f"{list(labels.shape)}")
    if not bool(((labels >= 0) & (labels < num_classes)).all()) or not bool(inputs.isfinite().all()):
        raise ArchiveError(f"{SAMPLES}: labels outside [0, {num_classes}) or inputs that are not finite")
    return HeldOutSamples(inputs, labels)


def _tool_versions() -> dict:
    import numpy
    import safetensors as st

    return {"protoserve": _package_version("protoserve"), "torch": torch.__version__, "numpy": numpy.__version__,
            "safetensors": st.__version__, "python": platform.python_version()}


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"

