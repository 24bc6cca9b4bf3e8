"""The settings a Slicer detection runs with (pure Python: no slicer, no torch)."""

import pytest
from GDPILiverAnomalyLib.errors import InputError
from GDPILiverAnomalyLib.slicer_side.settings import DEFAULT_CHECKPOINT, DetectionSettings


def test_presets_resolve_to_the_engine_parameters():
    fast = DetectionSettings()
    assert fast.params().nfe_per_batch() == 95 and fast.checkpointPath() == DEFAULT_CHECKPOINT
    custom = DetectionSettings(preset="custom", steps=20, jump_length=2, jump_n_sample=1)
    assert custom.basePreset == "paper" and custom.params().steps == 20
    assert DetectionSettings(preset="paper", threshold_hu=30).value("threshold_hu") == 30


def test_worker_arguments_are_the_detect_options():
    args = DetectionSettings(
        checkpoint="/m.safetensors", preset="fast", device="cpu"
    ).workerArguments()
    assert args == ["--checkpoint", "/m.safetensors", "--preset", "fast", "--device", "cpu"]
    args = DetectionSettings(batch_size=None, seed=3).workerArguments()
    assert "--batch-size" not in args and args[-2:] == ["--seed", "3"]


def test_unknown_names_and_presets_are_refused():
    with pytest.raises(InputError, match="unknown detection parameter"):
        DetectionSettings(resamplings=3)
    with pytest.raises(InputError, match="unknown preset"):
        DetectionSettings(preset="slow")
