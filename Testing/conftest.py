"""Shared fixtures. ``../shared/data`` (real CTs) sits beside the repository; tests that
need it skip when it is missing, except under CI (``CI`` set), where they fail.

Imports nothing that needs torch at module level: the torch-free tests also run under
Python 3.9 without torch (``test_python39.py``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from GDPILiverAnomalyLib.method.parameters import DetectionParams

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

#: Equal scores across engines, batches and cases (HU). float32 convolutions (the CPU
#: default without native bf16) round differently with the batch size (not with the
#: other slices in the batch: same size, same bits), and the sampling chain carries that
#: on: a slice inpainted in a batch of another size differs by up to 0.011 HU (measured
#: on the Ray tests' 20 M voxels, tiny random model, 4 steps). A wrong slice, seed or
#: window differs by whole HU.
SAME_HU = 0.05


def assert_same_hu(actual, expected, what: str = "") -> None:
    """Score-like arrays (HU) equal within :data:`SAME_HU`, shapes exactly."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, what
    np.testing.assert_allclose(actual, expected, rtol=0, atol=SAME_HU, err_msg=what)


def assert_same_detection(folder: Path, other: Path, threshold_hu: float = 20.0) -> None:
    """Two ``detect`` output folders of one case hold the same result: the same geometry
    and candidates, scores and pseudo-healthy images within :data:`SAME_HU`, the anomaly
    mask equal but for voxels within it of the threshold, and the same lesions
    (lesions.csv: scores within :data:`SAME_HU`; sizes exact unless a voxel flipped)."""
    import csv

    import SimpleITK as sitk

    arrays = {}
    for name in ("score.nrrd", "pseudo_healthy.nrrd", "candidates.nrrd", "anomaly.nrrd"):
        a, b = (sitk.ReadImage(str(f / name)) for f in (folder, other))
        assert (a.GetOrigin(), a.GetSpacing(), a.GetDirection()) == (
            b.GetOrigin(), b.GetSpacing(), b.GetDirection()), name  # fmt: skip
        arrays[name] = (sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    np.testing.assert_array_equal(*arrays["candidates.nrrd"], err_msg="candidates.nrrd")
    assert_same_hu(*arrays["score.nrrd"], "score.nrrd")
    assert_same_hu(*arrays["pseudo_healthy.nrrd"], "pseudo_healthy.nrrd")
    mine, theirs = arrays["anomaly.nrrd"]
    assert_same_mask(mine, theirs, arrays["score.nrrd"][0], threshold_hu, "anomaly.nrrd")
    flipped = int(np.count_nonzero(mine != theirs))
    rows = []
    for f in (folder, other):
        with open(f / "lesions.csv", newline="") as handle:
            rows.append(list(csv.DictReader(handle)))
    assert len(rows[0]) == len(rows[1]), "lesions.csv"
    for row, twin in zip(*rows):  # noqa: B905 (equal lengths checked; 3.9 has no strict)
        assert row.keys() == twin.keys()
        for key in ("lesion_score", "max_score_hu", "mean_score_hu"):
            # written to 3 decimals: rounding adds up to 1e-3
            assert abs(float(row[key]) - float(twin[key])) <= SAME_HU + 1e-3 + 1e-9, (key, row)
        if not flipped:
            sizes = ("id", "voxels", "volume_ml", "slice_first", "slice_last")
            assert [row[k] for k in sizes] == [twin[k] for k in sizes], (row, twin)
        else:
            assert abs(int(row["voxels"]) - int(twin["voxels"])) <= flipped, (row, twin)


def detect_as_ray_tasks(inputs, checkpoint, params, batch_size: int, out: Path) -> tuple:
    """What the Ray engine's tasks and model worker do for one case, as plain functions in
    this process: ``prepare_case``, the case's grid images packed into batches of
    ``batch_size`` and inpainted by an ``InpaintWorker``, ``finish_case`` writing ``out``.
    Returns finish_case's info and the number of grid images inpainted."""
    from datetime import datetime, timezone

    from GDPILiverAnomalyLib.running.packing import CaseSlices, Packer
    from GDPILiverAnomalyLib.running.ray_engine import InpaintWorker, finish_case, prepare_case

    work, plan = prepare_case(inputs, checkpoint.grid, params)
    packer = Packer(batch_size)
    case = CaseSlices(out.name, work["ct"], work["mask"], work["seeds"], work["work"])
    packer.add(case)
    worker = InpaintWorker(checkpoint, params, threads=0)  # 0: leave this process's threads
    done = []
    while (batch := packer.next_batch(flush=True)) is not None:
        diff, name = worker.inpaint(batch.ct, batch.mask, batch.seeds)
        done += packer.receive(batch, diff, name)
    assert done == [case]
    inpainting = {"device": "cpu", "bf16": False, "batches": case.batches,
                  "batch_size": batch_size, "nfe": 0,
                  "timings_s": {"prepare": 0.0, "inpaint": 0.0}}  # fmt: skip
    timings = {"read": 0.1, "started": datetime.now(timezone.utc), "elapsed_s": 1.0}
    info = finish_case(inputs, plan, case.diff, case.work, inpainting, out, params,
                       checkpoint.identity(), timings, {"name": "ray"}, False)  # fmt: skip
    assert "error" not in info, info
    return info, len(work["work"])


def assert_same_mask(actual, expected, score, threshold_hu: float, what: str = "") -> None:
    """Masks made by ``score > threshold_hu`` equal, except voxels whose score lies within
    :data:`SAME_HU` of the threshold (where batch rounding may flip them)."""
    actual, expected, score = np.asarray(actual), np.asarray(expected), np.asarray(score)
    assert actual.shape == expected.shape, what
    differ = actual != expected
    assert np.all(np.abs(score[differ] - threshold_hu) <= SAME_HU), what


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
