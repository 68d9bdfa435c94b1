"""Model archives: one file per model version, read without executing anything from it.

An archive is an uncompressed zip holding

* ``manifest.json``: format version, model name and version, input spec and
  preprocessing, class labels, the explained layer and its feature shape, the model's
  weight hash, each method's hyperparameters, fit report and components, the versions of
  the tools that wrote it, and the sha256 of every other member;
* ``model/{upstream,downstream}.graph.json`` and ``.safetensors``: the model's two parts
  (see :mod:`handlers.model_parts`);
* ``methods/<name>/factors.safetensors`` and ``methods/<name>/exemplars/<id>.png``.

Reading checks, before anything is built: member names (no absolute paths, no ``..``),
that the members are exactly those the manifest lists, sizes, and every sha256; then that
each factorization was fitted against this model's weights and layer shape.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import safetensors
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from handlers.base import Component, FittedMethod
from handlers.errors import ArchiveError
from handlers.model import InputSpec, ModelParts
from handlers.model_parts import UnsafeGraphError, dump_graph_module, load_graph_module
from handlers.onnx_backend import export_part

FORMAT = "protoserve-archive"
FORMAT_VERSION = 1
ARCHIVE_SUFFIX = ".psar"
MANIFEST = "manifest.json"
MAX_MEMBER_BYTES = 4 << 30
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed timestamps: the same inputs give the same bytes
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*$")


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


def archive_filename(name: str, version: str) -> str:
    return f"{name}-{version}{ARCHIVE_SUFFIX}"


def write_archive(directory: Path | str, name: str, version: str, parts: ModelParts,
                  methods: list[FittedMethod], default_method: str | None = None,
                  model_card: dict | None = None, backend: str = "torch") -> Path:
    """Write ``directory/<name>-<version>.psar`` and return its path.

    ``model_card`` is free-form JSON about the model (training data, held-out accuracy).
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
    tmp = path.with_suffix(path.suffix + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
        for member, data in [(MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode()), *sorted(members.items())]:
            zf.writestr(zipfile.ZipInfo(member, date_time=_ZIP_EPOCH), data)
    tmp.replace(path)  # readers never see a half-written archive
    return path


def read_archive(path: Path | str) -> Archive:
    """Read and verify an archive; raise :class:`ArchiveError` on anything amiss."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            members = _read_members(zf)
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise ArchiveError(f"{path.name}: not a readable archive (truncated or corrupt?): {exc}") from exc
    try:
        return _build(members)
    except ArchiveError as exc:
        raise ArchiveError(f"{path.name}: {exc}") from exc
    except (UnsafeGraphError, safetensors.SafetensorError, KeyError, TypeError, ValueError) as exc:
        raise ArchiveError(f"{path.name}: invalid content: {exc}") from exc


def _read_members(zf: zipfile.ZipFile) -> dict[str, bytes]:
    names = [info.filename for info in zf.infolist()]
    for name in names:
        if not _SAFE_NAME.match(name) or ".." in name.split("/"):
            raise ArchiveError(f"member name {name!r} is not allowed (absolute, escaping or odd characters)")
    if len(set(names)) != len(names):
        raise ArchiveError("duplicate member names")
    if MANIFEST not in names:
        raise ArchiveError("no manifest.json")
    manifest_bytes = zf.read(MANIFEST)
    try:
        manifest = json.loads(manifest_bytes)
    except json.JSONDecodeError as exc:
        raise ArchiveError(f"manifest.json is not JSON: {exc}") from exc
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ArchiveError(f"format {manifest.get('format')!r} v{manifest.get('format_version')!r} is not "
                           f"{FORMAT} v{FORMAT_VERSION}")
    listed = manifest.get("members", {})
    if set(names) - {MANIFEST} != set(listed):
        extra, missing = sorted(set(names) - {MANIFEST} - set(listed)), sorted(set(listed) - set(names))
        raise ArchiveError(f"members differ from the manifest: unlisted {extra}, missing {missing}")
    data = {MANIFEST: manifest_bytes}
    for info in zf.infolist():
        if info.filename == MANIFEST:
            continue
        if info.file_size > MAX_MEMBER_BYTES:
            raise ArchiveError(f"member {info.filename} is larger than {MAX_MEMBER_BYTES} bytes")
        content = zf.read(info)
        if hashlib.sha256(content).hexdigest() != listed[info.filename]:
            raise ArchiveError(f"member {info.filename} fails its sha256 check (tampered or corrupt)")
        data[info.filename] = content
    return data


def _build(members: dict[str, bytes]) -> Archive:
    manifest = json.loads(members[MANIFEST])
    upstream = load_graph_module(members["model/upstream.graph.json"], members["model/upstream.safetensors"])
    downstream = load_graph_module(members["model/downstream.graph.json"], members["model/downstream.safetensors"])
    parts = ModelParts(upstream, downstream, InputSpec.from_json(manifest["input"]), list(manifest["labels"]),
                       manifest["layer"]["name"])
    if parts.weights_sha256 != manifest["model_weights_sha256"]:
        raise ArchiveError("the model's weights do not match the manifest's weight hash")
    if parts.feature_shape != manifest["layer"]["feature_shape"]:
        raise ArchiveError(f"layer shape {parts.feature_shape} differs from the manifest's "
                           f"{manifest['layer']['feature_shape']}")
    methods = {}
    for method_name, entry in manifest["methods"].items():
        if entry["model_weights_sha256"] != parts.weights_sha256 or entry["feature_shape"] != parts.feature_shape:
            raise ArchiveError(f"method {method_name!r} was fitted against another model (weight hash or layer "
                               "shape differs); refit it")
        factors = load_safetensors(members[f"methods/{method_name}/factors.safetensors"])
        components = [Component(c["id"], c["label"], int(c["class_index"])) for c in entry["components"]]
        exemplars = {c["id"]: members[c["exemplar"]] for c in entry["components"] if "exemplar" in c}
        methods[method_name] = FittedMethod(method_name, factors, components, entry["hyperparameters"],
                                            entry["fit_report"], exemplars)
    if manifest["default_method"] not in methods:
        raise ArchiveError(f"default method {manifest['default_method']!r} is not in the archive")
    onnx_parts = None
    if manifest.get("backend") == "onnx":
        onnx_parts = {part: members[f"model/{part}.onnx"] for part in ("upstream", "downstream")}
    return Archive(manifest["name"], manifest["version"], parts, methods, manifest["default_method"], manifest,
                   onnx_parts)


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

