"""The serving process imports no offline code: no fitting modules, no plotting or data libraries.

A real server process loads the demo store and answers an Explain of every method; then its
``sys.modules`` is read. tqdm is the one exception that is not ours to avoid: ``import torch``
imports it (torch.hub's download progress bar) whenever it is installed, so for tqdm the test
checks, from ``python -X importtime``, that torch.hub is what imported it; likewise numba (ProtoFac's
compiled CPU solvers) imports scipy to check its version and binds scipy.linalg's BLAS when it compiles,
and nothing else of scipy may be loaded.
"""

from __future__ import annotations

import json
import subprocess
import sys

OFFLINE_LIBRARIES = ("matplotlib", "sklearn", "scipy", "pandas", "mlxtend", "tqdm")

_SERVE_AND_REPORT = """
import asyncio, json, sys
import numpy as np
from pathlib import Path
from protoserve_client import ExplainerClient
from server.app import App
from server.settings import Settings

async def main():
    app = App(Settings(model_store=Path(sys.argv[1]), port=0, metrics_port=0))
    await app.start()
    def explain_every_method():
        with ExplainerClient(f"127.0.0.1:{app.port}", timeout=60) as client:
            for model in client.list_models().models:
                info = client.get_model(model.name)
                x = np.zeros(list(info.input_shape), dtype=np.float32)
                for method in info.methods:
                    client.explain(x, model=model.name, method=method.name, heatmaps="feature_grid")
    await asyncio.to_thread(explain_every_method)
    await app.stop()

asyncio.run(main())
print("MODULES " + json.dumps(sorted(sys.modules)))
"""


def _importer_of(importtime: str, module: str) -> str | None:
    """The module whose import imported ``module`` first (from ``-X importtime``'s tree, where
    an import's children are listed above it, one indentation level deeper)."""
    rows = []
    for line in importtime.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            name = line.rsplit("|", 1)[1]
            rows.append((len(name) - len(name.lstrip()), name.strip()))
    for i, (depth, name) in enumerate(rows):
        if name == module:
            return next((parent for d, parent in rows[i + 1:] if d < depth), None)
    return None


def test_a_serving_process_imports_no_offline_code(demo_store):
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", _SERVE_AND_REPORT, str(demo_store)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    modules = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("MODULES "))[8:])
    ours = [m for m in modules if m.startswith("handlers.")]
    assert "handlers.explainers.protonmf" in ours  # the methods were loaded …
    assert not [m for m in ours if m.startswith(("handlers.fitting", "handlers.packaging"))]  # … not their fits
    imported = {m.split(".")[0] for m in modules} & set(OFFLINE_LIBRARIES)
    assert imported <= {"tqdm", "scipy"}, imported
    if "tqdm" in imported:
        assert _importer_of(result.stderr, "tqdm") == "torch.hub"
    if "scipy" in imported:  # numba's: its import checks scipy's version, its compiler binds scipy.linalg's BLAS
        assert _importer_of(result.stderr, "scipy") == "numba"
        scipy_code = {m.split(".")[1] for m in modules if m.startswith("scipy.")} - {"linalg", "version"}
        assert all(name.startswith("_") for name in scipy_code), scipy_code  # no optimize, sparse, stats, …
