"""Archives: written and read back; tampered, truncated, pickled and escaping ones refused."""

from __future__ import annotations

import hashlib
import itertools
import json
import pickle
import re
import shutil
import struct
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
from conftest import rewrite_archive
from safetensors.torch import load, save

from handlers.archive import MAX_MANIFEST_BYTES, SAMPLES, read_archive, write_archive
from handlers.errors import ArchiveError
from handlers.runtime import ModelRuntime


@pytest.fixture(scope="module")
def archive_path(demo_store) -> Path:
    return demo_store / "mnist-1.psar"


def test_round_trip_gives_the_same_model(archive_path, mnist_model, mnist_split, tmp_path):
    archive = read_archive(archive_path)
    x = mnist_split["x_test"][:16]
    with torch.inference_mode():
        assert torch.equal(archive.parts.downstream(archive.parts.upstream(x)), mnist_model(x))
    again = write_archive(tmp_path, archive.name, archive.version, archive.parts, list(archive.methods.values()),
                          default_method=archive.default_method, model_card=archive.manifest["model_card"],
                          samples=archive.samples)
    assert again.read_bytes() == archive_path.read_bytes()  # deterministic bytes
    manifest = archive.manifest
    assert manifest["model_card"]["training"]["test_accuracy"] >= 0.97
    assert {"torch", "safetensors", "python"} <= set(manifest["written_by"])


def test_a_flipped_byte_is_refused(archive_path, tmp_path):
    data = bytearray(archive_path.read_bytes())
    with zipfile.ZipFile(archive_path) as zf:
        info = zf.getinfo("methods/protonmf/factors.safetensors")
    data[info.header_offset + 200] ^= 0x01  # inside that member's bytes
    bad = tmp_path / "flipped.psar"
    bad.write_bytes(bytes(data))
    with pytest.raises(ArchiveError, match="sha256|corrupt|CRC"):
        read_archive(bad)


def test_a_truncated_archive_is_refused(archive_path, tmp_path):
    bad = tmp_path / "truncated.psar"
    bad.write_bytes(archive_path.read_bytes()[: archive_path.stat().st_size // 2])
    with pytest.raises(ArchiveError, match="not a readable archive"):
        read_archive(bad)


def test_a_pickle_payload_is_never_executed(archive_path, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.write_text, (marker, "executed"))

    def plant(members, manifest):
        members["model/downstream.safetensors"] = pickle.dumps(Payload())

    bad = rewrite_archive(archive_path, tmp_path / "pickle.psar", plant)
    with pytest.raises(ArchiveError):
        read_archive(bad)
    assert not marker.exists()


def test_a_graph_calling_an_unlisted_function_is_refused(archive_path, tmp_path):
    def plant(members, manifest):
        graph = json.loads(members["model/downstream.graph.json"])
        for node in graph["nodes"]:
            if node["op"] == "call_module":
                node["op"], node["target"] = "call_function", "builtins.exec"
                break
        members["model/downstream.graph.json"] = json.dumps(graph).encode()

    with pytest.raises(ArchiveError, match="not allowed"):
        read_archive(rewrite_archive(archive_path, tmp_path / "exec.psar", plant))


@pytest.mark.parametrize("name", ["../escape.png", "/abs/path.png", "methods/../../x"])
def test_member_names_that_escape_are_refused(archive_path, tmp_path, name):
    def plant(members, manifest):
        members[name] = b"x"

    with pytest.raises(ArchiveError, match="not allowed"):
        read_archive(rewrite_archive(archive_path, tmp_path / "escape.psar", plant))


def test_an_unlisted_member_is_refused(archive_path, tmp_path):
    bad = tmp_path / "extra.psar"
    shutil.copy(archive_path, bad)
    with zipfile.ZipFile(bad, "a") as zf:
        zf.writestr("extra.bin", b"smuggled")
    with pytest.raises(ArchiveError, match="differ from the manifest"):
        read_archive(bad)


def test_a_factorization_fitted_on_other_weights_is_refused(archive_path, tmp_path):
    def other_model(members, manifest):
        for entry in manifest["methods"].values():
            entry["model_weights_sha256"] = "0" * 64

    with pytest.raises(ArchiveError, match="fitted against another model"):
        read_archive(rewrite_archive(archive_path, tmp_path / "other.psar", other_model))


def test_changed_weights_are_refused(archive_path, tmp_path):
    def perturb(members, manifest):
        tensors = load(members["model/downstream.safetensors"])
        tensors = {k: v + 1e-3 if v.is_floating_point() else v for k, v in tensors.items()}
        members["model/downstream.safetensors"] = save(tensors)

    with pytest.raises(ArchiveError, match="weight hash"):
        read_archive(rewrite_archive(archive_path, tmp_path / "weights.psar", perturb))


def test_held_out_samples_are_stored_with_their_labels(archive_path, mnist_split):
    samples = read_archive(archive_path).samples
    assert samples.labels.bincount(minlength=10).tolist() == [2] * 10
    # The first two held-out images of each class, in their held-out order, with their true labels.
    y = mnist_split["y_test"]
    expected = sorted(i for c in range(10) for i in (y == c).nonzero().flatten()[:2].tolist())
    assert torch.equal(samples.inputs, mnist_split["x_test"][expected])
    assert torch.equal(samples.labels, y[expected])


@pytest.mark.parametrize("labels, inputs_shape, match", [
    ([0, 1, 99], None, "labels outside"),
    (None, [3, 1, 28, 27], "expected 1 to 64"),
])
def test_held_out_samples_that_do_not_fit_the_model_are_refused(archive_path, tmp_path, labels, inputs_shape, match):
    def plant(members, manifest):
        tensors = load(members[SAMPLES])
        if labels is not None:
            tensors = {"inputs": tensors["inputs"][:3], "labels": torch.tensor(labels)}
        else:
            tensors = {"inputs": torch.zeros(inputs_shape), "labels": tensors["labels"][:3]}
        members[SAMPLES] = save(tensors)

    with pytest.raises(ArchiveError, match=match):
        read_archive(rewrite_archive(archive_path, tmp_path / "samples.psar", plant))


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["input"].update(shape=[3, 28, 28]), "does not take inputs of the manifest's shape"),  # channels
    (lambda m: m["input"].update(shape=[1, 32, 32]), r"layer shape \[128, 8, 8\] differs from the manifest's"),
    (lambda m: m["input"].update(shape=[1, 100_000, 100_000]), "at most 16777216 elements"),
    (lambda m: m["input"].update(shape=[1, 0, 28]), "positive sizes"),
    (lambda m: m["labels"].append("eleven"), r"logits of shape \[10\] for the manifest's 11 labels"),
    (lambda m: m.update(labels=m["labels"][:9]), r"logits of shape \[10\] for the manifest's 9 labels"),
])
def test_a_manifest_that_disagrees_with_the_weights_is_an_archive_error(archive_path, tmp_path, edit, match):
    with pytest.raises(ArchiveError, match=match):
        read_archive(rewrite_archive(archive_path, tmp_path / "disagrees.psar", lambda members, manifest: edit(manifest)))


def test_a_manifest_over_the_limit_is_refused_unread(archive_path, tmp_path):
    def pad(members, manifest):
        manifest["model_card"]["padding"] = "x" * MAX_MANIFEST_BYTES

    big = rewrite_archive(archive_path, tmp_path / "big-manifest.psar", pad)
    tracemalloc.start()
    try:
        with pytest.raises(ArchiveError, match=f"manifest.json is .* more than the limit of {MAX_MANIFEST_BYTES}"):
            read_archive(big)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MAX_MANIFEST_BYTES // 4


def test_a_deeply_nested_manifest_is_refused(archive_path, tmp_path):
    bad = tmp_path / "nested.psar"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("manifest.json", "[" * 200_000 + "]" * 200_000)
    with pytest.raises(ArchiveError, match="not JSON"):
        read_archive(bad)


def test_a_compression_bomb_is_refused_before_it_is_inflated(archive_path, tmp_path):
    """A deflated member of 256 MiB of zeros (a few hundred KiB on disk), listed with its true sha256."""
    inflated, chunk = 256 << 20, bytes(1 << 20)
    digest = hashlib.sha256()
    for _ in range(inflated // len(chunk)):
        digest.update(chunk)
    bomb = tmp_path / "bomb.psar"
    with zipfile.ZipFile(archive_path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    manifest = json.loads(members.pop("manifest.json"))
    manifest["members"]["samples/bomb.bin"] = digest.hexdigest()
    with zipfile.ZipFile(bomb, "w") as zf:
        zf.writestr("manifest.json", json.dumps(manifest))
        for name, data in members.items():
            zf.writestr(name, data)
        info = zipfile.ZipInfo("samples/bomb.bin")
        info.compress_type = zipfile.ZIP_DEFLATED
        with zf.open(info, "w", force_zip64=True) as out:
            for _ in range(inflated // len(chunk)):
                out.write(chunk)
    assert bomb.stat().st_size < 16 << 20
    tracemalloc.start()
    try:
        with pytest.raises(ArchiveError, match="samples/bomb.bin is compressed"):
            read_archive(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


def test_deflated_members_are_refused(archive_path, tmp_path):
    deflated = tmp_path / "deflated.psar"
    with zipfile.ZipFile(archive_path) as src, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as dst:
        for name in src.namelist():
            dst.writestr(name, src.read(name))
    with pytest.raises(ArchiveError, match="compressed"):
        read_archive(deflated)


def only_method(name: str, edit=lambda members, manifest: None):
    """A :func:`rewrite_archive` edit that keeps method ``name`` alone (the others cost load time), then ``edit``."""
    def keep(members, manifest):
        for other in [m for m in manifest["methods"] if m != name]:
            del manifest["methods"][other]
            for member in [k for k in members if k.startswith(f"methods/{other}/")]:
                del members[member]
        manifest["default_method"] = name
        edit(members, manifest)
    return keep


def edit_factors(method: str, change):
    """An edit that lets ``change(tensors)`` change ``method``'s fitted tensors."""
    def edit(members, manifest):
        path = f"methods/{method}/factors.safetensors"
        tensors = load(members[path])
        change(tensors)
        members[path] = save(tensors)
    return edit


@pytest.mark.parametrize("class_index, shown", [(10**12, "1000000000000"), (10, "10"), (-2, "-2"), ("3", "'3'"),
                                                (True, "True")])
def test_a_class_index_outside_the_classes_is_refused(archive_path, tmp_path, class_index, shown):
    """A class index reaches compiled kernels that index the logits unchecked (10**12 crashed the server)."""
    def plant(members, manifest):
        manifest["methods"]["protonmf"]["components"][0]["class_index"] = class_index

    with pytest.raises(ArchiveError, match=rf"component 'c0.p0' has class_index {shown}, not -1 or a class in "
                                           r"\[0, 10\)"):
        read_archive(rewrite_archive(archive_path, tmp_path / "class.psar", plant))


def test_a_shared_component_of_an_additive_method_is_refused(archive_path, tmp_path):
    def plant(members, manifest):
        manifest["methods"]["protonmf"]["components"][0]["class_index"] = -1

    archive = read_archive(rewrite_archive(archive_path, tmp_path / "shared.psar", only_method("protonmf", plant)))
    with pytest.raises(ArchiveError, match=r"method 'protonmf' does not fit the model \(ValueError\): protonmf: "
                                           r"component 'c0.p0' has class_index -1; every component of an additive "
                                           r"method belongs to a class in \[0, 10\)"):
        ModelRuntime(archive)


@pytest.mark.parametrize("method, change, match", [
    ("gradcam_rules", lambda t: t["class_components_"].view(-1)[0].fill_(10**6),
     r"class_components_ holds component indices outside \[-1, \d+\)"),
    ("gradcam_rules", lambda t: t["class_components_"].view(-1)[0].fill_(-2),
     r"class_components_ holds component indices outside \[-1, \d+\)"),
    ("gradcam_rules", lambda t: t["component_filters_"].view(-1)[0].fill_(1e9),
     "component_filters_ holds values other than 0 and 1"),
    ("coupled_nmf", lambda t: t["probe_labels_"].view(-1)[0].fill_(10),
     r"probe_labels_ holds classes outside \[0, 10\)"),
])
def test_fitted_indices_outside_their_range_are_refused(archive_path, tmp_path, method, change, match):
    archive = read_archive(rewrite_archive(archive_path, tmp_path / "index.psar",
                                           only_method(method, edit_factors(method, change))))
    with pytest.raises(ArchiveError, match=rf"method '{method}' does not fit the model \(ValueError\): .*{match}"):
        ModelRuntime(archive)


@pytest.mark.parametrize("method, edit, match", [
    # 3 of 30: requests would index components past the list (INTERNAL "list index out of range").
    ("protonmf", lambda c: c[:3], r"protonmf has 3 components; its factors hold 3 prototypes for each of 10 classes, "
                                  r"listed class by class \(30 components, c·p \+ i of class c\)"),
    ("protonmf", lambda c: [{**c[0], "class_index": 1}, *c[1:]], "protonmf has 30 components; its factors hold"),
    ("srae", lambda c: c[:-1], r"srae has 49 components; its factors hold 5 x-features for each of 10 modules"),
    ("srae", lambda c: [*c[:-1], {**c[-1], "class_index": 0}], "srae has 50 components; its factors hold"),
    ("protofac", lambda c: c[:-1], r"protofac factor prototypes_ has shape \(30, 6272\), expected \(C=29, F=6272\)"),
])
def test_components_that_do_not_match_the_factors_are_refused(archive_path, tmp_path, method, edit, match):
    def plant(members, manifest):
        entry = manifest["methods"][method]
        entry["components"] = edit(entry["components"])

    archive = read_archive(rewrite_archive(archive_path, tmp_path / "components.psar", only_method(method, plant)))
    with pytest.raises(ArchiveError, match=rf"method '{method}' does not fit the model \(ValueError\): {match}"):
        ModelRuntime(archive)


def _local_header(name: str, crc: int, size: int) -> bytes:
    """A zip local file header of a stored member."""
    return struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 0, 0, 0x21, crc, size, size, len(name), 0) + name.encode()


def test_members_that_overlap_are_refused_before_they_are_read(archive_path, tmp_path):
    """A zip bomb without compression: the central directory points 200 stored members, each listed with its
    correct CRC and sha256, at one 1 MiB range of the file (each member runs from its own header to the range's
    end, over the later members' headers): 1 MiB on disk, 200 MiB read."""
    with zipfile.ZipFile(archive_path) as zf:
        manifest = json.loads(zf.read("manifest.json"))
    names = [f"pad/m{i:03d}" for i in range(200)]
    headers = [_local_header(name, 0, 0) for name in names]  # stored members' sizes are read from the directory
    blob = b"".join(headers) + bytes(1 << 20)
    starts = list(itertools.accumulate(len(header) for header in headers))  # where each member's data starts
    manifest["members"] = {name: hashlib.sha256(blob[start:]).hexdigest() for name, start in zip(names, starts)}
    manifest_bytes = json.dumps(manifest).encode()
    out = _local_header("manifest.json", zlib.crc32(manifest_bytes), len(manifest_bytes)) + manifest_bytes
    entries = [("manifest.json", zlib.crc32(manifest_bytes), len(manifest_bytes), 0)]
    entries += [(name, zlib.crc32(blob[start:]), len(blob) - start, len(out) + start - len(header))
                for name, start, header in zip(names, starts, headers)]
    out += blob
    directory = b"".join(struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 0, 0, 0x21, crc, size, size, len(name),
                                     0, 0, 0, 0, 0, offset) + name.encode() for name, crc, size, offset in entries)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(entries), len(entries), len(directory), len(out), 0)
    bomb = tmp_path / "overlap.psar"
    bomb.write_bytes(out + directory + end)
    tracemalloc.start()
    try:
        with pytest.raises(ArchiveError, match="overlap.psar: member pad/m001 overlaps the member before it in the "
                                               "file"):
            read_archive(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


def test_an_integer_too_long_to_convert_is_an_archive_error(archive_path, tmp_path):
    """json refuses integers over 4300 digits with a plain ValueError."""
    bad = tmp_path / "bigint.psar"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("manifest.json", '{"format_version": ' + "9" * 5000 + "}")
    with pytest.raises(ArchiveError, match="manifest.json is not JSON: ValueError: Exceeds the limit"):
        read_archive(bad)


@pytest.mark.parametrize("method, key, value, rule", [
    ("protofac", "code_steps", 10**9, "at most 100000"),  # one Explain held a core for an hour
    ("protofac", "n_prototypes", 10**6, "at most 100000"),  # the default solver steps
    ("protonmf", "max_iter", 10**9, "at most 100000"),
    ("coupled_nmf", "fold_in_iter", 10**6, "at most 100000"),
    ("srae", "negatives", 10**7, "at most 1000000"),
    ("gradcam_rules", "n_candidates", 10**6, "at most 100000"),
    ("gradcam_rules", "table_sizes", [5, 10**7], "at most 1000000"),
    ("gradcam_rules", "n_filters", 129, "at most the layer's 128 filters"),
    ("gradcam_rules", "patch_size", 29, r"at most the input's size \[28, 28\]"),
])
def test_method_settings_over_their_bounds_are_refused(archive_path, tmp_path, method, key, value, rule):
    def plant(members, manifest):
        manifest["methods"][method]["hyperparameters"][key] = value

    archive = read_archive(rewrite_archive(archive_path, tmp_path / "settings.psar", only_method(method, plant)))
    shown = re.escape(repr(tuple(value) if isinstance(value, list) else value))
    with pytest.raises(ArchiveError, match=rf"method '{method}' does not fit the model \(ValueError\): {method}: "
                                           rf"{key}={shown} must be {rule}"):
        ModelRuntime(archive)
