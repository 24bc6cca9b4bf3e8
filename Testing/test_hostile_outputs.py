"""Your files are never overwritten or deleted, and folder mode keeps its books straight
(issue 20, sections 4 and 5): every ``--out`` follows the output-folder contract,
two training runs never mix in one folder, streamed partial scores never touch files
the run did not make, resume notices changed inputs, pairing refuses duplicate case
names and lists what it skipped, temporary folders never collide with case folders
and a killed writer's leftovers are removed by the next run, and no CSV cell the tool
writes is a live spreadsheet formula. Real files, real subprocesses, real (tiny)
models throughout."""

from __future__ import annotations

import csv
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from GDPILiverAnomalyLib.errors import InputError
from GDPILiverAnomalyLib.files.cases import pair_cases
from GDPILiverAnomalyLib.files.outputs import check_output_dir
from GDPILiverAnomalyLib.files.synthetic import synthetic_case
from GDPILiverAnomalyLib.method.grid import InputGrid
from GDPILiverAnomalyLib.running.runner import OUTPUT_FILES
from GDPITraining.cli import main
from GDPITraining.prepare import prepare

QUICK = ["--steps", "2", "--jump-length", "1", "--jump-n-sample", "1", "--device", "cpu"]


def _errors(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> content)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _write_case(folder: Path, seed: int = 3) -> None:
    """A small synthetic case (6 slices of 96 x 96 px at 3 mm) as ``ct.nrrd`` + ``liver.nrrd``."""
    case = synthetic_case(seed, n_slices=6, size=96, pixel_mm=3.0)
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(case.image(case.ct.astype(np.int16)), str(folder / "ct.nrrd"))
    sitk.WriteImage(case.image(case.liver), str(folder / "liver.nrrd"))


def _detect(ct, liver, checkpoint, out, *options) -> int:
    return main(["detect", "--ct", str(ct), "--liver", str(liver), "--checkpoint",
                 str(checkpoint), "--out", str(out), *QUICK, "--progress", "none", *options])  # fmt: skip


def _summary(out: Path) -> dict[str, dict]:
    with open(out / "summary.csv", newline="") as f:
        return {row["case"]: row for row in csv.DictReader(f)}


# -- section 4: --out of init-model, train, demo; --stream-dir ------------------------


def test_init_model_replaces_only_a_gdpi_checkpoint(tmp_path, capsys):
    notes = tmp_path / "model.safetensors"
    notes.write_text("my notes, not a checkpoint")
    for extra in ([], ["--overwrite"]):
        assert main(["init-model", "--out", str(notes), "--size", "micro", *extra]) == 2
        err = _errors(capsys)
        assert len(err) == 1 and err[0].startswith("gdpi: error: "), err
        assert ("not a gdpi checkpoint" if extra else "exists: pass --overwrite") in err[0]
    assert notes.read_text() == "my notes, not a checkpoint"

    model = tmp_path / "init.safetensors"
    assert main(["init-model", "--out", str(model), "--size", "micro"]) == 0
    first = model.read_bytes()
    assert main(["init-model", "--out", str(model), "--size", "micro", "--seed", "1"]) == 2
    assert model.read_bytes() == first  # an existing checkpoint needs --overwrite too
    assert main(["init-model", "--out", str(model), "--size", "micro", "--seed", "1",
                 "--overwrite"]) == 0  # fmt: skip
    assert model.read_bytes() != first
    assert main(["init-model", "--out", str(tmp_path), "--size", "micro"]) == 2  # a folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["init.safetensors", "model.safetensors"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("store") / "s"
    prepare("synthetic", None, path, InputGrid(32, 7.0), synthetic_cases=2, seed=100,
            val_fraction=0.0, log=lambda m: None, min_liver_mm2=500)  # fmt: skip
    return path


def _train_args(store: Path, out: Path, steps: int) -> list[str]:
    return ["train", "--data", str(store), "--out", str(out), "--size", "micro", "--steps",
            str(steps), "--batch-size", "2", "--save-every", "100000", "--device", "cpu",
            "--no-progress"]  # fmt: skip


def test_train_never_writes_over_a_folder_it_did_not_make(tmp_path, store, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"the user's own model")
    assert main(_train_args(store, out, 1)) == 2
    err = _errors(capsys)
    assert len(err) == 1 and "is not a gdpi train run folder" in err[0], err
    assert _tree(out) == {"model.safetensors": b"the user's own model"}
    assert [p.name for p in out.iterdir()] == ["model.safetensors"]  # no lock, no marker

    run = tmp_path / "run"  # a run folder of gdpi train is resumed, the lock removed
    assert main(_train_args(store, run, 1)) == 0
    assert main(_train_args(store, run, 2)) == 0
    assert (run / "model.safetensors").is_file() and not (run / ".gdpi-train.lock").exists()


def test_two_train_runs_never_mix_and_a_killed_runs_lock_is_taken_over(tmp_path, store, capsys):
    out = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "GDPITraining", *_train_args(store, out, 100000)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / ".gdpi-train.lock").exists() and time.monotonic() < deadline:
            assert first.poll() is None, "the first training run ended early"
            time.sleep(0.2)
        time.sleep(1.0)  # it trains now
        before = {p.name for p in out.iterdir()}
        assert main(_train_args(store, out, 1)) == 2
        err = _errors(capsys)
        assert len(err) == 1 and "in use by another gdpi train" in err[0], err
        assert f"pid {first.pid}" in err[0]
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert {p.name for p in out.iterdir()} >= before
    assert (out / ".gdpi-train.lock").exists()  # SIGKILL: nobody removed it
    assert main(_train_args(store, out, 1)) == 0  # the killed run's lock is taken over
    err = capsys.readouterr().err
    assert f"ended without releasing it (pid {first.pid}" in err, err
    assert not (out / ".gdpi-train.lock").exists()


def test_demo_overwrite_replaces_only_a_folder_of_demo_files(tmp_path, capsys):
    from GDPILiverAnomalyLib.running.demo import _is_demo_output

    out = tmp_path / "demo"
    (out / "input").mkdir(parents=True)
    (out / "result").mkdir()
    for name in ("ct.nrrd", "liver.nrrd", "tumour.nrrd"):
        (out / "input" / name).write_text("an earlier demo's input")
    for name in OUTPUT_FILES:
        (out / "result" / name).write_text("an earlier demo's output")
    (out / "metrics.json").write_text("{}")
    (out / "demo.png").write_text("png")
    assert check_output_dir(out, True, "metrics.json", _is_demo_output) == out  # replaceable
    (out / "result" / "my_notes.txt").write_text("the user's notes on this result")
    before = _tree(out)
    assert main(["demo", "--out", str(out), "--device", "cpu", "--progress", "none",
                 "--overwrite"]) == 2  # fmt: skip
    err = _errors(capsys)
    assert len(err) == 1 and "--overwrite replaces only an earlier result" in err[0], err
    assert _tree(out) == before


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_checkpoint) -> dict:
    """One small case, and a batch of cases (one with a hostile name, a DICOM case
    folder, a case folder with other file names, a hidden folder) detected once."""
    root = tmp_path_factory.mktemp("work")
    _write_case(root / "single")
    cases = root / "cases"
    for name in ("a", "=2+3"):
        _write_case(cases / name)
    (cases / "dicom_case" / "CT").mkdir(parents=True)  # a DICOM series folder
    shutil.copy(cases / "a" / "liver.nrrd", cases / "dicom_case" / "seg.nrrd")
    (cases / "other_names").mkdir()
    shutil.copy(cases / "a" / "ct.nrrd", cases / "other_names" / "scan_001.nrrd")
    shutil.copy(cases / "a" / "liver.nrrd", cases / "other_names" / "seg.nrrd")
    (cases / ".a.partial-x").mkdir()  # hidden: never a case (temporary names start with .)
    for name in ("ct.nrrd", "liver.nrrd"):
        shutil.copy(cases / "a" / name, cases / ".a.partial-x" / name)
    batch = root / "batch"
    proc = subprocess.run(
        [sys.executable, "-m", "GDPILiverAnomalyLib", "detect", "--ct", str(cases), "--liver",
         str(cases), "--checkpoint", str(tiny_checkpoint), "--out", str(batch), *QUICK],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return {"single": root / "single", "cases": cases, "batch": batch, "stderr": proc.stderr}


def test_stream_dir_never_touches_files_the_run_did_not_make(
    tmp_path, work, tiny_checkpoint, capsys
):
    stream = tmp_path / "stream"
    stream.mkdir()
    np.save(stream / "partial-0001.npy", np.arange(3))  # the user's (or an earlier run's)
    (stream / "partial-0002.tmp").write_text("the user's")
    before = _tree(stream)
    case = work["single"]
    code = _detect(case / "ct.nrrd", case / "liver.nrrd", tiny_checkpoint, tmp_path / "out",
                   "--batch-size", "1", "--stream-dir", str(stream), "--stream-every", "0",
                   "--progress", "json")  # fmt: skip
    assert code == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    written = [Path(e["path"]) for e in events if e["event"] == "partial"]
    assert len(written) >= 2 and not {p.name for p in written} & set(before)
    assert {k: v for k, v in _tree(stream).items() if k in before} == before
    assert sorted(p.name for p in stream.iterdir()) == sorted([*before, written[-1].name])

    a_file = tmp_path / "stream-file"
    a_file.write_text("not a folder")
    code = _detect(case / "ct.nrrd", case / "liver.nrrd", tiny_checkpoint, tmp_path / "out2",
                   "--stream-dir", str(a_file))  # fmt: skip
    err = _errors(capsys)
    assert code == 2 and len(err) == 1 and "--stream-dir" in err[0] and "not a folder" in err[0]
    assert a_file.read_text() == "not a folder" and not (tmp_path / "out2").exists()


# -- section 5: folder mode ------------------------------------------------------------


def test_resume_redoes_a_case_whose_mask_changed(tmp_path, tiny_checkpoint, caplog):
    cases, batch = tmp_path / "cases", tmp_path / "batch"
    for name in ("a", "b"):
        _write_case(cases / name)
    assert _detect(cases, cases, tiny_checkpoint, batch) == 0
    kept = (batch / "b" / "run.json").read_bytes()
    mask = sitk.ReadImage(str(cases / "a" / "liver.nrrd"))
    liver = sitk.GetArrayFromImage(mask)
    liver[:2] = 0  # the corrected mask (two slices fewer), at the same path
    corrected = sitk.GetImageFromArray(liver)
    corrected.CopyInformation(mask)
    sitk.WriteImage(corrected, str(cases / "a" / "liver.nrrd"))  # same size, newer
    old = json.loads((batch / "a" / "run.json").read_text())["inputs"]["liver_voxels"]
    assert 0 < int(liver.sum()) < old
    assert _detect(cases, cases, tiny_checkpoint, batch) == 0
    assert "case a: its liver file changed" in caplog.text
    run = json.loads((batch / "a" / "run.json").read_text())
    assert run["inputs"]["liver_voxels"] == int(liver.sum())  # redone with the new mask
    assert (batch / "b" / "run.json").read_bytes() == kept  # unchanged inputs: kept


def test_two_files_that_would_be_one_case_are_refused(tmp_path, work, tiny_checkpoint, capsys):
    images, labels = tmp_path / "imagesTr", tmp_path / "labelsTr"
    images.mkdir()
    labels.mkdir()
    for suffix in (".nrrd", ".nii.gz"):
        for folder, name in ((images, "ct.nrrd"), (labels, "liver.nrrd")):
            image = sitk.ReadImage(str(work["single"] / name))
            sitk.WriteImage(image, str(folder / f"A{suffix}"))
    assert _detect(images, labels, tiny_checkpoint, tmp_path / "out") == 2
    err = _errors(capsys)
    assert len(err) == 1 and "A.nii.gz and A.nrrd" in err[0] and "case 'A'" in err[0], err
    assert not (tmp_path / "out").exists()
    (images / "A.nrrd").rename(images / "a.nrrd")  # one output folder on macOS and Windows
    with pytest.raises(InputError, match="A.nii.gz and a.nrrd"):
        pair_cases(images, labels)


def test_skipped_case_folders_are_listed_with_the_reason(work):
    for name in ("dicom_case", "other_names"):
        assert f"gdpi: skipped {work['cases'] / name}: " in work["stderr"]
    rows = _summary(work["batch"])
    assert {n: r["status"] for n, r in rows.items()} == {
        "a": "ok",
        "'=2+3": "ok",
        "dicom_case": "skipped",
        "other_names": "skipped",
    }
    assert "DICOM folders are not read in folder mode" in rows["dicom_case"]["error"]
    assert "no CT file named ct" in rows["other_names"]["error"]
    assert "scan_001.nrrd" in rows["other_names"]["error"]


def test_temporary_names_never_collide_with_cases_or_your_folders(
    tmp_path, work, tiny_checkpoint, capsys
):
    assert ".a.partial-x" not in {c.name for c in pair_cases(work["cases"], work["cases"])}
    assert not (work["batch"] / ".a.partial-x").exists()
    batch = tmp_path / "batch"
    shutil.copytree(work["batch"], batch)
    yours = batch / ".a.partial-yours"  # named like a temporary folder, but no gdpi marker
    yours.mkdir()
    (yours / "notes.txt").write_text("the user's")
    assert _detect(work["cases"], work["cases"], tiny_checkpoint, batch) == 2
    err = _errors(capsys)
    assert len(err) == 1 and ".a.partial-yours" in err[0], err
    assert (yours / "notes.txt").read_text() == "the user's"


_WRITER = """
import sys, time
from pathlib import Path
from GDPILiverAnomalyLib.files.outputs import atomic_dir
with atomic_dir(Path(sys.argv[1])) as tmp:
    (tmp / "score.nrrd").write_text("half written")
    print("writing", flush=True)
    time.sleep(600)
"""


def _writer(out: Path) -> subprocess.Popen:
    """A process in the middle of writing ``out`` (atomic_dir, as every result is)."""
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(out)], stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "writing"
    return proc


def test_a_killed_writers_partial_folder_is_removed_by_the_next_run(
    tmp_path, work, tiny_checkpoint, caplog
):
    killed, running = _writer(tmp_path / "result"), _writer(tmp_path / "other")
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        stale = [p for p in tmp_path.iterdir() if p.name.startswith(".result.partial-")]
        alive = [p for p in tmp_path.iterdir() if p.name.startswith(".other.partial-")]
        assert len(stale) == 1 and len(alive) == 1
        yours = tmp_path / ".notes.partial-mine"  # hidden, named alike, not gdpi's
        yours.mkdir()
        (yours / "notes.txt").write_text("the user's")
        case = work["single"]
        assert _detect(case / "ct.nrrd", case / "liver.nrrd", tiny_checkpoint,
                       tmp_path / "result2") == 0  # fmt: skip
        assert f"removed {stale[0]}" in caplog.text and f"pid {killed.pid}" in caplog.text
        assert not stale[0].exists()
        assert alive[0].exists()  # its writer still runs
        assert (yours / "notes.txt").read_text() == "the user's"
        assert sorted(p.name for p in (tmp_path / "result2").iterdir()) == sorted(OUTPUT_FILES)
    finally:
        running.kill()
        running.wait()
        killed.kill()


# -- CSV injection ------------------------------------------------------------------


def test_no_csv_cell_is_a_live_formula(work):
    rows = _summary(work["batch"])
    assert "'=2+3" in rows and "=2+3" not in rows  # the case name, as text
    with open(work["batch"] / "=2+3" / "lesions.csv", newline="") as f:
        lesions = list(csv.DictReader(f))
    assert lesions and all(isinstance(float(v), float) for r in lesions for v in r.values())
    from GDPILiverAnomalyLib.files.outputs import csv_safe

    for text in ("=2+3", "+cmd", "-cmd|' /C calc'!A0", "@SUM(1)", "\t=1", "\r=1", "-inf"):
        assert csv_safe(text) == "'" + text
    for value in ("-12.5", "+3", "-1e-05", "case", "", 7, -3.5, None):
        assert csv_safe(value) == value  # numbers stay numbers
    for row in rows.values():
        for cell in row.values():
            assert csv_safe(cell) == cell or cell[0] not in "=+-@\t\r"


def test_resume_never_deletes_an_editors_file_beside_summary_csv(tmp_path, tiny_checkpoint, capsys):
    """vim's swap file of an open ``summary.csv`` (``.summary.csv.swp``) looked like gdpi's
    own temporary file and was deleted by the next run; only gdpi's own
    (``.summary.csv.XXXXXXXX.gdpi-tmp``) are removed, and a batch folder with the swap file
    in it is refused, the file kept."""
    cases, batch = tmp_path / "cases", tmp_path / "batch"
    _write_case(cases / "a")
    assert _detect(cases, cases, tiny_checkpoint, batch) == 0
    ours = batch / ".summary.csv.k2j4h5l6.gdpi-tmp"  # an interrupted write_text_atomic
    ours.write_text("case\n")
    assert _detect(cases, cases, tiny_checkpoint, batch) == 0
    assert not ours.exists()
    swap = batch / ".summary.csv.swp"
    swap.write_bytes(b"b0VIM 9.0")
    capsys.readouterr()
    assert _detect(cases, cases, tiny_checkpoint, batch) == 2
    assert ".summary.csv.swp" in _errors(capsys)[0]
    assert swap.read_bytes() == b"b0VIM 9.0"


def test_a_writer_in_another_container_is_never_taken_for_gone():
    """Containers that share the host name (``--network host``) have their own pids: a
    marker from one must not be judged by the other's process table."""
    import socket

    from GDPILiverAnomalyLib.files.outputs import this_process, writer_gone

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    here = {**this_process(), "pid": int(dead)}
    assert writer_gone(here)  # same host and pid space, the process has ended
    assert not writer_gone({**here, "pid_space": "another-boot:4026531836"})
    assert not writer_gone({**here, "host": socket.gethostname() + "-other"})
    assert not writer_gone(this_process())  # this process runs
