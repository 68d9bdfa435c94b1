"""The command lines end to end: protoserve-client against a live server, protoserve package."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image

BIN = Path(sys.executable).parent


def test_client_cli_explains_an_image_and_writes_an_overlay(server, mnist_split, tmp_path):
    digit = (mnist_split["x_test"][0, 0].numpy() * 255).round().astype(np.uint8)
    Image.fromarray(digit).save(tmp_path / "digit.png")
    overlay = tmp_path / "overlay.png"
    result = subprocess.run([BIN / "protoserve-client", "explain", tmp_path / "digit.png", "--model", "mnist",
                             "--address", server.address, "--suppress", "c0.p0", "--overlay", overlay],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "residual share" in result.stdout and "c0.p0" in result.stdout and "interventions" in result.stdout
    assert overlay.read_bytes().startswith(b"\x89PNG")
    assert Image.open(overlay).width > 224  # the input plus heatmap panels


def test_client_cli_shows_the_neighbour_view_and_writes_its_pngs(server, client, tmp_path):
    from protoserve_client import from_tensor
    from protoserve_client.cli import format_explanation

    sample = client.get_model("mnist").samples[5]
    result = subprocess.run([BIN / "protoserve-client", "explain", "--sample", "5", "--model", "mnist", "--method",
                             "coupled_nmf", "--neighbours", "4", "--neighbour-pngs", tmp_path / "near",
                             "--address", server.address], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    expected = client.explain(from_tensor(sample.input), model="mnist", method="coupled_nmf", heatmaps="none",
                              neighbours=4)
    assert len(expected.neighbours) == 4 and result.stdout == format_explanation(expected) + "\n"
    assert "neighbours (4 nearest probe examples)" in result.stdout and "their components: " in result.stdout
    written = sorted((tmp_path / "near").iterdir())
    assert [p.name for p in written] == sorted(f"neighbour-{rank}-probe-{n.probe_index}.png"
                                               for rank, n in enumerate(expected.neighbours, 1))
    by_name = {p.name: p.read_bytes() for p in written}
    for rank, n in enumerate(expected.neighbours, 1):
        assert by_name[f"neighbour-{rank}-probe-{n.probe_index}.png"] == n.png and n.png.startswith(b"\x89PNG")
    refused = subprocess.run([BIN / "protoserve-client", "explain", "--sample", "5", "--model", "mnist",
                              "--neighbour-pngs", tmp_path / "x", "--address", server.address],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "add --neighbours K" in refused.stderr


def test_client_cli_explains_a_held_out_sample_without_a_file(server, client):
    from protoserve_client import from_tensor
    from protoserve_client.cli import format_explanation

    sample = client.get_model("mnist").samples[3]
    result = subprocess.run([BIN / "protoserve-client", "explain", "--sample", "3", "--model", "mnist",
                             "--address", server.address], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    expected = client.explain(from_tensor(sample.input), model="mnist", heatmaps="none")
    assert result.stdout == format_explanation(expected) + "\n"
    assert result.stderr == f"sample 3: class {sample.class_index} ({sample.label})\n"
    models = subprocess.run([BIN / "protoserve-client", "models", "--address", server.address],
                            capture_output=True, text=True, timeout=120)
    assert "samples (--sample N): 0: 0, 1: 0, 2: 1, 3: 1" in models.stdout
    for args, message in ((["--sample", "99"], "--sample 99: model mnist has samples 0 to 19"),
                          (["--sample", "1", "x.png"], "give INPUT or --sample N"), ([], "give INPUT or --sample N")):
        refused = subprocess.run([BIN / "protoserve-client", "explain", *args, "--model", "mnist",
                                  "--address", server.address], capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr


def test_client_cli_reports_grpc_errors_with_exit_code_2(server, tmp_path):
    np.save(tmp_path / "bad.npy", np.zeros((3, 3), np.float32))
    result = subprocess.run([BIN / "protoserve-client", "explain", tmp_path / "bad.npy", "--model", "mnist",
                             "--address", server.address], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "INVALID_ARGUMENT" in result.stderr


MODEL_DEF = textwrap.dedent('''
    import torch
    from torch import nn

    class TinyNet(nn.Module):
        def __init__(self, hidden=8):
            super().__init__()
            self.conv = nn.Conv1d(1, hidden, 5, padding=2)
            self.fc = nn.Linear(hidden, 3)

        def forward(self, x):
            h = torch.relu(self.conv(x))
            return self.fc(h.mean(2))
''')


def test_package_a_users_model_from_definition_and_weights(tmp_path):
    """A model definition and a state dict in, an archive out, served without the definition."""
    (tmp_path / "tiny.py").write_text(MODEL_DEF)
    sys.path.insert(0, str(tmp_path))
    try:
        import tiny
    finally:
        sys.path.remove(str(tmp_path))
    torch.manual_seed(0)
    model = tiny.TinyNet()
    torch.save(model.state_dict(), tmp_path / "tiny.pt")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(90, 1, 20, generator=g)
    y = torch.arange(90) % 3
    np.savez(tmp_path / "data.npz", x_train=x[:60].numpy(), y_train=y[:60].numpy(), x_test=x[60:].numpy(),
             y_test=y[60:].numpy())
    layers = subprocess.run([BIN / "protoserve", "layers", "--model-def", f"{tmp_path / 'tiny.py'}:TinyNet"],
                            capture_output=True, text=True, timeout=120)
    assert "relu" in layers.stdout.split()
    store = tmp_path / "store"
    result = subprocess.run([BIN / "protoserve", "package", "--model-def", f"{tmp_path / 'tiny.py'}:TinyNet",
                             "--weights", tmp_path / "tiny.pt", "--layer", "relu", "--input-shape", "1", "20",
                             "--labels", "a,b,c", "--data", tmp_path / "data.npz", "--method", "protonmf",
                             "--param", "protonmf.n_prototypes=2", "--name", "tiny", "--version", "3",
                             "--out", store], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr

    from handlers.archive import read_archive
    from handlers.runtime import ExplainItem, ModelRuntime

    served = ModelRuntime(read_archive(store / "tiny-3.psar"))
    assert served.parts.feature_shape == [8, 20]
    logits, e, _ = served.explain("protonmf", [ExplainItem(x[i, :], None, []) for i in range(60, 70)], "feature_grid")
    with torch.inference_mode():
        assert torch.allclose(logits, model(x[60:70]), atol=1e-5)
    assert torch.allclose(e.contribution.sum(1) + e.residual_contribution + e.bias, e.target_logit, atol=1e-5)
    assert e.heatmaps.shape == (10, 2, 20)  # a 1-D feature grid
    assert torch.allclose(e.heatmaps.sum(2), e.contribution, atol=1e-5)


def test_health_command_for_container_probes(server):
    ok = subprocess.run([BIN / "protoserve", "health", "--address", server.address], capture_output=True, text=True,
                        timeout=60)
    assert ok.returncode == 0 and ok.stdout.strip() == "SERVING"
    down = subprocess.run([BIN / "protoserve", "health", "--address", "127.0.0.1:9"], capture_output=True, text=True,
                          timeout=60)
    assert down.returncode == 1


def test_serve_passes_the_http_json_limit_to_the_server(tmp_path, monkeypatch, capsys):
    from server import cli
    from server.settings import Settings

    started = []

    class App:  # the server, as far as `protoserve serve` sees it
        def __init__(self, settings):
            started.append(settings)

        async def run_until_signal(self):
            pass

    monkeypatch.setattr("server.app.App", App)
    assert cli.main(["serve", "--model-store", str(tmp_path)]) == 0
    assert cli.main(["serve", "--model-store", str(tmp_path), "--http-max-json-bytes", "1234"]) == 0
    assert [settings.http_max_json_bytes for settings in started] == [Settings(tmp_path).http_max_json_bytes, 1234]
    assert cli.main(["serve", "--model-store", str(tmp_path), "--http-max-json-bytes", "0"]) == 2
    assert "http_max_json_bytes must be >= 1" in capsys.readouterr().err
