"""What a detection started from Slicer (panel or Python console) runs with.

Pure Python (no ``slicer``, no torch): the parameter names, ranges and presets are
those of :mod:`GDPILiverAnomalyLib.method.parameters`. A preset name means one thing
everywhere: the panel's ``fast`` and ``paper`` run exactly ``gdpi detect --preset
fast|paper`` (only the :data:`RUN_OPTIONS` are the user's under every preset);
``custom`` starts from the preset shown and sends every value.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..method.parameters import (
    DEFAULT_CHECKPOINT,
    PARAMETER_NAMES,
    PRESETS,
    DetectionParams,
    cli_arguments,
)

#: Score display window (HU): the colour map runs from 0 to 50 HU, and the panel's
#: threshold slider (and its parameter node field) spans the same range, so every
#: slider position hides a part of what the colours show.
SCORE_WINDOW_HU = (0.0, 50.0)
#: The panel's research-use notice: what the bundled model is and is not (its model
#: card: models/REAL_CT_MODEL_CARD.md).
RESEARCH_NOTICE = (
    "Research use only; not a medical device: not for diagnosis or treatment decisions. "
    "The bundled model was trained on about 200 healthy liver slices (194) of six CT "
    "scans. It sees each slice on a 64 x 64 grid at 3.5 mm, a 224 mm field of view "
    "centred on the liver: liver outside it is not analysed (the status line and the log "
    "say how much), and detail finer than 3.5 mm is not seen. It finds tissue darker "
    "than healthy liver (brighter only on scans found to be arterial phase); the score "
    "is a difference in HU, not a probability."
)
#: Preset names the panel offers: the engine's presets, and ``custom`` (a preset's
#: values, each of them editable).
PANEL_PRESETS = ("fast", "paper", "custom")
#: The panel's AME side choices and the ``two_sided`` value each gives: ``auto`` decides
#: by the scan's contrast phase (two-sided on arterial-phase scans; see phase.py).
AME_SIDES = {"auto": None, "darker": False, "darker and brighter": True}
#: The panel's bfloat16 choices and the ``bf16`` value each gives (``auto``: on CPUs
#: with native bf16, off on CUDA).
BF16_CHOICES = {"auto": None, "on": True, "off": False}
#: Detection parameters a run chooses under every preset: where it runs (device, batch
#: size: neither changes a score) and the threshold of the anomaly mask and lesions (not
#: of the score). Every other parameter is the preset's (editable in ``custom`` only).
RUN_OPTIONS = ("threshold_hu", "batch_size", "device")
#: The parameters a preset fixes, in definition order.
PRESET_PARAMETERS = tuple(name for name in PARAMETER_NAMES if name not in RUN_OPTIONS)
#: The panel's parameter node field of each detection parameter: its own name, except
#: ``two_sided`` (the AME side choice).
PANEL_FIELDS = {name: "ameSide" if name == "two_sided" else name for name in PARAMETER_NAMES}


def panelValues(params: DetectionParams, names: tuple[str, ...] = PARAMETER_NAMES) -> dict:
    """The parameter node values (by field name) that show ``params``: ``two_sided`` as
    the AME side choice, ``bf16`` as auto/on/off, an automatic batch size as 0."""
    values: dict[str, Any] = {}
    for name in names:
        value = getattr(params, name)
        if name == "two_sided":
            value = next(k for k, v in AME_SIDES.items() if v is value)
        elif name == "bf16":
            value = next(k for k, v in BF16_CHOICES.items() if v is value)
        elif name == "batch_size":
            value = value or 0
        values[PANEL_FIELDS[name]] = value
    return values


def parametersFromPanel(values: Mapping[str, Any]) -> dict:
    """Detection parameters by name from parameter node values (the inverse of
    :func:`panelValues`; fields that are absent are left out)."""
    params: dict[str, Any] = {}
    for name, fieldName in PANEL_FIELDS.items():
        if fieldName not in values:
            continue
        value = values[fieldName]
        if name == "two_sided":
            value = AME_SIDES[value]
        elif name == "bf16":
            value = BF16_CHOICES[value]
        elif name == "batch_size":
            value = int(value) or None
        params[name] = value
    return params


def presetUpdates(preset: str, previous: str | None, values: Mapping[str, Any]) -> dict:
    """Parameter node changes when the panel's preset is ``preset`` (``previous`` = the
    one shown before): ``fast``/``paper`` show exactly that preset's values (every field
    that differs, e.g. from a saved scene); switching to ``custom`` keeps the values
    shown and records which preset they came from (``customBase``). Only values that
    differ are returned, so applying them ends the widget's update loop."""
    if preset in PRESETS:
        shown = panelValues(DetectionParams.from_preset(preset), PRESET_PARAMETERS)
        return {k: v for k, v in shown.items() if values.get(k) != v}
    if preset == "custom" and previous in PRESETS and values.get("customBase") != previous:
        return {"customBase": previous}
    return {}


class DetectionSettings:
    """A checkpoint (``""`` = the bundled model), a preset and parameter overrides.

    ``parameters`` are :class:`~.parameters.DetectionParams` fields by name (HU for
    ``offset_hu`` and ``threshold_hu``, model-grid pixels for ``median_size``); a
    parameter not given takes the preset's value. ``preset="custom"`` is the ``base``
    preset (``paper`` unless given) with the given values. Example::

        DetectionSettings(preset="paper", device="cuda:0", threshold_hu=30)
        DetectionSettings(preset="custom", base="fast", jump_n_sample=3)
    """

    def __init__(
        self, checkpoint: str = "", preset: str = "fast", base: str = "paper", **parameters: Any
    ):
        if preset not in PANEL_PRESETS:
            raise InputError(f"unknown preset {preset!r} ({', '.join(PANEL_PRESETS)})")
        if base not in PRESETS:
            raise InputError(f"unknown base preset {base!r} ({', '.join(PRESETS)})")
        unknown = sorted(set(parameters) - set(PARAMETER_NAMES))
        if unknown:
            raise InputError(
                f"unknown detection parameter(s) {', '.join(unknown)} "
                f"(choose from {', '.join(PARAMETER_NAMES)})"
            )
        self.checkpoint = checkpoint
        self.preset = preset
        self.base = base
        self.parameters = {k: v for k, v in parameters.items() if v is not None}

    @classmethod
    def fromPanel(
        cls,
        values: Mapping[str, Any],
        checkpoint: str = "",
        preset: str = "fast",
        customBase: str = "fast",
    ) -> DetectionSettings:
        """The settings of the panel's parameter node ``values`` (by field name): for
        ``fast`` and ``paper`` only the :data:`RUN_OPTIONS` (the rest is the preset's,
        whatever the node holds); for ``custom`` every value, on ``customBase``."""
        params = parametersFromPanel(values)
        names = PARAMETER_NAMES if preset == "custom" else RUN_OPTIONS
        given = {name: params[name] for name in names if name in params}
        return cls(checkpoint, preset, base=customBase, **given)

    def __repr__(self) -> str:
        given = "".join(f", {k}={v!r}" for k, v in self.parameters.items())
        base = f", base={self.base!r}" if self.preset == "custom" else ""
        return (
            f"DetectionSettings(checkpoint={self.checkpoint!r}, preset={self.preset!r}"
            f"{base}{given})"
        )

    @property
    def basePreset(self) -> str:
        """The engine preset the worker starts from (``custom`` -> its ``base``)."""
        return self.base if self.preset == "custom" else self.preset

    def params(self) -> DetectionParams:
        """The complete parameters the worker will use."""
        return DetectionParams.from_preset(self.basePreset, **self.parameters)

    def value(self, name: str) -> Any:
        """One resolved parameter value (e.g. ``threshold_hu``)."""
        return getattr(self.params(), name)

    def checkpointPath(self) -> Path:
        return Path(self.checkpoint) if self.checkpoint else DEFAULT_CHECKPOINT

    def workerArguments(self) -> list[str]:
        """``gdpi detect`` options for these settings."""
        ordered = {
            name: self.parameters[name] for name in PARAMETER_NAMES if name in self.parameters
        }
        args = ["--checkpoint", str(self.checkpointPath()), "--preset", self.basePreset]
        return args + cli_arguments(ordered)


#: The panel's parameter node values when nothing is chosen yet: the default preset's.
PANEL_DEFAULTS = panelValues(DetectionSettings().params())
