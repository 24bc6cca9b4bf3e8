"""The default detection on real scans: the bundled model, the automatic AME side by
contrast phase (recorded in run.json, overridable), calibration and 3-D smoothing."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
from conftest import shared
from GDPILiverAnomalyLib.files.checkpoint import load_checkpoint
from GDPILiverAnomalyLib.method.parameters import DetectionParams
from GDPILiverAnomalyLib.running.runner import run_case
from GDPILiverAnomalyLib.slicer_side.settings import DEFAULT_CHECKPOINT


def _quick(**kw) -> DetectionParams:
    return DetectionParams.from_preset(
        "fast", steps=6, jump_length=2, jump_n_sample=1, device="cpu", **kw
    )


def test_bundled_model_detects_an_arterial_case_two_sided_automatically(tmp_path):
    ct, seg = shared("hcc_1211", "ct.nii.gz"), shared("hcc_1211", "seg.nii.gz")
    checkpoint = load_checkpoint(DEFAULT_CHECKPOINT)
    info = run_case(ct, seg, checkpoint, _quick(), tmp_path / "auto")
    assert info["parameters"]["two_sided"] is None  # as asked: automatic
    stats = info["stats"]
    assert stats["two_sided"] is True and stats["two_sided_from"] == "contrast phase"
    assert stats["phase"]["phase"] == "arterial" and stats["phase"]["aorta_hu"] > 150
    assert "|inpainted - test|" in info["conventions"]["score"]
    saved = json.loads((tmp_path / "auto" / "run.json").read_text())
    assert saved["stats"]["phase"] == stats["phase"]
    assert info["results"]["max_score_hu"] > 0


def test_the_flag_overrides_the_phase_and_the_log_says_why(tmp_path, tiny_checkpoint):
    ct, seg = shared("hcc_1211", "ct.nii.gz"), shared("hcc_1211", "seg.nii.gz")
    proc = subprocess.run(
        [sys.executable, "-m", "GDPILiverAnomalyLib", "detect", "--ct", str(ct), "--liver",
         str(seg), "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "one"),
         "--steps", "4", "--jump-length", "1", "--jump-n-sample", "1", "--no-two-sided",
         "--device", "cpu", "--progress", "none"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    stats = json.loads((tmp_path / "one" / "run.json").read_text())["stats"]
    assert stats["two_sided"] is False and stats["two_sided_from"] == "parameter"
    assert stats["phase"] is None


def test_calibration_and_smoothing_change_only_the_score(tmp_path, tiny_checkpoint):
    ct, seg = shared("hcc_0697", "ct.nii.gz"), shared("hcc_0697", "seg.nii.gz")
    checkpoint = load_checkpoint(tiny_checkpoint)
    plain = _quick(two_sided=False, calibrate=False, depth_sigma_mm=0.0)
    base = run_case(ct, seg, checkpoint, plain, tmp_path / "plain")
    refined = run_case(
        ct,
        seg,
        checkpoint,
        dataclasses.replace(plain, calibrate=True, depth_sigma_mm=5.0),
        tmp_path / "refined",
    )
    assert refined["stats"]["slices_inpainted"] == base["stats"]["slices_inpainted"]
    assert refined["stats"]["nfe"] == base["stats"]["nfe"]  # no extra network work
    bias = refined["stats"]["calibration_bias_hu"]
    assert bias is not None and bias["min"] <= bias["median"] <= bias["max"]
    import SimpleITK as sitk

    a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "plain" / "score.nrrd")))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "refined" / "score.nrrd")))
    assert a.shape == b.shape and not np.allclose(a, b)
    liver = sitk.GetArrayFromImage(sitk.ReadImage(str(seg))) > 0
    assert not b[~liver].any()  # still 0 outside the liver
