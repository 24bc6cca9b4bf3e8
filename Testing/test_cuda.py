"""CUDA checks; they skip on machines without a GPU (CI has none). They need no
``../shared`` data (a generated CT), so ``bench/gpu_check.sh`` runs them on a bare GPU
machine."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from GDPILiverAnomalyLib.files.checkpoint import load_checkpoint
from GDPILiverAnomalyLib.files.synthetic import synthetic_case
from GDPILiverAnomalyLib.method.parameters import DetectionParams
from GDPILiverAnomalyLib.running.devices import resolve_device
from GDPILiverAnomalyLib.running.runner import run_case

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


def test_auto_device_picks_what_exists():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@cuda
@pytest.mark.parametrize("bf16", [False, True])
def test_cuda_matches_cpu(tmp_path, tiny_checkpoint, bf16):
    case = synthetic_case(seed=1, n_slices=4, size=128, pixel_mm=2.5, slice_mm=5.0)
    ct, mask = tmp_path / "ct.nii.gz", tmp_path / "liver.nii.gz"
    sitk.WriteImage(case.image(case.ct), str(ct))
    sitk.WriteImage(case.image(case.liver), str(mask))
    scores = {}
    for device in ("cpu", "cuda"):
        params = DetectionParams.from_preset(
            "fast",
            steps=10,
            jump_length=2,
            jump_n_sample=2,
            device=device,
            bf16=bf16 and device == "cuda",
        )
        info = run_case(ct, mask, load_checkpoint(tiny_checkpoint), params, tmp_path / device)
        assert info["device"].startswith(device)
        scores[device] = sitk.GetArrayFromImage(
            sitk.ReadImage(str(tmp_path / device / "score.nrrd"))
        )
    # same per-slice seeds, different generators on each device: compare distributions
    a, b = scores["cpu"], scores["cuda"]
    assert np.count_nonzero(a) == pytest.approx(np.count_nonzero(b), rel=0.2)
    assert np.abs(a).mean() == pytest.approx(np.abs(b).mean(), rel=0.3)
