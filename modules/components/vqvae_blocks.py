"""The VQVAE's convolutional encoder and decoder (the official layout: LDM "vq-f16" with conv
resampling, so official checkpoints load by their key names). ``cfg`` is a ``VQVAEConfig``
(modules/components/vqvae.py); every width must be a multiple of ``norm_groups``.
"""
from __future__ import annotations

from typing import Any, List

import torch
import torch.nn as nn
import torch.nn.functional as F


# ------------------------------------------------------------------------------------------------
# Conv encoder / decoder (official layout: LDM "vq-f16" with conv resampling)
# ------------------------------------------------------------------------------------------------
def _norm(channels: int, groups: int) -> nn.GroupNorm:
    if channels % groups:
        raise ValueError(
            f"VQVAE width {channels} is not a multiple of norm_groups={groups}: GroupNorm needs "
            f"channels divisible by groups. Use ch/ch_mult giving multiples of {groups}, or set "
            f"VQVAEConfig.norm_groups to a divisor of every width (ch * m for m in ch_mult)."
        )
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = _norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.norm2 = _norm(c_out, groups)
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        # official: a 1x1 shortcut only when the width changes (no key otherwise)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1, 1, 0) if c_in != c_out else nn.Identity()

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            # inference (decoding a sample): SiLU and the residual add in place, as the official
            # blocks' silu(inplace=True); bit-identical, two fewer full-size tensors per block (at
            # 256 px, B 4, ch 32 each is 32 MiB, above glibc's mmap threshold: page-faulted in
            # afresh). Measured decode of the ch-32 VQVAE, 256 px, B 4, 1 thread, AMX Xeon: 1.20 s
            # vs 1.41 s NCHW, 0.89 s vs 1.02 s channels-last (best of 8, alternating)
            h = self.conv1(F.silu(self.norm1(x_BCHW), inplace=True))
            h = self.conv2(self.dropout(F.silu(self.norm2(h), inplace=True)))
            return h.add_(self.nin_shortcut(x_BCHW))
        h = self.conv1(F.silu(self.norm1(x_BCHW)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x_BCHW) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention; the fused SDPA kernel instead of two bmm + softmax."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = _norm(c, groups)
        self.qkv = nn.Conv2d(c, 3 * c, 1, 1, 0)
        self.proj_out = nn.Conv2d(c, c, 1, 1, 0)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x_BCHW.shape
        qkv = self.qkv(self.norm(x_BCHW)).view(B, 3, C, H * W).transpose(2, 3)  # B,3,HW,C
        q, k, v = qkv.unbind(1)
        h_BNC = F.scaled_dot_product_attention(q, k, v)  # scale C**-0.5, as the official w_ratio
        return x_BCHW + self.proj_out(h_BNC.transpose(1, 2).reshape(B, C, H, W))


class Downsample2x(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad: the official (LDM) convention


class Upsample2x(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Level(nn.Module):
    """One resolution level; a plain container so the keys read `down.{i}.block.{j}...`."""


class Encoder(nn.Module):
    def __init__(self, cfg: Any):
        super().__init__()
        g, ch, mult = cfg.norm_groups, cfg.ch, list(cfg.ch_mult)
        n_lvl = len(mult)
        self.conv_in = nn.Conv2d(3, ch, 3, 1, 1)
        in_mult = [1] + mult
        self.down = nn.ModuleList()
        c_in = ch
        for i in range(n_lvl):
            lvl = _Level()
            lvl.block, lvl.attn = nn.ModuleList(), nn.ModuleList()
            c_in, c_out = ch * in_mult[i], ch * mult[i]
            for _ in range(cfg.num_res_blocks):
                lvl.block.append(ResnetBlock(c_in, c_out, cfg.dropout, g))
                c_in = c_out
                if i == n_lvl - 1 and cfg.using_sa:
                    lvl.attn.append(AttnBlock(c_in, g))
            if i != n_lvl - 1:
                lvl.downsample = Downsample2x(c_in)
            self.down.append(lvl)
        self.mid = _Level()
        self.mid.block_1 = ResnetBlock(c_in, c_in, cfg.dropout, g)
        self.mid.attn_1 = AttnBlock(c_in, g) if cfg.using_mid_sa else nn.Identity()
        self.mid.block_2 = ResnetBlock(c_in, c_in, cfg.dropout, g)
        self.norm_out = _norm(c_in, g)
        self.conv_out = nn.Conv2d(c_in, cfg.z_channels, 3, 1, 1)

    def forward(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(img_B3HW)
        for lvl in self.down:
            for j, blk in enumerate(lvl.block):
                h = blk(h)
                if len(lvl.attn):
                    h = lvl.attn[j](h)
            if hasattr(lvl, "downsample"):
                h = lvl.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: Any):
        super().__init__()
        g, ch, mult = cfg.norm_groups, cfg.ch, list(cfg.ch_mult)
        n_lvl = len(mult)
        c_in = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c_in, 3, 1, 1)
        self.mid = _Level()
        self.mid.block_1 = ResnetBlock(c_in, c_in, cfg.dropout, g)
        self.mid.attn_1 = AttnBlock(c_in, g) if cfg.using_mid_sa else nn.Identity()
        self.mid.block_2 = ResnetBlock(c_in, c_in, cfg.dropout, g)
        levels: List[_Level] = []
        for i in reversed(range(n_lvl)):
            lvl = _Level()
            lvl.block, lvl.attn = nn.ModuleList(), nn.ModuleList()
            c_out = ch * mult[i]
            for _ in range(cfg.num_res_blocks + 1):
                lvl.block.append(ResnetBlock(c_in, c_out, cfg.dropout, g))
                c_in = c_out
                if i == n_lvl - 1 and cfg.using_sa:
                    lvl.attn.append(AttnBlock(c_in, g))
            if i != 0:
                lvl.upsample = Upsample2x(c_in)
            levels.insert(0, lvl)  # up.0 is the highest resolution, as in the official keys
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(c_in, g)
        self.conv_out = nn.Conv2d(c_in, 3, 3, 1, 1)

    def forward(self, z_BChw: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z_BChw))))
        for lvl in reversed(self.up):
            for j, blk in enumerate(lvl.block):
                h = blk(h)
                if len(lvl.attn):
                    h = lvl.attn[j](h)
            if hasattr(lvl, "upsample"):
                h = lvl.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=not torch.is_grad_enabled()))


# ------------------------------------------------------------------------------------------------
# Residual quantizer
# ------------------------------------------------------------------------------------------------
