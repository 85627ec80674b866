"""The conditional U-Net of RainDiffusion.

One class serves twice: as a scale noise estimator of the DTB (input = concat(x_t, cond) on
channels, with a timestep) and as an NTB generator (input = an image, no timestep).

Blocks follow DDPM: sinusoidal time embedding -> MLP, ResBlocks with GroupNorm + SiLU and
the time embedding added between the two convolutions, self-attention only at the levels
listed in ``attention_levels`` (by default the lowest resolution). ``forward`` has no
data-dependent Python branches so it traces to ONNX with dynamic H and W.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["UNet", "UNetConfig", "timestep_embedding"]


@dataclass
class UNetConfig:
    in_channels: int = 6
    out_channels: int = 3
    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 1
    #: level indices (0 = full resolution) that get self-attention; -1 means the lowest level.
    attention_levels: tuple[int, ...] = (-1,)
    groups: int = 8
    dropout: float = 0.0
    time_embedding: bool = True
    #: NTB generators predict a residual added to their input (out = x + f(x)).
    residual: bool = False

    def __post_init__(self) -> None:
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        self.attention_levels = tuple(int(a) for a in self.attention_levels)
        if not self.channel_mult:
            raise ValueError("channel_mult must name at least one level")
        n = len(self.channel_mult)
        for a in self.attention_levels:
            if not -n <= a < n:
                raise ValueError(f"attention level {a} is outside the {n} levels of channel_mult")
        for m in self.channel_mult:
            if (self.base_channels * m) % self.groups:
                raise ValueError(
                    f"channels {self.base_channels * m} are not divisible by GroupNorm groups {self.groups}"
                )

    @property
    def num_levels(self) -> int:
        return len(self.channel_mult)

    @property
    def size_multiple(self) -> int:
        """H and W must be multiples of this (one 2x downsample between levels)."""
        return 2 ** (self.num_levels - 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["attention_levels"] = list(self.attention_levels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        return cls(**d)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (float) timesteps t [N] -> [N, dim] (Transformer / DDPM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    def __init__(self, *, in_ch: int, out_ch: int, emb_ch: int | None, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_ch, out_ch) if emb_ch else None
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.emb is not None:
            h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Single-head spatial self-attention (used at the lowest resolution only)."""

    def __init__(self, ch: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(n, 3, c, h * w).unbind(1)
        attn = torch.softmax(torch.einsum("ncq,nck->nqk", q, k) * (c**-0.5), dim=-1)
        out = torch.einsum("nqk,nck->ncq", attn, v).reshape(n, c, h, w)
        return x + self.proj(out)


class Level(nn.Module):
    def __init__(self, blocks: list[ResBlock], attn: nn.Module | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attn = attn if attn is not None else nn.Identity()


class UNet(nn.Module):
    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = cfg = config
        ch0 = cfg.base_channels
        emb_ch = 4 * ch0 if cfg.time_embedding else None
        self.time_mlp = (
            nn.Sequential(nn.Linear(ch0, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch)) if emb_ch else None
        )
        n = cfg.num_levels
        attn_levels = {a % n for a in cfg.attention_levels}
        chans = [ch0 * m for m in cfg.channel_mult]
        self.stem = nn.Conv2d(cfg.in_channels, ch0, 3, padding=1)

        def block(i: int, o: int) -> ResBlock:
            return ResBlock(in_ch=i, out_ch=o, emb_ch=emb_ch, groups=cfg.groups, dropout=cfg.dropout)

        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        prev = ch0
        for lvl, ch in enumerate(chans):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(block(prev, ch))
                prev = ch
            attn = SelfAttention(ch, cfg.groups) if lvl in attn_levels else None
            self.down.append(Level(blocks, attn))
            if lvl < n - 1:
                self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        self.mid = Level([block(prev, prev), block(prev, prev)], SelfAttention(prev, cfg.groups)
                         if (n - 1) in attn_levels else None)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for lvl in reversed(range(n)):
            ch = chans[lvl]
            blocks = [block(prev + ch, ch)]
            for _ in range(cfg.num_res_blocks - 1):
                blocks.append(block(ch, ch))
            prev = ch
            attn = SelfAttention(ch, cfg.groups) if lvl in attn_levels else None
            self.up.append(Level(blocks, attn))
            if lvl > 0:
                self.upsample.append(nn.Conv2d(ch, chans[lvl - 1], 3, padding=1))
                prev = chans[lvl - 1]
        self.out_norm = nn.GroupNorm(cfg.groups, prev)
        self.out_conv = nn.Conv2d(prev, cfg.out_channels, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        emb = None
        if self.time_mlp is not None:
            emb = self.time_mlp(timestep_embedding(t, self.config.base_channels))
        h = self.stem(x)
        skips = []
        for lvl, level in enumerate(self.down):
            for blk in level.blocks:
                h = blk(h, emb)
            h = level.attn(h)
            skips.append(h)
            if lvl < len(self.downsample):
                h = self.downsample[lvl](h)
        for blk in self.mid.blocks:
            h = blk(h, emb)
        h = self.mid.attn(h)
        for i, level in enumerate(self.up):
            h = torch.cat([h, skips.pop()], dim=1)
            for blk in level.blocks:
                h = blk(h, emb)
            h = level.attn(h)
            if i < len(self.upsample):
                h = F.interpolate(h, scale_factor=2.0, mode="nearest")
                h = self.upsample[i](h)
        out = self.out_conv(F.silu(self.out_norm(h)))
        if self.config.residual:
            out = x[:, : self.config.out_channels] + out
        return out
