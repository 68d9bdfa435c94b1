"""Offline: a layer's features of a whole data set on disk, by split and class.

A fit over more data than memory holds reads the features from here in batches: the
featurizer (:mod:`handlers.fitting.engine`) writes them once, the methods that stream read
them class by class. Files are read and written through file offsets, never mapped, so the
pages they pass through are the kernel's page cache, not the fitting process's memory.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

CACHE_FORMAT = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "test")


def cache_key(source_fingerprint: str, layer: str, weights_sha256: str, feature_shape: list[int]) -> dict:
    """What a cache's features depend on: the data, the layer and the model's weights."""
    return {"format": CACHE_FORMAT, "source": source_fingerprint, "layer": layer,
            "model_weights_sha256": weights_sha256, "feature_shape": list(feature_shape)}


class FeatureCache:
    """Features of one data source at one layer of one model, in ``directory``.

    Layout: ``manifest.json`` (the key, the per-class counts and ``complete``) and, per split s
    and class c, ``{s}_c{c}.npy`` (n_sc, *feature_shape) float32, the features of the split's
    examples of class c in the split's order (:meth:`indices` says which they are).
    ``complete`` is set once every row is written: an incomplete cache
    (an interrupted featurization) is started again, a complete one with the same key reused.

    Parameters
    ----------
    directory : Path
        Where the files are (made by :meth:`open`).
    key : dict
        :func:`cache_key` of what the features depend on.
    labels : dict of str to ndarray of shape (n_s,) int64
        Each split's class labels, in the split's order.
    num_classes : int
    """

    def __init__(self, directory: Path, key: dict, labels: dict[str, np.ndarray], num_classes: int):
        self.directory = Path(directory)
        self.key = key
        self.feature_shape = tuple(key["feature_shape"])
        self.num_classes = num_classes
        self.labels = {split: np.asarray(y, dtype=np.int64) for split, y in labels.items()}
        self.row_bytes = 4 * int(np.prod(self.feature_shape))
        # Per split: the examples of each class in order (members[s][c]), and slot[s][i], the row of
        # example i in its class's file; one stable sort, not a pass per class.
        self._members, self._slot = {}, {}
        for split, y in self.labels.items():
            order = np.argsort(y, kind="stable")
            counts = np.bincount(y, minlength=num_classes)
            self._members[split] = np.split(order, np.cumsum(counts)[:-1])
            slot = np.empty(len(y), dtype=np.int64)
            slot[order] = np.arange(len(y)) - np.repeat(np.cumsum(counts) - counts, counts)
            self._slot[split] = slot
        self._written = {split: np.zeros(len(y), dtype=bool) for split, y in self.labels.items()}
        self._header_bytes: dict[str, int] = {}
        manifest = self._read_manifest()
        self.complete = bool(manifest and manifest["key"] == key and manifest["complete"])

    @classmethod
    def open(cls, root: Path | str, key: dict, labels: dict[str, np.ndarray], num_classes: int) -> FeatureCache:
        """The cache for ``key`` under ``root`` (a directory named by the key's hash): reused when
        complete, else emptied and laid out anew (files of the right size, rows not yet written)."""
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        cache = cls(Path(root) / digest, key, labels, num_classes)
        if not cache.complete:
            cache._lay_out()
        return cache

    def _read_manifest(self) -> dict | None:
        path = self.directory / MANIFEST
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def _write_manifest(self) -> None:
        manifest = {"key": self.key, "complete": self.complete, "num_classes": self.num_classes,
                    "counts": {split: np.bincount(y, minlength=self.num_classes).tolist()
                               for split, y in self.labels.items()}}
        tmp = self.directory / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
        tmp.replace(self.directory / MANIFEST)

    def _lay_out(self) -> None:
        if self.directory.exists():
            shutil.rmtree(self.directory)
        self.directory.mkdir(parents=True)
        self._write_manifest()  # complete: false, before any row
        for split, by_class in self._members.items():
            for c, members in enumerate(by_class):
                # A header, then a sparse file of the final size: rows are written in place.
                array = np.lib.format.open_memmap(self._path(split, c), mode="w+", dtype=np.float32,
                                                  shape=(len(members), *self.feature_shape))
                del array

    def _path(self, split: str, c: int) -> Path:
        return self.directory / f"{split}_c{c}.npy"

    def _data_offset(self, split: str, c: int) -> int:
        key = f"{split}_{c}"
        if key not in self._header_bytes:
            with open(self._path(split, c), "rb") as f:
                read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                               (2, 0): np.lib.format.read_array_header_2_0}[np.lib.format.read_magic(f)]
                read_header(f)
                self._header_bytes[key] = f.tell()
        return self._header_bytes[key]

    def write(self, split: str, index: np.ndarray, features: np.ndarray) -> None:
        """Store the features of the split's examples ``index`` (B,), ``features`` (B, *feature_shape)
        float32, in any order; writing a row again overwrites it."""
        index = np.asarray(index, dtype=np.int64)
        features = np.ascontiguousarray(features, dtype=np.float32)
        if features.shape != (len(index), *self.feature_shape):
            raise ValueError(f"features of shape {features.shape} for {len(index)} rows of {self.feature_shape}")
        classes, slots = self.labels[split][index], self._slot[split][index]
        for c in np.unique(classes).tolist():
            rows = np.flatnonzero(classes == c)
            rows = rows[np.argsort(slots[rows], kind="stable")]
            with open(self._path(split, c), "r+b") as f:
                # One write per run of consecutive slots (a sequential batch is one run per class).
                runs = np.split(rows, np.flatnonzero(np.diff(slots[rows]) != 1) + 1)
                for run in runs:
                    f.seek(self._data_offset(split, c) + int(slots[run[0]]) * self.row_bytes)
                    # Rows next to each other in the batch (a class-sorted folder's) are written without a copy.
                    adjacent = run[-1] - run[0] == len(run) - 1
                    f.write(memoryview(features[run[0]:run[-1] + 1] if adjacent else features[run]))
        self._written[split][index] = True

    def mark_complete(self) -> None:
        """Record that every row is written (refused while rows are missing)."""
        missing = {split: int((~written).sum()) for split, written in self._written.items() if not written.all()}
        if missing:
            raise RuntimeError(f"the feature cache lacks rows: {missing}")
        self.complete = True
        self._write_manifest()

    def count(self, split: str, c: int) -> int:
        """Examples of class ``c`` in ``split``."""
        return len(self._members[split][c])

    def indices(self, split: str, c: int) -> np.ndarray:
        """(n_sc,) int64: the split's indices of its examples of class ``c``, in the files' order."""
        return self._members[split][c]

    def read(self, split: str, c: int, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of class ``c``'s features: (stop - start, *feature_shape) float32."""
        stop = min(stop, self.count(split, c))
        with open(self._path(split, c), "rb") as f:
            f.seek(self._data_offset(split, c) + start * self.row_bytes)
            array = np.fromfile(f, dtype=np.float32, count=(stop - start) * self.row_bytes // 4)
        return array.reshape(stop - start, *self.feature_shape)

    def batches(self, split: str, c: int, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, features)`` of class ``c`` in order, ``rows`` examples at a time."""
        for start in range(0, self.count(split, c), rows):
            yield start, self.read(split, c, start, start + rows)
