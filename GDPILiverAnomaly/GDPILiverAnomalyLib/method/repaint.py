"""Inpainting with a diffusion prior, batched over slices: RePaint (Lugmayr et al. 2022)
or DDNM (:mod:`.ddnm`), both on RePaint's jump walk.

Mask convention: ``inpaint_mask`` is 1 where the image is unknown and gets re-painted
(the AME candidates), 0 where the image is known and kept. Images are in model units
([-1, 1]), shape ``[N, C, H, W]``; the mask is ``[N, 1, H, W]`` or ``[N, C, H, W]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..errors import Cancelled, ParameterError
from .ddnm import DEFAULT_ETA, ddnm_step
from .diffusion import GaussianDiffusion, NoiseModel
from .parameters import choices
from .schedule import get_schedule_jump, transitions


class SliceNoise:
    """Gaussian noise from one generator per batch item.

    A slice's noise depends only on its own seed, so a slice inpaints the same
    whatever batch it lands in.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.generators = [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]

    def like(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != len(self.generators):
            raise ValueError(f"batch of {x.shape[0]} but {len(self.generators)} noise generators")
        return torch.stack(
            [
                torch.randn(x.shape[1:], generator=g, device=self.device, dtype=torch.float32)
                for g in self.generators
            ]
        ).to(x.dtype)


def slice_seeds(seed: int, slice_ids: Sequence[int], sample: int = 0, window: int = 0) -> list[int]:
    """Noise seed of each slice from the run's ``seed`` and the slice's own id (its k
    index in a CT, its store index in an evaluation), so batching never changes it;
    ``sample`` k > 0: the k-th further inpainting of the same slice; ``window`` w > 0:
    the slice's w-th sliding window (:func:`.grid.sliding_windows`; window 0 keeps the
    seeds of a liver that fits the grid)."""
    return [
        seed * 1_000_003 + int(i) + sample * 1_000_000_007_000 + window * 1_000_000_007
        for i in slice_ids
    ]


ProgressFn = Callable[[int, int], None]  # (network evaluations done, total)

#: The denoising steps :func:`repaint` can take on its walk.
SAMPLERS = choices("sampler")


@torch.no_grad()
def repaint(
    model: NoiseModel,
    diffusion: GaussianDiffusion,
    image: torch.Tensor,
    inpaint_mask: torch.Tensor,
    jump_length: int = 10,
    jump_n_sample: int = 10,
    noise: SliceNoise | None = None,
    progress: ProgressFn | None = None,
    should_cancel: Callable[[], bool] | None = None,
    start: tuple[torch.Tensor, int] | None = None,
    sampler: str = "repaint",
    eta: float = DEFAULT_ETA,
) -> tuple[torch.Tensor, int]:
    """Re-paint the masked region of ``image``; return ``(x0, network evaluations)``.

    ``sampler="repaint"``: before every denoising step at level ``t`` the known region
    is replaced by the input noised to level ``t``. ``sampler="ddnm"``: every step
    replaces the known region of the network's clean estimate instead and takes a DDIM
    step with ``eta`` (:func:`.ddnm.ddnm_step`). Undo steps of the walk re-noise the
    whole image by one step. The known region of the returned image equals ``image``
    exactly. The model is any callable ``model(x_t, t_original)`` returning C (fixed
    variance) or 2C (learned variance) channels.

    ``start = (prompt, level)`` begins the walk at its first visit of respaced ``level``
    from ``prompt`` (model units, shaped like ``image``) noised to that level, instead of
    pure noise at the top (SDEdit-style; used by the memory-bank prompt). The known
    region is handled as usual; network evaluations drop to those below ``level``.
    """
    if image.ndim != 4 or inpaint_mask.ndim != 4 or inpaint_mask.shape[0] != image.shape[0]:
        raise ParameterError("image must be [N, C, H, W] and the mask [N, 1 or C, H, W]")
    if sampler not in SAMPLERS:
        raise ParameterError(f"unknown sampler {sampler!r} ({' or '.join(SAMPLERS)})")
    noise = noise or SliceNoise(range(image.shape[0]), image.device)
    unknown = inpaint_mask.to(image.dtype).expand_as(image)
    known = 1.0 - unknown
    walk = get_schedule_jump(diffusion.num_timesteps, jump_length, jump_n_sample)
    if start is None:
        x = noise.like(image)
    else:
        prompt, level = start
        if not 0 <= level < diffusion.num_timesteps or prompt.shape != image.shape:
            raise ParameterError("start needs a prompt shaped like the image and a valid level")
        walk = walk[walk.index(level) :]
        x = diffusion.q_sample(prompt, level, noise.like(image))
    total = sum(1 for a, b in transitions(walk) if b < a)
    nfe = 0
    for t_last, t_cur in transitions(walk):
        if should_cancel is not None and should_cancel():
            raise Cancelled()
        if t_cur > t_last:  # undo: one forward noising step
            x = diffusion.forward_step(x, t_cur, noise.like(image))
            continue
        if sampler == "ddnm":
            out = model(x, diffusion.model_timesteps(t_last, x.shape[0], x.device)).float()
            step_noise = noise.like(image) if t_last > 0 else None
            x = ddnm_step(diffusion, out, x, t_last, image, known, eta, step_noise)
        else:
            known_t = diffusion.q_sample(image, t_last, noise.like(image))
            x = known * known_t + unknown * x
            step = diffusion.p_mean_variance(model, x, t_last)
            x = step.mean
            if t_last > 0:
                x = x + torch.exp(0.5 * step.log_variance) * noise.like(image)
        nfe += 1
        if progress is not None:
            progress(nfe, total)
    return known * image + unknown * x.clamp(-1, 1), nfe
