"""``gdpi detect`` end to end: real files, a real (random, tiny) network, real outputs."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import shared
from GDPILiverAnomalyLib.files.cases import pair_cases
from GDPILiverAnomalyLib.files.checkpoint import file_sha256, load_checkpoint
from GDPILiverAnomalyLib.files.volumes import read_ct, read_liver_mask
from GDPILiverAnomalyLib.method.parameters import DetectionParams
from GDPILiverAnomalyLib.running.runner import OUTPUT_FILES, run_case
from scipy import ndimage

VOLUMES = ("score.nrrd", "pseudo_healthy.nrrd", "candidates.nrrd", "anomaly.nrrd")
GDPI = [sys.executable, "-m", "GDPILiverAnomalyLib"]


def _assert_same_geometry(path, ct):
    image = sitk.ReadImage(str(path))
    assert image.GetSize() == ct.GetSize(), path
    # NRRD stores spacing x direction as text: equal up to double rounding (1e-9)
    assert np.allclose(image.GetSpacing(), ct.GetSpacing(), rtol=0, atol=1e-9), path
    assert np.allclose(image.GetOrigin(), ct.GetOrigin(), rtol=0, atol=1e-9), path
    assert np.allclose(image.GetDirection(), ct.GetDirection(), rtol=0, atol=1e-9), path
    return sitk.GetArrayFromImage(image)


def test_cli_end_to_end_on_a_real_case(tmp_path, tiny_checkpoint):
    ct_path, seg_path = shared("ts_small", "ct.nii.gz"), shared("ts_small", "totalseg.nii.gz")
    out = tmp_path / "out"
    cmd = [
        *GDPI,
        "detect",
        "--ct",
        str(ct_path),
        "--liver",
        str(seg_path),
        "--liver-label",
        "5",
        "--checkpoint",
        str(tiny_checkpoint),
        "--out",
        str(out),
        "--preset",
        "fast",
        "--steps",
        "10",
        "--jump-length",
        "2",
        "--jump-n-sample",
        "2",
        "--device",
        "cpu",
        "--progress",
        "json",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert events[0]["event"] == "start" and events[-1]["event"] == "done"
    progress = [e for e in events if e["event"] == "progress"]
    assert progress and progress[-1]["nfe_done"] == progress[-1]["nfe_total"] > 0
    assert progress[-1]["slices_done"] == progress[-1]["slices_total"]
    assert [p["nfe_done"] for p in progress] == sorted(p["nfe_done"] for p in progress)

    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES)
    ct = read_ct(ct_path)
    ct_array = sitk.GetArrayFromImage(ct)
    liver = read_liver_mask(seg_path, ct, 5)
    score, pseudo, cand, anomaly = (_assert_same_geometry(out / name, ct) for name in VOLUMES)
    assert score.dtype == np.float32 and cand.dtype == np.uint8 and anomaly.dtype == np.uint8
    assert not score[liver == 0].any()  # zero outside the liver
    assert score.max() > 0
    assert not cand[liver == 0].any() and cand.any()
    assert np.array_equal(anomaly, (score > 20.0).astype(np.uint8))
    assert np.array_equal(pseudo[liver == 0], ct_array[liver == 0])

    run = json.loads((out / "run.json").read_text())
    assert run["checkpoint"]["sha256"] == file_sha256(tiny_checkpoint)
    assert run["parameters"]["steps"] == 10 and run["parameters"]["preset"] == "fast"
    assert run["device"] == "cpu"
    assert run["nfe"] == run["stats"]["batches"] * 18 == progress[-1]["nfe_total"]
    assert run["stats"]["slices_with_liver"] == int(liver.any(axis=(1, 2)).sum())
    for key in ("torch", "numpy", "SimpleITK", "python", "gdpi"):
        assert run["versions"][key]
    for key in ("read", "prepare", "inpaint", "score", "write", "wall"):
        assert run["timings_s"][key] >= 0
    assert run["inputs"]["geometry"]["size"] == list(ct.GetSize())

    with open(out / "lesions.csv") as f:
        rows = list(csv.DictReader(f))
    _, n = ndimage.label(anomaly, structure=np.ones((3, 3, 3)))
    assert len(rows) == n == run["results"]["lesions"]
    if rows:
        assert float(rows[0]["max_score_hu"]) > 20.0


@pytest.mark.parametrize(
    "case,ct_name,mask_name,label",
    [
        ("hcc_1720", "ct.nii.gz", "seg.nii.gz", None),
        ("hcc_1211", "ct.nii.gz", "seg.nii.gz", None),
        ("ts_full", "ct.nii.gz", "totalseg.nii.gz", 5),
        ("dcmqi_3slice", "dicom", "liver_seg.nrrd", None),
    ],
)
def test_outputs_have_the_ct_geometry_for_every_case_format(
    tmp_path, tiny_checkpoint, case, ct_name, mask_name, label
):
    # candidates under 1e6 mm^2 are dropped, so none are left: the whole path runs without
    # network work
    params = DetectionParams.from_preset("fast", min_candidate_mm2=1e6, device="cpu")
    info = run_case(
        shared(case, ct_name),
        shared(case, mask_name),
        load_checkpoint(tiny_checkpoint),
        params,
        tmp_path / case,
        liver_label=label,
    )
    ct = read_ct(shared(case, ct_name))
    for name in VOLUMES:
        _assert_same_geometry(tmp_path / case / name, ct)
    assert info["nfe"] == 0 and info["results"]["candidate_voxels"] == 0
    pseudo = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / case / "pseudo_healthy.nrrd")))
    assert np.array_equal(pseudo, sitk.GetArrayFromImage(ct))


def test_dicom_case_is_deterministic_and_batch_independent(tmp_path, tiny_checkpoint, quick_params):
    ckpt = load_checkpoint(tiny_checkpoint)
    ct, mask = shared("dcmqi_3slice", "dicom"), shared("dcmqi_3slice", "liver_seg.nrrd")

    def score(name, **changes):
        params = DetectionParams(**{**quick_params.to_dict(), **changes})
        run_case(ct, mask, ckpt, params, tmp_path / name)
        return sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / name / "score.nrrd")))

    a, b = score("a"), score("b")
    assert np.array_equal(a, b) and a.max() > 0
    assert a is not None and quick_params.batch_size is None  # auto: 8 slices per batch
    single, batched = score("single", batch_size=1), score("batched", batch_size=8)
    assert np.allclose(batched, single, atol=0.05) and np.allclose(a, single, atol=0.05)
    assert not np.allclose(score("seed", seed=1), a, atol=0.05)
    # the DDNM sampler: also deterministic and batch-independent, recorded in run.json
    ddnm = score("ddnm", sampler="ddnm", steps=10, jump_n_sample=1)
    assert np.array_equal(ddnm, score("ddnm2", sampler="ddnm", steps=10, jump_n_sample=1))
    single = score("ddnm1", sampler="ddnm", steps=10, jump_n_sample=1, batch_size=1)
    assert np.allclose(ddnm, single, atol=0.05) and not np.allclose(ddnm, a, atol=0.05)
    run = json.loads((tmp_path / "ddnm" / "run.json").read_text())
    assert run["parameters"]["sampler"] == "ddnm" and run["stats"]["nfe_per_batch"] == 10


def test_folder_mode_skips_a_broken_case(tmp_path, tiny_checkpoint):
    cases = tmp_path / "cases"
    for name in ("a", "b", "broken"):
        (cases / name).mkdir(parents=True)
    for name in ("a", "b"):
        os.symlink(shared("ts_small", "ct.nii.gz"), cases / name / "ct.nii.gz")
        os.symlink(shared("ts_small", "totalseg.nii.gz"), cases / name / "totalseg.nii.gz")
    (cases / "broken" / "ct.nii.gz").write_bytes(b"not an image")
    os.symlink(shared("ts_small", "totalseg.nii.gz"), cases / "broken" / "seg.nii.gz")
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            *GDPI,
            "detect",
            "--ct",
            str(cases),
            "--liver",
            str(cases),
            "--liver-label",
            "5",
            "--checkpoint",
            str(tiny_checkpoint),
            "--out",
            str(out),
            "--preset",
            "fast",
            "--steps",
            "4",
            "--jump-length",
            "1",
            "--jump-n-sample",
            "1",
            "--batch-size",
            "32",
            "--device",
            "cpu",
            "--progress",
            "none",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 3, proc.stderr
    assert "case broken failed: cannot read CT" in proc.stderr
    with open(out / "summary.csv") as f:
        rows = {r["case"]: r for r in csv.DictReader(f)}
    assert [rows[c]["status"] for c in ("a", "b", "broken")] == ["ok", "ok", "error"]
    assert "cannot read CT" in rows["broken"]["error"]
    assert int(rows["a"]["nfe"]) == 4
    for name in ("a", "b"):
        assert sorted(p.name for p in (out / name).iterdir()) == sorted(OUTPUT_FILES)
    assert not (out / "broken").exists()


def test_pairing_rules(tmp_path):
    lits = tmp_path / "lits"
    lits.mkdir()
    for n in (0, 2, 10):
        (lits / f"volume-{n}.nii").touch()
        (lits / f"segmentation-{n}.nii").touch()
    assert [(c.name, c.liver.name) for c in pair_cases(lits, lits)] == [
        ("volume-0", "segmentation-0.nii"),
        ("volume-2", "segmentation-2.nii"),
        ("volume-10", "segmentation-10.nii"),
    ]
    msd = tmp_path / "msd"
    (msd / "imagesTr").mkdir(parents=True)
    (msd / "labelsTr").mkdir()
    for n in (1, 3):
        (msd / "imagesTr" / f"liver_{n}.nii.gz").touch()
        (msd / "labelsTr" / f"liver_{n}.nii.gz").touch()
    pairs = pair_cases(msd / "imagesTr", msd / "labelsTr")
    assert [(c.name, c.liver.parent.name) for c in pairs] == [
        ("liver_1", "labelsTr"),
        ("liver_3", "labelsTr"),
    ]


def test_cancel_stops_the_worker_and_writes_nothing(tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            *GDPI,
            "detect",
            "--ct",
            str(shared("ts_small", "ct.nii.gz")),
            "--liver",
            str(shared("ts_small", "totalseg.nii.gz")),
            "--liver-label",
            "5",
            "--checkpoint",
            str(tiny_checkpoint),
            "--out",
            str(out),
            "--preset",
            "paper",
            "--device",
            "cpu",
            "--progress",
            "json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in proc.stdout:
            event = json.loads(line)
            if event["event"] == "progress" and event["nfe_done"] >= 2:
                assert event["nfe_total"] % 2410 == 0  # paper preset: 2410 NFE per batch
                break
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert time.monotonic() - t0 < 30
    assert json.loads(rest.splitlines()[-1])["event"] == "cancelled"
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no partial output folder left behind
