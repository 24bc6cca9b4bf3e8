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
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .diffusion import DiffusionConfig
from .errors import CheckpointError
from .files import give_default_permissions
from .grid import InputGrid
from .unet import MODEL_SIZES, UNet, UNetConfig

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


def save_checkpoint(ckpt: Checkpoint, path: str | Path) -> Path:
    """Write atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "meta": json.dumps(ckpt.metadata()),
    }
    return save_weights(ckpt.model, header, path)


def save_weights(model: nn.Module, header: dict[str, str], path: Path) -> Path:
    """A module's weights as safetensors with ``header`` metadata, atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
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


def _read_header(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n < 100_000_000:
                raise ValueError("bad header length")
            header = json.loads(f.read(n))
        return header.get("__metadata__") or {}
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"{path} is not a GDPI checkpoint (unreadable safetensors header: {exc})"
        ) from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint, validating its metadata against its weights."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    header = _read_header(path)
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a GDPI checkpoint (format {header.get('format')!r})")
    version = int(header.get("format_version", -1))
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
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} has incomplete or invalid metadata ({exc!r})") from None
    if config.learn_sigma != diffusion.learn_sigma:
        raise CheckpointError(
            f"{path}: model learn_sigma={config.learn_sigma} but diffusion "
            f"learn_sigma={diffusion.learn_sigma}"
        )
    if grid.size != config.image_size:
        raise CheckpointError(
            f"{path}: input grid of {grid.size} px but the network expects {config.image_size} px"
        )
    if not intensity.hu_max > intensity.hu_min:
        raise CheckpointError(f"{path}: intensity window hu_max must exceed hu_min")
    try:
        tensors = load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is corrupt: {exc}") from None
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
