"""Detection parameters: their one definition, the presets, and what is derived from them.

Each field of :class:`DetectionParams` carries its help text, unit and valid range;
``gdpi detect``/``gdpi evaluate`` options (:func:`add_arguments`), the checks
(:meth:`DetectionParams.validate`), the worker command line the Slicer module builds
(:func:`cli_arguments`) and the Slicer parameter node's ranges (:func:`value_range`)
are all derived from it. No torch import: the Slicer panel reads this at start-up.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from ..errors import ParameterError
from .schedule import schedule_counts

#: The model ``gdpi detect`` and the Slicer module use when none is given: trained on
#: every healthy slice of ../shared/data (see its model card beside it).
DEFAULT_CHECKPOINT = Path(__file__).parent.parent / "models" / "real_ct_tiny.safetensors"


def _param(default, kind, label, help, low=None, high=None, unit="", flag=None, choices=None):
    """A dataclass field with its description (``kind``: int, float, bool or str;
    ``label``: the name error messages use; ``choices``: the valid strings)."""
    metadata = {"kind": kind, "label": label, "help": help, "range": None, "unit": unit}
    metadata["flag"] = flag
    metadata["choices"] = choices
    if low is not None:
        metadata["range"] = (low, high)
    return field(default=default, metadata=metadata)


@dataclass
class DetectionParams:
    """Detection settings. HU for intensities, model-grid pixels for ``median_size``."""

    steps: int = _param(250, int, "steps", "respaced diffusion steps", 1, 1000)
    jump_length: int = _param(10, int, "jump length", "RePaint jump length", 1, 1000)
    jump_n_sample: int = _param(
        10, int, "resamplings (jump_n_sample)", "RePaint resamplings (1 = none)", 1, 100
    )
    sampler: str = _param(
        "repaint",
        str,
        "sampler",
        "denoising step on the jump walk: repaint (RePaint, the paper's) or ddnm (DDNM: the "
        "known region fixed in every clean estimate, DDIM steps; needs fewer steps)",
        choices=("repaint", "ddnm"),
    )
    eta: float = _param(
        0.85,
        float,
        "DDIM eta",
        "ddnm sampler: noise of each DDIM step (0 = deterministic, 1 = DDPM-like)",
        0.0,
        1.0,
    )
    samples: int = _param(
        1,
        int,
        "samples",
        "inpaintings averaged per slice, each from its own noise (K times the network work)",
        1,
        16,
    )
    offset_hu: float = _param(
        20.0,
        float,
        "offset",
        "AME: candidate where HU < slice liver median - offset",
        0.0,
        500.0,
        "HU",
    )
    ame_sigma_mm: float = _param(
        0.0,
        float,
        "AME smoothing",
        "AME on the CT smoothed in-plane by a Gaussian of this sigma (noise otherwise "
        "marks most of the liver on thin-pixel CT; 0 = raw pixels)",
        0.0,
        10.0,
        "mm",
    )
    two_sided: Optional[bool] = _param(  # noqa: UP045 - evaluated on Python 3.9
        None, bool, "two-sided", "AME also flags HU > median + offset (arterial-phase tumours); "
        "the score becomes |difference| (default: on for scans found to be arterial phase, "
        "from the aorta's and the liver's enhancement; see phase.py)",
    )  # fmt: skip
    min_candidate_mm2: float = _param(
        0.0,
        float,
        "minimum candidate area",
        "AME: drop smaller in-slice candidate regions",
        0.0,
        1e6,
        "mm^2",
    )
    calibrate: bool = _param(
        False,
        bool,
        "bias calibration",
        "re-paint a few healthy liver discs per slice in the same run and subtract the "
        "prior's bias found there (no extra network work)",
    )
    depth_sigma_mm: float = _param(
        0.0,
        float,
        "3-D smoothing",
        "average the score over neighbouring slices with a Gaussian of this sigma "
        "(tumours are 3-D, noise is not; 0 = off)",
        0.0,
        50.0,
        "mm",
    )
    depth_spacing_mm: float = _param(
        0.0,
        float,
        "depth spacing",
        "inpaint liver slices at most this far apart in depth, plus every slice whose AME "
        "candidates its inpainted neighbours do not cover; the other slices get their "
        "pseudo-healthy image by interpolation in depth (0 = inpaint every slice)",
        0.0,
        50.0,
        "mm",
    )
    median_size: int = _param(
        5,
        int,
        "median filter size",
        "median filter of the score, model-grid pixels (0 = off)",
        0,
        31,
        "px",
    )
    threshold_hu: float = _param(
        20.0,
        float,
        "threshold",
        "anomaly mask: score > threshold",
        0.0,
        500.0,
        "HU",
        "--threshold",
    )
    batch_size: Optional[int] = _param(  # noqa: UP045 - evaluated on Python 3.9
        None,
        int,
        "batch size",
        "slices inpainted together (default: 8 on CUDA; on CPU 8 for 64 px models, 2 for "
        "128 px, 1 above)",
        1,
        512,
    )
    device: str = _param("auto", str, "device", "auto (CUDA if present), cpu, cuda or cuda:N")
    seed: int = _param(
        0,
        int,
        "seed",
        "random seed; a slice's result does not depend on its batch",
        0,
        2**31 - 1,  # slice seeds (repaint.slice_seeds) then stay within torch's 64 bits
    )
    bf16: Optional[bool] = _param(  # noqa: UP045 - evaluated on Python 3.9
        None,
        bool,
        "bf16",
        "bfloat16 autocast (default: on for CPUs that run bf16 natively, AVX-512 BF16 or "
        "AMX: 1.6x faster, scores within 0.6 HU of float32; off elsewhere: plain AVX-512 "
        "only emulates bf16, 2.7x slower than float32; off on CUDA)",
    )
    preset: Optional[str] = None  # noqa: UP045 - the preset these values started from

    @classmethod
    def from_preset(cls, preset: str = "paper", **overrides: Any) -> DetectionParams:
        """A preset with non-None ``overrides`` applied."""
        if preset not in PRESETS:
            raise ParameterError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
        values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
        unknown = set(values) - set(PARAMETER_NAMES)
        if unknown:
            raise ParameterError(f"unknown parameter(s): {', '.join(sorted(unknown))}")
        return cls(preset=preset, **values)

    def validate(self, num_timesteps: int = 1000) -> None:
        """Raise :class:`ParameterError` naming the first value out of its range."""
        for f in _described_fields():
            value = getattr(self, f.name)
            if value is None and f.name in ("batch_size", "bf16", "two_sided"):
                continue
            low, high = f.metadata["range"] or (None, None)
            if f.name == "steps":
                high = num_timesteps
            if f.name == "jump_length":
                high = self.steps
            label, unit = f.metadata["label"], f.metadata["unit"]
            choices = f.metadata["choices"]
            if choices is not None and value not in choices:
                raise ParameterError(f"{label} must be one of {', '.join(choices)}, got {value!r}")
            if f.metadata["kind"] is float and not math.isfinite(value):
                raise ParameterError(f"{label} must be a finite number of {unit or 'units'}")
            if low is not None and not low <= value <= high:
                upper = f"steps ({high:g})" if f.name == "jump_length" else f"{high:g}"
                raise ParameterError(
                    f"{label} must be in {low:g}..{upper}{' ' + unit if unit else ''}, "
                    f"got {value:g}"
                )

    def nfe_per_batch(self) -> int:
        """Network evaluations of one RePaint run of a batch of slices."""
        return schedule_counts(self.steps, self.jump_length, self.jump_n_sample)[0]

    def to_dict(self) -> dict:
        return asdict(self)


#: ``paper``: the GDPI paper's RePaint setting and AME (2410 network evaluations per
#: batch); ``fast`` (the default): RePaint 50/5/2, 95 per batch (the cheapest schedule
#: within 1 AUROC and 2 AP points of the paper's on the real tumours of the
#: cross-validation), with the AME smoothing and offset, the bias calibration and the 3-D
#: smoothing the patient-level cross-validation chose (docs/evaluation.md, "Detection quality").
#: ``median_size`` in model-grid pixels.
PRESETS: dict[str, dict] = {
    "paper": dict(steps=250, jump_length=10, jump_n_sample=10, median_size=5),
    "fast": dict(
        steps=50,
        jump_length=5,
        jump_n_sample=2,
        median_size=5,
        ame_sigma_mm=2.0,
        offset_hu=10.0,
        calibrate=True,
        depth_sigma_mm=5.0,
        depth_spacing_mm=3.5,
    ),
}


def _described_fields() -> list:
    return [f for f in fields(DetectionParams) if "kind" in f.metadata]


#: Names of the detection parameters, in definition order.
PARAMETER_NAMES: tuple[str, ...] = tuple(f.name for f in _described_fields())
_FIELDS = {f.name: f for f in _described_fields()}


def flag(name: str) -> str:
    """The command-line option of a parameter (``jump_n_sample`` -> ``--jump-n-sample``)."""
    return _FIELDS[name].metadata["flag"] or "--" + name.replace("_", "-")


def value_range(name: str) -> tuple[float, float]:
    """Valid ``(low, high)`` of a numeric parameter (``steps`` is also capped by the
    checkpoint's diffusion steps, ``jump_length`` by ``steps``)."""
    bounds = _FIELDS[name].metadata["range"]
    if bounds is None:
        raise KeyError(f"{name} has no numeric range")
    return bounds


def choices(name: str) -> tuple[str, ...]:
    """The valid values of a string parameter with a fixed set (``sampler``)."""
    values = _FIELDS[name].metadata["choices"]
    if values is None:
        raise KeyError(f"{name} has no fixed choices")
    return values


def default(name: str) -> Any:
    """A parameter's value when neither a preset nor the user sets it."""
    return _FIELDS[name].default


def help_text(name: str) -> str:
    """One-line help with unit, as shown by ``gdpi detect --help`` and in panel tooltips."""
    meta = _FIELDS[name].metadata
    return meta["help"] + (f" ({meta['unit']})" if meta["unit"] else "")


def describe_preset(name: str) -> str:
    """E.g. ``paper: repaint, 250 steps, jump length 10, 10 resamplings = 2410 NFE per
    batch``."""
    p = DetectionParams.from_preset(name)
    return (
        f"{name}: {p.sampler}, {p.steps} steps, jump length {p.jump_length}, {p.jump_n_sample} "
        f"resamplings = {p.nfe_per_batch()} NFE per batch"
    )


def default_batch_size(device_type: str, image_size: int | None = None) -> int:
    """Slices per batch when the user sets none: 8 on CUDA; on CPU by the model's grid,
    as measured with ``bench/bench_cpu.py`` (2-core AVX-512 CPU, bf16): 64 px models are
    fastest per slice at batch 4-8 (6.1 ms per slice per network evaluation vs 10.2 at
    batch 1), 128 px models at batch 1-2 (97.5 ms at 2 vs 126.1 at 8), larger ones at 1."""
    if device_type == "cuda":
        return 8
    if image_size is None or image_size <= 64:
        return 8
    return 2 if image_size <= 128 else 1


def add_arguments(parser: argparse.ArgumentParser, names: tuple[str, ...] = PARAMETER_NAMES):
    """Add one option per named parameter; each defaults to None (= the preset's value).

    Ranges are checked by :meth:`DetectionParams.validate`, which names the option.
    """
    for name in names:
        meta = _FIELDS[name].metadata
        text = help_text(name)
        if meta["kind"] is bool:
            parser.add_argument(
                flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None,
                help=text,
            )  # fmt: skip
            continue
        if meta["choices"] is not None:
            text += f"; default {PRESETS['paper'].get(name, default(name))} (paper preset)"
            parser.add_argument(flag(name), dest=name, choices=meta["choices"], default=None,
                                help=text)  # fmt: skip
            continue
        bounds = meta["range"]
        if bounds is not None:
            text += f"; {bounds[0]:g}..{bounds[1]:g}"
        default_value = PRESETS["paper"].get(name, default(name))
        if default_value is not None:
            text += f"; default {default_value}" + (
                " (paper preset)" if name in PRESETS["paper"] else ""
            )
        parser.add_argument(flag(name), dest=name, type=meta["kind"], default=None, help=text)


def overrides_from(args: argparse.Namespace) -> dict:
    """The parameter values given on a command line (None = not given)."""
    return {name: getattr(args, name) for name in PARAMETER_NAMES if hasattr(args, name)}


def cli_arguments(values: dict) -> list[str]:
    """``gdpi detect`` options for the non-None ``values`` (the inverse of :func:`add_arguments`)."""
    args: list[str] = []
    for name, value in values.items():
        if name not in _FIELDS:
            raise ParameterError(f"unknown parameter {name!r}")
        if value is None:
            continue
        kind = _FIELDS[name].metadata["kind"]
        if kind is bool:
            args.append(flag(name) if value else "--no-" + flag(name)[2:])
            continue
        args += [flag(name), repr(float(value)) if kind is float else str(kind(value))]
    return args
