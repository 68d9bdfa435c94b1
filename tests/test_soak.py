"""The fast variant of `make soak`: 300 mixed requests against a real server subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_soak_fast_variant(demo_store, tmp_path):
    out = tmp_path / "soak.json"
    result = subprocess.run([sys.executable, ROOT / "tools" / "soak.py", "--store", demo_store, "--requests", "300",
                             "--duration", "120", "--concurrency", "64", "--json", out],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    summary = json.loads(out.read_text())
    assert summary["passed"] and summary["failures"] == []
    assert summary["requests_sent"] == 300
    assert summary["wrong_answers"] == 0 and summary["unexpected_statuses"] == 0
    assert not {"UNKNOWN", "INTERNAL"} & (set(summary["codes"]) | set(summary["server_codes"]))
    kinds = summary["codes_by_kind"]
    assert kinds["explain"].get("OK", 0) > 0 and kinds["predict"].get("OK", 0) > 0
    assert set(kinds["bad"]) <= {"INVALID_ARGUMENT", "NOT_FOUND"}
    assert summary["server_exit_code"] == 0
    assert "p50" in result.stdout and "RSS" in result.stdout
