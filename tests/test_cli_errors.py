"""A user error at either command line is one line on stderr, the problem and what to do, and exit status 2.

The command lines run as the subprocesses a user starts; `--verbose` adds the traceback.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from conftest import free_port

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
