"""What a detection started from Slicer (panel or Python console) runs with.

Pure Python (no ``slicer``, no torch): the parameter names, ranges and presets are
those of :mod:`GDPILiverAnomalyLib.method.parameters`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import InputError
from ..method.parameters import DEFAULT_CHECKPOINT, PARAMETER_NAMES, DetectionParams, cli_arguments

#: Preset names the panel offers: the engine's presets, and ``custom`` (the paper preset
#: with the schedule given explicitly).
PANEL_PRESETS = ("fast", "paper", "custom")
#: The panel's AME side choices and the ``two_sided`` value each gives: ``auto`` decides
#: by the scan's contrast phase (two-sided on arterial-phase scans; see phase.py).
AME_SIDES = {"auto": None, "darker": False, "darker and brighter": True}


class DetectionSettings:
    """A checkpoint (``""`` = the bundled model), a preset and parameter overrides.

    ``parameters`` are :class:`~.parameters.DetectionParams` fields by name (HU for
    ``offset_hu`` and ``threshold_hu``, model-grid pixels for ``median_size``); a
    parameter not given takes the preset's value. ``preset="custom"`` is ``paper`` with
    the given ``steps``, ``jump_length`` and ``jump_n_sample``. Example::

        DetectionSettings(preset="paper", device="cuda:0", threshold_hu=30)
    """

    def __init__(self, checkpoint: str = "", preset: str = "fast", **parameters: Any):
        if preset not in PANEL_PRESETS:
            raise InputError(f"unknown preset {preset!r} ({', '.join(PANEL_PRESETS)})")
        unknown = sorted(set(parameters) - set(PARAMETER_NAMES))
        if unknown:
            raise InputError(
                f"unknown detection parameter(s) {', '.join(unknown)} "
                f"(choose from {', '.join(PARAMETER_NAMES)})"
            )
        self.checkpoint = checkpoint
        self.preset = preset
        self.parameters = {k: v for k, v in parameters.items() if v is not None}

    def __repr__(self) -> str:
        given = "".join(f", {k}={v!r}" for k, v in self.parameters.items())
        return f"DetectionSettings(checkpoint={self.checkpoint!r}, preset={self.preset!r}{given})"

    @property
    def basePreset(self) -> str:
        """The engine preset the worker starts from (``custom`` -> ``paper``)."""
        return "paper" if self.preset == "custom" else self.preset

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
