"""Shared fixtures. ``../shared/data`` (real CTs) sits beside the repository; tests that
need it skip when it is missing, except under CI (``CI`` set), where they fail.

Imports nothing that needs torch at module level: the torch-free tests also run under
Python 3.9 without torch (``test_python39.py``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from GDPILiverAnomalyLib.method.parameters import DetectionParams

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared(*parts: str) -> Path:
    """Path inside ``../shared/data``; skip (locally) or fail (CI) when it is missing."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing on CI; ../shared/data must be beside the repository")
        pytest.skip(f"{path} not found (../shared/data is not beside this checkout)")
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised tiny checkpoint (64 px grid at 5 mm, learned sigma)."""
    from GDPILiverAnomalyLib.files.checkpoint import init_checkpoint, save_checkpoint  # torch

    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    return save_checkpoint(init_checkpoint("tiny", seed=0), path)


@pytest.fixture()
def quick_params() -> DetectionParams:
    """Cheap but complete RePaint settings: 10 steps, jump 2, 2 resamplings = 18 NFE per batch."""
    return DetectionParams.from_preset(
        "fast", steps=10, jump_length=2, jump_n_sample=2, device="cpu"
    )


def one_error_line(code: int, captured, message: str) -> str:
    """What a refused ``gdpi`` run must show: exit 2, exactly one ``gdpi: error:`` line
    on stderr holding ``message``, no traceback. Returns the line."""
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("gdpi: error: "), captured.err
    assert message in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


def tree_snapshot(root: Path) -> dict[str, str]:
    """Every file (sha256) and folder under ``root``, symbolic links not followed: two
    snapshots are equal when nothing was written, removed or changed there."""
    import hashlib

    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            found[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.is_dir():
            found[str(path.relative_to(root)) + "/"] = "dir"
    return found
