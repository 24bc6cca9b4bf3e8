"""``gdpi train``: improved DDPM on healthy slices (one process, or many with torchrun).

Hybrid loss (L_simple + 0.001 L_vlb with learned variances), linear betas 1e-4..0.02
over T = 1000 (cosine optional), Adam (lr 1e-4), EMA 0.999, as in the GDPI paper.

Every random draw of step ``s`` on rank ``r`` (data order, timesteps, noise,
augmentation) comes from generators seeded by ``(seed, s, r)``, so a run killed at any
moment and resumed from its last state continues exactly as if never stopped.

Outputs in ``--out``: ``model.safetensors`` (EMA weights in the core checkpoint
format, usable by ``gdpi detect``), ``state.pt`` (resume state: weights, EMA,
optimizer, step), ``log.csv`` (step, loss, mse, vb, it/s), TensorBoard events when
``tensorboard`` is installed, and ``previews/`` (samples and an inpainting).
"""

from __future__ import annotations

import copy
import csv
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from GDPILiverAnomalyLib import __version__
from GDPILiverAnomalyLib.checkpoint import Checkpoint, Intensity, save_checkpoint
from GDPILiverAnomalyLib.diffusion import DiffusionConfig, GaussianDiffusion, training_losses
from GDPILiverAnomalyLib.errors import ParameterError
from GDPILiverAnomalyLib.grid import InputGrid
from GDPILiverAnomalyLib.unet import MODEL_SIZES, UNet, UNetConfig

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
    save_every: int = 500
    log_every: int = 25
    preview_every: int = 0  # 0 = only at the end
    seed: int = 0
    device: str = "auto"
    bf16: bool = False
    progress: bool = True
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


def sample_randomness(
    seed: int, step: int, positions: np.ndarray, shape: tuple[int, ...], num_timesteps: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Timestep, noise and augmentation parameters of each sample, from its own generator.

    Seeded by (seed, step, position in the global batch): a sample gets the same draws
    whichever process handles it, so N processes reproduce one process's run.
    """
    ts, noises, augs = [], [], []
    for pos in positions:
        g = torch.Generator().manual_seed(
            int(np.random.SeedSequence([seed, step, int(pos)]).generate_state(1)[0])
        )
        ts.append(torch.randint(0, num_timesteps, (1,), generator=g))
        noises.append(torch.randn(shape, generator=g))
        augs.append(torch.rand(5, generator=g))
    return torch.cat(ts), torch.stack(noises), torch.stack(augs)


def batch_indices(n: int, batch: int, step: int, seed: int) -> np.ndarray:
    """Global batch of ``step``: consecutive positions in per-epoch seeded permutations."""
    start = step * batch
    out = []
    while len(out) < batch:
        epoch, pos = divmod(start + len(out), n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        out.extend(perm[pos : pos + batch - len(out)].tolist())
    return np.array(out, dtype=np.int64)


def augment(x: torch.Tensor, u: torch.Tensor, hu_per_unit: float) -> torch.Tensor:
    """CT-safe augmentation of normalised slices ``[B, 1, n, n]`` (no flips: anatomy has sides).

    ``u`` holds 5 uniform [0, 1) draws per slice: HU shift +-10, rotation +-5 degrees,
    scale +-5 %, shift +-3 pixels in each direction.
    """
    b, _, n, _ = x.shape
    v = u.to(x.device) * 2 - 1
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


def append_log(path: Path, names: list[str], step: int, mean, rate: float) -> None:
    """One row of ``log.csv`` (step, the mean of each named term, it/s); header when new."""
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["step", *names, "it_per_s"])
        w.writerow([step, *(f"{v:.6f}" for v in mean), f"{rate:.3f}"])


def _distributed() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if world > 1:
        return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


def _device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def save_state(
    path: Path,
    model: torch.nn.Module,
    ema: torch.nn.Module,
    opt: torch.optim.Optimizer,
    step: int,
    config: TrainConfig,
) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(
        {
            "version": STATE_VERSION,
            "step": step,
            "model": model.state_dict(),
            "ema": ema.state_dict(),
            "optimizer": opt.state_dict(),
            "config": asdict(config),
        },
        tmp,
    )
    os.replace(tmp, path)


def load_state(path: Path) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("version") != STATE_VERSION:
        raise ParameterError(
            f"{path}: resume state version {state.get('version')} is not {STATE_VERSION}"
        )
    return state


def train(config: TrainConfig) -> Path:
    """Train (or resume) and return the path of the EMA checkpoint."""
    config.validate()
    config.data = str(Path(config.data).resolve())
    if config.model != "ddpm":
        from .train_baseline import train_baseline

        return train_baseline(config)
    rank, world, local_rank = _distributed()
    device = _device(config.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if config.batch_size % world:
        raise ParameterError(
            f"batch size {config.batch_size} is not divisible by {world} processes"
        )
    store = SliceStore.open(config.data)
    train_idx = store.select("healthy", "train")
    if not len(train_idx):
        raise ParameterError(f"{config.data} holds no healthy training slices")
    grid = InputGrid.from_dict(store.info["grid"])
    model_cfg = UNetConfig(
        **{
            **MODEL_SIZES[config.size],
            "image_size": grid.size,
            "learn_sigma": config.learn_sigma,
            "dropout": config.dropout,
        }
    )
    diff_cfg = DiffusionConfig(schedule=config.schedule, learn_sigma=config.learn_sigma)
    diffusion = GaussianDiffusion.from_config(diff_cfg)
    intensity = Intensity(config.hu_min, config.hu_max)
    out = Path(config.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(config.seed)
    model = UNet(model_cfg).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    step = 0
    state_path = out / "state.pt"
    if state_path.exists():
        state = load_state(state_path)
        saved = TrainConfig(**state["config"])
        for key in (
            "model",
            "size",
            "batch_size",
            "schedule",
            "learn_sigma",
            "seed",
            "hu_min",
            "hu_max",
            "data",
        ):
            if getattr(saved, key) != getattr(config, key):
                raise ParameterError(
                    f"cannot resume {state_path}: {key} was {getattr(saved, key)!r}, "
                    f"now {getattr(config, key)!r}"
                )
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        step = int(state["step"])
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    local = config.batch_size // world
    images = store.images

    writer = None
    if rank == 0:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            pass
    log_path = out / "log.csv"
    bar = None
    if rank == 0 and config.progress:
        from tqdm import tqdm

        bar = tqdm(
            total=config.steps,
            initial=step,
            unit="it",
            desc="training",
            file=sys.stderr,
            dynamic_ncols=True,
        )
    started = time.perf_counter()
    t_window, window_losses = time.perf_counter(), []

    def checkpoint() -> Path:
        trained = Checkpoint(
            ema,
            diff_cfg,
            intensity,
            grid,
            ema=True,
            training={
                **training_summary(config, store, device, step, started),
                "processes": world,
                "ema_decay": config.ema_decay,
            },
        )
        save_state(state_path, model, ema, opt, step, config)
        return save_checkpoint(trained, out / "model.safetensors")

    while step < config.steps:
        positions = np.arange(rank * local, (rank + 1) * local)
        idx = batch_indices(len(train_idx), config.batch_size, step, config.seed)[positions]
        x0 = intensity.normalize(
            torch.from_numpy(np.asarray(images[train_idx[idx]])).to(device)[:, None]
        )
        t, noise, aug = sample_randomness(
            config.seed, step, positions, tuple(x0.shape[1:]), diffusion.num_timesteps
        )
        t, noise = t.to(device), noise.to(device)
        if config.augment:
            x0 = augment(x0, aug, intensity.hu_per_unit)
        ctx = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if config.bf16 and device.type == "cuda"
            else torch.autocast("cpu", enabled=False)
        )
        with ctx:
            terms = training_losses(diffusion, net, x0, t, noise, config.vlb_weight)
        loss = terms["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        decay = (
            min(config.ema_decay, (1 + step) / (10 + step))
            if config.ema_warmup
            else config.ema_decay
        )
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters(), strict=True):
                e.lerp_(p, 1 - decay)
            for e, b in zip(ema.buffers(), model.buffers(), strict=True):
                e.copy_(b)
        if rank == 0:
            window_losses.append(
                [
                    loss.item(),
                    terms["mse"].mean().item(),
                    terms["vb"].mean().item() if "vb" in terms else 0.0,
                ]
            )
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{window_losses[-1][0]:.4f}", refresh=False)
            if step % config.log_every == 0 or step == config.steps:
                mean = np.mean(window_losses, axis=0)
                rate = len(window_losses) / (time.perf_counter() - t_window)
                append_log(log_path, ["loss", "mse", "vb"], step, mean, rate)
                if writer is not None:
                    for name, value in zip(("loss", "mse", "vb"), mean, strict=True):
                        writer.add_scalar(f"train/{name}", value, step)
                    writer.add_scalar("train/it_per_s", rate, step)
                t_window, window_losses = time.perf_counter(), []
        if step % config.save_every == 0 or step == config.steps:
            if rank == 0:
                checkpoint()
                if (
                    config.preview_every
                    and step % config.preview_every == 0
                    or step == config.steps
                ):
                    from .preview import write_preview

                    write_preview(
                        ema,
                        diff_cfg,
                        intensity,
                        store,
                        out / "previews" / f"step{step:07d}.png",
                        seed=config.seed,
                        device=device,
                    )
            if world > 1:
                dist.barrier()
    if bar is not None:
        bar.close()
    if writer is not None:
        writer.close()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return out / "model.safetensors"


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
        "cases": store.info.get("cases", {}).get("train"),
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
