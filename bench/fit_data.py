"""Fitting data of any size (issue 17, item 5): two figures, each measured side by side in one run.

    python -m bench.fit_data [--work build/bench-fit-data] [--inputs 2100]

* ``fit_memory_growth``: peak RSS of ``protoserve package`` (a subprocess each, ProtoNMF from an
  image folder of PNGs under ``--max-memory-mib``) on 4N inputs over the same on N inputs, at a
  layer whose features for the 4N inputs exceed 1 GiB in float32. Goal <= 1.25.
* ``featurize_over_loop``: inputs per second of the streaming featurizer (``LocalEngine.featurize``
  into the feature cache) over a plain DataLoader + forward loop that keeps nothing, over the same
  folder, same batch size and workers, rounds interleaved. Goal >= 0.9.

The model is an untrained wide CNN (the figures depend on shapes, not weights): 3x64x64 inputs,
its last ReLU 512x8x8 (128 KiB of float32 per input). The images are smooth random RGB PNGs in
torchvision's ImageFolder layout, two classes, written once into ``--work``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
GOALS = {"fit_memory_growth": "<= 1.25", "featurize_over_loop": ">= 0.9"}
LABELS = ["a", "b"]
SIDE, LAYER, FEATURE_SHAPE = 64, "relu_2", (512, 8, 8)
TEST_SHARE = 1 / 7  # of each size's inputs, in test/
BATCH_SIZE, WORKERS = 64, 1
# The process holds about 1040 MiB after featurizing the 8400 inputs on this machine (torch, the model, and the
# heap the featurizer freed, which glibc keeps and the fit reuses): the budget leaves the fit room above it.
MAX_MEMORY_MIB = 1280
LOOP_ROUNDS = 3

MODEL_DEF = textwrap.dedent('''
    import torch
    from torch import nn

    class WideNet(nn.Module):
        """3x64x64 -> its last ReLU, 512x8x8 -> pooled linear head (2 classes)."""

        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 3, stride=2, padding=1)
            self.conv2 = nn.Conv2d(64, 128, 3, stride=2, padding=1)
            self.conv3 = nn.Conv2d(128, 512, 3, stride=2, padding=1, groups=8)
            self.head = nn.Linear(512, 2)

        def forward(self, x):
            h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
            return self.head(torch.relu(self.conv3(h)).mean((2, 3)))
''')


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def write_inputs(work: Path, n: int) -> dict[int, Path]:
    """ImageFolders of N and 4N inputs (the N folder hard-links the first of the 4N folder's files)."""
    folders = {n: work / f"images-{n}", 4 * n: work / f"images-{4 * n}"}
    big = folders[4 * n]
    if not (big / "done").exists():
        shutil.rmtree(big, ignore_errors=True)
        rng = np.random.default_rng(0)
        for i in range(4 * n):
            split = "test" if i % round(1 / TEST_SHARE) == 0 else "train"
            folder = big / split / LABELS[i % 2]
            folder.mkdir(parents=True, exist_ok=True)
            coarse = rng.integers(0, 256, (SIDE // 8, SIDE // 8, 3), dtype=np.uint8)
            Image.fromarray(coarse).resize((SIDE, SIDE), Image.BILINEAR).save(folder / f"{i:06d}.png")
        (big / "done").touch()
    small = folders[n]
    shutil.rmtree(small, ignore_errors=True)
    for path in sorted(big.glob("*/*/*.png")):
        if int(path.stem) < n:
            target = small / path.relative_to(big)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target)
    return folders


def model_files(work: Path) -> tuple[Path, Path]:
    definition, weights = work / "widenet.py", work / "widenet.pt"
    definition.write_text(MODEL_DEF)
    sys.path.insert(0, str(work))
    try:
        import widenet
    finally:
        sys.path.remove(str(work))
    torch.manual_seed(0)
    torch.save(widenet.WideNet().state_dict(), weights)
    return definition, weights


def package_command(definition: Path, weights: Path, folder: Path, out: Path, cache: Path) -> list[str]:
    return [str(Path(sys.executable).parent / "protoserve"), "package", "--model-def", f"{definition}:WideNet",
            "--weights", str(weights), "--layer", LAYER, "--input-shape", "3", str(SIDE), str(SIDE),
            "--image-mode", "RGB", "--labels", ",".join(LABELS), "--data", str(folder), "--method", "protonmf",
            "--name", folder.name, "--version", "1", "--out", str(out), "--cache-dir", str(cache),
            "--max-memory-mib", str(MAX_MEMORY_MIB), "--batch-size", str(BATCH_SIZE), "--num-workers", str(WORKERS)]


def peak_rss(command: list[str]) -> dict:
    """Run ``command``; the peak RSS of its process and of its process tree (itself and the DataLoader
    workers), sampled every 20 ms, in MiB, and the seconds it took."""
    start = time.perf_counter()
    process = psutil.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peaks = {"process": 0, "tree": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            try:
                main = process.memory_info().rss
                tree = main + sum(child.memory_info().rss for child in process.children(recursive=True))
            except psutil.Error:
                continue
            peaks["process"], peaks["tree"] = max(peaks["process"], main), max(peaks["tree"], tree)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    _, stderr = process.communicate()
    done.set()
    sampler.join()
    if process.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{stderr[-3000:]}")
    return {"peak_rss_mib": peaks["process"] / 2 ** 20, "peak_tree_rss_mib": peaks["tree"] / 2 ** 20,
            "seconds": time.perf_counter() - start}


def fit_memory_growth(work: Path, folders: dict[int, Path], definition: Path, weights: Path) -> dict:
    n, big = sorted(folders)
    feature_bytes = big * 4 * int(np.prod(FEATURE_SHAPE))  # over 1 GiB from N = 2049 on
    runs = {}
    for size in (n, big):
        with tempfile.TemporaryDirectory(dir=work) as scratch:
            scratch = Path(scratch)
            log(f"fit_data: protoserve package on {size} inputs …")
            runs[size] = peak_rss(package_command(definition, weights, folders[size], scratch / "out",
                                                  scratch / "cache"))
            log(f"fit_data: {size} inputs: peak RSS {runs[size]['peak_rss_mib']:.0f} MiB (tree "
                f"{runs[size]['peak_tree_rss_mib']:.0f} MiB), {runs[size]['seconds']:.0f}s")
    return {"value": runs[big]["peak_rss_mib"] / runs[n]["peak_rss_mib"],
            "tree_ratio": runs[big]["peak_tree_rss_mib"] / runs[n]["peak_tree_rss_mib"],
            "inputs": {"n": n, "4n": big}, "features_4n_gib": feature_bytes / 2 ** 30,
            "max_memory_mib": MAX_MEMORY_MIB, "runs": {str(size): run for size, run in runs.items()}}


def featurize_over_loop(work: Path, folder: Path, definition: Path, weights: Path) -> dict:
    """Inputs per second: LocalEngine.featurize into a fresh feature cache / DataLoader + forward, interleaved."""
    from torch.utils.data import DataLoader

    from handlers.fitting.engine import LocalEngine, one_intraop_thread
    from handlers.fitting.feature_cache import FeatureCache, cache_key
    from handlers.fitting.sources import open_source
    from handlers.model import InputSpec, ModelParts
    from handlers.packaging import load_model_definition, load_weights

    model = load_weights(load_model_definition(f"{definition}:WideNet"), weights)
    spec = InputSpec([3, SIDE, SIDE], image={"mode": "RGB", "size": [SIDE, SIDE], "scale": 1 / 255,
                                             "mean": [0.0] * 3, "std": [1.0] * 3})
    parts = ModelParts.from_model(model, LAYER, spec, LABELS)
    source = open_source(folder, spec, LABELS, work_dir=work)
    engine = LocalEngine("cpu")

    def streaming():
        with tempfile.TemporaryDirectory(dir=work) as scratch:
            key = cache_key(source.fingerprint, parts.layer, parts.weights_sha256, parts.feature_shape)
            cache = FeatureCache.open(scratch, key, {"train": source.labels["train"]}, parts.num_classes)
            engine.featurize(parts, source.train, cache, "train", batch_size=BATCH_SIZE, num_workers=WORKERS)

    def plain_loop():
        loader = DataLoader(source.train, batch_size=BATCH_SIZE, num_workers=WORKERS, worker_init_fn=one_intraop_thread)
        with torch.inference_mode():
            for x, _ in loader:
                parts.upstream(x)

    times = {"streaming": [], "loop": []}
    for _ in range(LOOP_ROUNDS):
        for name, fn in (("streaming", streaming), ("loop", plain_loop)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    n = len(source.train)
    ratios = [loop / stream for stream, loop in zip(times["streaming"], times["loop"])]
    return {"value": statistics.median(times["loop"]) / statistics.median(times["streaming"]),
            "spread": [min(ratios), max(ratios)], "inputs": n,
            "streaming_inputs_per_s": n / statistics.median(times["streaming"]),
            "loop_inputs_per_s": n / statistics.median(times["loop"]), "rounds": LOOP_ROUNDS}


def run(work: Path = ROOT / "build/bench-fit-data", n: int = 2100) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    log(f"fit_data: writing {4 * n} PNGs into {work} (once) …")
    folders = write_inputs(work, n)
    definition, weights = model_files(work)
    memory = fit_memory_growth(work, folders, definition, weights)
    log("fit_data: featurize_over_loop …")
    loop = featurize_over_loop(work, folders[n], definition, weights)
    return {"fit_memory_growth": memory, "featurize_over_loop": loop}


def rows(figures: dict) -> list[tuple[str, str, float, str]]:
    """Table rows (key, what, value, spread) for BENCHMARKS.md."""
    m, f = figures["fit_memory_growth"], figures["featurize_over_loop"]
    small, big = (m["runs"][str(size)] for size in (m["inputs"]["n"], m["inputs"]["4n"]))
    return [
        ("fit_memory_growth", f"peak RSS of `protoserve package` (ProtoNMF, image folder, `--max-memory-mib "
         f"{m['max_memory_mib']}`) on {m['inputs']['4n']} / {m['inputs']['n']} inputs ({big['peak_rss_mib']:.0f} / "
         f"{small['peak_rss_mib']:.0f} MiB; {big['seconds']:.0f} / {small['seconds']:.0f} s); features of the 4N "
         f"inputs {m['features_4n_gib']:.2f} GiB", m["value"],
         f"with the decoding worker {big['peak_tree_rss_mib']:.0f} / {small['peak_tree_rss_mib']:.0f} MiB: "
         f"{m['tree_ratio']:.3f}"),
        ("featurize_over_loop", f"inputs/s, streaming featurizer into the feature cache / DataLoader + forward "
         f"loop, {f['inputs']} PNGs, {f['rounds']} interleaved rounds ({f['streaming_inputs_per_s']:.0f} / "
         f"{f['loop_inputs_per_s']:.0f} inputs/s)", f["value"], f"{f['spread'][0]:.3f}–{f['spread'][1]:.3f}"),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "build/bench-fit-data")
    parser.add_argument("--inputs", type=int, default=2100, help="N")
    args = parser.parse_args(argv)
    figures = run(args.work, args.inputs)
    for key, what, value, spread in rows(figures):
        print(f"{key}: {value:.3f} ({spread}; goal {GOALS[key]}): {what}")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
