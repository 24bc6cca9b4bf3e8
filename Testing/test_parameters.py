"""The one definition of the detection parameters and what is derived from it."""

import argparse
import math

import pytest
from GDPILiverAnomalyLib.errors import ParameterError
from GDPILiverAnomalyLib.method.parameters import (
    PARAMETER_NAMES,
    PRESETS,
    DetectionParams,
    add_arguments,
    cli_arguments,
    default_batch_size,
    describe_preset,
    flag,
    overrides_from,
    value_range,
)


def test_presets_and_their_network_evaluations():
    assert DetectionParams.from_preset("paper").nfe_per_batch() == 2410
    assert DetectionParams.from_preset("fast").nfe_per_batch() == 95
    assert describe_preset("fast").endswith("= 95 NFE per batch")
    params = DetectionParams.from_preset("fast", steps=20, threshold_hu=None)
    assert params.steps == 20 and params.threshold_hu == 20.0 and params.preset == "fast"
    with pytest.raises(ParameterError, match="unknown preset"):
        DetectionParams.from_preset("slow")
    with pytest.raises(ParameterError, match="unknown parameter"):
        DetectionParams.from_preset("fast", resamplings=3)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (dict(steps=0), "steps must be in 1..1000, got 0"),
        (dict(steps=5, jump_length=9), "jump length must be in 1..steps (5), got 9"),
        (dict(jump_n_sample=101), "resamplings (jump_n_sample) must be in 1..100"),
        (dict(offset_hu=-5.0), "offset must be in 0..500 HU"),
        (dict(median_size=32), "median filter size must be in 0..31 px"),
        (dict(batch_size=0), "batch size must be in 1..512"),
        (dict(threshold_hu=math.nan), "threshold must be a finite number of HU"),
        (dict(threshold_hu=-1.0), "threshold must be in 0..500 HU"),
        (dict(min_candidate_mm2=-1.0), "minimum candidate area must be in 0..1e+06 mm^2"),
        (dict(samples=0), "samples must be in 1..16"),
        (dict(sampler="ddim"), "sampler must be one of repaint, ddnm, got 'ddim'"),
        (dict(eta=1.5), "DDIM eta must be in 0..1, got 1.5"),
        (dict(ame_sigma_mm=11.0), "AME smoothing must be in 0..10 mm"),
        (dict(depth_sigma_mm=-1.0), "3-D smoothing must be in 0..50 mm"),
    ],
)
def test_validate_names_the_value_out_of_range(override, message):
    with pytest.raises(ParameterError) as info:
        DetectionParams.from_preset("paper", **override).validate()
    assert message in str(info.value)


def test_steps_are_capped_by_the_checkpoints_diffusion():
    DetectionParams.from_preset("fast", steps=100).validate(num_timesteps=100)
    with pytest.raises(ParameterError, match="steps must be in 1..100"):
        DetectionParams.from_preset("fast", steps=101).validate(num_timesteps=100)


def test_command_line_options_round_trip():
    """add_arguments parses what cli_arguments writes, for every parameter."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    given = dict(
        steps=30, jump_length=3, jump_n_sample=2, sampler="ddnm", eta=0.5, samples=2,
        offset_hu=12.5,
        ame_sigma_mm=1.5, two_sided=True, min_candidate_mm2=4.0, calibrate=True,
        depth_sigma_mm=2.5, depth_spacing_mm=1.5, median_size=3, threshold_hu=7.5, batch_size=4,
        device="cpu", seed=11, bf16=True,
    )  # fmt: skip
    assert set(given) == set(PARAMETER_NAMES)
    args = parser.parse_args(cli_arguments(given))
    assert overrides_from(args) == given
    # nothing given: every option is None, so the preset decides
    assert set(overrides_from(parser.parse_args([])).values()) == {None}
    assert flag("threshold_hu") == "--threshold" and flag("jump_n_sample") == "--jump-n-sample"
    # False is said explicitly (bf16's default depends on the CPU); None is left out
    assert cli_arguments({"two_sided": False, "bf16": False, "batch_size": None}) == [
        "--no-two-sided",
        "--no-bf16",
    ]
    assert overrides_from(parser.parse_args(["--no-bf16"]))["bf16"] is False
    with pytest.raises(ParameterError, match="unknown parameter"):
        cli_arguments({"resamplings": 3})


def test_ranges_defaults_and_batch_size():
    assert value_range("steps") == (1, 1000)
    assert value_range("median_size") == (0, 31)
    with pytest.raises(KeyError):
        value_range("device")
    assert default_batch_size("cuda") == 8 and default_batch_size("cpu", 64) == 8
    assert set(PRESETS) == {"paper", "fast"}
