"""The committed gRPC stubs are exactly what tools/gen_stubs.py makes from proto/ today."""

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
GENERATOR = REPO_ROOT / "tools" / "gen_stubs.py"
COMMITTED = REPO_ROOT / "client" / "src" / "protoserve_client" / "stubs"


def _files(root: Path) -> dict[str, bytes]:
    # __pycache__ appears wherever the stubs were imported; it is not part of the output.
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    }


def test_committed_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    fresh_root = tmp_path / "stubs"
    subprocess.run([sys.executable, str(GENERATOR), str(fresh_root)], check=True, cwd=tmp_path)
    fresh, committed = _files(fresh_root), _files(COMMITTED)
    hint = f"regenerate with: python tools/gen_stubs.py {COMMITTED.relative_to(REPO_ROOT)}"
    assert sorted(fresh) == sorted(committed), f"stub files differ; {hint}"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale stubs {stale}; {hint}"


def test_generated_imports_point_inside_the_package() -> None:
    from protoserve_client import pb, pb_grpc

    assert pb.Tensor.__module__ == "protoserve_client.stubs.protoserve.v1.explainer_pb2"
    # The service module imports the very same messages module, not a second copy.
    assert pb_grpc.protoserve_dot_v1_dot_explainer__pb2 is pb
    assert pb.DESCRIPTOR.services_by_name["Explainer"].full_name == "protoserve.v1.Explainer"
