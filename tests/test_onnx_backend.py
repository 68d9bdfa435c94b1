"""The ONNX Runtime backend gives the torch backend's results within 1e-4."""

from __future__ import annotations

import pytest
import torch

from handlers.archive import read_archive, write_archive
from handlers.errors import ArchiveError
from handlers.runtime import ExplainItem, ServedModel


@pytest.fixture(scope="module")
def onnx_archive(demo_store, tmp_path_factory):
    archive = read_archive(demo_store / "mnist-1.psar")
    path = write_archive(tmp_path_factory.mktemp("onnx"), "mnist", "1", archive.parts, list(archive.methods.values()),
                         default_method=archive.default_method, backend="onnx")
    return read_archive(path)


def test_onnx_and_torch_backends_agree(onnx_archive, mnist_split):
    x = mnist_split["x_test"][:16]
    torch_model = ServedModel(onnx_archive, backend="torch")
    onnx_model = ServedModel(onnx_archive)  # the archive prefers ONNX
    assert onnx_model.backend == "onnx" and torch_model.backend == "torch"
    assert torch.allclose(onnx_model.predict(x), torch_model.predict(x), atol=1e-4)
    items = [ExplainItem(x[i], None, [[0, 4]]) for i in range(len(x))]
    for method in onnx_model.explainers:
        _, a, _ = onnx_model.explain(method, items, "feature_grid")
        _, b, _ = torch_model.explain(method, items, "feature_grid")
        for field in ("contribution", "weight", "residual_contribution", "residual_share", "intervened_logits"):
            assert torch.allclose(getattr(a, field), getattr(b, field), atol=1e-4), (method, field)


def test_onnx_backend_needs_onnx_parts(demo_store):
    with pytest.raises(ArchiveError, match="no ONNX parts"):
        ServedModel(read_archive(demo_store / "mnist-1.psar"), backend="onnx")
