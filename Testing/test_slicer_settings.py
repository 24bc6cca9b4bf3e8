"""The settings a Slicer detection runs with (pure Python: no slicer, no torch; the
checks through ``gdpi detect``'s parser need torch and skip without it)."""

from __future__ import annotations

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


def _detect_params(options: list[str]):
    """What ``gdpi detect`` runs with for these options: its real argument parser and
    the same resolution as its handler (preset + overrides)."""
    pytest.importorskip("torch")  # running.cli imports the checkpoint loader
    from GDPILiverAnomalyLib.method.parameters import DetectionParams, overrides_from
    from GDPILiverAnomalyLib.running.cli import build_parser

    parser, _ = build_parser()
    args = parser.parse_args(["detect", "--ct", "ct.nii.gz", "--liver", "l.nii.gz",
                              "--out", "out", *options])  # fmt: skip
    return DetectionParams.from_preset(args.preset, **overrides_from(args))


def _panel(preset: str, previous: str | None = None, values: dict | None = None) -> dict:
    """The parameter node's values after the user picks ``preset`` (the widget applies
    presetUpdates on every change), starting from ``values`` (default: a new panel)."""
    from GDPILiverAnomalyLib.slicer_side.settings import PANEL_DEFAULTS, presetUpdates

    node = dict(PANEL_DEFAULTS if values is None else values, customBase="fast")
    node.update(presetUpdates(preset, previous, node))
    assert presetUpdates(preset, preset, node) == {}  # applied once, the widget's loop ends
    return node


@pytest.mark.parametrize("preset", ["fast", "paper"])
def test_panel_presets_are_the_cli_presets(preset):
    """The panel's fast and paper send exactly ``gdpi detect --preset fast|paper``: a
    value left in the parameter node by another preset (the fast offset under paper) or
    by custom edits changes nothing; only the run options (device, batch size,
    threshold) are the user's."""
    from GDPILiverAnomalyLib.slicer_side.settings import PANEL_DEFAULTS, DetectionSettings

    stale = dict(PANEL_DEFAULTS, offset_hu=33.0, calibrate=False, steps=7, ameSide="darker")
    for values in (_panel(preset), _panel(preset, "custom", stale), stale):
        settings = DetectionSettings.fromPanel(values, preset=preset)
        assert _detect_params(settings.workerArguments()) == _detect_params(["--preset", preset]), (
            values
        )
    run = dict(_panel(preset), device="cpu", batch_size=3, threshold_hu=35.0)
    settings = DetectionSettings.fromPanel(run, preset=preset)
    assert _detect_params(settings.workerArguments()) == _detect_params(
        ["--preset", preset, "--device", "cpu", "--batch-size", "3", "--threshold", "35"]
    )
    # what the panel shows under the preset is the preset (every value, none missing)
    shown = _panel(preset, values=stale)
    assert DetectionSettings.fromPanel(shown, preset="custom", customBase=preset).params() == (
        _detect_params(["--preset", preset])
    )


@pytest.mark.parametrize("start", ["fast", "paper"])
def test_custom_starts_from_the_preset_shown_and_keeps_every_value(start):
    """custom = the values shown when it was chosen, each editable: unchanged it is the
    preset it came from (AME smoothing, calibration and 3-D smoothing included); an edit
    changes that value and nothing else."""
    from GDPILiverAnomalyLib.slicer_side.settings import PANEL_FIELDS, DetectionSettings

    node = _panel("custom", start, _panel(start, "fast"))
    assert node["customBase"] == start
    settings = DetectionSettings.fromPanel(node, preset="custom", customBase=node["customBase"])
    assert _detect_params(settings.workerArguments()) == _detect_params(["--preset", start])
    edits = dict(jump_n_sample=3, ame_sigma_mm=1.5, calibrate=False, depth_sigma_mm=0.0,
                 two_sided=True, bf16=False, seed=4, eta=0.5, samples=2, min_candidate_mm2=9.0)  # fmt: skip
    panel_edits = {PANEL_FIELDS[k]: v for k, v in edits.items()}
    panel_edits.update(ameSide="darker and brighter", bf16="off")
    edited = dict(node, **panel_edits)
    settings = DetectionSettings.fromPanel(edited, preset="custom", customBase=start)
    resolved = _detect_params(settings.workerArguments())
    expected = _detect_params(["--preset", start])
    for name, value in edits.items():
        setattr(expected, name, value)
    assert resolved == expected


def test_panel_values_round_trip_every_parameter():
    from GDPILiverAnomalyLib.method.parameters import PARAMETER_NAMES, DetectionParams
    from GDPILiverAnomalyLib.slicer_side.settings import panelValues, parametersFromPanel

    params = DetectionParams.from_preset("fast", two_sided=False, bf16=True, batch_size=4)
    values = panelValues(params)
    assert values["ameSide"] == "darker" and values["bf16"] == "on" and values["batch_size"] == 4
    assert parametersFromPanel(values) == {n: getattr(params, n) for n in PARAMETER_NAMES}
    assert (
        parametersFromPanel(panelValues(DetectionParams.from_preset("paper")))["batch_size"] is None
    )
