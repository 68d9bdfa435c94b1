"""Archives: written and read back; tampered, truncated, pickled and escaping ones refused."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from handlers.archive import read_archive, write_archive
from handlers.errors import ArchiveError


@pytest.fixture(scope="module")
def archive_path(demo_store) -> Path:
    return demo_store / "mnist-1.psar"


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy an archive, letting ``edit(members, manifest)`` change it, with hashes recomputed."""
    with zipfile.ZipFile(src) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    manifest = json.loads(members.pop("manifest.json"))
    edit(members, manifest)
    manifest["members"] = {k: hashlib.sha256(v).hexdigest() for k, v in members.items()}
    with zipfile.ZipFile(dst, "w") as zf:
        zf.writestr("manifest.json", json.dumps(manifest))
        for name, data in members.items():
            zf.writestr(name, data)
    return dst


def test_round_trip_gives_the_same_model(archive_path, mnist_model, mnist_split, tmp_path):
    archive = read_archive(archive_path)
    x = mnist_split["x_test"][:16]
    with torch.inference_mode():
        assert torch.equal(archive.parts.downstream(archive.parts.upstream(x)), mnist_model(x))
    again = write_archive(tmp_path, archive.name, archive.version, archive.parts, list(archive.methods.values()),
                          default_method=archive.default_method, model_card=archive.manifest["model_card"])
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

    bad = _rewrite(archive_path, tmp_path / "pickle.psar", plant)
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
        read_archive(_rewrite(archive_path, tmp_path / "exec.psar", plant))


@pytest.mark.parametrize("name", ["../escape.png", "/abs/path.png", "methods/../../x"])
def test_member_names_that_escape_are_refused(archive_path, tmp_path, name):
    def plant(members, manifest):
        members[name] = b"x"

    with pytest.raises(ArchiveError, match="not allowed"):
        read_archive(_rewrite(archive_path, tmp_path / "escape.psar", plant))


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
        read_archive(_rewrite(archive_path, tmp_path / "other.psar", other_model))


def test_changed_weights_are_refused(archive_path, tmp_path):
    from safetensors.torch import load, save

    def perturb(members, manifest):
        tensors = load(members["model/downstream.safetensors"])
        tensors = {k: v + 1e-3 if v.is_floating_point() else v for k, v in tensors.items()}
        members["model/downstream.safetensors"] = save(tensors)

    with pytest.raises(ArchiveError, match="weight hash"):
        read_archive(_rewrite(archive_path, tmp_path / "weights.psar", perturb))
