"""The denoising network: a UNet in the style of DDPM (Ho et al. 2020) and improved DDPM (Nichol & Dhariwal 2021):
residual blocks with group norm and a scale-and-shift from the time and class embedding, self-attention at the low
resolutions only (its cost grows with the square of the pixels), sinusoidal time embedding, and a class embedding
with one extra row, the null class, for classifier-free guidance (Ho & Salimans 2022).

forward(x_t [B, C, H, W], t [B] in [0, 1], y [B] int64 in 0..num_classes) -> the parametrisation's target
[B, C, H, W]; y == num_classes is the unconditional (null) class.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# name -> (base channels, channel multiplier per level, residual blocks per level, levels with attention, patch).
# `patch` p folds p x p pixels into channels before the first convolution and unfolds them after the last
# (pixel unshuffle, as "simple diffusion", Hoogeboom et al. 2023, does for large images): level i then works at
# resolution H / (p 2^i). On 2 CPU cores the full-resolution level costs most of a small UNet's time.
SIZES = {
    "xs": (48, (1, 2), 1, (1,), 2),
    "s": (64, (1, 2, 2), 2, (2,), 1),
    "m": (96, (1, 2, 2, 2), 2, (2, 3), 1),
}


def group_count(channels: int) -> int:
    """Up to 32 groups of at least 4 channels, a divisor of `channels` (a skip concatenation may be odd-sized)."""
    groups = min(32, max(1, channels // 4))
    while channels % groups:
        groups -= 1
    return groups


def timestep_embedding(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """Sinusoidal features of t * scale (Vaswani et al. 2017, as DDPM uses them), [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * scale)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(group_count(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)  # scale and shift of the second norm (FiLM)
        self.norm2 = nn.GroupNorm(group_count(c_out), c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity: a deep net trains from step 0
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # [B, C, 1, 1] each
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    def __init__(self, channels: int, head_dim: int = 32):
        super().__init__()
        self.heads = max(1, channels // head_dim)
        self.norm = nn.GroupNorm(group_count(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W)  # [B, 3, h, d, HW]
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # [B, h, HW, d] each
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj(out)


class UNet(nn.Module):
    def __init__(self, channels: int, num_classes: int, size: str = "xs", dropout: float = 0.0):
        super().__init__()
        base, mults, blocks, attention_levels, patch = SIZES[size]
        self.patch = patch
        self.num_classes = num_classes
        self.base = base
        emb_dim = 4 * base
        self.time_mlp = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim)  # the last row: the null class
        self.stem = nn.Sequential(nn.PixelUnshuffle(patch), nn.Conv2d(channels * patch * patch, base, 3, padding=1))

        self.down = nn.ModuleList()
        skips, c = [base], base
        for level, mult in enumerate(mults):
            for _ in range(blocks):
                layers = [ResBlock(c, base * mult, emb_dim, dropout)]
                c = base * mult
                if level in attention_levels:
                    layers.append(Attention(c))
                self.down.append(nn.ModuleList(layers))
                skips.append(c)
            if level < len(mults) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(c, c, 3, stride=2, padding=1)]))
                skips.append(c)
        self.mid = nn.ModuleList([ResBlock(c, c, emb_dim, dropout), Attention(c), ResBlock(c, c, emb_dim, dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(mults))):
            for _ in range(blocks + 1):
                layers = [ResBlock(c + skips.pop(), base * mult, emb_dim, dropout)]
                c = base * mult
                if level in attention_levels:
                    layers.append(Attention(c))
                self.up.append(nn.ModuleList(layers))
            if level > 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2, mode="nearest"),
                                              nn.Conv2d(c, c, 3, padding=1)]))
        self.out_norm = nn.GroupNorm(group_count(c), c)
        self.out = nn.Sequential(nn.Conv2d(c, channels * patch * patch, 3, padding=1), nn.PixelShuffle(patch))
        nn.init.zeros_(self.out[0].weight)
        nn.init.zeros_(self.out[0].bias)

    @staticmethod
    def _run(layers: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in layers:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.base)) + self.class_emb(y)  # [B, 4 base]
        h = self.stem(x)
        hs = [h]
        for layers in self.down:
            h = self._run(layers, h, emb)
            hs.append(h)
        h = self._run(self.mid, h, emb)
        for layers in self.up:
            if isinstance(layers[0], ResBlock):
                h = torch.cat([h, hs.pop()], dim=1)
            h = self._run(layers, h, emb)
        return self.out(F.silu(self.out_norm(h))).float()
