"""The DDNM denoising step (Wang, Yu & Zhang, "Zero-Shot Image Restoration Using
Denoising Diffusion Null-Space Model", ICLR 2023) for inpainting.

At level ``t`` the network's noise estimate gives ``x0|t``; its known region is
replaced by the known image (the range-space part ``A^+ y``; the null-space part
``(I - A^+ A) x0|t`` is the re-painted region), and a DDIM step (Song et al. 2021, with
``eta``) goes to the level below. Unlike RePaint, which pastes a *noised* copy of the
known region into ``x_t`` and relies on resampling to harmonise it, every step here
conditions the clean estimate, so far fewer network evaluations suffice. DDNM+'s time
travel is RePaint's jump walk (:func:`.schedule.get_schedule_jump`).

Learned-variance checkpoints: only the noise channels are used; the step's variance is
DDIM's, set by ``eta`` (0 = deterministic, 1 = the DDPM posterior variance).
Mask convention as :mod:`.repaint`: ``known`` is 1 where the image is kept.
"""

from __future__ import annotations

import math

import torch

from .diffusion import GaussianDiffusion

#: DDIM ``eta`` of the DDNM paper's experiments.
DEFAULT_ETA = 0.85


def ddnm_step(
    diffusion: GaussianDiffusion,
    out: torch.Tensor,
    x: torch.Tensor,
    t: int,
    image: torch.Tensor,
    known: torch.Tensor,
    eta: float,
    noise: torch.Tensor | None,
) -> torch.Tensor:
    """``x_{t-1}`` from ``x_t`` and the network output ``out`` (C or 2C channels) at
    respaced level ``t``; ``image`` in model units, ``known`` 1 = keep. At ``t = 0`` the
    result is the corrected ``x0`` and ``noise`` is not used."""
    eps = out[:, : x.shape[1]]
    a_t = float(diffusion.alphas_cumprod[t])
    a_prev = float(diffusion.alphas_cumprod_prev[t])
    x0 = ((x - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)).clamp(-1, 1)
    eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1.0 - a_t)  # consistent with the clipped x0
    x0 = known * image + (1.0 - known) * x0  # range space from the data, null space from the prior
    if t == 0:
        return x0
    sigma = eta * math.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))
    x_prev = math.sqrt(a_prev) * x0 + math.sqrt(max(1.0 - a_prev - sigma**2, 0.0)) * eps
    if sigma > 0 and noise is not None:
        x_prev = x_prev + sigma * noise
    return x_prev
