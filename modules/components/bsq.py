"""Visual tokenizer family: Infinity's binary spherical quantization (BSQ) VAE (VARGPT-v1.1).

An image x (B, 3, H, W) in [-1, 1] is encoded to one latent map f (B, d, h, w) (h = H / 16,
d = bits per token, 32 in the release) and quantized over a schedule of K growing scales
(h_k, w_k). Scale k codes what the earlier scales left unexplained, one bit per channel:

    rest_k = f - sum_{j<k} up(c_j);   c_k = sign(area_down(rest_k, h_k, w_k)) / sqrt(d)

where ``up`` is (tri)linear up-sampling to (h, w). The bits of scale k are (c_k > 0), a
(B, h_k*w_k, d) tensor row-major over (h_k, w_k); decoding sums the up-sampled codes and runs the
conv decoder. The sign of a vector does not change under l2-normalization, so the released
"l2-normalize then sign" gives the same bits and codes +-1/sqrt(d).

Module and parameter names follow the released ``vae_local.*`` keys (``conv.conv``, ``norm.norm``:
each conv / GroupNorm sits inside a wrapper), so a released directory loads by key name. Every
size is derived from tensor shapes by ``BSQConfig.from_state_dict`` (the release hard-codes them
in code, not in config.json). Everything runs in fp32: bits are discrete and bf16 flips signs
near zero.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from modules.components.registry import ComponentConfig
from modules.components.vqvae import TOKENIZERS

Schedule = Sequence[Tuple[int, int]]


@dataclass
class BSQLossConfig:
    """Training losses of the BSQ tokenizer (the world base ``base_bsq``; unused at inference).
    Reconstruction L1 + MSE on [-1, 1] pixels, a commitment term ||f - sg(f_hat)||^2 and the
    release's soft entropy penalty per scale: per-bit p = sigmoid(4 u / sqrt(d) * inv_temperature)
    of the l2-normalized residual u; per-sample entropy (pushed down) minus the batch-mean bit
    entropy (pushed up, so every bit is used)."""

    l1_weight: float = 1.0
    mse_weight: float = 1.0
    commit_weight: float = 0.25
    entropy_weight: float = 0.1  # the release's entropy_loss_weight
    inv_temperature: float = 100.0
    codebook_entropy_weight: float = 1.0  # the release's gamma (per-sample: gamma0 = 1)


@dataclass
class BSQConfig(ComponentConfig):
    """Sizes of the BSQ VAE. Defaults are the release (``infinity_vae_d32reg``, 16x down)."""

    family: ClassVar[str] = "tokenizer"
    name: str = "bsq"
    codebook_dim: int = 32  # d: bits per token = latent channels
    base_ch: int = 128
    ch_mult: List[int] = field(default_factory=lambda: [1, 2, 4, 4, 4])  # down = 2**(len-1)
    num_res_blocks: int = 2  # per encoder level (the decoder uses one more)
    # the generation schedule: (h, w) per scale, last = latent size
    scales: List[List[int]] = field(default_factory=lambda: [[s, s] for s in (1, 2, 4, 6, 8, 12, 16, 20, 24, 32)])
    loss: BSQLossConfig = field(default_factory=BSQLossConfig)  # training only (base_bsq)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def tokens_per_image(self) -> int:
        return sum(h * w for h, w in self.scales)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], prefix: str = "", **over) -> "BSQConfig":
        """Sizes read from tensor shapes of a BSQ state dict (keys under ``prefix``)."""
        def shape(k: str) -> Tuple[int, ...]:
            if prefix + k not in sd:
                raise KeyError(f"BSQ state dict lacks {prefix + k!r}: not a BSQ VAE (expected keys "
                               f"{prefix}encoder.*, {prefix}decoder.*)")
            return tuple(sd[prefix + k].shape)

        base = shape("encoder.conv_in.conv.weight")[0]
        d = shape("encoder.conv_out.conv.weight")[0]
        levels = sorted({int(k[len(prefix):].split(".")[2]) for k in sd if k.startswith(prefix + "encoder.down.")})
        mult = [shape(f"encoder.down.{i}.block.0.conv1.conv.weight")[0] // base for i in levels]
        nrb = len({k[len(prefix):].split(".")[4] for k in sd if k.startswith(prefix + "encoder.down.0.block.")})
        return cls(codebook_dim=d, base_ch=base, ch_mult=mult, num_res_blocks=nrb, **over)


class Conv(nn.Module):
    """A Conv2d under the released wrapper name (``*.conv.weight``)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Norm(nn.Module):
    """GroupNorm with the release's group rule: 32 groups when the width allows, else 24."""

    def __init__(self, ch: int):
        super().__init__()
        if ch % 32 == 0:
            groups = 32
        elif ch % 24 == 0:
            groups = 24
        else:
            raise ValueError(f"BSQ width {ch} is not a multiple of 32 or 24 (GroupNorm groups)")
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = Norm(cin), Conv(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = Norm(cout), Conv(cout, cout, 3, padding=1)
        self.nin_shortcut = Conv(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = Conv(ch, ch, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad: H -> H/2 exactly


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = Conv(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.block_1, self.block_2 = ResBlock(ch, ch), ResBlock(ch, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.block_1(x))


class BSQEncoder(nn.Module):
    def __init__(self, cfg: BSQConfig):
        super().__init__()
        ch, mult = cfg.base_ch, cfg.ch_mult
        self.conv_in = Conv(3, ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = ch
        for i, m in enumerate(mult):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResBlock(cin, ch * m))
                cin = ch * m
            if i != len(mult) - 1:
                level.downsample = Downsample(cin)
            self.down.append(level)
        self.mid = _Mid(cin)
        self.norm_out = Norm(cin)
        self.conv_out = Conv(cin, cfg.codebook_dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for blk in level.block:
                h = blk(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class BSQDecoder(nn.Module):
    def __init__(self, cfg: BSQConfig):
        super().__init__()
        ch, mult = cfg.base_ch, cfg.ch_mult
        cin = ch * mult[-1]
        self.conv_in = Conv(cfg.codebook_dim, cin, 3, padding=1)
        self.mid = _Mid(cin)
        ups: List[nn.Module] = []
        for i in reversed(range(len(mult))):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResBlock(cin, ch * mult[i]))
                cin = ch * mult[i]
            if i != 0:
                level.upsample = Upsample(cin)
            ups.insert(0, level)
        self.up = nn.ModuleList(ups)  # up[0] is the finest level, as the released keys
        self.norm_out = Norm(cin)
        self.conv_out = Conv(cin, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for blk in level.block:
                h = blk(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class _LFQ(nn.Module):
    """Holds the released ``quantizer.lfq.mask`` buffer (bit weights 2**(d-1..0), int64)."""

    def __init__(self, d: int):
        super().__init__()
        self.register_buffer("mask", 2 ** torch.arange(d - 1, -1, -1, dtype=torch.long))


class _Quantizer(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.lfq = _LFQ(d)


class BSQTokenizer(nn.Module):
    """Encode images to bits per scale and decode bits back to images (see the module doc)."""

    def __init__(self, cfg: BSQConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = BSQEncoder(cfg)
        self.decoder = BSQDecoder(cfg)
        self.quantizer = _Quantizer(cfg.codebook_dim)

    @property
    def d(self) -> int:
        return self.cfg.codebook_dim

    def schedule(self, scales: Optional[Schedule] = None) -> List[Tuple[int, int]]:
        return [(int(h), int(w)) for h, w in (scales if scales is not None else self.cfg.scales)]

    def _up(self, c: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        # the release up-samples 5-D (B, d, 1, h, w) codes trilinearly; with T = 1 that is
        # bilinear over (h, w) (align_corners False), computed the same way here.
        if tuple(c.shape[-2:]) == tuple(hw):
            return c
        return F.interpolate(c.unsqueeze(2), size=(1, *hw), mode="trilinear").squeeze(2)

    def codes_from_bits(self, bits_BLd: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        """bits (B, h*w, d) in {0,1} -> codes c (B, d, h, w) = +-1/sqrt(d)."""
        B = bits_BLd.shape[0]
        c = (bits_BLd.float() * 2 - 1) / math.sqrt(self.d)
        return c.view(B, hw[0], hw[1], self.d).permute(0, 3, 1, 2)

    @torch.no_grad()
    def encode(self, x_B3HW: torch.Tensor, scales: Optional[Schedule] = None) -> Dict[str, object]:
        """-> ``features`` f (B, d, h, w), ``bits`` [(B, h_k*w_k, d) uint8], ``f_hat`` (sum of codes)."""
        f = self.encoder(x_B3HW.float())
        bits = self.quantize(f, scales)
        return {"features": f, "bits": bits, "f_hat": self.summed_codes(bits, scales)}

    def quantize(self, f_BdHW: torch.Tensor, scales: Optional[Schedule] = None) -> List[torch.Tensor]:
        sched = self.schedule(scales)
        H, W = f_BdHW.shape[-2:]
        rest, out = f_BdHW.float(), []
        for hw in sched:
            r = rest if hw == (H, W) else F.interpolate(rest.unsqueeze(2), size=(1, *hw), mode="area").squeeze(2)
            b = (r > 0).to(torch.uint8)  # (B, d, h, w)
            out.append(b.permute(0, 2, 3, 1).reshape(b.shape[0], -1, self.d))
            rest = rest - self._up(self.codes_from_bits(out[-1], hw), (H, W))
        return out

    def summed_codes(self, bits: Sequence[torch.Tensor], scales: Optional[Schedule] = None) -> torch.Tensor:
        """f_hat (B, d, h, w): the sum of every scale's code map up-sampled to the latent size."""
        sched = self.schedule(scales)
        H, W = sched[-1]
        f_hat = 0.0
        for b, hw in zip(bits, sched):
            f_hat = f_hat + self._up(self.codes_from_bits(b, hw), (H, W))
        return f_hat

    def next_inputs(self, bits: Sequence[torch.Tensor], scales: Optional[Schedule] = None) -> List[torch.Tensor]:
        """Teacher-forced decoder inputs: after scale k, f_hat_k area-down-sampled to scale k+1
        (B, d, h_{k+1}, w_{k+1}); one per scale but the first."""
        sched = self.schedule(scales)
        H, W = sched[-1]
        f_hat, out = 0.0, []
        for k in range(len(sched) - 1):
            f_hat = f_hat + self._up(self.codes_from_bits(bits[k], sched[k]), (H, W))
            nxt = sched[k + 1]
            out.append(f_hat if nxt == (H, W) else F.interpolate(f_hat.unsqueeze(2), size=(1, *nxt), mode="area").squeeze(2))
        return out

    @torch.no_grad()
    def decode_bits(self, bits: Sequence[torch.Tensor], scales: Optional[Schedule] = None) -> torch.Tensor:
        """bits per scale -> image (B, 3, H, W) clamped to [-1, 1]."""
        return self.decode(self.summed_codes(bits, scales))

    def decode(self, f_hat: torch.Tensor) -> torch.Tensor:
        return self.decoder(f_hat.float()).clamp_(-1, 1)


@TOKENIZERS.register("bsq")
def build_bsq(cfg: BSQConfig) -> BSQTokenizer:
    return BSQTokenizer(cfg)


def bitwise_self_correction(tok: BSQTokenizer, f_BdHW: torch.Tensor, scales: Optional[Schedule] = None,
                            max_strength: float = 0.3, layers: int = -1,
                            strength_rng=None, generator: Optional[torch.Generator] = None,
                            flipped: Optional[Sequence[torch.Tensor]] = None,
                            input_mode: str = "area") -> Dict[str, List[torch.Tensor]]:
    """Bitwise self-correction (Infinity's BSC): teacher-forced inputs from randomly flipped bits.

    Per scale k < ``layers`` (all when -1): strength s_k = randint(0, 100*max_strength) / 100
    (``strength_rng``: a numpy RandomState), each bit of the scale flips with probability s_k
    (``torch.rand`` on ``generator``). Labels of scale k are the bits of the residual left by the
    *flipped* earlier scales, so the decoder learns to correct its own mistakes. ``flipped`` replays
    recorded flipped bits instead of drawing. ``input_mode`` resamples the running sum of codes to
    the next scale: "area" (``next_inputs``) or "bilinear" (what the released decoder is trained
    and sampled with: the up-sampling mode, also for this down-sampling). Returns ``labels`` / ``flipped`` [(B, h*w, d)],
    ``inputs`` [(B, d, h_{k+1}, w_{k+1})] and ``strength`` [float]."""
    import numpy as np  # numpy's legacy RandomState is what the released strengths are drawn with

    sched = tok.schedule(scales)
    H, W = sched[-1]
    rng = strength_rng if strength_rng is not None else np.random.RandomState(0)
    n_noisy = len(sched) if layers < 0 else layers
    f = f_BdHW.float()
    B = f.shape[0]
    cum, labels, flips, inputs, strength = torch.zeros_like(f), [], [], [], []
    for k, hw in enumerate(sched):
        rest = f - cum
        r = rest if hw == (H, W) else F.interpolate(rest.unsqueeze(2), size=(1, *hw), mode="area").squeeze(2)
        bits = (r > 0).to(torch.uint8).permute(0, 2, 3, 1).reshape(B, -1, tok.d)
        labels.append(bits)
        if flipped is not None:
            fb = flipped[k].reshape(B, -1, tok.d).to(torch.uint8)
            strength.append(float("nan"))
        elif k < n_noisy:
            s = rng.randint(0, int(round(100 * max_strength)) + 1) * 0.01
            mask = torch.rand(B, 1, hw[0], hw[1], tok.d, generator=generator).to(f.device) < s
            fb = torch.where(mask.view(B, -1, tok.d), 1 - bits, bits)
            strength.append(s)
        else:
            fb = bits
            strength.append(0.0)
        flips.append(fb)
        cum = cum + tok._up(tok.codes_from_bits(fb, hw), (H, W))
        if k + 1 < len(sched):
            nxt = sched[k + 1]
            if input_mode not in ("area", "bilinear"):
                raise ValueError(f"input_mode {input_mode!r}: choose area or bilinear")
            mode = "area" if input_mode == "area" else "trilinear"
            inputs.append(cum if nxt == (H, W) else F.interpolate(cum.unsqueeze(2), size=(1, *nxt), mode=mode).squeeze(2))
    return {"labels": labels, "flipped": flips, "inputs": inputs, "strength": strength}
