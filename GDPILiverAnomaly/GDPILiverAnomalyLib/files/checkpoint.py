"""Checkpoints: safetensors weights with the metadata needed to use them.

The file's safetensors header carries ``format`` (``gdpi-checkpoint``), ``format_version``
and ``meta`` (JSON): ``model`` (UNetConfig), ``diffusion`` (DiffusionConfig),
``intensity`` (``hu_min``/``hu_max``: HU mapped linearly to [-1, 1] after clipping),
``input_grid`` (InputGrid), ``ema`` (bool), ``training`` (free-form summary).
Loading never executes code from the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .. import __version__
from ..errors import CheckpointError, ParameterError
from ..method.diffusion import DiffusionConfig
from ..method.grid import InputGrid
from ..method.unet import MODEL_SIZES, UNet, UNetConfig
from .outputs import give_default_permissions

FORMAT = "gdpi-checkpoint"
FORMAT_VERSION = 1


@dataclass
class Intensity:
    """HU window mapped to [-1, 1]: ``x = 2 * (clip(HU) - hu_min) / (hu_max - hu_min) - 1``."""

    hu_min: float = -200.0
    hu_max: float = 300.0

    @property
    def hu_per_unit(self) -> float:
        """HU per model unit (one unit = half the window)."""
        return (self.hu_max - self.hu_min) / 2

    def normalize(self, hu: torch.Tensor) -> torch.Tensor:
        return (hu.clamp(self.hu_min, self.hu_max) - self.hu_min) / self.hu_per_unit - 1

    def to_hu(self, x: torch.Tensor) -> torch.Tensor:
        return (x + 1) * self.hu_per_unit + self.hu_min


@dataclass
class Checkpoint:
    """A loaded (or new) model with its metadata."""

    model: UNet
    diffusion: DiffusionConfig
    intensity: Intensity
    grid: InputGrid
    ema: bool = True
    training: dict = field(default_factory=dict)
    path: Path | None = None
    sha256: str | None = None

    def metadata(self) -> dict:
        return {
            "model": self.model.config.to_dict(),
            "diffusion": self.diffusion.to_dict(),
            "intensity": {"hu_min": self.intensity.hu_min, "hu_max": self.intensity.hu_max},
            "input_grid": self.grid.to_dict(),
            "ema": self.ema,
            "training": self.training,
            "gdpi_version": __version__,
        }

    def identity(self) -> dict:
        """What run.json records about the checkpoint."""
        return {
            "path": str(self.path) if self.path else None,
            "sha256": self.sha256,
            "format_version": FORMAT_VERSION,
            **self.metadata(),
        }


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(ckpt: Checkpoint, path: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write atomically (temporary file, then rename); ``torch.float16`` halves the file
    (weights are loaded back as float32). A model :func:`load_checkpoint` would refuse
    (NaN, infinite or absurd weights) is not written (:class:`CheckpointError`)."""
    path = Path(path)
    problem = weight_problem(ckpt.model.state_dict())  # never one that loading refuses
    if problem:
        raise CheckpointError(f"not saving {path}: the model has {problem}; diverged?")
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "meta": json.dumps(ckpt.metadata()),
    }
    return save_weights(ckpt.model, header, path, dtype)


def save_weights(
    model: nn.Module, header: dict[str, str], path: Path, dtype: torch.dtype = torch.float32
) -> Path:
    """A module's weights as safetensors with ``header`` metadata, atomically; a model
    with a NaN or infinite weight is never written (:class:`CheckpointError`)."""
    tensors = {
        k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in model.state_dict().items()
    }
    problem = weight_problem(tensors, bound=False)
    if problem:
        raise CheckpointError(f"not saving {path}: the model has {problem}; diverged?")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=header)
        give_default_permissions(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


#: Largest weight magnitude a checkpoint may hold (trained models stay near 1).
MAX_ABS_WEIGHT = 1e4

#: Intensity window width (hu_max - hu_min, HU) a checkpoint may have, and the HU range
#: both ends must lie in (the CT range with a margin; the models use -200..300 HU).
INTENSITY_WIDTH_HU = (10.0, 5000.0)
INTENSITY_LIMITS_HU = (-2000.0, 5000.0)


def weight_problem(tensors: dict[str, torch.Tensor], bound: bool = True) -> str:
    """What is wrong with a model's weights, ``""`` when nothing: NaN or infinite values
    (how many, and the first tensor holding one), or with ``bound`` a magnitude beyond
    :data:`MAX_ABS_WEIGHT`."""
    count, first = 0, None
    for name, value in tensors.items():
        if value.is_floating_point():
            n = int((~torch.isfinite(value)).sum())
            if n and first is None:
                first = name
            count += n
    if count:
        return f"NaN or infinite weights ({count}, first in {first})"
    for name, value in tensors.items() if bound else ():
        if value.is_floating_point() and value.numel():
            largest = float(value.abs().max())
            if largest > MAX_ABS_WEIGHT:
                return (
                    f"an absurd weight ({largest:.3g} in {name}; trained models stay below "
                    f"{MAX_ABS_WEIGHT:g})"
                )
    return ""


def _window_plausible(window: tuple) -> bool:
    """Intensity window ``(hu_min, hu_max)`` within the stated limits (numbers only)."""
    if not all(type(v) in (int, float) for v in window):
        return False  # reported by the check before
    low, high = INTENSITY_LIMITS_HU
    width = window[1] - window[0]
    return all(low <= v <= high for v in window) and (
        INTENSITY_WIDTH_HU[0] <= width <= INTENSITY_WIDTH_HU[1]
    )


#: Largest network a checkpoint may describe (far above every model size).
MAX_CONFIG = {"image_size": 1024, "model_channels": 1024, "num_res_blocks": 16,
              "levels": 8, "channel_mult": 32, "num_heads": 64, "in_channels": 16}  # fmt: skip


def _check_shapes(path: Path, config: UNetConfig, tensors: dict) -> None:
    """The config must be of sane size and its network's tensor shapes must equal those
    in the file's header (``tensors``: the header's entries other than metadata): checked on torch's meta device, so an absurd config in a
    forged header never allocates memory."""
    limits = MAX_CONFIG
    if not isinstance(config.channel_mult, list) or not all(
        type(m) is int for m in config.channel_mult
    ):
        raise CheckpointError(f"{path}: the model config in its metadata is out of range")
    sizes = (
        (config.image_size, limits["image_size"]),
        (config.model_channels, limits["model_channels"]),
        (config.num_res_blocks, limits["num_res_blocks"]),
        (len(config.channel_mult), limits["levels"]),
        (max(config.channel_mult, default=1), limits["channel_mult"]),
        (config.num_heads, limits["num_heads"]),
        (config.in_channels, limits["in_channels"]),
    )
    if any(type(v) is not int or not 1 <= v <= high for v, high in sizes):
        raise CheckpointError(f"{path}: the model config in its metadata is out of range")
    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in UNet(config).state_dict().items()}
    except (ValueError, TypeError, RuntimeError, ParameterError) as exc:
        raise CheckpointError(f"{path}: invalid model config in its metadata ({exc})") from None
    try:
        found = {
            k: tuple(v.get("shape", ())) for k, v in tensors.items() if isinstance(v, dict)
        }  # fmt: skip
    except TypeError:
        raise CheckpointError(f"{path}: tensor shapes in its header are not lists") from None
    if found != expected:
        missing = sorted(set(expected) - set(found))[:3]
        differ = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])[:3]
        raise CheckpointError(
            f"{path}: weights do not match the model config in its metadata "
            f"(missing {missing or 'none'}, other shapes {differ or 'none'})"
        )


def read_header(path: Path, full: bool = False) -> dict:
    """A safetensors file's JSON header (``full``) or its ``__metadata__``; refuses a file
    whose header cannot be read with a :class:`CheckpointError`."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n < 100_000_000:
                raise ValueError("bad header length")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        return header if full else (header.get("__metadata__") or {})
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(
            f"{path} is not a GDPI checkpoint (unreadable safetensors header: {exc})"
        ) from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint, validating its metadata against its weights."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder; give the .safetensors file in it")
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a regular file (a named pipe or device?)")
    full = read_header(path, full=True)
    header = full.get("__metadata__") or {}
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        found = header.get("format") if isinstance(header, dict) else None
        raise CheckpointError(f"{path} is not a GDPI checkpoint (format {found!r})")
    try:
        version = int(header.get("format_version", -1))
    except (TypeError, ValueError):
        version = -1
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {version}; this gdpi reads "
            f"version {FORMAT_VERSION}"
        )
    try:
        meta = json.loads(header["meta"])
        config = UNetConfig.from_dict(meta["model"])
        diffusion = DiffusionConfig.from_dict(meta["diffusion"])
        intensity = Intensity(**meta["intensity"])
        grid = InputGrid.from_dict(meta["input_grid"])
        window = (intensity.hu_min, intensity.hu_max)
        consistent = (
            (config.learn_sigma == diffusion.learn_sigma, "model and diffusion learn_sigma differ"),
            (grid.size == config.image_size, "input grid and network sizes differ"),
            (
                all(type(v) in (int, float) and math.isfinite(v) for v in window)
                and window[1] > window[0],
                "the intensity window must be finite numbers with hu_max > hu_min",
            ),
            (
                _window_plausible(window),
                f"the intensity window {window[0]}..{window[1]} HU is absurd (both ends "
                f"must lie in {INTENSITY_LIMITS_HU[0]:g}..{INTENSITY_LIMITS_HU[1]:g} HU, "
                f"width {INTENSITY_WIDTH_HU[0]:g}..{INTENSITY_WIDTH_HU[1]:g} HU)",
            ),
            (
                type(diffusion.num_timesteps) is int and 1 <= diffusion.num_timesteps <= 10_000,
                "the diffusion needs 1..10000 timesteps",
            ),
            (
                grid.spacing_mm is None
                or (math.isfinite(grid.spacing_mm) and 0.1 <= grid.spacing_mm <= 20),
                "the input grid spacing must be 0.1..20 mm",
            ),
        )
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as exc:
        raise CheckpointError(f"{path} has incomplete or invalid metadata ({exc!r})") from None
    for ok, problem in consistent:
        if not ok:
            raise CheckpointError(f"{path}: {problem} in its metadata")
    tensors = {k: v for k, v in full.items() if k != "__metadata__"}
    _check_shapes(path, config, tensors)  # before any real allocation
    try:
        tensors = load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is corrupt: {exc}") from None
    problem = weight_problem(tensors)
    if problem:
        raise CheckpointError(f"{path} has {problem}: a broken model")
    model = UNet(config)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointError(
            f"{path}: weights do not match the model config in its metadata ({first})"
        ) from None
    model.eval()
    return Checkpoint(
        model,
        diffusion,
        intensity,
        grid,
        bool(meta.get("ema", True)),
        meta.get("training", {}),
        path,
        file_sha256(path),
    )


def init_checkpoint(
    size: str = "tiny", seed: int = 0, learn_sigma: bool = True, grid: InputGrid | None = None
) -> Checkpoint:
    """A randomly initialised model of a named size (for tests and smoke runs).

    Layers that training starts at zero get small random weights, so the random
    network's output is not identically zero.
    """
    if size not in MODEL_SIZES:
        raise CheckpointError(f"unknown model size {size!r} (choose from {', '.join(MODEL_SIZES)})")
    torch.manual_seed(seed)
    config = UNetConfig(learn_sigma=learn_sigma, **MODEL_SIZES[size])
    model = UNet(config)
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d)) and not module.weight.abs().sum():
            nn.init.normal_(module.weight, std=0.02)
    default_mm = {64: 5.0, 128: 2.5, 256: 1.25}.get(config.image_size, 320.0 / config.image_size)
    grid = grid or InputGrid(config.image_size, default_mm)
    if grid.size != config.image_size:
        raise CheckpointError(f"grid of {grid.size} px does not fit a {config.image_size} px model")
    return Checkpoint(
        model,
        DiffusionConfig(learn_sigma=learn_sigma),
        Intensity(),
        grid,
        ema=False,
        training={"note": f"random initialisation, seed {seed}; not trained"},
    )
