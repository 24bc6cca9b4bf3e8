"""Improved-DDPM-style UNet (Nichol & Dhariwal 2021), written for this project.

Sinusoidal timestep embedding, residual blocks with scale-shift conditioning,
multi-head self-attention at chosen resolutions, and an optional learned-sigma output
(2C channels: noise, then the variance interpolation value in [-1, 1]).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ParameterError


@dataclass
class UNetConfig:
    """Everything needed to rebuild the network; travels in the checkpoint."""

    image_size: int = 64
    in_channels: int = 1
    model_channels: int = 64
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])
    num_res_blocks: int = 2
    attention_resolutions: list[int] = field(default_factory=lambda: [16])  # feature-map sizes
    num_heads: int = 4
    dropout: float = 0.0
    learn_sigma: bool = True
    use_scale_shift_norm: bool = True

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        return cls(**d)

    def validate(self) -> None:
        levels = len(self.channel_mult)
        if self.image_size % (2 ** (levels - 1)):
            raise ParameterError(
                f"image_size {self.image_size} is not divisible by "
                f"2^{levels - 1} for {levels} resolution levels"
            )
        for c in self.channel_mult:
            if (self.model_channels * c) % _groups(self.model_channels * c):
                raise ParameterError("channel counts must be divisible by the GroupNorm groups")


def _groups(channels: int) -> int:
    return math.gcd(32, channels)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[N, dim]`` of (possibly fractional) timesteps ``[N]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class ResBlock(nn.Module):
    def __init__(
        self, channels: int, emb_dim: int, out_channels: int, dropout: float, scale_shift: bool
    ):
        super().__init__()
        self.scale_shift = scale_shift
        self.in_layers = nn.Sequential(
            nn.GroupNorm(_groups(channels), channels),
            nn.SiLU(),
            nn.Conv2d(channels, out_channels, 3, padding=1),
        )
        self.emb = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_dim, out_channels * (2 if scale_shift else 1))
        )
        self.out_norm = nn.GroupNorm(_groups(out_channels), out_channels)
        self.out_layers = nn.Sequential(
            nn.SiLU(), nn.Dropout(dropout), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        )
        nn.init.zeros_(self.out_layers[-1].weight)
        nn.init.zeros_(self.out_layers[-1].bias)
        self.skip = (
            nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        e = self.emb(emb)[..., None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_norm(h) * (1 + scale) + shift
        else:
            h = self.out_norm(h + e)
        return self.skip(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        if channels % num_heads:
            raise ParameterError(f"{channels} channels cannot be split into {num_heads} heads")
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj = nn.Conv1d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x).reshape(b, c, h * w))
        q, k, v = (
            qkv.reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
            .transpose(-1, -2)
            .unbind(1)
        )
        a = F.scaled_dot_product_attention(q, k, v)  # [b, heads, hw, c/heads]
        a = a.transpose(-1, -2).reshape(b, c, h * w)
        return x + self.proj(a).reshape(b, c, h, w)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Stage(nn.ModuleList):
    """Sequence of blocks that all take ``(x, emb)``."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb)
        return x


class UNet(nn.Module):
    """Noise-prediction network: ``forward(x [N,C,H,W], t [N]) -> [N, C or 2C, H, W]``."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        config.validate()
        self.config = config
        ch = config.model_channels
        emb_dim = 4 * ch
        self.time_embed = nn.Sequential(
            nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.input_conv = nn.Conv2d(config.in_channels, ch, 3, padding=1)

        def block(c_in: int, c_out: int, res: int) -> _Stage:
            layers = [ResBlock(c_in, emb_dim, c_out, config.dropout, config.use_scale_shift_norm)]
            if res in config.attention_resolutions:
                layers.append(AttentionBlock(c_out, config.num_heads))
            return _Stage(layers)

        self.down = nn.ModuleList()
        skips = [ch]
        res, cur = config.image_size, ch
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                self.down.append(block(cur, ch * mult, res))
                cur = ch * mult
                skips.append(cur)
            if level != len(config.channel_mult) - 1:
                self.down.append(_Stage([Downsample(cur)]))
                skips.append(cur)
                res //= 2
        self.middle = _Stage(
            [
                ResBlock(cur, emb_dim, cur, config.dropout, config.use_scale_shift_norm),
                AttentionBlock(cur, config.num_heads),
                ResBlock(cur, emb_dim, cur, config.dropout, config.use_scale_shift_norm),
            ]
        )
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for i in range(config.num_res_blocks + 1):
                stage = block(cur + skips.pop(), ch * mult, res)
                cur = ch * mult
                if level and i == config.num_res_blocks:
                    stage.append(Upsample(cur))
                    res *= 2
                self.up.append(stage)
        self.out = nn.Sequential(
            nn.GroupNorm(_groups(cur), cur),
            nn.SiLU(),
            nn.Conv2d(cur, config.out_channels, 3, padding=1),
        )
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels))
        h = self.input_conv(x)
        hs = [h]
        for stage in self.down:
            h = stage(h, emb)
            hs.append(h)
        h = self.middle(h, emb)
        for stage in self.up:
            h = stage(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)


#: Named sizes for ``gdpi init-model`` and training; grid = (pixels, mm per pixel).
MODEL_SIZES: dict[str, dict] = {
    # for tests only: trains in seconds on a CPU
    "micro": dict(
        image_size=32,
        model_channels=16,
        channel_mult=[1, 2],
        num_res_blocks=1,
        attention_resolutions=[8],
        num_heads=2,
    ),
    "tiny": dict(
        image_size=64,
        model_channels=32,
        channel_mult=[1, 2, 2],
        num_res_blocks=1,
        attention_resolutions=[16],
        num_heads=2,
    ),
    # 64 px like tiny, twice the width and two blocks per level: ~4x tiny's compute
    "medium": dict(
        image_size=64,
        model_channels=64,
        channel_mult=[1, 2, 2],
        num_res_blocks=2,
        attention_resolutions=[16],
        num_heads=4,
    ),
    "small": dict(
        image_size=128,
        model_channels=64,
        channel_mult=[1, 2, 3, 4],
        num_res_blocks=2,
        attention_resolutions=[16],
        num_heads=4,
    ),
    "base": dict(
        image_size=256,
        model_channels=128,
        channel_mult=[1, 1, 2, 3, 4],
        num_res_blocks=2,
        attention_resolutions=[32, 16, 8],
        num_heads=4,
    ),
}
