"""What the Slicer extension ships runs on Python 3.9 (Slicer 5.6 and 5.8) to 3.13.

Two checks: ``vermin`` finds no construct newer than 3.9 in ``GDPILiverAnomaly/``; and
a real Python 3.9 (pyenv keeps one on these machines) compiles every shipped file,
imports the torch-free modules and runs the torch-free tests, in a venv with numpy,
scipy, SimpleITK and pytest only (no torch, as in a Slicer before its first Detect).
Locally without Python 3.9 the second check skips; under CI (``CI`` set) it fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

MODULE = REPO / "GDPILiverAnomaly"
#: Modules the Slicer GUI process and the worker import before or without torch.
TORCH_FREE_MODULES = (
    "errors", "method.parameters", "method.schedule", "files.outputs", "running.worker",
    "slicer_side.dependencies", "slicer_side.settings", "files.cases", "files.volumes",
    "method.ame", "method.grid", "method.scoring", "files.synthetic", "running.progress",
    "method.phase", "method.calibration", "method.lesions",
)  # fmt: skip
#: Tests that need neither torch nor slicer.
TORCH_FREE_TESTS = (
    "test_parameters.py", "test_schedule.py", "test_slicer_settings.py", "test_files.py",
    "test_ame.py", "test_scoring_grid.py", "test_volumes.py", "test_phase.py",
)  # fmt: skip


def test_vermin_finds_nothing_newer_than_python_39():
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("vermin")), "-t=3.9-", "--violations", "--no-tips",
         "--eval-annotations", "--backport", "typing_extensions", str(MODULE)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _python39() -> str | None:
    """A working Python 3.9: pyenv's own (its shims may refuse), else one on PATH."""
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates = [str(p) for p in sorted(root.glob("versions/3.9*/bin/python3.9"))]
    candidates += [p for p in [shutil.which("python3.9")] if p]
    for candidate in candidates:
        check = [candidate, "-c", "import sys; assert sys.version_info[:2] == (3, 9)"]
        if subprocess.run(check, capture_output=True).returncode == 0:
            return candidate
    return None


@pytest.fixture(scope="module")
def python39(tmp_path_factory) -> str:
    interpreter = _python39()
    if interpreter is None:
        if os.environ.get("CI"):
            pytest.fail("Python 3.9 is missing on CI (pyenv versions should list it)")
        pytest.skip("no Python 3.9 on this machine (pyenv install 3.9 to run this check)")
    venv = tmp_path_factory.mktemp("py39") / "venv"
    subprocess.run([interpreter, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "numpy", "scipy", "SimpleITK", "pytest"],
        check=True, capture_output=True,
    )  # fmt: skip
    return python


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(MODULE), "PYTHONDONTWRITEBYTECODE": "1"}


def test_shipped_files_compile_and_torch_free_modules_import_on_39(python39):
    subprocess.run(
        [python39, "-c", "import sys; assert sys.version_info[:2] == (3, 9), sys.version"],
        check=True,
    )
    compiled = subprocess.run(
        [python39, "-c", f"import compileall, sys; sys.exit(not compileall.compile_dir("
         f"{str(MODULE)!r}, quiet=1, legacy=True, force=True, workers=1))"],
        capture_output=True, text=True, env=_env(),
    )  # fmt: skip
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr
    for path in MODULE.rglob("*.pyc"):  # legacy=True wrote them beside the sources
        path.unlink()
    imports = "; ".join(f"import GDPILiverAnomalyLib.{m}" for m in TORCH_FREE_MODULES)
    code = f"import sys; {imports}; assert 'torch' not in sys.modules"
    proc = subprocess.run([python39, "-c", code], capture_output=True, text=True, env=_env())
    assert proc.returncode == 0, proc.stderr


def test_torch_free_tests_pass_on_39(python39):
    proc = subprocess.run(
        [python39, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         *(str(REPO / "Testing" / name) for name in TORCH_FREE_TESTS)],
        capture_output=True, text=True, env=_env(), cwd=REPO / "Testing",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
