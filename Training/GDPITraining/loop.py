"""What training the diffusion prior and the baselines share: the run configuration, the
seeded data order, CT augmentation, the CSV log, the resume state (one format, one
version check) and the training summary a checkpoint records."""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from GDPILiverAnomalyLib import __version__
from GDPILiverAnomalyLib.errors import GDPIError, OutputError, ParameterError
from GDPILiverAnomalyLib.files.checkpoint import INTENSITY_LIMITS_HU, INTENSITY_WIDTH_HU, Intensity
from GDPILiverAnomalyLib.method.grid import InputGrid
from GDPILiverAnomalyLib.method.unet import MODEL_SIZES

from .baselines import KINDS as BASELINE_KINDS
from .store import SliceStore

STATE_VERSION = 1


@dataclass
class TrainConfig:
    data: str
    out: str
    model: str = "ddpm"  # ddpm (the GDPI prior) or a baseline: ae, vae, dae
    size: str = "tiny"  # a MODEL_SIZES name (ddpm)
    steps: int = 10_000
    batch_size: int = 16  # global, split across processes
    lr: float = 1e-4
    ema_decay: float = 0.999
    ema_warmup: bool = True  # decay min(ema_decay, (1 + s) / (10 + s)): useful for short runs
    schedule: str = "linear"
    learn_sigma: bool = True
    vlb_weight: float = 0.001
    dropout: float = 0.0
    hu_min: float = -200.0
    hu_max: float = 300.0
    augment: bool = True  # HU shift +-10, rotation +-5 deg, scale +-5 %, shift +-3 px
    augment_phase: bool = False  # also contrast-phase variation and CT noise (see augment)
    exclude_cases: list[str] = field(default_factory=list)  # patients left out (folds)
    max_minutes: float = 0.0  # stop (and save) after this much training time; 0 = no limit
    snapshot_every: int = 0  # keep a copy of the EMA model every N steps (curves); 0 = none
    weights_dtype: str = "float32"  # model.safetensors: float32 or float16 (half the size)
    save_every: int = 500
    log_every: int = 25
    preview_every: int = 0  # 0 = only at the end
    seed: int = 0
    device: str = "auto"
    bf16: bool = False
    progress: bool = True
    restart: bool = False  # ignore (and keep aside) an earlier resume state
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.model not in ("ddpm", *BASELINE_KINDS):
            raise ParameterError(
                f"unknown model {self.model!r} (ddpm, {', '.join(BASELINE_KINDS)})"
            )
        if self.size not in MODEL_SIZES:
            raise ParameterError(f"unknown model size {self.size!r} ({', '.join(MODEL_SIZES)})")
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or not 0 <= self.ema_decay < 1:
            raise ParameterError("steps and batch size must be >= 1, lr > 0, 0 <= EMA decay < 1")
        if self.weights_dtype not in ("float32", "float16"):
            raise ParameterError(
                f"weights dtype must be float32 or float16, not {self.weights_dtype}"
            )
        if self.max_minutes < 0 or self.snapshot_every < 0:
            raise ParameterError("--max-minutes and --snapshot-every must be >= 0")
        low, high = INTENSITY_LIMITS_HU
        width = self.hu_max - self.hu_min
        if not (
            low <= self.hu_min <= high
            and low <= self.hu_max <= high
            and INTENSITY_WIDTH_HU[0] <= width <= INTENSITY_WIDTH_HU[1]
        ):
            raise ParameterError(
                f"the intensity window {self.hu_min:g}..{self.hu_max:g} HU must lie in "
                f"{low:g}..{high:g} HU with a width of {INTENSITY_WIDTH_HU[0]:g}.."
                f"{INTENSITY_WIDTH_HU[1]:g} HU"
            )


def batch_indices(n: int, batch: int, step: int, seed: int) -> np.ndarray:
    """Global batch of ``step``: consecutive positions in per-epoch seeded permutations."""
    start = step * batch
    out = []
    while len(out) < batch:
        epoch, pos = divmod(start + len(out), n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        out.extend(perm[pos : pos + batch - len(out)].tolist())
    return np.array(out, dtype=np.int64)


#: Uniform draws per slice that :func:`augment` uses (the first 5: geometry and HU shift).
AUGMENT_DRAWS = 8


def augment(
    x: torch.Tensor,
    u: torch.Tensor,
    intensity: Intensity,
    phase_noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """CT-safe augmentation of normalised slices ``[B, 1, n, n]`` (no flips: anatomy has sides).

    ``u`` holds uniform [0, 1) draws per slice: HU shift +-10, rotation +-5 degrees,
    scale +-5 %, shift +-3 pixels in each direction. With ``phase_noise`` (standard
    normal ``[B, 1, n, n]``; contrast-phase variation, for data from few scans) also:
    soft-tissue contrast scaled by 0.8..1.25 around 40 HU (enhancement differs between
    scans and phases: liver 55-145 HU in ../shared/data), a further HU shift +-20 and
    Gaussian noise of 0-6 HU (the model grid's noise differs with dose and pixel size).
    """
    b, _, n, _ = x.shape
    hu_per_unit = intensity.hu_per_unit
    v = u.to(x.device) * 2 - 1
    if phase_noise is not None:
        gain = torch.exp(v[:, 5] * math.log(1.25)).view(b, 1, 1, 1)
        pivot = intensity.normalize(torch.tensor(40.0)).to(x.device)
        shift = (v[:, 6] * 20.0 / hu_per_unit).view(b, 1, 1, 1)
        sigma = ((v[:, 7] + 1) * 3.0 / hu_per_unit).view(b, 1, 1, 1)
        x = (x - pivot) * gain + pivot + shift + phase_noise.to(x.device) * sigma
    shift_hu, angle, scale = v[:, 0] * 10.0, v[:, 1] * math.radians(5), 1 + v[:, 2] * 0.05
    trans = v[:, 3:5] * (3 * 2 / n)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, trans[:, 0]], 1), torch.stack([sin, cos, trans[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    moved = (
        F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1
    )
    return (moved + (shift_hu / hu_per_unit).view(b, 1, 1, 1)).clamp(-1, 1)


class Diverged(GDPIError):
    """Training produced a NaN or infinite loss."""


def check_loss(loss: torch.Tensor, step: int, world: int = 1) -> None:
    """Stop training (:class:`Diverged`) when ``loss`` of 1-based ``step`` is NaN or
    infinite, before it reaches the weights; with ``world`` > 1 processes every process
    stops at the same step. The model files saved before stay as they were."""
    local = torch.isfinite(loss.detach()).all().to(torch.float32)
    finite = local.clone()
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not bool(finite.item()):
        value = float(loss.detach().float().mean()) if not local.item() else "another process"
        raise Diverged(
            f"training stopped at step {step}: the loss is not finite ({value}); it "
            "diverged (lower --lr) or the data holds bad values; the last saved model is kept"
        )


def append_log(path: Path, names: list[str], step: int, mean, rate: float) -> None:
    """One row of ``log.csv`` (step, the mean of each named term, it/s); header when new."""
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["step", *names, "it_per_s"])
        w.writerow([step, *(f"{v:.6f}" for v in mean), f"{rate:.3f}"])


def training_data(config: TrainConfig) -> tuple[SliceStore, np.ndarray, InputGrid]:
    """The store, its healthy training slice indices and its model grid."""
    store = SliceStore.open(config.data)
    train_idx = store.select("healthy", "train")
    if config.exclude_cases:
        unknown = set(config.exclude_cases) - {s["case"] for s in store.slices}
        if unknown:
            raise ParameterError(f"{config.data} has no case(s) {', '.join(sorted(unknown))}")
        keep = [store.slices[int(i)]["case"] not in config.exclude_cases for i in train_idx]
        train_idx = train_idx[np.array(keep, bool)]
    if not len(train_idx):
        raise ParameterError(f"{config.data} holds no healthy training slices")
    return store, train_idx, InputGrid.from_dict(store.info["grid"])


def slice_batch(
    store: SliceStore, indices: np.ndarray, intensity: Intensity, device: torch.device
) -> torch.Tensor:
    """Store slices ``indices`` as a normalised ``[B, 1, n, n]`` batch on ``device``."""
    hu = torch.from_numpy(np.asarray(store.images[indices], np.float32))
    return intensity.normalize(hu.to(device)[:, None])


def previous_state_path(path: Path) -> Path:
    """Where the state before the newest one is kept (``state.prev.pt``)."""
    return path.with_name(path.stem + ".prev" + path.suffix)


def save_state(path: Path, step: int, config: TrainConfig, **parts) -> None:
    """Write the resume state atomically: ``step``, ``config`` and the ``state_dict()``
    of each named part (model, EMA, optimizer). The state it replaces is kept as
    :func:`previous_state_path`, a fallback should the new one be damaged later."""
    tmp = path.with_name(f".{path.name}.tmp")
    state = {"version": STATE_VERSION, "step": step, "config": asdict(config)}
    state.update({name: part.state_dict() for name, part in parts.items()})
    torch.save(state, tmp)
    if path.exists():  # keep the current state as the previous one; state.pt never vanishes
        link = path.with_name(f".{path.name}.prev.tmp")
        link.unlink(missing_ok=True)
        try:
            os.link(path, link)
        except OSError:  # no hard links here: a copy
            shutil.copyfile(path, link)
        os.replace(link, previous_state_path(path))
    os.replace(tmp, path)


class DamagedState(ParameterError):
    """A resume state file that cannot be read (cut short, overwritten, not a state)."""


def load_state(path: Path) -> dict:
    """A resume state written by :func:`save_state` (never executes code from the file)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several kinds for a damaged zip or pickle
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DamagedState(f"resume state {path} is damaged ({reason})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise DamagedState(f"resume state {path} is damaged (not a gdpi training state)")
    if state.get("version") != STATE_VERSION:
        raise ParameterError(
            f"{path}: resume state version {state.get('version')} is not {STATE_VERSION}"
        )
    return state


def resume_state(path: Path, restart: bool = False, log=print) -> dict | None:
    """The state to resume from, or None to start at step 0.

    ``restart`` starts over: existing states are kept aside as ``*.restarted``. A damaged
    ``state.pt`` falls back to the previous state (the damaged file is kept as
    ``state.pt.damaged``); with no readable state the error says how to start over.
    """
    previous = previous_state_path(path)
    if restart:
        for p in (path, previous):
            if p.exists():
                os.replace(p, p.with_name(p.name + ".restarted"))
        return None
    if not path.exists():
        if not previous.exists():
            return None
        path = previous  # a stop between the two renames of save_state
    try:
        return load_state(path)
    except DamagedState as exc:
        if path == previous or not previous.exists():
            raise DamagedState(f"{exc}; delete it or pass --restart to start over") from None
        try:
            state = load_state(previous)
        except DamagedState:
            raise DamagedState(
                f"{exc}, and so is {previous}; pass --restart to start over"
            ) from None
        damaged = path.with_name(path.name + ".damaged")
        os.replace(path, damaged)
        log(
            f"gdpi: warning: {exc}; resuming from the previous state {previous} "
            f"(step {state['step']}); the damaged file is kept as {damaged}"
        )
        return state


def check_resume(path: Path, saved: dict, config: TrainConfig, keys: tuple[str, ...]) -> None:
    """Refuse to resume when a setting that shapes the run differs from the saved one."""
    for key in keys:
        if saved.get(key) != getattr(config, key):
            raise ParameterError(
                f"cannot resume {path}: {key} was {saved.get(key)!r}, now {getattr(config, key)!r}"
            )


def training_summary(
    config: TrainConfig, store: SliceStore, device: torch.device, step: int, started: float
) -> dict:
    """What a checkpoint records about the run that made it (``started``: perf_counter)."""
    return {
        "steps": step,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "data": str(config.data),
        "data_summary": store.info.get("counts"),
        "cases": [
            c
            for c in store.info.get("cases", {}).get("train") or []
            if c not in config.exclude_cases
        ],
        "config": asdict(config),
        "device": str(device),
        "hardware": _hardware(device),
        "gdpi_version": __version__,
        "seconds_this_run": round(time.perf_counter() - started, 1),
    }


def _hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}"


#: A run folder's marker (JSON: what made it, when): ``--out`` holding it is resumed.
RUN_MARKER = ".gdpi-train"
#: The lock a running ``gdpi train`` holds on its ``--out`` (pid, host, start).
RUN_LOCK = ".gdpi-train.lock"


def check_run_folder(out: Path) -> None:
    """``gdpi train --out``: a new or empty folder, or an earlier run's folder of gdpi
    train (its :data:`RUN_MARKER`, or a resume state of a version before the marker),
    which is resumed; anything else (e.g. your own ``model.safetensors``) is refused,
    since training writes ``model.safetensors``, ``state.pt`` and ``log.csv`` there."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"output path exists and is not a folder: {out}")
    if not out.is_dir() or not any(out.iterdir()):
        return
    state = out / "state.pt"
    ours = (out / RUN_MARKER, out / RUN_LOCK, state, previous_state_path(state))
    if not any(p.is_file() for p in ours):
        names = sorted(p.name for p in out.iterdir())
        listed = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise OutputError(
            f"output folder {out} is not a gdpi train run folder (it holds {listed}): "
            "choose a new or empty folder (an earlier run's folder is resumed)"
        )


@contextmanager
def run_folder(out: str | Path, primary: bool = True, log=print) -> Iterator[Path]:
    """The run folder ``out``, checked (:func:`check_run_folder`), made and locked while
    the block trains: a second ``gdpi train`` into it is refused (one line), a lock left
    by a killed run is taken over (``log`` says so). A run that fails before it wrote
    anything (a bad store, a damaged state) leaves the folder as it was (no marker; a
    folder it made is removed). ``primary``: this process checks and locks (rank 0 of
    torchrun; the other ranks write nothing)."""
    from GDPILiverAnomalyLib.files.outputs import folder_lock, write_text_atomic

    out = Path(out)
    if not primary:
        yield out
        return
    check_run_folder(out)
    made_dirs = [p for p in (out, *out.absolute().parents) if not p.exists()]
    out.mkdir(parents=True, exist_ok=True)
    before = {p.name for p in out.iterdir()} - {RUN_LOCK}
    made_marker = False
    try:
        with folder_lock(out, RUN_LOCK, "gdpi train") as previous:
            if previous is not None:
                log(
                    f"gdpi: warning: {out} was locked by a gdpi train that ended without "
                    f"releasing it (pid {previous['pid']}, since {previous.get('started')}); "
                    "resuming its run"
                )
            if not (out / RUN_MARKER).is_file():
                made = datetime.now(timezone.utc).isoformat(timespec="seconds")
                info = {"made_by": "gdpi train", "gdpi_version": __version__, "made": made}
                write_text_atomic(out / RUN_MARKER, json.dumps(info))
                made_marker = True
            yield out
    except BaseException:
        if made_marker and {p.name for p in out.iterdir()} - {RUN_MARKER} == before:
            (out / RUN_MARKER).unlink()  # nothing else written: as it was
        for folder in made_dirs:  # deepest first; stops at the first one not empty
            try:
                folder.rmdir()
            except OSError:
                break
        raise
