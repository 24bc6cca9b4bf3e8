"""``gdpi train --model ae|vae|dae``: the reconstruction baselines on the same healthy slices.

One process; the same slice store, data order, augmentation, logging and resume rules
as the diffusion prior (``train.py``). Outputs in ``--out``: ``model.safetensors``
(``gdpi-baseline`` format), ``state.pt`` (resume state) and ``log.csv``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from GDPILiverAnomalyLib.errors import ParameterError
from GDPILiverAnomalyLib.files.checkpoint import Intensity
from GDPILiverAnomalyLib.running.devices import resolve_device
from GDPILiverAnomalyLib.running.progress import progress_bar

from .baselines import Baseline, BaselineConfig, build_model, save_baseline, training_loss
from .loop import (
    TrainConfig,
    append_log,
    augment,
    batch_indices,
    check_loss,
    check_resume,
    resume_state,
    save_state,
    slice_batch,
    training_data,
    training_summary,
)

#: Settings that must match to resume a baseline run from its state.
RESUME_KEYS = ("model", "batch_size", "seed", "hu_min", "hu_max", "data")


def train_baseline(config: TrainConfig) -> Path:
    """Train (or resume) an AE, VAE or DAE; return the checkpoint path."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ParameterError("the baselines train in one process (no torchrun)")
    device = resolve_device(config.device)
    store, train_idx, grid = training_data(config)
    base = BaselineConfig(kind=config.model, image_size=grid.size)
    base.validate()
    intensity = Intensity(config.hu_min, config.hu_max)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    model = build_model(base).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    step = 0
    state_path = out / "state.pt"
    state = resume_state(state_path, config.restart, log=lambda m: print(m, file=sys.stderr))
    if state is not None:
        check_resume(state_path, state["config"], config, RESUME_KEYS)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step = int(state["step"])
    log_path = out / "log.csv"
    started = time.perf_counter()
    window: list[list[float]] = []
    t_window = time.perf_counter()
    bar = None
    if config.progress:
        bar = progress_bar(config.steps, config.model, "it", initial=step)

    def save() -> Path:
        training = training_summary(config, store, device, step, started)
        path = save_baseline(  # the model first, then the state (see train.py)
            Baseline(model, base, intensity, grid, training), out / "model.safetensors"
        )
        save_state(state_path, step, config, model=model, optimizer=opt)
        return path

    model.train()
    while step < config.steps:
        idx = batch_indices(len(train_idx), config.batch_size, step, config.seed)
        x = slice_batch(store, train_idx[idx], intensity, device)
        g = torch.Generator().manual_seed(
            int(np.random.SeedSequence([config.seed, step]).generate_state(1)[0])
        )
        if config.augment:
            x = augment(x, torch.rand((len(x), 5), generator=g), intensity)
        terms = training_loss(model, x, g)
        check_loss(terms["loss"], step + 1)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt.step()
        step += 1
        window.append(
            [terms["loss"].item(), terms["mse"].item(), terms.get("kl", torch.zeros(())).item()]
        )
        if bar is not None:
            bar.update(1)
        if step % config.log_every == 0 or step == config.steps:
            mean = np.mean(window, axis=0)
            rate = len(window) / (time.perf_counter() - t_window)
            append_log(log_path, ["loss", "mse", "kl"], step, mean, rate)
            window, t_window = [], time.perf_counter()
        if step % config.save_every == 0 or step == config.steps:
            save()
    if bar is not None:
        bar.close()
    if step == config.steps and not (out / "model.safetensors").exists():
        save()
    return out / "model.safetensors"
