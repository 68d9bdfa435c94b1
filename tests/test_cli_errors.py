"""A user error at either command line is one line on stderr, the problem and what to do, and exit status 2.

The command lines run as the subprocesses a user starts; `--verbose` adds the traceback.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import free_port, fully_connected_problem
from handlers.archive import write_archive
from handlers.packaging import fit_methods

BIN = Path(sys.executable).parent


def _run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300)


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


# ----------------------------------------------------------------------------- protoserve-client

def test_client_bad_option_value(tmp_path):
    line = _one_line_error(_run(BIN / "protoserve-client", "explain", tmp_path / "x.npy", "--model", "mnist",
                                "--top-k", "many"))
    assert line == ("protoserve-client explain: error: argument --top-k: invalid int value: 'many' "
                    "— see protoserve-client explain --help")
    line = _one_line_error(_run(BIN / "protoserve-client", "explain", tmp_path / "x.npy", "--model", "mnist",
                                "--overlay", tmp_path / "overlay.png", "--heatmaps", "none"))
    assert line == ("protoserve-client explain: error: --overlay draws heatmaps, but --heatmaps none asks for none "
                    "— leave out --heatmaps none")


def test_client_missing_input_file(tmp_path):
    missing = tmp_path / "digit.png"
    line = _one_line_error(_run(BIN / "protoserve-client", "explain", missing, "--model", "mnist"))
    assert line == f"protoserve-client explain: error: {missing}: No such file or directory — check the path"


def test_client_unreadable_inputs(tmp_path):
    (tmp_path / "text.npy").write_text("not an array")
    line = _one_line_error(_run(BIN / "protoserve-client", "predict", tmp_path / "text.npy", "--model", "mnist"))
    assert line.startswith(f"protoserve-client predict: error: {tmp_path / 'text.npy'}: not a readable .npy array (")
    assert line.endswith(") — save the input with numpy.save, as numbers")
    (tmp_path / "beat.csv").write_text("0.1, 0.2, high, 0.3\n")
    line = _one_line_error(_run(BIN / "protoserve-client", "explain", tmp_path / "beat.csv", "--model", "ecg"))
    assert line == (f"protoserve-client explain: error: {tmp_path / 'beat.csv'}: not a series of numbers "
                    "(could not convert string to float: 'high') — write the series as numbers separated by commas "
                    "or whitespace")
    (tmp_path / "beat.txt").write_text("0.1 0.2")
    line = _one_line_error(_run(BIN / "protoserve-client", "explain", tmp_path / "beat.txt", "--model", "ecg"))
    assert line == (f"protoserve-client explain: error: {tmp_path / 'beat.txt'}: unsupported input type .txt "
                    "— give an image (.png, .jpg, .jpeg), a .npy array or a .csv series")


def test_client_server_unreachable():
    address = f"127.0.0.1:{free_port()}"
    line = _one_line_error(_run(BIN / "protoserve-client", "models", "--address", address, "--timeout", "5"))
    assert line.startswith(f"protoserve-client models: error: the server at {address} is unavailable (")
    assert line.endswith(") — start it (make run) or point --address at a running one")


def test_client_request_the_server_refuses(server, tmp_path):
    np.save(tmp_path / "digit.npy", np.zeros((1, 28, 28), np.float32))
    line = _one_line_error(_run(BIN / "protoserve-client", "explain", tmp_path / "digit.npy", "--model", "nosuch",
                                "--address", server.address))
    assert line == ("protoserve-client explain: error: NOT_FOUND: model 'nosuch' not found; known: ecg, mnist "
                    "— `protoserve-client models` lists the models, methods and component ids")


def test_client_verbose_shows_the_traceback(tmp_path):
    result = _run(BIN / "protoserve-client", "explain", tmp_path / "digit.png", "--model", "mnist", "--verbose")
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert lines[0] == "Traceback (most recent call last):" and "FileNotFoundError" in result.stderr
    assert lines[-1] == f"protoserve-client explain: error: {tmp_path / 'digit.png'}: No such file or directory " \
                        "— check the path"


# ----------------------------------------------------------------------------- protoserve

@pytest.fixture(scope="module")
def fully_connected_archive(tmp_path_factory) -> tuple[Path, Path]:
    """An archive of a 12-16-3 MLP explained at its hidden ReLU (a 1x1 feature grid), and fit data for it."""
    directory = tmp_path_factory.mktemp("fc")
    parts, data = fully_connected_problem(60, 30)
    fitted = fit_methods(parts, data, {"protonmf": {"n_prototypes": 2}}, log=lambda message: None)
    archive = write_archive(directory, "mlp", "1", parts, fitted)
    np.savez(directory / "data.npz", x_train=data.x_train.numpy(), y_train=data.y_train.numpy(),
             x_test=data.x_test.numpy(), y_test=data.y_test.numpy())
    return archive, directory / "data.npz"


def _fit(archive, data, *options) -> subprocess.CompletedProcess:
    return _run(BIN / "protoserve", "fit", archive, "--data", data, "--out", Path(archive).parent / "out", *options)


FIT_REMEDY = ("choose --method and --param to suit the archive's layer and --data, or package the model at "
              "another --layer")


def test_protoserve_method_that_does_not_suit_the_layer(fully_connected_archive):
    archive, data = fully_connected_archive
    line = _one_line_error(_fit(archive, data, "--method", "gradcam_rules"))
    assert line == ("protoserve fit: error: gradcam_rules needs an image input and a convolutional layer, got input "
                    f"[1, 12] and features [16] — {FIT_REMEDY}")


def test_protoserve_bad_option_values(fully_connected_archive, tmp_path):
    archive, data = fully_connected_archive
    line = _one_line_error(_fit(archive, data, "--method", "protonmf", "--param", "protonmf.n_protos=2"))
    assert line == ("protoserve fit: error: --param protonmf.n_protos: protonmf has no parameter 'n_protos' "
                    "— use one of n_prototypes, solver, init, max_iter, tol, random_state, head_reads, p_sweep")
    line = _one_line_error(_fit(archive, data, "--method", "protonfm"))
    assert line == ("protoserve fit: error: --method protonfm: no such method "
                    "— choose from coupled_nmf, gradcam_rules, protofac, protonmf, srae")
    line = _one_line_error(_run(BIN / "protoserve", "serve", "--model-store", tmp_path, "--port", "high"))
    assert line == "protoserve serve: error: argument --port: invalid int value: 'high' — see protoserve serve --help"


def test_protoserve_missing_and_unreadable_files(fully_connected_archive, tmp_path):
    archive, data = fully_connected_archive
    line = _one_line_error(_fit(archive, tmp_path / "missing.npz", "--method", "protonmf"))
    assert line == f"protoserve fit: error: {tmp_path / 'missing.npz'}: No such file or directory — check the path"
    (tmp_path / "notes.npz").write_text("x_train, y_train")
    line = _one_line_error(_fit(archive, tmp_path / "notes.npz", "--method", "protonmf"))
    assert line.startswith(f"protoserve fit: error: --data {tmp_path / 'notes.npz'}: not a readable .npz of x_train, "
                           "y_train, x_test, y_test (")
    line = _one_line_error(_fit(tmp_path / "missing.psar", data, "--method", "protonmf"))
    assert line.startswith("protoserve fit: error: missing.psar: not a readable archive")
    assert line.endswith("— check the path, or give an archive that `protoserve package` wrote")


def test_protoserve_serve_without_a_model_store(tmp_path):
    line = _one_line_error(_run(BIN / "protoserve", "serve", "--model-store", tmp_path / "store", "--port", "0",
                                "--metrics-port", "0"))
    assert line == (f"protoserve serve: error: model store {tmp_path / 'store'} is not a directory — check "
                    "--model-store (a directory of .psar archives; `make demo` builds one) and the other options")


def test_protoserve_verbose_shows_the_traceback(fully_connected_archive):
    archive, data = fully_connected_archive
    result = _fit(archive, data, "--method", "gradcam_rules", "--verbose")
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert "Traceback (most recent call last):" in lines and "ValueError: gradcam_rules needs" in result.stderr
    assert lines[-1].startswith("protoserve fit: error: gradcam_rules needs an image input")
