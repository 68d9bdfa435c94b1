"""Fast checks of the MNIST recipe: the data split and the model's structure (no training)."""

from __future__ import annotations

import pytest
import torch
import torch.fx

from model_store.recipes.mnist import (
    MNIST_FEATURE_DIM,
    MNIST_LABELS,
    MNIST_LAYER,
    N_TEST,
    MnistCNN,
    load_mnist,
    random_shift,
)


@pytest.fixture(scope="module")
def split() -> dict[str, torch.Tensor]:
    return load_mnist(seed=0)


@pytest.fixture(scope="module")
def model() -> MnistCNN:
    # Random weights with perturbed BN statistics so the eval-mode graph is non-trivial.
    torch.manual_seed(0)
    m = MnistCNN()
    for bn in m.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
    return m.eval()


def test_split_shapes_and_ranges(split):
    n_train = 5000 - N_TEST
    assert split["x_train"].shape == (n_train, 1, 28, 28)
    assert split["x_test"].shape == (N_TEST, 1, 28, 28)
    assert split["y_train"].shape == (n_train,)
    assert split["y_test"].shape == (N_TEST,)
    for key in ("x_train", "x_test"):
        assert split[key].dtype == torch.float32
        assert split[key].min() >= 0.0 and split[key].max() <= 1.0
        assert split[key].max() == 1.0  # scaled from 0..255, not left raw
    for key in ("y_train", "y_test"):
        assert split[key].dtype == torch.int64
        assert split[key].min() >= 0 and split[key].max() < len(MNIST_LABELS)
    assert MNIST_LABELS == [str(d) for d in range(10)]


def test_split_is_stratified(split):
    assert split["y_train"].bincount(minlength=10).tolist() == [400] * 10
    assert split["y_test"].bincount(minlength=10).tolist() == [100] * 10


def test_split_is_deterministic_and_disjoint(split):
    again = load_mnist(seed=0)
    for key, value in split.items():
        assert torch.equal(value, again[key])
    other = load_mnist(seed=1)
    assert not torch.equal(split["x_test"], other["x_test"])
    # No test image also appears in the training set (compare images as rows).
    train_rows = {row.numpy().tobytes() for row in split["x_train"].flatten(1)}
    assert not any(row.numpy().tobytes() in train_rows for row in split["x_test"].flatten(1))


def test_logits_shape(model, split):
    x = split["x_test"][:8]
    assert model(x).shape == (8, len(MNIST_LABELS))


def test_fx_trace_and_explained_layer(model, split):
    x = split["x_test"][:8]
    traced = torch.fx.symbolic_trace(model)
    nodes = {n.name: n for n in traced.graph.nodes}
    assert MNIST_LAYER in nodes
    node = nodes[MNIST_LAYER]
    assert node.op == "call_module"
    assert isinstance(traced.get_submodule(node.target), torch.nn.ReLU)
    torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)


def test_head_is_mean_pool_plus_linear(model, split):
    x = split["x_test"][:8]
    traced = torch.fx.symbolic_trace(model)
    relu = traced.get_submodule(next(n.target for n in traced.graph.nodes if n.name == MNIST_LAYER))
    captured = {}
    handle = relu.register_forward_hook(lambda _m, _i, out: captured.update(z=out.detach().clone()))
    try:
        logits = traced(x)
    finally:
        handle.remove()
    z = captured["z"]
    assert z.shape == (8, MNIST_FEATURE_DIM, 7, 7)
    assert (z >= 0).all()
    assert (z > 0).any()
    expected = model.head(z.mean((2, 3)))
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


def test_random_shift_is_a_seeded_translation():
    x = torch.arange(2 * 28 * 28, dtype=torch.float32).reshape(2, 1, 28, 28)
    a = random_shift(x, 2, torch.Generator().manual_seed(3))
    b = random_shift(x, 2, torch.Generator().manual_seed(3))
    assert a.shape == x.shape and torch.equal(a, b)
    # Every output pixel is zero padding or a pixel of the same image.
    for i in range(2):
        assert set(a[i].unique().tolist()) <= set(x[i].unique().tolist()) | {0.0}
    assert torch.equal(random_shift(x, 0, torch.Generator()), x)
