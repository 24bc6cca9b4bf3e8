"""Gaussian diffusion (DDPM / improved DDPM) with respacing and learned variances.

Index convention (improved-diffusion): level ``t`` in ``0..N-1`` is the latent after
``t + 1`` noising steps; ``q_sample(x0, t)`` uses ``alphas_cumprod[t]``. A respaced
process keeps a subset of the original timesteps; its betas are recomputed so the
kept ``alphas_cumprod`` are unchanged, and the network always sees the original
timestep (``timestep_map``). Learned-range variances interpolate between the
respaced chain's posterior variance and its beta.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..errors import ParameterError

#: ``model(x_t, t_original) -> eps`` (C channels) or ``[eps, v]`` (2C channels).
NoiseModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
    """Betas of the ``linear`` (1e-4..0.02 at T = 1000, scaled for other T) or ``cosine`` schedule."""
    if name == "linear":
        scale = 1000.0 / num_timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    if name == "cosine":

        def alpha_bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array(
            [
                min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), 0.999)
                for i in range(num_timesteps)
            ],
            dtype=np.float64,
        )
    raise ParameterError(f"unknown beta schedule {name!r} (linear or cosine)")


def space_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """Evenly strided subset of ``steps`` original timesteps, first and last included."""
    if not 1 <= steps <= num_timesteps:
        raise ParameterError(f"steps must be in 1..{num_timesteps}, got {steps}")
    if steps == 1:
        return [0]
    stride = (num_timesteps - 1) / (steps - 1)
    return sorted({round(i * stride) for i in range(steps)})


@dataclass
class DiffusionConfig:
    """What a checkpoint records about its diffusion process."""

    schedule: str = "linear"
    num_timesteps: int = 1000
    learn_sigma: bool = True
    fixed_variance: str = "small"  # used when learn_sigma is False: "small" or "large"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DiffusionConfig:
        return cls(**d)


@dataclass
class StepOutput:
    mean: torch.Tensor
    log_variance: torch.Tensor
    pred_xstart: torch.Tensor


class GaussianDiffusion:
    """A (possibly respaced) diffusion chain. All coefficients are float64 numpy arrays."""

    def __init__(
        self,
        betas: np.ndarray,
        learn_sigma: bool = True,
        fixed_variance: str = "small",
        timestep_map: list[int] | None = None,
    ):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not np.all((betas > 0) & (betas <= 1)):
            raise ParameterError("betas must be a 1-D array in (0, 1]")
        if fixed_variance not in ("small", "large"):
            raise ParameterError(
                f"fixed_variance must be 'small' or 'large', got {fixed_variance!r}"
            )
        self.betas = betas
        self.num_timesteps = len(betas)
        self.learn_sigma = learn_sigma
        self.fixed_variance = fixed_variance
        self.timestep_map = list(range(len(betas))) if timestep_map is None else list(timestep_map)
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = (
            betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        # The posterior variance is 0 at t = 0: clip the log like improved-diffusion.
        post = self.posterior_variance
        self.posterior_log_variance_clipped = (
            np.log(np.append(post[1], post[1:])) if len(post) > 1 else np.log(betas)
        )
        self.posterior_mean_coef1 = (
            betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )

    @classmethod
    def from_config(cls, config: DiffusionConfig, steps: int | None = None) -> GaussianDiffusion:
        """The trained process, or a respaced one with ``steps`` levels."""
        base = beta_schedule(config.schedule, config.num_timesteps)
        if steps is None or steps == config.num_timesteps:
            return cls(base, config.learn_sigma, config.fixed_variance)
        use = space_timesteps(config.num_timesteps, steps)
        alphas_cumprod = np.cumprod(1.0 - base)
        last, betas = 1.0, []
        for t in use:
            betas.append(1.0 - alphas_cumprod[t] / last)
            last = alphas_cumprod[t]
        return cls(np.array(betas), config.learn_sigma, config.fixed_variance, timestep_map=use)

    @staticmethod
    def _at(values: np.ndarray, t: int | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Coefficient(s) at level ``t`` broadcastable to ``x`` (float32, on x's device)."""
        if isinstance(t, torch.Tensor):
            v = torch.as_tensor(values, device=x.device)[t.to(x.device)].float()
            return v.reshape(-1, *([1] * (x.ndim - 1)))
        return torch.tensor(float(values[t]), device=x.device)

    def q_sample(
        self, x0: torch.Tensor, t: int | torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """Sample ``x_t ~ q(x_t | x_0)``."""
        return (
            self._at(self.sqrt_alphas_cumprod, t, x0) * x0
            + self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def forward_step(self, x: torch.Tensor, t: int, noise: torch.Tensor) -> torch.Tensor:
        """One forward step from level ``t - 1`` to level ``t`` (RePaint's undo)."""
        beta = self.betas[t]
        return math.sqrt(1.0 - beta) * x + math.sqrt(beta) * noise

    def q_posterior_mean(
        self, x0: torch.Tensor, xt: torch.Tensor, t: int | torch.Tensor
    ) -> torch.Tensor:
        return (
            self._at(self.posterior_mean_coef1, t, xt) * x0
            + self._at(self.posterior_mean_coef2, t, xt) * xt
        )

    def model_timesteps(self, t: int, batch: int, device: torch.device) -> torch.Tensor:
        """Original-process timesteps the network sees for respaced level ``t``."""
        return torch.full((batch,), self.timestep_map[t], device=device, dtype=torch.long)

    def model_timesteps_from(self, t: torch.Tensor) -> torch.Tensor:
        """Original-process timesteps for a tensor of levels ``t``."""
        return torch.as_tensor(self.timestep_map, device=t.device)[t]

    def p_mean_variance(
        self, model: NoiseModel, x: torch.Tensor, t: int, clip_denoised: bool = True
    ) -> StepOutput:
        """Mean and log-variance of ``p(x_{t-1} | x_t)`` from the network at level ``t``."""
        out = model(x, self.model_timesteps(t, x.shape[0], x.device)).float()
        return self.p_mean_variance_from_output(out, x, t, clip_denoised)

    def p_mean_variance_from_output(
        self, out: torch.Tensor, x: torch.Tensor, t: int | torch.Tensor, clip_denoised: bool = True
    ) -> StepOutput:
        """``p(x_{t-1} | x_t)`` given the network output ``out`` (C or 2C channels)."""
        channels = x.shape[1]
        if out.shape[1] == 2 * channels:
            eps, v = out[:, :channels], out[:, channels:]
            frac = (v.clamp(-1, 1) + 1) / 2
            min_log = self._at(self.posterior_log_variance_clipped, t, x)
            max_log = self._at(np.log(self.betas), t, x)
            log_var = frac * max_log + (1 - frac) * min_log
        elif out.shape[1] == channels:
            eps = out
            if self.fixed_variance == "large":
                large = (
                    np.append(self.posterior_variance[1], self.betas[1:])
                    if self.num_timesteps > 1
                    else self.betas
                )
                log_var = self._at(np.log(large), t, x).expand_as(x)
            else:
                log_var = self._at(self.posterior_log_variance_clipped, t, x).expand_as(x)
        else:
            raise ParameterError(
                f"model returned {out.shape[1]} channels for a {channels}-channel "
                f"input; expected {channels} or {2 * channels}"
            )
        pred_x0 = (
            self._at(self.sqrt_recip_alphas_cumprod, t, x) * x
            - self._at(self.sqrt_recipm1_alphas_cumprod, t, x) * eps
        )
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1, 1)
        return StepOutput(self.q_posterior_mean(pred_x0, x, t), log_var, pred_x0)


def normal_kl(
    mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor
) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor
) -> torch.Tensor:
    """Log-likelihood (nats) of data in [-1, 1] quantised to 256 bins under a Gaussian."""
    centred = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centred + 1.0 / 255))
    cdf_min = _approx_std_normal_cdf(inv_std * (centred - 1.0 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(
        x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta)
    )


def training_losses(
    diffusion: GaussianDiffusion,
    model: NoiseModel,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    vlb_weight: float = 0.001,
) -> dict[str, torch.Tensor]:
    """Per-example losses of improved DDPM (``diffusion`` must be the unrespaced process).

    ``mse`` is L_simple (noise prediction). With learned variances, ``vb`` is the
    variational term L_t in bits per dimension, computed with the mean frozen (it trains
    only the variance), and ``loss = mse + vlb_weight * T * vb``: with uniform t,
    ``T * L_t`` estimates L_vlb, so this is the paper's L_simple + lambda L_vlb.
    """
    x_t = diffusion.q_sample(x0, t, noise)
    out = model(x_t, diffusion.model_timesteps_from(t)).float()
    channels = x0.shape[1]
    terms = {"mse": ((out[:, :channels] - noise) ** 2).mean(dim=(1, 2, 3))}
    if out.shape[1] == 2 * channels:
        frozen = torch.cat([out[:, :channels].detach(), out[:, channels:]], dim=1)
        step = diffusion.p_mean_variance_from_output(frozen, x_t, t)
        true_mean = diffusion.q_posterior_mean(x0, x_t, t)
        true_logvar = diffusion._at(diffusion.posterior_log_variance_clipped, t, x_t)
        kl = normal_kl(true_mean, true_logvar, step.mean, step.log_variance).mean(dim=(1, 2, 3))
        nll = -discretized_gaussian_log_likelihood(x0, step.mean, 0.5 * step.log_variance).mean(
            dim=(1, 2, 3)
        )
        terms["vb"] = torch.where(t == 0, nll, kl) / math.log(2.0)
        terms["loss"] = terms["mse"] + vlb_weight * diffusion.num_timesteps * terms["vb"]
    else:
        terms["loss"] = terms["mse"]
    return terms
