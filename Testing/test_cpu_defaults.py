"""CPU defaults chosen by measurement (bench/bench_cpu.py): batch size per model grid and
bf16 autocast where the CPU runs it natively, without changing the answer."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import REPO, shared
from GDPILiverAnomalyLib.files.checkpoint import load_checkpoint
from GDPILiverAnomalyLib.files.volumes import read_ct, read_liver_mask
from GDPILiverAnomalyLib.method.metrics import pixel_metrics
from GDPILiverAnomalyLib.method.parameters import DetectionParams, default_batch_size
from GDPILiverAnomalyLib.running.pipeline import bf16_active, cpu_can_bf16, cpu_has_bf16, detect

REAL_MODEL = (
    REPO / "GDPILiverAnomaly" / "GDPILiverAnomalyLib" / "models" / "real_ct_tiny.safetensors"
)


def test_default_batch_size_follows_the_measurements():
    assert default_batch_size("cuda", 256) == 8
    assert default_batch_size("cpu", 64) == 8  # tiny: fastest per slice at 4-8
    assert default_batch_size("cpu", 128) == 2  # small: fastest at 1-2
    assert default_batch_size("cpu", 256) == 1


def test_bf16_is_on_by_default_only_where_the_cpu_runs_it_natively():
    """Emulated bf16 (plain AVX-512) is 2.7x slower than float32: never the default."""
    cpu = torch.device("cpu")
    assert bf16_active(None, cpu) == cpu_has_bf16()
    assert bf16_active(False, cpu) is False
    assert bf16_active(None, torch.device("cuda")) is False  # CUDA: only when asked
    assert bf16_active(True, torch.device("cuda")) is True
    assert bf16_active(True, cpu) == cpu_can_bf16()  # asked for: emulated bf16 too


def test_native_bf16_means_the_cpu_flags_not_onednn_emulation():
    """On a plain AVX-512 CPU oneDNN runs bf16 by conversion, about 2x slower than float32
    (bench/bench_runtimes.py): cpu_has_bf16 (run.json's cpu_native_bf16) is true only with
    AVX-512 BF16 or AMX."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo on this system")
    flags = set(
        next(ln for ln in text.splitlines() if ln.startswith("flags")).split(":")[1].split()
    )
    native = bool(flags & {"avx512_bf16", "amx_bf16"})
    assert cpu_has_bf16() is (native and cpu_can_bf16())


@pytest.mark.skipif(not cpu_can_bf16(), reason="oneDNN runs no bfloat16 on this CPU")
def test_bf16_does_not_change_the_answer_on_a_real_case():
    """hcc_1720 with the bundled real-CT model, a short schedule: bf16 scores stay within
    1.5 HU of float32 everywhere (mean 0.05 HU), and AUROC, AP and best Dice (%) differ by
    less than 0.1 point (measured with the fast preset: 0.59 HU max, 0.015 HU mean,
    metrics within 0.03 points, 1.7x faster than the former batch-1 float32 default)."""
    ct = read_ct(shared("hcc_1720", "ct.nii.gz"))
    liver = read_liver_mask(shared("hcc_1720", "seg.nii.gz"), ct)
    tumour = sitk.GetArrayFromImage(sitk.ReadImage(str(shared("hcc_1720", "seg.nii.gz")))) == 2
    checkpoint = load_checkpoint(REAL_MODEL)
    results = {}
    for bf16 in (False, True):
        params = DetectionParams.from_preset(
            "fast", steps=25, jump_length=5, jump_n_sample=2, device="cpu", bf16=bf16
        )
        result = detect(ct, liver, checkpoint, params)
        assert result.stats["bf16"] is bf16 and result.stats["batch_size"] == 8
        results[bf16] = result.score
    inside = liver > 0
    difference = np.abs(results[True] - results[False])[inside]
    assert difference.max() <= 1.5 and difference.mean() <= 0.05
    metrics = {b: pixel_metrics(s, tumour, region=inside) for b, s in results.items()}
    for name in ("auroc", "ap", "best_dice"):
        assert abs(100 * metrics[True][name] - 100 * metrics[False][name]) < 0.1, name
