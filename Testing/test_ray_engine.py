"""``gdpi detect --engine ray`` on a local Ray instance (2 CPUs here): the shared cases
plus a broken one give the local engine's outputs voxel for voxel, the same summary,
resume, survive a killed model worker, and stop cleanly on Ctrl+C.

Every run is the real command in a subprocess (its own Ray instance, started and shut
down by it), with a random tiny model and a short schedule.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import SAME_HU, assert_same_detection, shared
from GDPILiverAnomalyLib.files.outputs import this_process
from GDPILiverAnomalyLib.running.runner import OUTPUT_FILES

pytest.importorskip("ray")  # the [ray] extra; README command 2 installs it

CASES = ("hcc_0697", "hcc_1720", "chaos_ct3")
VOLUMES = ("score.nrrd", "pseudo_healthy.nrrd", "candidates.nrrd", "anomaly.nrrd")
SAME_COLUMNS = ("case", "status", "error", "lesions", "ct", "liver")  # numbers: below


@pytest.fixture(scope="module")
def batch(tmp_path_factory, tiny_checkpoint):
    """A folder of the shared cases (case subfolders) plus a broken one, and the local
    engine's outputs for it."""
    root = tmp_path_factory.mktemp("ray")
    cases = root / "cases"
    for name in CASES:
        (cases / name).mkdir(parents=True)
        for file in ("ct.nii.gz", "seg.nii.gz"):
            (cases / name / file).symlink_to(shared(name, file))
    (cases / "broken").mkdir()
    (cases / "broken" / "ct.nii.gz").write_bytes(b"not a CT")
    (cases / "broken" / "seg.nii.gz").symlink_to(shared("hcc_0697", "seg.nii.gz"))
    options = ["--checkpoint", str(tiny_checkpoint), "--steps", "4", "--jump-length", "1",
               "--jump-n-sample", "1", "--device", "cpu"]  # fmt: skip
    local = root / "local"
    proc = _gdpi(cases, local, *options, "--batch-size", "8")
    assert proc.returncode == 3, proc.stderr
    return {"cases": cases, "options": options, "local": local, "root": root}


def _gdpi(cases: Path, out: Path, *args: str, timeout: float = 300):
    return subprocess.run(
        [sys.executable, "-m", "GDPITraining", "detect", "--ct", str(cases), "--liver",
         str(cases), "--out", str(out), "--progress", "json", *args],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def _start(cases: Path, out: Path, *args: str) -> subprocess.Popen:
    """``gdpi detect --engine ray`` in its own process group, as a terminal starts it."""
    return subprocess.Popen(
        [sys.executable, "-m", "GDPITraining", "detect", "--ct", str(cases), "--liver",
         str(cases), "--out", str(out), "--progress", "json", "--engine", "ray", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip


def _events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]  # stdout: JSON lines only


def _summary(out: Path) -> dict[str, dict]:
    with open(out / "summary.csv", newline="") as f:
        return {row["case"]: row for row in csv.DictReader(f)}


def _assert_same_outputs(local: Path, other: Path) -> None:
    for name in CASES:
        assert sorted(p.name for p in (other / name).iterdir()) == sorted(OUTPUT_FILES)
        assert_same_detection(local / name, other / name)
    assert not (other / "broken").exists()
    assert not [p.name for p in other.iterdir() if p.name.startswith(".")]  # no leftovers
    rows_local, rows_other = _summary(local), _summary(other)
    assert list(rows_other) == list(rows_local) == sorted(["broken", *CASES])  # case order
    for name, row in rows_local.items():
        assert [rows_other[name][k] for k in SAME_COLUMNS] == [row[k] for k in SAME_COLUMNS]
        # float32 batch rounding, printed to 3 decimals (anomaly_ml: the volumes above)
        mine, theirs = row["max_score_hu"], rows_other[name]["max_score_hu"]
        assert (mine == theirs == "") or abs(float(mine) - float(theirs)) <= SAME_HU + 1e-3, name


def test_ray_gives_the_local_outputs_summary_and_resumes(batch):
    out = batch["root"] / "on_ray"
    proc = _gdpi(batch["cases"], out, *batch["options"], "--batch-size", "8", "--engine", "ray")
    assert proc.returncode == 3, proc.stderr  # one case failed, the others went on
    assert "case broken failed: cannot read CT" in proc.stderr
    _assert_same_outputs(batch["local"], out)
    events = _events(proc.stdout)
    done = events[-1]
    assert done["event"] == "done" and done["engine"] == "ray" and done["failed"] == 1
    progress = [e for e in events if e["event"] == "batch"]
    assert progress[-1]["cases_done"] == 4 and progress[-1]["cases_failed"] == 1
    assert progress[-1]["slices_done"] == progress[-1]["slices_total"] == done["slices_inpainted"]
    assert {e["case"] for e in events if e["event"] == "case_done"} == {"broken", *CASES}

    # run.json: the local fields, plus the engine and its workers; NFE counts the
    # (shared) batches that held the case's slices
    runs = {name: json.loads((out / name / "run.json").read_text()) for name in CASES}
    local_runs = {n: json.loads((batch["local"] / n / "run.json").read_text()) for n in CASES}
    summary = _summary(out)
    for name, run in runs.items():
        assert set(run) == set(local_runs[name])
        assert run["engine"]["name"] == "ray" and run["engine"]["workers"]
        assert local_runs[name]["engine"] == {"name": "local"}
        assert run["parameters"] == local_runs[name]["parameters"]
        assert run["nfe"] == run["stats"]["batches"] * run["stats"]["nfe_per_batch"]
        assert int(summary[name]["nfe"]) == run["nfe"]
    # packing: fuller batches than each case on its own
    local_fill = sum(r["stats"]["slices_inpainted"] for r in local_runs.values()) / sum(
        r["stats"]["batches"] * r["stats"]["batch_size"] for r in local_runs.values()
    )
    assert done["batch_fill"] > local_fill
    assert done["batches"] == -(-done["slices_inpainted"] // 8)  # all full but the last

    # resume: the same command redoes only what is missing (and the broken case)
    redo = CASES[0]
    kept = {n: (out / n / "run.json").stat().st_mtime_ns for n in CASES[1:]}
    for path in (out / redo).iterdir():
        path.unlink()
    (out / redo).rmdir()
    leftover = out / f".{redo}.partial-x1"  # what a killed run leaves behind: its marker
    leftover.mkdir()  # names the writer, whose process is gone
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    (leftover / ".gdpi-writing").write_text(json.dumps(
        {**this_process(), "pid": int(gone.stdout), "target": redo}
    ))  # fmt: skip
    proc = _gdpi(batch["cases"], out, *batch["options"], "--batch-size", "8", "--engine", "ray")
    assert proc.returncode == 3, proc.stderr
    assert _events(proc.stdout)[-1]["slices_inpainted"] == runs[redo]["stats"]["slices_inpainted"]
    assert {n: (out / n / "run.json").stat().st_mtime_ns for n in CASES[1:]} == kept
    _assert_same_outputs(batch["local"], out)

    # the local engine resumes the same batch too (nothing left to do but the broken case)
    proc = _gdpi(batch["cases"], out, *batch["options"])
    assert proc.returncode == 3, proc.stderr
    assert [e["case"] for e in _events(proc.stdout) if e["event"] == "case"] == ["broken"]
    # other settings never mix into a batch
    proc = _gdpi(batch["cases"], out, *batch["options"], "--steps", "5", "--engine", "ray")
    assert (
        proc.returncode == 2 and "made with other settings (steps: 5 now, 4 there)" in proc.stderr
    )
    proc = _gdpi(batch["cases"], out, *batch["options"], "--liver-label", "1")
    assert proc.returncode == 2 and "(liver_label: 1 now, None there)" in proc.stderr


def test_a_killed_model_worker_is_replaced_and_nothing_is_lost(batch):
    out = batch["root"] / "killed"
    proc = _start(batch["cases"], out, *batch["options"], "--batch-size", "4")
    killed = None
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == "workers":
            pid = int(event["workers"][0].split()[0].rsplit(":", 1)[1])
        if event["event"] == "batch" and event["slices_done"] >= 8 and killed is None:
            os.kill(pid, signal.SIGKILL)  # the model worker, mid-run
            killed = event["slices_done"]
    assert proc.wait(timeout=300) == 3, proc.stderr.read()
    assert killed is not None
    _assert_same_outputs(batch["local"], out)
    workers = {
        w
        for n in CASES
        for w in json.loads((out / n / "run.json").read_text())["engine"]["workers"]
    }
    assert len({w.split()[0] for w in workers}) >= 2  # the restarted worker has a new process


def test_ctrl_c_stops_the_cluster_work_and_the_rerun_completes(batch):
    out = batch["root"] / "interrupted"
    proc = _start(batch["cases"], out, *batch["options"], "--batch-size", "4")
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == "batch" and event["slices_done"] >= 8:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl+C: the whole process group, Ray's too
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == 130
    assert _events(rest)[-1] == {"event": "cancelled"}
    finished = [p for p in out.iterdir() if p.is_dir()]
    assert len(finished) < len(CASES)
    for case in finished:  # only whole cases, no half-written one, no temporary folder
        assert not case.name.startswith(".")
        assert sorted(p.name for p in case.iterdir()) == sorted(OUTPUT_FILES)
    assert set(_summary(out)) <= {"broken", *CASES}
    proc = _gdpi(batch["cases"], out, *batch["options"], "--batch-size", "4", "--engine", "ray")
    assert proc.returncode == 3, proc.stderr
    _assert_same_outputs(batch["local"], out)


def test_engine_options_are_checked_before_anything_runs(batch, tmp_path, monkeypatch):
    ct = shared("hcc_0697", "ct.nii.gz")
    proc = subprocess.run(
        [sys.executable, "-m", "GDPITraining", "detect", "--ct", str(ct), "--liver",
         str(shared("hcc_0697", "seg.nii.gz")), "--out", str(tmp_path / "o"), "--engine", "ray"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "--engine ray runs folder mode" in proc.stderr
    proc = _gdpi(batch["cases"], tmp_path / "o", *batch["options"], "--workers", "2")
    assert proc.returncode == 2 and "--workers is an option of --engine ray" in proc.stderr
    proc = _gdpi(batch["cases"], tmp_path / "o", "--engine", "ray", "--cpus-per-worker", "0")
    assert proc.returncode == 2 and "--cpus-per-worker must be at least 1" in proc.stderr
    assert not (tmp_path / "o").exists()

    from GDPILiverAnomalyLib.errors import GDPIError
    from GDPILiverAnomalyLib.running import ray_engine

    monkeypatch.setitem(sys.modules, "ray", None)  # Ray not installed
    with pytest.raises(GDPIError, match=r'needs Ray: pip install "gdpi-liver-anomaly\[ray\]"'):
        ray_engine.import_ray()


def test_a_case_with_nothing_to_inpaint_is_scored_and_written_like_locally(
    tmp_path, tiny_checkpoint
):
    """The read and score tasks as plain functions (what Ray runs), for a case whose AME
    finds no candidate: no model work, the same outputs as the local engine."""
    from datetime import datetime, timezone

    from GDPILiverAnomalyLib.files.checkpoint import load_checkpoint
    from GDPILiverAnomalyLib.method.parameters import DetectionParams
    from GDPILiverAnomalyLib.running.ray_engine import finish_case, prepare_case
    from GDPILiverAnomalyLib.running.runner import CaseInputs, run_case

    checkpoint = load_checkpoint(tiny_checkpoint)
    params = DetectionParams.from_preset("fast", offset_hu=400, two_sided=False, device="cpu")
    inputs = CaseInputs(shared("hcc_0697", "ct.nii.gz"), shared("hcc_0697", "seg.nii.gz"))
    work, plan = prepare_case(inputs, checkpoint.grid, params)
    assert work["work"] == [] and work["ct"].shape[0] == 0
    inpainting = {"device": "cpu", "bf16": False, "batches": 0, "batch_size": 8, "nfe": 0,
                  "timings_s": {"prepare": work["prepare_s"], "inpaint": 0.0}}  # fmt: skip
    timings = {"read": 0.1, "started": datetime.now(timezone.utc), "elapsed_s": 1.0}
    info = finish_case(inputs, plan, work["ct"], [], inpainting, tmp_path / "ray", params,
                       checkpoint.identity(), timings, {"name": "ray"}, False)  # fmt: skip
    assert "error" not in info and info["nfe"] == 0 and info["results"]["candidate_voxels"] == 0
    run_case(inputs.ct, inputs.liver, checkpoint, params, tmp_path / "local")
    for volume in VOLUMES:
        a, b = (sitk.ReadImage(str(tmp_path / d / volume)) for d in ("local", "ray"))
        assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b)), volume
    # a retried score task (its worker died after writing) returns the written case
    again = finish_case(inputs, plan, work["ct"], [], inpainting, tmp_path / "ray", params,
                        checkpoint.identity(), timings, {"name": "ray"}, False)  # fmt: skip
    assert again == json.loads((tmp_path / "ray" / "run.json").read_text())
