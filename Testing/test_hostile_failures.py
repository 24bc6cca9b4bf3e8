"""Scripted hostile cases for failures that the in-process table
(``test_hostile_inputs.py``) cannot stage: a closed stderr, a closed progress pipe, a
disk that fills up in folder mode, an unreachable Ray cluster. Each is the real
``gdpi`` process; every failure is one ``gdpi: error:`` line, never a traceback, an
abort or a hang."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import shared

QUICK = ["--device", "cpu", "--steps", "2", "--jump-length", "1", "--jump-n-sample", "1"]


def _gdpi(*args: str) -> list[str]:
    return [sys.executable, "-m", "GDPILiverAnomalyLib", *args]


def _detect_args(tiny_checkpoint: Path, out: Path, *extra: str) -> list[str]:
    case = shared("ts_small")
    return ["detect", "--ct", str(case / "ct.nii.gz"), "--liver", str(case / "totalseg.nii.gz"),
            "--liver-label", "5", "--checkpoint", str(tiny_checkpoint), "--out", str(out),
            *QUICK, *extra]  # fmt: skip


def test_a_run_with_stderr_closed_completes(tmp_path, tiny_checkpoint):
    """``2>&-`` (schedulers, services): before, every run failed with exit 1 and no output."""
    out = tmp_path / "out"
    cmd = _gdpi(*_detect_args(tiny_checkpoint, out, "--progress", "text"))
    proc = subprocess.run(["bash", "-c", 'exec "$@" 2>&-', "_", *cmd], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout
    assert {p.name for p in out.iterdir()} >= {"score.nrrd", "run.json", "lesions.csv"}


def test_a_closed_progress_pipe_stops_with_one_line_and_writes_nothing(tmp_path, tiny_checkpoint):
    """``gdpi detect --progress json | head -1``: the reader goes away mid-run."""
    out = tmp_path / "out"
    cmd = _gdpi(*_detect_args(tiny_checkpoint, out, "--progress", "json"))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert '"event": "start"' in proc.stdout.readline()
    proc.stdout.close()  # the reader is gone: the next progress line cannot be written
    _, err = proc.communicate(timeout=300)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 2, err
    assert lines == ["gdpi: error: stdout was closed by its reader; stopped"], err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary folder left either


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)")
def test_disk_full_in_folder_mode_fails_only_that_case(tmp_path, tiny_checkpoint):
    """A disk that fills up while the second case is written: that case fails with
    "disk full", the first keeps its complete folder, the batch ends with exit 3."""
    cases = tmp_path / "cases"
    cases.mkdir()
    case = shared("ts_small")
    for name in ("a", "b"):
        (cases / name).mkdir()
        shutil.copy(case / "ct.nii.gz", cases / name / "ct.nii.gz")
        shutil.copy(case / "totalseg.nii.gz", cases / name / "seg.nii.gz")
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "out"
    cmd = _gdpi("detect", "--ct", str(cases), "--liver", str(cases), "--liver-label", "5",
                "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--progress", "none",
                *QUICK)  # fmt: skip
    # a private mount namespace: a 1.1 MB file system holds one case's result (0.7 MB)
    script = 'mount -t tmpfs -o size=1100k tmpfs "$1" && shift && "$@"; code=$?; ' \
             'cp -r "$OUT" "$COPY" 2>/dev/null; exit $code'  # fmt: skip
    copy = tmp_path / "copy"
    proc = subprocess.run(
        ["unshare", "-m", "bash", "-c", script, "_", str(disk), *cmd],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "OUT": str(out), "COPY": str(copy)},
    )  # fmt: skip
    if "mount:" in proc.stderr and "permission denied" in proc.stderr.lower():
        pytest.skip("this machine does not let tests mount a small file system")
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    summary = (copy / "summary.csv").read_text().splitlines()
    assert summary[1].startswith("a,ok,"), summary
    assert summary[2].startswith("b,error,disk full: "), summary
    assert {p.name for p in (copy / "a").iterdir()} >= {"score.nrrd", "run.json", "lesions.csv"}
    assert not (copy / "b").exists()


def test_an_unreachable_ray_cluster_is_one_line_within_seconds(tmp_path, tiny_checkpoint):
    """Before: Ray retried for minutes without a word."""
    pytest.importorskip("ray")
    cases = tmp_path / "cases"
    cases.mkdir()
    shutil.copy(shared("ts_small", "ct.nii.gz"), cases / "volume-1.nii.gz")
    shutil.copy(shared("ts_small", "totalseg.nii.gz"), cases / "segmentation-1.nii.gz")
    t0 = time.monotonic()
    proc = subprocess.run(
        _gdpi("detect", "--ct", str(cases), "--liver", str(cases), "--liver-label", "5",
              "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "out"),
              "--engine", "ray", "--address", "127.0.0.1:1", "--progress", "none"),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "gdpi: error: cannot reach the Ray cluster at 127.0.0.1:1 (Connection refused)"
    ]
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damaged", ["{broken", "{}", "[1, 2]", '{"inputs": 5}', "null"])
def test_a_damaged_case_run_json_is_redone_on_resume(tmp_path, tiny_checkpoint, damaged):
    """Before: a traceback (AttributeError), or the whole batch refused as "made with
    other settings"; now that case is redone, with a warning."""
    cases = tmp_path / "cases"
    cases.mkdir()
    shutil.copy(shared("ts_small", "ct.nii.gz"), cases / "volume-1.nii.gz")
    shutil.copy(shared("ts_small", "totalseg.nii.gz"), cases / "segmentation-1.nii.gz")
    out = tmp_path / "out"
    cmd = _gdpi("detect", "--ct", str(cases), "--liver", str(cases), "--liver-label", "5",
                "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--progress", "none",
                *QUICK)  # fmt: skip
    assert subprocess.run(cmd, capture_output=True, timeout=300).returncode == 0
    good = json.loads((out / "volume-1" / "run.json").read_text())
    (out / "volume-1" / "run.json").write_text(damaged)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    if damaged != "{broken":  # valid JSON of the wrong shape is named in the log
        assert "run.json is damaged: redoing that case" in proc.stderr
    redone = json.loads((out / "volume-1" / "run.json").read_text())
    assert redone["results"] == good["results"] and redone["started"] != good["started"]
