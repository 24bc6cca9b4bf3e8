"""The cross-validation script end to end on a tiny configuration: two folds, a few
training steps, a short schedule; then the tables."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, shared


def test_cross_validation_script_end_to_end(tmp_path):
    shared("hcc_0697", "ct.nii.gz")
    shared("hcc_1720", "ct.nii.gz")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "RUNS": str(tmp_path / "cv"),
        "DATA": str(REPO.parent / "shared" / "data"),
        "FOLDS": "hcc_0697 hcc_1720",
        "RECIPES": "tiny",
        "STEPS": "2",
        "MAX_SLICES": "2",
        "VARIANTS": "small",
        "EXTRA": "--steps 4 --jump-length 1 --jump-n-sample 1",
        "OMP_NUM_THREADS": "2",
    }
    script = REPO / "Training" / "crossval" / "run.sh"
    proc = subprocess.run(["bash", str(script)], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = tmp_path / "cv"
    for fold in ("hcc_0697", "hcc_1720"):
        model = json.loads((runs / "eval" / "tiny" / fold / "real" / "results.json").read_text())
        # each fold's model never saw its patient, and is tested on that patient only
        assert model["test_set"]["cases"] == [fold]
        trained = subprocess.run(
            [sys.executable, "-c", "import sys, json; from GDPILiverAnomalyLib.files.checkpoint "
             "import load_checkpoint as l; print(json.dumps(l(sys.argv[1]).training['cases']))",
             str(runs / "models" / f"tiny_{fold}" / "model.safetensors")],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert fold not in json.loads(trained.stdout)
        synth = json.loads((runs / "eval" / "tiny" / fold / "synth" / "results.json").read_text())
        assert synth["test_set"]["cases"] == [f"{fold}-small"]
    # a second run redoes nothing
    again = subprocess.run(["bash", str(script)], cwd=REPO, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "gdpi train" not in again.stderr
    assert "wrote" not in again.stdout

    from GDPITraining.crossval import main, schedules, summarize

    table = summarize(runs)
    real = table["tiny"]["real"]
    assert set(real) == {"hcc_0697", "hcc_1720", "pooled"}
    pooled = real["pooled"]
    assert {"gdpi-one-sided", "gdpi-two-sided", "darkness", "gdpi (auto)"} <= set(pooled)
    assert "gdpi (auto) + 3-D σ=2.5" in pooled
    # neither patient is arterial: the automatic side is the one-sided run
    assert pooled["gdpi (auto)"] == pooled["gdpi-one-sided"]
    for figures in pooled.values():
        assert 0 <= figures["auroc"] <= 1 and figures["lesions"] == 3  # 2 + 1 real tumours
        lesion = figures["lesion_level"]
        assert lesion["lesions"] == 3 and lesion["scans"] == 2
        mean = lesion["froc"]["mean"]  # pooled: an interval over the two patients
        assert mean["low"] <= mean["value"] <= mean["high"]
        assert lesion["pixel_bootstrap"]["auroc"]["value"] == pytest.approx(figures["auroc"])
    # one fold: one patient, no interval
    assert real["hcc_0697"]["darkness"]["lesion_level"]["froc"]["mean"]["low"] is None
    synth = table["tiny"]["synth"]["pooled"]["darkness"]["lesion_level"]
    assert synth["scans"] == 2 and synth["froc"] is not None
    # figures at gdpi detect's default threshold, and an operating point chosen on the
    # synthetic set (<= 1 false positive per case there) reported on the real set
    at_default = pooled["darkness"]["lesion_level"]["at_threshold"]
    assert at_default["threshold_hu"] == 20.0 and at_default["lesions"] == 3
    point = table["tiny"]["operating_point"]["darkness"]
    chosen = synth["at"]["1.0"]
    assert point["threshold_hu"] == chosen["threshold"] and point["synth"] == chosen
    assert point["synth"]["fp_per_scan"] <= 1.0
    tested = point["real"]
    assert tested["threshold_hu"] == chosen["threshold"] and tested["lesions"] == 3
    assert tested["sensitivity"]["value"] == tested["found"] / 3
    curve = tmp_path / "curve.png"
    assert main(["--runs", str(runs), "--out", str(tmp_path / "table.md"), "--curve", str(curve),
                 "--seconds-per-nfe", "0.2", "--fixed-seconds", "3",
                 "--froc", str(tmp_path / "froc.png")]) == 0  # fmt: skip
    text = (tmp_path / "table.md").read_text()
    assert "Real tumours, pooled over folds" in text
    assert "Synthetic tumours, lesion level, pooled over folds" in text
    assert "| tiny · darkness | 3 |" in text
    assert "### Operating point: chosen on the synth set at <= 1 false positive" in text
    for which in ("real", "synth"):
        assert (tmp_path / f"froc_{which}.png").read_bytes()[:4] == b"\x89PNG"
    assert curve.stat().st_size > 10_000 and curve.read_bytes()[:4] == b"\x89PNG"
    assert schedules(runs)["tiny"] == {"sampler": "repaint", "steps": 4, "jump_length": 1,
                                       "jump_n_sample": 1, "nfe": 4}  # fmt: skip
