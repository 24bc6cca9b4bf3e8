"""The paper's competing methods: AE, VAE and DAE as defined in the MedIAnomaly benchmark.

Written from the benchmark's published description (Cai et al., "MedIAnomaly"), not
copied from its code:

- ``ae``: 64 x 64 input; encoder of four 4x4 stride-2 convolutions (16, 32, 64, 64
  channels) with batch norm and ReLU; a bottleneck ``Linear(64*4*4 -> 2048) + BN + ReLU
  + Linear(2048 -> 16)`` and its mirror; decoder of four 4x4 stride-2 transposed
  convolutions (the last without BN/ReLU). Loss: mean squared error.
- ``vae``: the same with a Gaussian latent (mean and log-variance heads); loss
  ``MSE + 0.005 KL``; scored from the mean latent (deterministic).
- ``dae``: a UNet denoiser (Kascenas et al.) trained to remove coarse noise: Gaussian
  noise of std 0.2 (in units of the [0, 1] intensity range) drawn at 16 x 16, upsampled
  bilinearly to the input size, randomly rolled, added to the image; loss MSE to the
  clean image.

All three see slices in model units ([-1, 1], the checkpoint's HU window) and are
scored by the squared reconstruction error, in model units squared.
Checkpoints are safetensors files with ``format`` = ``gdpi-baseline``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from GDPILiverAnomalyLib.errors import CheckpointError
from GDPILiverAnomalyLib.files.checkpoint import Intensity, save_weights
from GDPILiverAnomalyLib.method.grid import InputGrid
from safetensors.torch import load_file
from torch import nn

FORMAT = "gdpi-baseline"
KINDS = ("ae", "vae", "dae")


@dataclass
class BaselineConfig:
    kind: str  # ae, vae or dae
    image_size: int = 64
    base_width: int = 16  # AE/VAE: first encoder width; DAE: first UNet width (x2 below)
    latent: int = 16  # AE/VAE latent size
    hidden: int = 2048  # AE/VAE bottleneck width
    kl_weight: float = 0.005  # VAE
    noise_std: float = 0.2  # DAE: coarse noise std, in units of the [0, 1] intensity range
    noise_res: int = 16  # DAE: coarse noise resolution (pixels per side)

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise CheckpointError(f"unknown baseline {self.kind!r} ({', '.join(KINDS)})")
        if self.image_size % 16:
            raise CheckpointError(
                f"baseline input size must be a multiple of 16, not {self.image_size}"
            )


def _down(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


def _up(cin: int, cout: int, last: bool = False) -> nn.Sequential:
    if last:
        return nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, 2, 1))
    return nn.Sequential(
        nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class AutoEncoder(nn.Module):
    """MedIAnomaly-style AE (``variational=False``) or VAE (``True``)."""

    def __init__(self, config: BaselineConfig):
        super().__init__()
        self.config = config
        w = config.base_width
        widths = [w, 2 * w, 4 * w, 4 * w]
        self.encoder = nn.Sequential(
            *(_down(a, b) for a, b in zip([1, *widths[:-1]], widths, strict=True))
        )
        self.side = config.image_size // 16
        flat = widths[-1] * self.side * self.side
        out = 2 * config.latent if config.kind == "vae" else config.latent
        self.to_latent = nn.Sequential(
            nn.Linear(flat, config.hidden), nn.BatchNorm1d(config.hidden), nn.ReLU(),
            nn.Linear(config.hidden, out),
        )  # fmt: skip
        self.from_latent = nn.Sequential(
            nn.Linear(config.latent, config.hidden), nn.BatchNorm1d(config.hidden), nn.ReLU(),
            nn.Linear(config.hidden, flat), nn.BatchNorm1d(flat), nn.ReLU(),
        )  # fmt: skip
        rev = widths[::-1]
        self.decoder = nn.Sequential(
            *(_up(a, b) for a, b in zip(rev[:-1], rev[1:], strict=True)), _up(rev[-1], 1, last=True)
        )
        self.widths = widths

    def forward(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``(reconstruction, mu, logvar)``; mu/logvar are None for the AE."""
        z = self.to_latent(self.encoder(x).flatten(1))
        mu = logvar = None
        if self.config.kind == "vae":
            mu, logvar = z.chunk(2, dim=1)
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        h = self.from_latent(z).view(-1, self.widths[-1], self.side, self.side)
        return self.decoder(h), mu, logvar


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.1),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.1),
    )  # fmt: skip


class DenoisingUNet(nn.Module):
    """A four-level UNet (widths 2w, 4w, 8w, 16w; w = ``base_width``) predicting the clean image."""

    def __init__(self, config: BaselineConfig):
        super().__init__()
        self.config = config
        w = 2 * config.base_width
        widths = [w, 2 * w, 4 * w, 8 * w]
        self.downs = nn.ModuleList()
        cin = 1
        for width in widths:
            self.downs.append(_double_conv(cin, width))
            cin = width
        self.middle = _double_conv(widths[-1], 2 * widths[-1])
        self.ups = nn.ModuleList()
        self.merges = nn.ModuleList()
        cin = 2 * widths[-1]
        for width in reversed(widths):
            self.ups.append(nn.ConvTranspose2d(cin, width, 2, 2))
            self.merges.append(_double_conv(2 * width, width))
            cin = width
        self.out = nn.Conv2d(widths[0], 1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        skips = []
        for down in self.downs:
            x = down(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.middle(x)
        for up, merge, skip in zip(self.ups, self.merges, reversed(skips), strict=True):
            x = merge(torch.cat([up(x), skip], dim=1))
        return self.out(x), None, None


def build_model(config: BaselineConfig) -> nn.Module:
    config.validate()
    return DenoisingUNet(config) if config.kind == "dae" else AutoEncoder(config)


def coarse_noise(
    shape: tuple[int, ...], config: BaselineConfig, generator: torch.Generator
) -> torch.Tensor:
    """The DAE's training noise for a batch ``[B, 1, n, n]``, in model units ([-1, 1])."""
    b, c, h, w = shape
    low = torch.randn((b, c, config.noise_res, config.noise_res), generator=generator)
    noise = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    shifts = torch.randint(0, h, (b, 2), generator=generator)
    noise = torch.stack(
        [
            torch.roll(n, (int(s[0]), int(s[1])), dims=(-2, -1))
            for n, s in zip(noise, shifts, strict=True)
        ]
    )
    return noise * config.noise_std * 2.0  # [0, 1] range units -> [-1, 1] model units


def training_loss(
    model: nn.Module, x: torch.Tensor, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Loss terms of one batch of clean slices ``x`` (model units)."""
    config = model.config
    if config.kind == "dae":
        noisy = x + coarse_noise(tuple(x.shape), config, generator).to(x.device)
        recon, _, _ = model(noisy)
        mse = F.mse_loss(recon, x)
        return {"loss": mse, "mse": mse}
    recon, mu, logvar = model(x)
    mse = F.mse_loss(recon, x)
    if config.kind == "vae":
        kl = -0.5 * torch.mean(torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1))
        return {"loss": mse + config.kl_weight * kl, "mse": mse, "kl": kl}
    return {"loss": mse, "mse": mse}


@torch.no_grad()
def reconstruct(model: nn.Module, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Reconstructions of ``x`` ``[N, 1, n, n]`` (model units), in eval mode."""
    model.eval()
    outs = [model(x[i : i + batch_size])[0] for i in range(0, len(x), batch_size)]
    return torch.cat(outs) if outs else x.clone()


@dataclass
class Baseline:
    model: nn.Module
    config: BaselineConfig
    intensity: Intensity
    grid: InputGrid
    training: dict
    path: Path | None = None


def save_baseline(b: Baseline, path: str | Path) -> Path:
    """Write atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "config": asdict(b.config),
        "intensity": {"hu_min": b.intensity.hu_min, "hu_max": b.intensity.hu_max},
        "input_grid": b.grid.to_dict(),
        "training": b.training,
    }
    return save_weights(b.model, {"format": FORMAT, "meta": json.dumps(meta)}, path)


def load_baseline(path: str | Path) -> Baseline:
    from GDPILiverAnomalyLib.files.checkpoint import read_header

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"baseline checkpoint not found: {path}")
    header = read_header(path)
    if header.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a baseline checkpoint (format {header.get('format')!r})"
        )
    meta = json.loads(header["meta"])
    config = BaselineConfig(**meta["config"])
    model = build_model(config)
    try:
        model.load_state_dict(load_file(str(path)))
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match the stored config ({exc})") from None
    return Baseline(
        model.eval(),
        config,
        Intensity(**meta["intensity"]),
        InputGrid.from_dict(meta["input_grid"]),
        meta.get("training", {}),
        path,
    )
