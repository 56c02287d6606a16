"""Visual tokenizer family: the multi-scale residual VQVAE of VAR (arXiv 2404.02905).

An image is encoded to one latent map f (B, Cvae, h, w) (h = w = patch_nums[-1]) and quantized
into K token maps of growing size (patch_nums, e.g. 1,2,3,...,16). Scale k quantizes what the
earlier scales left unexplained:

    rest_k = f - f_hat_{k-1};  idx_k = NN(area_down(rest_k, pn_k));
    f_hat_k = f_hat_{k-1} + phi_k(bicubic_up(E[idx_k], h))

so the decoder of the VAR transformer predicts scale k from the image "so far" (f_hat_{k-1}).

Module and parameter names follow the official FoundationVision/VAR code (`models/vqvae.py`,
`models/basic_vae.py`, `models/quant.py`) so `vae_ch160v4096z32.pth` loads by key name, and every
inference path reproduces its indices and images (tests/test_var_parity.py, tests/fixtures/var_official). Unlike the
official quantizer ours also trains in one process: codebook/commitment loss with a
straight-through estimator, code-usage tracking without torch.distributed, and dead-code restart
(measured on the world: without it 20 of 512 codes survived the first minute).

Everything here runs in fp32, also inside an autocast region: indices are discrete, and a bf16
nearest-neighbour search picks other codes than fp32 does (the released code tokenizes in bf16).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import ClassVar, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from modules.checkpoint import StateDictMismatchError, load_strict  # noqa: F401 (re-exported)
from modules.components.registry import ComponentConfig, Registry
from modules.components.vqvae_blocks import Decoder, Encoder

# What a VQVAE / VAR checkpoint mismatch usually means.
LOAD_HINT = ("check the config (sizes, patch_nums, share_quant_resi, shared_aln, cond_mode) against the "
             "checkpoint, or pass the keys you expect to differ in allow_missing= / allow_unexpected=")

TOKENIZERS = Registry("tokenizer")


@dataclass
class VQVAEConfig(ComponentConfig):
    """Multi-scale VQVAE. Defaults are the official `vae_ch160v4096z32.pth` (256 px, 16x16 latent).

    The embedded CPU world (64 px) uses e.g. ch 32, ch_mult [1,1,2,2] (8x down), z_channels 16,
    vocab_size 512, patch_nums [1,2,3,4,6,8].
    """

    family: ClassVar[str] = "tokenizer"
    name: str = "msvq"
    vocab_size: int = 4096  # V: codebook rows
    z_channels: int = 32  # Cvae: codebook / latent width
    ch: int = 160  # width of the first conv level
    ch_mult: List[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])  # downsample = 2**(len-1)
    num_res_blocks: int = 2  # per encoder level (the decoder uses one more, as the official one)
    using_sa: bool = True  # self-attention after each res block at the lowest resolution
    using_mid_sa: bool = True  # self-attention in the middle block
    dropout: float = 0.0
    norm_groups: int = 32  # GroupNorm groups; every width ch*m must be a multiple of it
    quant_conv_ks: int = 3
    using_znorm: bool = False  # cosine instead of L2 nearest neighbour
    beta: float = 0.25  # commitment weight
    quant_resi: float = 0.5  # phi(h) = (1 - r) h + r conv(h)
    # 0: one phi per scale (non-shared), 1: one phi for all scales, n > 1: n phis, each scale uses
    # the one whose tick is nearest to k/(K-1) (the official "partially shared", default 4).
    share_quant_resi: int = 4
    default_qresi_counts: int = 0  # non-shared phi count; 0 = len(patch_nums)
    patch_nums: List[int] = field(default_factory=lambda: [1, 2, 3, 4, 5, 6, 8, 10, 13, 16])
    # training only (ignored at inference, excluded from fingerprint())
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    vq_weight: float = 1.0
    dead_code_restart_every: int = 25  # training steps between restarts; 0 disables
    dead_code_min_hits: float = 1.0  # a code hit fewer times than this since the last restart is dead

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def resolution(self) -> int:
        return self.patch_nums[-1] * self.downsample


_TRAIN_ONLY_FIELDS = ("l1_weight", "mse_weight", "vq_weight", "dead_code_restart_every", "dead_code_min_hits", "dropout")


# CPU inference decodes one image at a time when one image's full-resolution activation is at least
# this large (fp32 bytes): the 256 px VQVAEs (8 MiB at ch 32), not the world's 64 px ch 16 (256 KiB),
# whose small images decode faster as one batch
DECODE_PER_IMAGE_BYTES = 2 << 20


def _fp32_region(x: torch.Tensor):
    """Disable autocast for the device type of x (a no-op outside autocast)."""
    return torch.autocast(device_type=x.device.type, enabled=False)


class Phi(nn.Conv2d):
    """phi(h) = (1 - r) h + r conv3x3(h): the per-scale refinement after upsampling."""

    def __init__(self, c: int, ratio: float):
        super().__init__(c, c, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(ratio)

    def forward(self, h_BChw: torch.Tensor) -> torch.Tensor:
        return h_BChw.mul(1 - self.resi_ratio) + super().forward(h_BChw).mul_(self.resi_ratio)


def _phi_ticks(k: int) -> np.ndarray:
    # official: K == 4 uses linspace(1/3/K, 1-1/3/K), any other K linspace(1/2/K, 1-1/2/K).
    # Scales k/(K-1) can sit exactly between two ticks (K=10 scales, 4 phis: scale 2 and 7), so
    # the tick values must round exactly as numpy's linspace does, or another phi is picked.
    a = 1 / 3 / k if k == 4 else 1 / 2 / k
    return np.linspace(a, 1 - a, k)


def _nearest_tick(ticks: np.ndarray, at: float) -> int:
    return int(np.argmin(np.abs(ticks - at)))  # first minimum on ties


class PhiShared(nn.Module):
    """share_quant_resi == 1. Keys: quant_resi.qresi.*"""

    def __init__(self, phi: nn.Module):
        super().__init__()
        self.qresi = phi

    def pick(self, at: float) -> nn.Module:
        return self.qresi


class PhiPartiallyShared(nn.Module):
    """share_quant_resi == n > 1. Keys: quant_resi.qresi_ls.{i}.*"""

    def __init__(self, phis: List[nn.Module]):
        super().__init__()
        self.qresi_ls = nn.ModuleList(phis)
        self.ticks = _phi_ticks(len(phis))

    def pick(self, at: float) -> nn.Module:
        return self.qresi_ls[_nearest_tick(self.ticks, at)]


class PhiNonShared(nn.ModuleList):
    """share_quant_resi == 0. Keys: quant_resi.{i}.*"""

    def __init__(self, phis: List[nn.Module]):
        super().__init__(phis)
        self.ticks = _phi_ticks(len(phis))

    def pick(self, at: float) -> nn.Module:
        return self[_nearest_tick(self.ticks, at)]


class MultiScaleQuantizer(nn.Module):
    """Residual quantizer over `patch_nums`; the official `VectorQuantizer2` key layout."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.V, self.Cvae = cfg.vocab_size, cfg.z_channels
        self.patch_nums: Tuple[int, ...] = tuple(cfg.patch_nums)
        self.using_znorm, self.beta = cfg.using_znorm, cfg.beta

        def make_phi() -> nn.Module:
            return Phi(self.Cvae, cfg.quant_resi) if abs(cfg.quant_resi) > 1e-6 else nn.Identity()

        if cfg.share_quant_resi == 0:
            self.quant_resi = PhiNonShared([make_phi() for _ in range(cfg.default_qresi_counts or len(self.patch_nums))])
        elif cfg.share_quant_resi == 1:
            self.quant_resi = PhiShared(make_phi())
        else:
            self.quant_resi = PhiPartiallyShared([make_phi() for _ in range(cfg.share_quant_resi)])
        # official buffer (per-scale EMA of code hits); we fill it in single-process training too
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.patch_nums), self.V))
        # hits per code since the last dead-code restart (not saved)
        self.register_buffer("hits_since_restart_V", torch.zeros(self.V), persistent=False)
        self.record_hit = 0
        self.embedding = nn.Embedding(self.V, self.Cvae)

    def phi(self, si: int) -> nn.Module:
        K = len(self.patch_nums)
        return self.quant_resi.pick(si / (K - 1) if K > 1 else 0.0)

    # -- nearest neighbour -------------------------------------------------------------------
    def nearest(self, z_NC: torch.Tensor) -> torch.Tensor:
        E_VC = self.embedding.weight.detach()
        if self.using_znorm:
            return torch.argmax(F.normalize(z_NC, dim=-1) @ F.normalize(E_VC.T, dim=0), dim=1)
        # ||z||^2 + ||e||^2 - 2 z.e, in the official order of operations so argmin ties agree
        d_NV = torch.sum(z_NC.square(), dim=1, keepdim=True) + torch.sum(E_VC.square(), dim=1)
        d_NV.addmm_(z_NC, E_VC.T, alpha=-2, beta=1)
        return torch.argmin(d_NV, dim=1)

    def _up(self, h_BChw: torch.Tensor, si: int, HW: int) -> torch.Tensor:
        """phi_k(bicubic_up(h)), the contribution of scale si to f_hat at the latent size."""
        if si != len(self.patch_nums) - 1:
            h_BChw = F.interpolate(h_BChw, size=(HW, HW), mode="bicubic")
        return self.phi(si)(h_BChw)

    def idx_to_h(self, idx_Bl: torch.Tensor) -> torch.Tensor:
        B, l = idx_Bl.shape
        pn = math.isqrt(l)
        return self.embedding(idx_Bl).transpose(1, 2).reshape(B, self.Cvae, pn, pn)

    # -- inference --------------------------------------------------------------------------
    @torch.no_grad()
    def f_to_idx(self, f_BChw: torch.Tensor, to_fhat: bool = False) -> List[torch.Tensor]:
        B, C, H, W = f_BChw.shape
        if (H, W) != (self.patch_nums[-1],) * 2:
            raise ValueError(f"latent is {H}x{W} but patch_nums end at {self.patch_nums[-1]}")
        f_rest = f_BChw.detach().clone()
        f_hat = torch.zeros_like(f_rest)
        out: List[torch.Tensor] = []
        K = len(self.patch_nums)
        for si, pn in enumerate(self.patch_nums):
            z = F.interpolate(f_rest, size=(pn, pn), mode="area") if si != K - 1 else f_rest
            idx_N = self.nearest(z.permute(0, 2, 3, 1).reshape(-1, C))
            h = self._up(self.embedding(idx_N.view(B, pn, pn)).permute(0, 3, 1, 2), si, H)
            f_hat.add_(h)
            f_rest.sub_(h)
            out.append(f_hat.clone() if to_fhat else idx_N.reshape(B, pn * pn))
        return out

    def idx_to_fhat(self, idx_list: Sequence[torch.Tensor]) -> torch.Tensor:
        HW = self.patch_nums[-1]
        B = idx_list[0].shape[0]
        f_hat = torch.zeros(B, self.Cvae, HW, HW, device=idx_list[0].device)
        for si, idx_Bl in enumerate(idx_list):
            f_hat.add_(self._up(self.idx_to_h(idx_Bl), si, HW))
        return f_hat

    def idx_to_var_input(self, idx_list: Sequence[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing input: for scales 1..K-1, area_down(f_hat_{k-1}) -> (B, L - first_l, Cvae)."""
        HW, K = self.patch_nums[-1], len(self.patch_nums)
        B = idx_list[0].shape[0]
        f_hat = torch.zeros(B, self.Cvae, HW, HW, device=idx_list[0].device)
        nxt: List[torch.Tensor] = []
        for si in range(K - 1):
            f_hat.add_(self._up(self.idx_to_h(idx_list[si]), si, HW))
            pn = self.patch_nums[si + 1]
            nxt.append(F.interpolate(f_hat, size=(pn, pn), mode="area").flatten(2).transpose(1, 2))
        if not nxt:
            return f_hat.new_zeros(B, 0, self.Cvae)
        return torch.cat(nxt, dim=1)

    def next_ar_input(self, si: int, f_hat_BChw: torch.Tensor, h_BChw: torch.Tensor) -> Optional[torch.Tensor]:
        """Add scale si's tokens (embeddings h at pn x pn) to f_hat in place; return the next
        scale's input area_down(f_hat) (B, Cvae, pn', pn'), or None after the last scale."""
        HW, K = self.patch_nums[-1], len(self.patch_nums)
        with _fp32_region(f_hat_BChw):
            f_hat_BChw.add_(self._up(h_BChw.float(), si, HW))
            if si == K - 1:
                return None
            pn = self.patch_nums[si + 1]
            return F.interpolate(f_hat_BChw, size=(pn, pn), mode="area")

    # -- training ---------------------------------------------------------------------------
    def forward(self, f_BChw: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
        """Quantize with gradients: returns (f_hat with straight-through, vq loss, stats).

        vq loss per scale = beta * ||sg(f_hat_k) - f||^2 (commitment: trains the encoder)
                          + ||f_hat_k - sg(f)||^2     (codebook: trains E and the phi convs)
        averaged over scales, as the official VectorQuantizer2.forward.
        """
        B, C, H, W = f_BChw.shape
        f_ng = f_BChw.detach()
        f_rest = f_ng.clone()
        f_hat = torch.zeros_like(f_rest)
        K = len(self.patch_nums)
        vq_loss = f_BChw.new_zeros(())
        hit_V = torch.zeros(self.V, device=f_BChw.device)
        per_scale_used = []
        for si, pn in enumerate(self.patch_nums):
            z = F.interpolate(f_rest, size=(pn, pn), mode="area") if si != K - 1 else f_rest
            idx_N = self.nearest(z.permute(0, 2, 3, 1).reshape(-1, C))
            hit_si = idx_N.bincount(minlength=self.V).float()
            h = self._up(self.embedding(idx_N.view(B, pn, pn)).permute(0, 3, 1, 2), si, H)
            f_hat = f_hat + h
            f_rest = f_rest - h.detach()
            vq_loss = vq_loss + F.mse_loss(f_hat.detach(), f_BChw).mul(self.beta) + F.mse_loss(f_hat, f_ng)
            hit_V += hit_si
            per_scale_used.append(hit_si)
            if self.training:
                with torch.no_grad():
                    ema = self.ema_vocab_hit_SV[si]
                    if self.record_hit == 0:
                        ema.copy_(hit_si)
                    else:
                        m = 0.9 if self.record_hit < 100 else 0.99
                        ema.mul_(m).add_(hit_si, alpha=1 - m)
        if self.training:
            self.record_hit += 1
            self.hits_since_restart_V += hit_V
        vq_loss = vq_loss / K
        f_hat_st = (f_hat.detach() - f_ng) + f_BChw  # value of f_hat, gradient of f
        stats = {
            "usage": (hit_V > 0).float().mean().detach(),  # fraction of the codebook hit by this batch
            "usage_since_restart": (self.hits_since_restart_V > 0).float().mean().detach(),
        }
        return f_hat_st, vq_loss, stats

    @torch.no_grad()
    def restart_dead_codes(self, f_BChw: torch.Tensor, min_hits: float, generator: Optional[torch.Generator] = None) -> int:
        """Re-seed codes hit fewer than `min_hits` times since the last restart with random
        latent vectors of the current batch (scaled by U(0.1, 1), plus noise); returns how many."""
        dead = (self.hits_since_restart_V < min_hits).nonzero().flatten()
        n = int(dead.numel())
        if n:
            # the residuals every scale sees are at most |f|; pick vectors from f at every scale size
            feats = [F.interpolate(f_BChw, size=(pn, pn), mode="area").permute(0, 2, 3, 1).reshape(-1, self.Cvae)
                     for pn in self.patch_nums]
            pool = torch.cat(feats, 0).float()
            pick = torch.randint(0, pool.shape[0], (n,), device=pool.device, generator=generator)
            scale = torch.empty(n, 1, device=pool.device).uniform_(0.1, 1.0, generator=generator)
            noise = torch.randn(n, self.Cvae, device=pool.device, generator=generator) * pool.std() * 0.01
            self.embedding.weight.data[dead] = pool[pick] * scale + noise
        self.hits_since_restart_V.zero_()
        return n


# ------------------------------------------------------------------------------------------------
# The VQVAE
# ------------------------------------------------------------------------------------------------
class MultiScaleVQVAE(nn.Module):
    """Encode images to K scales of indices and back; trainable (see `forward`)."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        if list(cfg.patch_nums) != sorted(set(cfg.patch_nums)) or cfg.patch_nums[0] < 1:
            raise ValueError(f"VQVAEConfig.patch_nums must be strictly increasing positive ints, got {cfg.patch_nums}")
        self.cfg = cfg
        self.V, self.Cvae = cfg.vocab_size, cfg.z_channels
        self.patch_nums: Tuple[int, ...] = tuple(cfg.patch_nums)
        self.downsample = cfg.downsample
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = MultiScaleQuantizer(cfg)
        ks = cfg.quant_conv_ks
        self.quant_conv = nn.Conv2d(self.Cvae, self.Cvae, ks, 1, ks // 2)
        self.post_quant_conv = nn.Conv2d(self.Cvae, self.Cvae, ks, 1, ks // 2)
        self.train_steps = 0
        self.reset_codebook()

    @property
    def vocab_size(self) -> int:
        return self.V

    @property
    def L(self) -> int:
        return sum(pn * pn for pn in self.patch_nums)

    def reset_codebook(self) -> None:
        # uniform(-1/V, 1/V) init (official `eini=-1`): small codes, all near the origin
        self.quantize.embedding.weight.data.uniform_(-1.0 / self.V, 1.0 / self.V)

    def _check_img(self, img_B3HW: torch.Tensor) -> None:
        res = self.patch_nums[-1] * self.downsample
        if img_B3HW.dim() != 4 or img_B3HW.shape[1] != 3 or tuple(img_B3HW.shape[2:]) != (res, res):
            raise ValueError(f"expected images (B, 3, {res}, {res}) in [-1, 1], got {tuple(img_B3HW.shape)}")

    # -- inference API (fp32) ---------------------------------------------------------------
    def img_to_f(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        self._check_img(img_B3HW)
        with _fp32_region(img_B3HW):
            x = img_B3HW.float()
            if x.device.type == "cpu":
                # channels-last: oneDNN's fp32 3x3 convolutions run on NHWC without reordering
                # every activation to its blocked layout and back (GroupNorm, SiLU and the
                # residual adds keep the layout). Encoder, ch 64, 128 px, B 4, 1 thread, AMX Xeon:
                # 351 -> 299 ms, f within 4.3e-6, indices equal (the training step encodes targets here)
                x = x.contiguous(memory_format=torch.channels_last)
            return self.quant_conv(self.encoder(x))

    @torch.no_grad()
    def img_to_idx(self, img_B3HW: torch.Tensor) -> List[torch.Tensor]:
        """Images in [-1, 1] -> list over scales of LongTensor (B, pn*pn)."""
        with _fp32_region(img_B3HW):
            return self.quantize.f_to_idx(self.img_to_f(img_B3HW), to_fhat=False)

    @torch.no_grad()
    def idx_to_var_input(self, idx_list: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-scale indices -> teacher-forcing VAR input x_BLCv_wo_first_l (B, L - first_l, Cvae)."""
        self._check_idx(idx_list)
        with _fp32_region(idx_list[0]):
            return self.quantize.idx_to_var_input(idx_list)

    def idx_to_fhat(self, idx_list: Sequence[torch.Tensor]) -> torch.Tensor:
        self._check_idx(idx_list, allow_prefix=True)
        with _fp32_region(idx_list[0]):
            return self.quantize.idx_to_fhat(idx_list)

    def fhat_to_img(self, f_hat_BChw: torch.Tensor) -> torch.Tensor:
        """Latent f_hat (B, Cvae, h, w) -> images (B, 3, H, W) clamped to [-1, 1]."""
        with _fp32_region(f_hat_BChw):
            f = f_hat_BChw.float()
            if f.device.type == "cpu" and f.shape[0] > 1 and not torch.is_grad_enabled() \
                    and 4 * self.cfg.ch * self.cfg.ch_mult[0] * self.cfg.resolution ** 2 >= DECODE_PER_IMAGE_BYTES:
                # one image at a time on a CPU: the decoder's full-resolution activations (B x 8 MiB
                # at 256 px, ch 32) are memory-bound passes (GroupNorm, SiLU, the residual add);
                # per image they stay nearer the cache. Measured decode of the ch-32 VQVAE, 256 px,
                # B 4, 1 thread, Xeon with AMX: 0.57 s vs 0.69 s channels-last (equal pixels),
                # 0.69 s vs 0.96 s NCHW (pixels within 2e-5: oneDNN blocks a batch differently)
                return torch.cat([self.decoder(self.post_quant_conv(f[i:i + 1])) for i in range(f.shape[0])]).clamp_(-1, 1)
            return self.decoder(self.post_quant_conv(f)).clamp_(-1, 1)

    @torch.no_grad()
    def idx_to_img(self, idx_list: Sequence[torch.Tensor]) -> torch.Tensor:
        """All scales (or a prefix of them) accumulated -> images (B, 3, H, W) in [-1, 1]."""
        return self.fhat_to_img(self.idx_to_fhat(idx_list))

    @torch.no_grad()
    def img_to_recon(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        with _fp32_region(img_B3HW):
            return self.fhat_to_img(self.quantize.f_to_idx(self.img_to_f(img_B3HW), to_fhat=True)[-1])

    def _check_idx(self, idx_list: Sequence[torch.Tensor], allow_prefix: bool = False) -> None:
        n = len(idx_list)
        if n == 0 or n > len(self.patch_nums) or (n != len(self.patch_nums) and not allow_prefix):
            raise ValueError(f"expected {len(self.patch_nums)} index maps (patch_nums={list(self.patch_nums)}), got {n}")
        for si, idx in enumerate(idx_list):
            if idx.dim() != 2 or idx.shape[1] != self.patch_nums[si] ** 2:
                raise ValueError(f"scale {si}: expected indices (B, {self.patch_nums[si] ** 2}), got {tuple(idx.shape)}")

    # -- training ---------------------------------------------------------------------------
    def forward(self, img_B3HW: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Training step body: returns (recon in [-1, 1]-ish, losses). `losses["loss"]` is the
        total to backpropagate: l1_weight*L1 + mse_weight*MSE + vq_weight*vq. Also reports
        `usage` (fraction of codes hit by this batch) and `dead_restarted` (codes re-seeded)."""
        self._check_img(img_B3HW)
        cfg = self.cfg
        with _fp32_region(img_B3HW):
            img = img_B3HW.float()
            f = self.quant_conv(self.encoder(img))
            f_hat, vq_loss, stats = self.quantize(f)
            recon = self.decoder(self.post_quant_conv(f_hat))
            l1 = F.l1_loss(recon, img)
            mse = F.mse_loss(recon, img)
            loss = cfg.l1_weight * l1 + cfg.mse_weight * mse + cfg.vq_weight * vq_loss
        restarted = 0
        if self.training:
            self.train_steps += 1
            if cfg.dead_code_restart_every > 0 and self.train_steps % cfg.dead_code_restart_every == 0:
                restarted = self.quantize.restart_dead_codes(f.detach(), cfg.dead_code_min_hits)
        losses = {"loss": loss, "l1": l1.detach(), "mse": mse.detach(), "vq": vq_loss.detach(),
                  "dead_restarted": torch.tensor(float(restarted)), **stats}
        return recon, losses

    # -- identity and loading --------------------------------------------------------------
    def fingerprint(self) -> str:
        """Stable short hash of the architecture config and the weights that decide indices and
        images; tags pre-tokenized data so indices from another tokenizer are never mixed in."""
        h = hashlib.sha256()
        arch = {k: v for k, v in asdict(self.cfg).items() if k not in _TRAIN_ONLY_FIELDS}
        h.update(json.dumps(arch, sort_keys=True).encode())
        for k, t in sorted(self.state_dict().items()):
            if k.endswith("ema_vocab_hit_SV"):
                continue  # usage statistics, not part of the mapping
            t = t.detach().to("cpu", torch.float32).contiguous()
            h.update(k.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()[:16]

    def load_official_state_dict(self, sd: Dict[str, torch.Tensor], allow_missing: Iterable[str] = (),
                                 allow_unexpected: Iterable[str] = ()) -> None:
        """Strict load of an official VQVAE state dict (e.g. vae_ch160v4096z32.pth). As the official
        loader, `quantize.ema_vocab_hit_SV` with another scale count keeps ours."""
        sd = dict(sd)
        key = "quantize.ema_vocab_hit_SV"
        if key in sd and sd[key].shape != self.quantize.ema_vocab_hit_SV.shape:
            sd[key] = self.quantize.ema_vocab_hit_SV.clone()
        load_strict(self, sd, tuple(allow_missing), tuple(allow_unexpected), source="VQVAE checkpoint", hint=LOAD_HINT)




@TOKENIZERS.register("msvq")
def _build_msvq(cfg: VQVAEConfig) -> MultiScaleVQVAE:
    return MultiScaleVQVAE(cfg)


def build_vqvae(cfg: VQVAEConfig) -> MultiScaleVQVAE:
    return TOKENIZERS.build(cfg)
