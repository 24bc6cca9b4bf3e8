"""Training side: dataset layouts, the synthetic generator, training, resume, DDP."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from GDPILiverAnomalyLib.errors import ParameterError
from GDPILiverAnomalyLib.files.checkpoint import load_checkpoint
from GDPILiverAnomalyLib.files.synthetic import synthetic_case
from GDPILiverAnomalyLib.method.diffusion import DiffusionConfig, GaussianDiffusion, training_losses
from GDPILiverAnomalyLib.method.grid import InputGrid
from GDPITraining.loop import TrainConfig, load_state
from GDPITraining.prepare import prepare
from GDPITraining.store import SliceStore
from GDPITraining.train import train

GRID = InputGrid(32, 7.0)
GDPI = [sys.executable, "-m", "GDPITraining"]


def _small_case(seed, lesions=True):
    n = None if lesions else 0
    return synthetic_case(seed, n_slices=6, size=64, pixel_mm=5.0, slice_mm=5.0, n_lesions=n)


def _label_map(case):
    seg = case.liver.astype(np.uint8)
    seg[case.tumour > 0] = 2
    return seg


def _expected_counts(case, min_liver_mm2=1000.0):
    keep = case.liver.sum(axis=(1, 2)) * 25.0 >= min_liver_mm2
    tumour = case.tumour.any(axis=(1, 2))
    return int((keep & ~tumour).sum()), int((keep & tumour).sum())


def _write_dicom_series(volume: np.ndarray, case, folder, series_uid: str):
    folder.mkdir(parents=True)
    image = case.image(volume)
    for k in range(volume.shape[0]):
        sl = image[:, :, k]
        origin = image.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in {
            "0010|0010": "SYNTH^CASE",
            "0010|0020": "synthetic",
            "0008|0060": "CT",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.4f}" for v in origin),
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0018|0050": "5.0",
        }.items():
            sl.SetMetaData(tag, value)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(folder / f"{k:03d}.dcm"))
        writer.Execute(sl)


@pytest.fixture(scope="module")
def cases():
    return [_small_case(s) for s in (11, 12, 13)]


def _check_store(store_path, cases, names):
    store = SliceStore.open(store_path)
    healthy = sum(_expected_counts(c)[0] for c in cases)
    abnormal = sum(_expected_counts(c)[1] for c in cases)
    assert len(store.select("healthy")) == healthy
    assert len(store.select("abnormal")) == abnormal
    assert abnormal > 0 and healthy > 0
    assert store.images.shape[1:] == (32, 32) and store.images.dtype == np.float32
    by_case = {}
    for row in store.slices:
        by_case.setdefault(row["case"], set()).add(row["split"])
        assert float(row["spacing_z_mm"]) == pytest.approx(5.0)
    assert sorted(by_case) == sorted(names)
    assert all(len(s) == 1 for s in by_case.values())  # split by patient, never by slice
    for i in store.select("abnormal"):
        assert store.tumour[i].any() or int(store.slices[i]["tumour_px"]) == 0
    for i in store.select("healthy"):
        assert not store.tumour[i].any()
    return store


def test_prepare_lits_layout(tmp_path, cases):
    src = tmp_path / "lits"
    src.mkdir()
    for n, case in enumerate(cases):
        sitk.WriteImage(case.image(case.ct.astype(np.int16)), str(src / f"volume-{n}.nii"))
        sitk.WriteImage(case.image(_label_map(case)), str(src / f"segmentation-{n}.nii"))
    summary = prepare("lits", src, tmp_path / "store", GRID, val_fraction=0.34, log=lambda m: None)
    store = _check_store(tmp_path / "store", cases, ["volume-0", "volume-1", "volume-2"])
    assert len(summary["cases"]["val"]) == 1 and len(summary["cases"]["train"]) == 2
    again = prepare("lits", src, tmp_path / "store2", GRID, val_fraction=0.34, log=lambda m: None)
    assert again["cases"] == summary["cases"]  # the split is reproducible
    assert np.array_equal(SliceStore.open(tmp_path / "store2").images, store.images)


def test_prepare_msd_layout_with_test_holdout(tmp_path, cases):
    src = tmp_path / "Task03_Liver"
    (src / "imagesTr").mkdir(parents=True)
    (src / "labelsTr").mkdir()
    for n, case in enumerate(cases):
        sitk.WriteImage(
            case.image(case.ct.astype(np.int16)), str(src / "imagesTr" / f"liver_{n}.nii.gz")
        )
        sitk.WriteImage(case.image(_label_map(case)), str(src / "labelsTr" / f"liver_{n}.nii.gz"))
    summary = prepare(
        "msd", src, tmp_path / "store", GRID, test_cases={"liver_2"}, log=lambda m: None
    )
    _check_store(tmp_path / "store", cases, ["liver_0", "liver_1", "liver_2"])
    assert summary["cases"]["test"] == ["liver_2"]


def test_prepare_ircad_dicom_layout(tmp_path, cases):
    src = tmp_path / "3Dircadb1"
    for n, case in enumerate(cases[:2]):
        patient = src / f"3Dircadb1.{n + 1}"
        _write_dicom_series(
            case.ct.astype(np.int16), case, patient / "PATIENT_DICOM", f"1.2.3.{n}.1"
        )
        _write_dicom_series(
            (case.liver * 255).astype(np.uint8),
            case,
            patient / "MASKS_DICOM" / "liver",
            f"1.2.3.{n}.2",
        )
        _write_dicom_series(
            (case.tumour * 255).astype(np.uint8),
            case,
            patient / "MASKS_DICOM" / "livertumor01",
            f"1.2.3.{n}.3",
        )
    prepare("ircad", src, tmp_path / "store", GRID, log=lambda m: None)
    _check_store(tmp_path / "store", cases[:2], ["3Dircadb1.1", "3Dircadb1.2"])


def test_prepare_generic_list_with_label_map(tmp_path, cases):
    rows = []
    for n, case in enumerate(cases):
        seg = np.where(case.liver > 0, 5, 0).astype(np.uint8)
        seg[:, :5, :] = 3  # other organs of a multi-label map
        sitk.WriteImage(case.image(case.ct.astype(np.int16)), str(tmp_path / f"ct{n}.nrrd"))
        sitk.WriteImage(case.image(seg), str(tmp_path / f"totalseg{n}.nrrd"))
        sitk.WriteImage(case.image(case.tumour), str(tmp_path / f"tumour{n}.nrrd"))
        rows.append(
            {
                "case": f"c{n}",
                "ct": f"ct{n}.nrrd",
                "liver": f"totalseg{n}.nrrd",
                "tumour": f"tumour{n}.nrrd",
                "liver_label": 5,
                "tumour_label": "",
            }
        )
    with open(tmp_path / "cases.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    prepare("list", tmp_path / "cases.csv", tmp_path / "store", GRID, log=lambda m: None)
    _check_store(tmp_path / "store", cases, ["c0", "c1", "c2"])


def test_prepare_case_folders_layout(tmp_path, cases):
    for n, case in enumerate(cases):
        d = tmp_path / "cases" / f"patient{n}"
        d.mkdir(parents=True)
        sitk.WriteImage(case.image(case.ct.astype(np.int16)), str(d / "ct.nii.gz"))
        sitk.WriteImage(case.image(_label_map(case)), str(d / "seg.nii.gz"))
    prepare("folders", tmp_path / "cases", tmp_path / "store", GRID, log=lambda m: None)
    _check_store(tmp_path / "store", cases, ["patient0", "patient1", "patient2"])


def test_gdpi_prepare_cli_refuses_bad_input(tmp_path):
    from GDPITraining.cli import main

    assert (
        main(
            ["prepare", "--layout", "lits", "--input", str(tmp_path), "--out", str(tmp_path / "s")]
        )
        == 2
    )
    assert not (tmp_path / "s").exists()


def test_synthetic_generator_is_deterministic_and_masks_match():
    a, b = synthetic_case(5), synthetic_case(5)
    assert np.array_equal(a.ct, b.ct) and np.array_equal(a.tumour, b.tumour)
    assert not np.array_equal(a.ct, synthetic_case(6).ct)
    altered = a.ct != a.healthy
    assert np.array_equal(altered, a.tumour > 0)  # lesion masks are exactly the altered voxels
    assert not (a.tumour & (a.liver == 0)).any()
    assert (a.ct[altered] < a.healthy[altered]).all()  # hypodense
    assert len(a.lesions) >= 2
    # plausible HU: air, fat, liver, bone
    assert a.ct.min() < -900 and a.ct.max() > 300
    assert 80 < np.median(a.healthy[a.liver > 0]) < 140
    healthy = synthetic_case(5, n_lesions=0)
    assert not healthy.tumour.any() and np.array_equal(healthy.ct, healthy.healthy)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "s"
    prepare(
        "synthetic",
        None,
        path,
        GRID,
        synthetic_cases=3,
        seed=100,
        val_fraction=0.0,
        log=lambda m: None,
        min_liver_mm2=500,
    )
    return path


def _config(store, out, **kw):
    base = dict(
        data=str(store),
        out=str(out),
        size="micro",
        steps=4,
        batch_size=4,
        save_every=2,
        log_every=1,
        device="cpu",
        progress=False,
        lr=1e-3,
    )
    return TrainConfig(**{**base, **kw})


def _fixed_batch_loss(model_path_or_state, store):
    s = SliceStore.open(store)
    from GDPILiverAnomalyLib.files.checkpoint import Intensity
    from GDPILiverAnomalyLib.method.unet import MODEL_SIZES, UNet, UNetConfig

    net = UNet(UNetConfig(**{**MODEL_SIZES["micro"], "image_size": 32}))
    net.load_state_dict(model_path_or_state)
    net.eval()
    d = GaussianDiffusion.from_config(DiffusionConfig())
    g = torch.Generator().manual_seed(0)
    x0 = Intensity().normalize(torch.from_numpy(np.array(s.images[:16]))[:, None])
    t = torch.randint(0, 1000, (16,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        return training_losses(d, net, x0, t, noise)["loss"].mean().item()


def test_training_lowers_the_loss(tmp_path, store):
    from GDPILiverAnomalyLib.method.unet import MODEL_SIZES, UNet, UNetConfig

    torch.manual_seed(0)
    initial = UNet(UNetConfig(**{**MODEL_SIZES["micro"], "image_size": 32})).state_dict()
    path = train(_config(store, tmp_path / "run", steps=40, save_every=40))
    trained = load_state(tmp_path / "run" / "state.pt")["model"]
    before, after = _fixed_batch_loss(initial, store), _fixed_batch_loss(trained, store)
    assert after < 0.7 * before, (before, after)
    rows = list(csv.DictReader(open(tmp_path / "run" / "log.csv")))
    assert len(rows) == 40 and float(rows[-1]["loss"]) < float(rows[0]["loss"])
    assert (tmp_path / "run" / "previews" / "step0000040.png").exists()
    # a freshly trained checkpoint loads and runs in gdpi detect
    ckpt = load_checkpoint(path)
    assert ckpt.ema and ckpt.training["steps"] == 40 and ckpt.grid == GRID
    case = _small_case(3)
    sitk.WriteImage(case.image(case.ct), str(tmp_path / "ct.nrrd"))
    sitk.WriteImage(case.image(case.liver), str(tmp_path / "liver.nrrd"))
    proc = subprocess.run(
        [
            *GDPI,
            "detect",
            "--ct",
            str(tmp_path / "ct.nrrd"),
            "--liver",
            str(tmp_path / "liver.nrrd"),
            "--checkpoint",
            str(path),
            "--out",
            str(tmp_path / "det"),
            "--steps",
            "4",
            "--jump-length",
            "1",
            "--jump-n-sample",
            "1",
            "--progress",
            "none",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "det" / "score.nrrd").exists()


def _weights(path):
    state = load_state(path)
    return state["step"], state["model"], state["ema"]


def test_killed_run_resumes_exactly(tmp_path, store):
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [
            *GDPI,
            "train",
            "--data",
            str(store),
            "--out",
            str(killed),
            "--size",
            "micro",
            "--steps",
            "400",
            "--batch-size",
            "4",
            "--save-every",
            "3",
            "--lr",
            "1e-3",
            "--device",
            "cpu",
            "--no-progress",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not (killed / "state.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    k = load_state(killed / "state.pt")["step"]
    assert 3 <= k < 400
    target = k + 3
    train(_config(store, killed, steps=target, save_every=100))
    train(_config(store, tmp_path / "straight", steps=target, save_every=100))
    step_a, model_a, ema_a = _weights(killed / "state.pt")
    step_b, model_b, ema_b = _weights(tmp_path / "straight" / "state.pt")
    assert step_a == step_b == target
    for key in model_a:  # identical up to float rounding of the same operations
        torch.testing.assert_close(model_a[key], model_b[key], rtol=0, atol=1e-6)
        torch.testing.assert_close(ema_a[key], ema_b[key], rtol=0, atol=1e-6)


def test_resume_refuses_a_changed_config(tmp_path, store):
    train(_config(store, tmp_path / "r", steps=2))
    with pytest.raises(ParameterError, match="batch_size"):
        train(_config(store, tmp_path / "r", steps=4, batch_size=2))


def test_two_process_ddp_matches_one_process(tmp_path, store):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "GDPITraining",
        "train",
        "--data",
        str(store),
        "--out",
        str(tmp_path / "ddp"),
        "--size",
        "micro",
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--save-every",
        "3",
        "--lr",
        "1e-3",
        "--device",
        "cpu",
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train(_config(store, tmp_path / "one", steps=3, save_every=3))
    _, ddp_model, _ = _weights(tmp_path / "ddp" / "state.pt")
    _, one_model, _ = _weights(tmp_path / "one" / "state.pt")
    # The all-reduce changes only the float summation order of the gradients; Adam divides by
    # sqrt(v), so for near-zero gradients that rounding can move a weight by a fraction of lr.
    diffs = torch.cat([(ddp_model[k] - one_model[k]).abs().flatten() for k in ddp_model])
    assert diffs.max() < 2e-4 and diffs.median() < 1e-6, (diffs.max(), diffs.median())
    assert load_checkpoint(tmp_path / "ddp" / "model.safetensors").training["processes"] == 2


def test_fold_training_leaves_out_patients_and_saves_half_precision_snapshots(tmp_path, store):
    s = SliceStore.open(store)
    names = sorted({r["case"] for r in s.slices})
    config = _config(
        store,
        tmp_path / "fold",
        steps=4,
        save_every=2,
        snapshot_every=2,
        weights_dtype="float16",
        exclude_cases=[names[0]],
        augment_phase=True,
    )
    path = train(config)
    ckpt = load_checkpoint(path)
    assert names[0] not in ckpt.training["cases"] and ckpt.training["cases"]
    assert ckpt.training["config"]["exclude_cases"] == [names[0]]
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())
    snapshots = sorted(p.name for p in (tmp_path / "fold" / "snapshots").iterdir())
    assert snapshots == ["step0000002.safetensors", "step0000004.safetensors"]
    # the validation curve of those snapshots on the left-out patient
    from GDPITraining.curves import run_curve

    curve = run_curve(str(store), str(tmp_path / "fold"), [names[0]], "cpu")
    assert [p["step"] for p in curve["points"]] == [2, 4] and curve["held_out_slices"] > 0
    assert all(np.isfinite(p["held_out_loss"]) for p in curve["points"])
    # a patient the store does not hold is refused
    with pytest.raises(ParameterError, match="no case"):
        train(_config(store, tmp_path / "bad", exclude_cases=["nobody"]))


def test_max_minutes_stops_and_saves(tmp_path, store):
    path = train(_config(store, tmp_path / "timed", steps=10_000, save_every=5000,
                         max_minutes=1e-6))  # fmt: skip
    assert load_checkpoint(path).training["steps"] == 1
    assert load_state(tmp_path / "timed" / "state.pt")["step"] == 1
