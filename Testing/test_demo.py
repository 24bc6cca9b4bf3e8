"""The README's first command's job: ``gdpi demo`` with the bundled model really detects."""

import json
import subprocess
import sys

from GDPILiverAnomalyLib.files.checkpoint import load_checkpoint
from GDPILiverAnomalyLib.running.demo import DEMO_MODEL


def test_bundled_demo_model_is_small_and_trained():
    assert DEMO_MODEL.stat().st_size < 20 * 2**20
    ckpt = load_checkpoint(DEMO_MODEL)
    assert ckpt.ema and ckpt.training["steps"] >= 1000
    assert (DEMO_MODEL.parent / "MODEL_CARD.md").exists()


def test_demo_detects_the_synthetic_lesions(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "GDPILiverAnomalyLib",
            "demo",
            "--out",
            str(tmp_path / "demo"),
            "--device",
            "cpu",
            "--progress",
            "none",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert metrics["auroc"] >= 0.90, metrics
    assert metrics["preset"] == "fast" and metrics["nfe"] > 0
    assert "AUROC" in proc.stdout
    assert (tmp_path / "demo" / "demo.png").stat().st_size > 10_000
    for name in ("score.nrrd", "pseudo_healthy.nrrd", "lesions.csv", "run.json"):
        assert (tmp_path / "demo" / "result" / name).exists()
