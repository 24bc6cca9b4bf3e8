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
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from GDPILiverAnomalyLib.errors import ParameterError
from GDPILiverAnomalyLib.files.checkpoint import Checkpoint, Intensity, save_checkpoint
from GDPILiverAnomalyLib.method.diffusion import DiffusionConfig, GaussianDiffusion, training_losses
from GDPILiverAnomalyLib.method.unet import MODEL_SIZES, UNet, UNetConfig
from GDPILiverAnomalyLib.running.devices import resolve_device
from GDPILiverAnomalyLib.running.progress import progress_bar

from .loop import (
    AUGMENT_DRAWS,
    TrainConfig,
    append_log,
    augment,
    batch_indices,
    check_loss,
    check_resume,
    resume_state,
    run_folder,
    save_state,
    slice_batch,
    training_data,
    training_summary,
)

#: Settings that must match to resume a run from its state.
RESUME_KEYS = ("model", "size", "batch_size", "schedule", "learn_sigma", "seed", "hu_min",
               "hu_max", "data", "augment_phase", "exclude_cases")  # fmt: skip


def sample_randomness(
    seed: int,
    step: int,
    positions: np.ndarray,
    shape: tuple[int, ...],
    num_timesteps: int,
    phase: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Timestep, noise and augmentation parameters of each sample, from its own generator.

    Seeded by (seed, step, position in the global batch): a sample gets the same draws
    whichever process handles it, so N processes reproduce one process's run. The last
    item is the augmentation noise of ``phase`` augmentation (else None).
    """
    ts, noises, augs, extra = [], [], [], []
    for pos in positions:
        g = torch.Generator().manual_seed(
            int(np.random.SeedSequence([seed, step, int(pos)]).generate_state(1)[0])
        )
        ts.append(torch.randint(0, num_timesteps, (1,), generator=g))
        noises.append(torch.randn(shape, generator=g))
        augs.append(torch.rand(AUGMENT_DRAWS, generator=g))
        if phase:
            extra.append(torch.randn(shape, generator=g))
    return (
        torch.cat(ts),
        torch.stack(noises),
        torch.stack(augs),
        torch.stack(extra) if phase else None,
    )


def _warn(message: str) -> None:
    print(message, file=sys.stderr)


def _distributed() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if world > 1:
        return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


def train(config: TrainConfig) -> Path:
    """Train (or resume) and return the path of the EMA checkpoint. ``config.out`` must
    be new, empty or an earlier run's folder, and is locked while training
    (:func:`loop.run_folder`)."""
    config.validate()
    config.data = str(Path(config.data).resolve())
    with run_folder(config.out, int(os.environ.get("RANK", "0")) == 0, log=_warn):
        if config.model != "ddpm":
            from .train_baseline import train_baseline

            return train_baseline(config)
        return _train_prior(config)


def _train_prior(config: TrainConfig) -> Path:
    rank, world, local_rank = _distributed()
    device = resolve_device(config.device, local_rank if world > 1 else None)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    if config.batch_size % world:
        raise ParameterError(
            f"batch size {config.batch_size} is not divisible by {world} processes"
        )
    store, train_idx, grid = training_data(config)
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
    # rank 0 settles which state to resume from (moving damaged or restarted files
    # aside); the other ranks then read the same one
    state = resume_state(state_path, config.restart, log=_warn) if rank == 0 else None
    if world > 1:
        dist.barrier()
        if rank > 0:
            state = resume_state(state_path, log=lambda message: None)
    if state is not None:
        check_resume(state_path, state["config"], config, RESUME_KEYS)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        step = int(state["step"])
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    local = config.batch_size // world

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
        bar = progress_bar(config.steps, "training", "it", initial=step)
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
        # the model first: a stop between the two leaves a state that redoes the last
        # steps, never a finished state with a stale or missing model
        dtype = getattr(torch, config.weights_dtype)
        path = save_checkpoint(trained, out / "model.safetensors", dtype)
        save_state(state_path, step, config, model=model, ema=ema, optimizer=opt)
        if config.snapshot_every and step % config.snapshot_every == 0:
            (out / "snapshots").mkdir(exist_ok=True)
            shutil.copyfile(path, out / "snapshots" / f"step{step:07d}.safetensors")
        return path

    budget = config.max_minutes * 60 if config.max_minutes else math.inf
    clock = time.perf_counter()

    while step < config.steps:
        positions = np.arange(rank * local, (rank + 1) * local)
        idx = batch_indices(len(train_idx), config.batch_size, step, config.seed)[positions]
        x0 = slice_batch(store, train_idx[idx], intensity, device)
        t, noise, aug, aug_noise = sample_randomness(
            config.seed,
            step,
            positions,
            tuple(x0.shape[1:]),
            diffusion.num_timesteps,
            config.augment and config.augment_phase,
        )
        t, noise = t.to(device), noise.to(device)
        if config.augment:
            x0 = augment(x0, aug, intensity, aug_noise)
        ctx = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if config.bf16 and device.type == "cuda"
            else torch.autocast("cpu", enabled=False)
        )
        with ctx:
            terms = training_losses(diffusion, net, x0, t, noise, config.vlb_weight)
        loss = terms["loss"].mean()
        check_loss(loss, step + 1, world)  # before a NaN reaches the weights
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
        out_of_time = time.perf_counter() - clock > budget
        if world > 1 and budget < math.inf:  # every rank stops at the same step
            flag = torch.tensor(float(out_of_time), device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            out_of_time = bool(flag.item())
        if out_of_time and rank == 0:
            _warn(f"--max-minutes {config.max_minutes:g} reached at step {step}: saved, stopping")
        if step % config.save_every == 0 or step == config.steps or out_of_time:
            if rank == 0:
                checkpoint()
                if (
                    config.preview_every
                    and step % config.preview_every == 0
                    or step == config.steps
                    or out_of_time
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
        if out_of_time:
            break
    if bar is not None:
        bar.close()
    if writer is not None:
        writer.close()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return out / "model.safetensors"
