"""Offline: training data that need not fit in memory, as random-access torch Datasets.

``protoserve package|fit --data`` takes, besides an ``.npz`` (read whole by
:func:`handlers.packaging.load_fit_data`):

* a directory of ``x_train.npy, y_train.npy, x_test.npy, y_test.npy``, read memory-mapped;
* an image folder in torchvision's ImageFolder layout, ``DIR/train/<class>/*`` and
  ``DIR/test/<class>/*`` (or ``DIR/<class>/*`` with a test fraction), each image decoded and
  preprocessed by the archive's own preprocessing, the code the server runs for an ``image``
  request (:func:`handlers.preprocess.input_from_image`); class folders are named by the labels;
* a CSV or Parquet file of series, one row per series and a label column, read in chunks into a
  float32 ``.npy`` in the work directory, then memory-mapped.

Every source gives :class:`DataSource`: ``train`` and ``test`` yield ``(x, y)`` with ``x`` float32
(*input_shape) preprocessed and ``y`` int64, and the labels of both splits are known without
decoding an input.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from handlers.errors import InvalidInputError
from handlers.model import InputSpec
from handlers.preprocess import input_from_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
TABLE_SUFFIXES = (".csv", ".parquet", ".pq")
NPY_FILES = ("x_train.npy", "y_train.npy", "x_test.npy", "y_test.npy")
# Offline, the packager's own images: far above the server's per-request default, still bounded.
MAX_IMAGE_PIXELS = 1 << 28
TABLE_CHUNK_ROWS = 4096


@dataclass
class DataSource:
    """Training and held-out data, read on demand.

    train, test : Datasets of ``(x, y)``: x float32 (*input_shape), y int64 ()
    labels      : {"train": (N,) int64, "test": (M,) int64}, in the Datasets' order
    fingerprint : changes when the data or the split does (names, sizes, modification times)
    description : what was read, for the log
    """

    train: Dataset
    test: Dataset
    labels: dict[str, np.ndarray]
    fingerprint: str
    description: str


class ArrayDataset(Dataset):
    """Rows of an array (a memory map, say) with their labels; a row is copied out as float32."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.x, self.y = x, np.asarray(y, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(np.array(self.x[i], dtype=np.float32)), torch.tensor(self.y[i])


class ImageFiles(Dataset):
    """Image files decoded and preprocessed as the server does for an ``image`` request."""

    def __init__(self, paths: list[Path], y: np.ndarray, spec: InputSpec):
        self.paths, self.y, self.spec = paths, np.asarray(y, dtype=np.int64), spec

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            x = input_from_image(self.paths[i].read_bytes(), self.spec, max_pixels=MAX_IMAGE_PIXELS)
        except InvalidInputError as error:
            raise ValueError(f"{self.paths[i]}: {error.detail}") from None
        return x, torch.tensor(self.y[i])


def open_source(path: Path | str, spec: InputSpec, labels: list[str], *, work_dir: Path | str,
                label_column: str | None = None, test_fraction: float | None = None,
                seed: int = 0) -> DataSource:
    """The data at ``path`` (not an ``.npz``): a directory of ``.npy`` files, an image folder, or a
    CSV/Parquet table of series. ``test_fraction`` splits a folder or table that has no test split
    (per class, by ``seed``); ``work_dir`` holds a table's converted rows. ValueError, in one line,
    for data that does not fit the model or ``labels``."""
    path = Path(path)
    if test_fraction is not None and not 0 < test_fraction < 1:
        raise ValueError(f"--test-fraction {test_fraction} must be between 0 and 1")
    if path.is_dir() and all((path / name).is_file() for name in NPY_FILES):
        return _npy_directory(path, spec, labels)
    if path.is_dir():
        return _image_folder(path, spec, labels, test_fraction, seed)
    if path.suffix.lower() in TABLE_SUFFIXES:
        if not label_column:
            raise ValueError(f"--data {path}: a table of series needs --label-column NAME")
        return _table(path, spec, labels, label_column, test_fraction, seed, Path(work_dir))
    raise ValueError(f"--data {path}: not an .npz, a directory of {', '.join(NPY_FILES)}, an image folder, "
                     f"or a {'/'.join(TABLE_SUFFIXES)} table")


def _fingerprint(files: list[Path], **extra) -> str:
    digest = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    for f in files:
        stat = f.stat()
        digest.update(f"{f}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _npy_directory(path: Path, spec: InputSpec, labels: list[str]) -> DataSource:
    arrays = {name[:-4]: np.load(path / name, mmap_mode="r", allow_pickle=False) for name in NPY_FILES}
    splits, y_all = {}, {}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], np.asarray(arrays[f"y_{split}"], dtype=np.int64)
        if list(x.shape[1:]) != list(spec.shape) or x.shape[:1] != y.shape:
            raise ValueError(f"--data {path}: x_{split}.npy is {list(x.shape)} and y_{split}.npy {list(y.shape)}; "
                             f"expected (N, {', '.join(map(str, spec.shape))}) and (N,)")
        if len(y) and not (0 <= y.min() and y.max() < len(labels)):
            raise ValueError(f"--data {path}: y_{split}.npy holds classes {y.min()}..{y.max()}, but --labels has "
                             f"{len(labels)}")
        splits[split], y_all[split] = ArrayDataset(x, y), y
    return DataSource(splits["train"], splits["test"], y_all, _fingerprint([path / n for n in NPY_FILES]),
                      f"{path}: .npy arrays, {len(y_all['train'])} train / {len(y_all['test'])} test (memory-mapped)")


def _class_folders(root: Path) -> dict[str, list[Path]]:
    return {d.name: sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("."))
            for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")}


def _image_folder(path: Path, spec: InputSpec, labels: list[str], test_fraction: float | None,
                  seed: int) -> DataSource:
    if spec.image is None:
        raise ValueError(f"--data {path}: an image folder needs the model's image preprocessing (--image-mode)")
    has_split = (path / "train").is_dir() and (path / "test").is_dir()
    if has_split and test_fraction is not None:
        raise ValueError(f"--data {path} has train/ and test/ folders; leave out --test-fraction")
    if not has_split and test_fraction is None:
        raise ValueError(f"--data {path} has no train/ and test/ folders: give --test-fraction F to hold out a "
                         "share of each class")
    folders = {"train": _class_folders(path / "train"), "test": _class_folders(path / "test")} if has_split \
        else {"all": _class_folders(path)}
    names = sorted(set().union(*folders.values()))
    if sorted(names) != sorted(labels) or not set(labels) <= set(next(iter(folders.values()))):
        raise ValueError(f"--data {path}: class folders {names} do not match --labels {labels} (folders without "
                         f"a label: {sorted(set(names) - set(labels))}; labels without a training folder: "
                         f"{sorted(set(labels) - set(next(iter(folders.values()))))})")
    index = {label: c for c, label in enumerate(labels)}
    files: dict[str, list[tuple[Path, int]]] = {"train": [], "test": []}
    rng = np.random.default_rng(seed)
    for split, by_class in folders.items():
        for name, paths in by_class.items():
            pairs = [(p, index[name]) for p in paths]
            if split == "all":
                held_out = set(rng.permutation(len(pairs))[:round(test_fraction * len(pairs))].tolist())
                files["test"] += [pair for i, pair in enumerate(pairs) if i in held_out]
                files["train"] += [pair for i, pair in enumerate(pairs) if i not in held_out]
            else:
                files[split] += pairs
    datasets = {split: ImageFiles([p for p, _ in pairs], np.array([c for _, c in pairs], dtype=np.int64), spec)
                for split, pairs in files.items()}
    every = [p for pairs in files.values() for p, _ in pairs]
    return DataSource(datasets["train"], datasets["test"], {s: d.y for s, d in datasets.items()},
                      _fingerprint(every, preprocessing=spec.to_json(), labels=labels, test_fraction=test_fraction,
                                   seed=seed),
                      f"{path}: image folder, {len(files['train'])} train / {len(files['test'])} test images")


def _table_chunks(path: Path, columns: list[str] | None = None):
    """DataFrames of at most TABLE_CHUNK_ROWS rows of a CSV or Parquet file (``columns``: only those)."""
    if path.suffix.lower() == ".csv":
        import pandas as pd

        yield from pd.read_csv(path, usecols=columns, chunksize=TABLE_CHUNK_ROWS)
    else:
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=TABLE_CHUNK_ROWS, columns=columns):
            yield batch.to_pandas()


def _table(path: Path, spec: InputSpec, labels: list[str], label_column: str, test_fraction: float | None,
           seed: int, work_dir: Path) -> DataSource:
    if test_fraction is None:
        raise ValueError(f"--data {path}: a table has no test split: give --test-fraction F")
    # First pass: the label column alone (the classes and the row count).
    try:
        values = np.concatenate([chunk[label_column].astype(str).to_numpy() for chunk in
                                 _table_chunks(path, [label_column])])
    except (KeyError, ValueError) as error:
        raise ValueError(f"--data {path}: no label column {label_column!r} ({error})") from None
    unknown = sorted(set(values.tolist()) - set(labels))
    if unknown:
        raise ValueError(f"--data {path}: label values {unknown[:10]} in column {label_column!r} are not among "
                         f"--labels {labels}")
    index = {label: c for c, label in enumerate(labels)}
    y = np.array([index[v] for v in values.tolist()], dtype=np.int64)
    fingerprint = _fingerprint([path], shape=spec.shape, label_column=label_column, labels=labels,
                               test_fraction=test_fraction, seed=seed)
    # Second pass: the series, chunk by chunk, into a float32 .npy that is then memory-mapped.
    rows_path = work_dir / f"table-{fingerprint[:16]}.npy"
    if not rows_path.is_file():
        work_dir.mkdir(parents=True, exist_ok=True)
        tmp = rows_path.with_suffix(".npy.tmp")
        rows = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(y), *spec.shape))
        start, size = 0, math.prod(spec.shape)
        for chunk in _table_chunks(path):
            series = chunk.drop(columns=[label_column]).to_numpy(dtype=np.float32)
            if series.shape[1] != size:
                raise ValueError(f"--data {path}: rows have {series.shape[1]} values besides {label_column!r}; "
                                 f"the model takes {spec.shape} = {size}")
            rows[start:start + len(series)] = series.reshape(len(series), *spec.shape)
            start += len(series)
        rows.flush()
        del rows
        tmp.replace(rows_path)
    rows = np.load(rows_path, mmap_mode="r")
    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(y), dtype=bool)
    for c in range(len(labels)):
        members = np.flatnonzero(y == c)
        is_test[rng.permutation(members)[:round(test_fraction * len(members))]] = True
    train, test = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    return DataSource(ArrayDataset(_Rows(rows, train), y[train]), ArrayDataset(_Rows(rows, test), y[test]),
                      {"train": y[train], "test": y[test]}, fingerprint,
                      f"{path}: table of series, {len(train)} train / {len(test)} test rows")


class _Rows:
    """The rows ``index`` of an array, indexed from 0."""

    def __init__(self, array: np.ndarray, index: np.ndarray):
        self.array, self.index = array, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.array[self.index[i]]
