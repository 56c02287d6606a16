"""VAR decoder family: the next-scale prediction transformer of VAR (arXiv 2404.02905).

Sequence layout for K scales (patch_nums pn_1..pn_K, L = sum pn_k^2 tokens):

    position  0 .. first_l-1        : SOS (condition embedding + pos_start)
    scale k   begin_k .. end_k - 1   : word_embed(area_down(f_hat_{k-1}, pn_k))
    every position                   : + lvl_embed(scale of the position) + pos_1LC

Blocks are AdaLN self-attention (scale/shift/gate from the condition) under a block-causal mask:
a token sees every token of its own and all earlier scales. Module and parameter names are the
official `models/var.py` / `models/basic_var.py` ones, so `var_d16.pth` ... `var_d30.pth` load by
key name and give the same logits (tests/test_var_parity.py).

Two conditioning modes behind one class (`VARConfig.cond_mode`):

- "class": the official model. `class_emb` has num_classes + 1 rows (the last is the null class
  used for classifier-free guidance); the class embedding is the SOS and the AdaLN condition.
- "external": VARGPT. The caller (the LLM) supplies the block inputs h_BLC per position; a tiny
  learned condition set `cond_emb` (row 0 conditional, row 1 unconditional) is the AdaLN condition
  and the SOS. Loading a class-conditional checkpoint then needs
  `allow_missing=("cond_emb.weight",), allow_unexpected=("class_emb.weight",)`
  (`EXTERNAL_FROM_CLASS_CKPT`).

Sampling (KV-cached next-scale generation) lives in `var_sampling.py`; `VARDecoder.sample` calls it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from modules.components import fused_linear
from modules.components.registry import ComponentConfig, Registry
from modules.components.var_sampling import DTypeArg, sample_next_scale
from modules.components.vqvae import LOAD_HINT, StateDictMismatchError, load_strict

VAR_DECODERS = Registry("var_decoder")

COND_CLASS, COND_EXTERNAL = "class", "external"
# What a VARGPT (external-mode) decoder allows when initialised from a class-conditional var_d*.pth.
EXTERNAL_FROM_CLASS_CKPT = {"allow_missing": ("cond_emb.weight",), "allow_unexpected": ("class_emb.weight",)}


@dataclass
class VARConfig(ComponentConfig):
    """VAR transformer. Width and heads follow depth as in the official models (width 64*depth,
    depth heads, drop_path 0.1*depth/24 when drop_path_rate < 0); any of them can be overridden."""

    family: ClassVar[str] = "var_decoder"
    name: str = "var"
    depth: int = 16
    embed_dim: int = 0  # 0 -> 64 * depth
    num_heads: int = 0  # 0 -> depth
    mlp_ratio: float = 4.0
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # < 0 -> the official 0.1 * depth / 24
    norm_eps: float = 1e-6
    shared_aln: bool = False  # one AdaLN projection for all blocks (+ a per-block learned offset)
    attn_l2_norm: bool = True  # cosine attention with a learned per-head temperature
    cond_mode: str = COND_CLASS  # "class" | "external"
    num_classes: int = 1000  # class mode only (+1 null class row)
    # Each block also cross-attends to a context sequence (VARGPT var_cond prompt_attn: the
    # prompt's LLM states); not in the official model, whose checkpoints then load without `cross.*`.
    cross_attn: bool = False
    cond_drop_rate: float = 0.1  # class mode, training only: label -> null class with this prob
    patch_nums: List[int] = field(default_factory=list)  # empty -> taken from the VQVAE
    vocab_size: int = 0  # V; 0 -> taken from the VQVAE
    cvae: int = 0  # Cvae; 0 -> taken from the VQVAE
    # initialisation (official train.py defaults; init_std < 0 means sqrt(1 / (3 C)))
    init_adaln: float = 0.5
    init_adaln_gamma: float = 1e-5
    init_head: float = 0.02
    init_std: float = -1.0

    def resolved(self, vqvae: Optional[nn.Module] = None) -> "VARConfig":
        """Copy with every 0/empty size filled in (from depth and from the VQVAE)."""
        from dataclasses import replace

        def need(what: str):
            if vqvae is None:
                raise ValueError(f"VARConfig.{what} is unset (0/empty) and no VQVAE was given to take it from")

        pn, V, cv = list(self.patch_nums), self.vocab_size, self.cvae
        if not pn:
            need("patch_nums")
            pn = list(vqvae.patch_nums)
        if not V:
            need("vocab_size")
            V = vqvae.V
        if not cv:
            need("cvae")
            cv = vqvae.Cvae
        C = self.embed_dim or 64 * self.depth
        H = self.num_heads or self.depth
        dpr = self.drop_path_rate if self.drop_path_rate >= 0 else 0.1 * self.depth / 24
        if C % H:
            raise ValueError(f"VAR embed_dim {C} is not divisible by num_heads {H}")
        if self.cond_mode not in (COND_CLASS, COND_EXTERNAL):
            raise ValueError(f"VARConfig.cond_mode must be 'class' or 'external', got {self.cond_mode!r}")
        if vqvae is not None and (tuple(pn) != tuple(vqvae.patch_nums) or V != vqvae.V or cv != vqvae.Cvae):
            raise ValueError(
                f"VAR (patch_nums={pn}, V={V}, Cvae={cv}) does not match the VQVAE "
                f"(patch_nums={list(vqvae.patch_nums)}, V={vqvae.V}, Cvae={vqvae.Cvae})"
            )
        return replace(self, embed_dim=C, num_heads=H, drop_path_rate=dpr, patch_nums=pn, vocab_size=V, cvae=cv)


# ------------------------------------------------------------------------------------------------
# Blocks
# ------------------------------------------------------------------------------------------------
def noisy_teacher_inputs(idx_list: Sequence[torch.Tensor], rate: float, vocab_size: int) -> List[torch.Tensor]:
    """Teacher-forcing inputs with random codes (``model.gen_input_noise``, beyond v1): the input
    scales 0..K-2 (each (N, pn^2)) of each target get their tokens replaced by random codes at a
    per-target rate ~ U(0, rate), so the model learns to draw on from its own imperfect scales;
    the last scale is never an input and the targets stay the caller's. ``rate`` 0 returns the
    inputs unchanged (the caller decides when: in training only)."""
    if rate <= 0:
        return list(idx_list)
    rate_N1 = torch.rand(idx_list[0].shape[0], 1, device=idx_list[0].device) * rate

    def noisy(idx: torch.Tensor) -> torch.Tensor:
        return torch.where(torch.rand(idx.shape, device=idx.device) < rate_N1, torch.randint_like(idx, vocab_size), idx)

    return [noisy(t) for t in idx_list[:-1]] + [idx_list[-1]]


class DropPath(nn.Module):
    """Per-sample stochastic depth (training only)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p <= 0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep.div_(1 - self.p)


class FFN(nn.Module):
    def __init__(self, C: int, hidden: int, drop: float):
        super().__init__()
        self.fc1 = nn.Linear(C, hidden)
        self.fc2 = nn.Linear(hidden, C)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fused_linear: plain F.linear + GELU, or one oneDNN call each in bf16 sampling
        return self.drop(fused_linear.linear(fused_linear.linear(x, self.fc1, act="gelu_tanh"), self.fc2))


# A KV slot for cached inference: (k_buf_BHLc, v_buf_BHLc, start). The chunk's keys/values are
# written at [start, start + l) and attention reads [0, start + l): no re-allocation per scale.
# A chunk that does not fit (the last scale: nothing attends to it later, so the cache need not
# hold it) attends to cat(buffer[:start], chunk) without being stored.
KVSlot = Tuple[torch.Tensor, torch.Tensor, int]


class SelfAttention(nn.Module):
    def __init__(self, C: int, H: int, attn_drop: float, proj_drop: float, l2_norm: bool):
        super().__init__()
        self.C, self.H, self.hd = C, H, C // H
        self.l2_norm = l2_norm
        if l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, H, 1, 1), 4.0).log())
            self.max_scale_mul = math.log(100)
        else:
            self.scale = 0.25 / math.sqrt(self.hd)
        self.mat_qkv = nn.Linear(C, 3 * C, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(C))
        self.v_bias = nn.Parameter(torch.zeros(C))
        self.register_buffer("zero_k_bias", torch.zeros(C))  # official key; K has no bias
        self.proj = nn.Linear(C, C)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        self.attn_drop = attn_drop

    def forward(self, x_BLC: torch.Tensor, attn_bias: Optional[torch.Tensor] = None,
                kv: Optional[KVSlot] = None) -> torch.Tensor:
        B, L, C = x_BLC.shape
        bias = (self.q_bias, self.zero_k_bias, self.v_bias)
        qkv = fused_linear.linear(x_BLC, self.mat_qkv, bias=bias).view(B, L, 3, self.H, self.hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # B H L c
        if self.l2_norm:
            scale_1H11 = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            if q.dtype == torch.bfloat16 and fused_linear.active(q):
                # bf16 sampling: q * (scale / |q|) in one bf16 pass (the per-row factor rounded to
                # bf16) instead of normalize -> an fp32 product (the fp32 scale promotes it) -> the
                # cast back to bf16 for attention: two fewer copies of q per block and scale
                q = q * (scale_1H11 / torch.linalg.vector_norm(q, dim=-1, keepdim=True, dtype=torch.float32)
                         .clamp_min(1e-12)).to(q.dtype)
            else:
                q = F.normalize(q, dim=-1).mul(scale_1H11)
            k = F.normalize(k, dim=-1)
        if kv is not None:
            k_buf, v_buf, start = kv
            end = start + L
            if end <= k_buf.shape[2]:
                k_buf[:, :, start:end] = k
                v_buf[:, :, start:end] = v
                k, v = k_buf[:, :, :end], v_buf[:, :, :end]
            else:
                k = torch.cat((k_buf[:, :, :start], k), dim=2)
                v = torch.cat((v_buf[:, :, :start], v), dim=2)
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_bias, dropout_p=self.attn_drop if self.training else 0.0, scale=self.scale
        )
        return self.proj_drop(fused_linear.linear(o.transpose(1, 2).reshape(B, L, C), self.proj))


Ada6 = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
# A context for cross-attention: (ctx_BTC, keep_BT) with keep_BT True at real (not padded) positions.
Context = Tuple[torch.Tensor, torch.Tensor]


class CrossAttention(nn.Module):
    """x += proj(attention of LN(x) over LN(context)): every position reads the context sequence
    (VARGPT var_cond prompt_attn: the prompt's projected LLM states, as VARGPT-v1.1's decoder
    attends to the prompt). proj starts at zero (VARDecoder.init_weights), so the block computes
    exactly what it did without this until it trains."""

    def __init__(self, C: int, H: int, norm_eps: float):
        super().__init__()
        self.H, self.hd = H, C // H
        self.ln_q = nn.LayerNorm(C, eps=norm_eps)
        self.ln_kv = nn.LayerNorm(C, eps=norm_eps)
        self.q = nn.Linear(C, C)
        self.kv = nn.Linear(C, 2 * C)
        self.proj = nn.Linear(C, C)

    def context(self, ctx_BTC: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, H, T, hd) of a context: once per sample, reused at every scale."""
        B, T, C = ctx_BTC.shape
        k, v = self.kv(self.ln_kv(ctx_BTC)).view(B, T, 2, self.H, self.hd).permute(2, 0, 3, 1, 4).unbind(0)
        return k, v

    def forward(self, x_BLC: torch.Tensor, kv: Tuple[torch.Tensor, torch.Tensor], keep_B11T: torch.Tensor) -> torch.Tensor:
        B, L, C = x_BLC.shape
        q = self.q(self.ln_q(x_BLC)).view(B, L, self.H, self.hd).transpose(1, 2)
        k, v = kv
        o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=keep_B11T)
        return x_BLC + self.proj(o.transpose(1, 2).reshape(B, L, C))


class AdaLNSelfAttn(nn.Module):
    """x += gate1 * attn(LN(x)(1+scale1) + shift1); x += gate2 * ffn(LN(x)(1+scale2) + shift2)."""

    def __init__(self, C: int, H: int, mlp_ratio: float, drop: float, attn_drop: float, drop_path: float,
                 norm_eps: float, shared_aln: bool, l2_norm: bool):
        super().__init__()
        self.C = C
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.attn = SelfAttention(C, H, attn_drop, drop, l2_norm)
        self.ffn = FFN(C, round(C * mlp_ratio), drop)
        self.ln_wo_grad = nn.LayerNorm(C, eps=norm_eps, elementwise_affine=False)
        self.shared_aln = shared_aln
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, C) / C**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))

    def ada(self, cond_BD_or_gss: torch.Tensor) -> Ada6:
        """AdaLN parameters (gamma1, gamma2, scale1, scale2, shift1, shift2), each (B, 1, C). They
        depend only on the condition, so sampling computes them once, not once per scale."""
        if self.shared_aln:
            return (self.ada_gss + cond_BD_or_gss).unbind(2)  # 116C + B16C
        return self.ada_lin(cond_BD_or_gss).view(-1, 1, 6, self.C).unbind(2)

    def forward(self, x_BLC: torch.Tensor, ada: Ada6, attn_bias: Optional[torch.Tensor] = None,
                kv: Optional[KVSlot] = None) -> torch.Tensor:
        g1, g2, s1, s2, b1, b2 = ada
        if fused_linear.active(x_BLC) and not self.training:
            # bf16 sampling (eval mode: no drop path): modulation and gated residual as one addcmul pass each (fp32, as the
            # condition terms are), where mul + add + the mixed-dtype product take two or three
            x_BLC = torch.addcmul(x_BLC, self.attn(torch.addcmul(b1, self.ln_wo_grad(x_BLC), s1.add(1)), attn_bias, kv), g1)
            return torch.addcmul(x_BLC, self.ffn(torch.addcmul(b2, self.ln_wo_grad(x_BLC), s2.add(1))), g2)
        # out of place on attn's output (a view of its projection): under sharding attn is a unit, and
        # an in-place op on a unit's output would drop the hook that gathers its weights for backward
        x_BLC = x_BLC + self.drop_path(self.attn(self.ln_wo_grad(x_BLC).mul(s1.add(1)).add_(b1), attn_bias, kv).mul(g1))
        x_BLC = x_BLC + self.drop_path(self.ffn(self.ln_wo_grad(x_BLC).mul(s2.add(1)).add_(b2)).mul(g2))
        return x_BLC


class AdaLNBeforeHead(nn.Module):
    def __init__(self, C: int, norm_eps: float):
        super().__init__()
        self.C = C
        self.ln_wo_grad = nn.LayerNorm(C, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))

    def ada(self, cond_BD: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor, ada: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        scale, shift = ada if ada is not None else self.ada(cond_BD)
        return self.ln_wo_grad(x_BLC).mul(scale.add(1)).add_(shift)


class SharedAdaLin(nn.Linear):
    def forward(self, cond_BD: torch.Tensor) -> torch.Tensor:
        return super().forward(cond_BD).view(-1, 1, 6, self.weight.shape[0] // 6)  # B16C


# ------------------------------------------------------------------------------------------------
# The decoder
# ------------------------------------------------------------------------------------------------
class VARDecoder(nn.Module):
    """Next-scale prediction transformer; see the module docstring for the two condition modes.

    `vqvae` (optional) is kept as a plain reference, not a submodule: the VAR state dict stays
    exactly the official one, and the VQVAE is moved/frozen by its owner. Sampling needs it (the
    next scale's input is built from the codebook), either from here or passed to `sample`.
    """

    def __init__(self, cfg: VARConfig, vqvae: Optional[nn.Module] = None):
        super().__init__()
        cfg = cfg.resolved(vqvae)
        self.cfg = cfg
        self._vqvae: Tuple[nn.Module, ...] = (vqvae,) if vqvae is not None else ()
        self.cond_mode = cfg.cond_mode
        self.depth, self.C, self.num_heads = cfg.depth, cfg.embed_dim, cfg.num_heads
        self.V, self.Cvae = cfg.vocab_size, cfg.cvae
        self.patch_nums: Tuple[int, ...] = tuple(cfg.patch_nums)
        self.L = sum(pn * pn for pn in self.patch_nums)
        self.first_l = self.patch_nums[0] ** 2
        self.begin_ends: List[Tuple[int, int]] = []
        cur = 0
        for pn in self.patch_nums:
            self.begin_ends.append((cur, cur + pn * pn))
            cur += pn * pn
        self.num_classes = cfg.num_classes
        self.cond_drop_rate = cfg.cond_drop_rate
        C = self.C
        init_std = math.sqrt(1 / C / 3)

        # 1. inputs: word embedding of the teacher-forcing latents; condition / SOS embedding
        self.word_embed = nn.Linear(self.Cvae, C)
        if self.cond_mode == COND_CLASS:
            self.class_emb = nn.Embedding(self.num_classes + 1, C)  # last row: null class
        else:
            self.cond_emb = nn.Embedding(2, C)  # 0: conditional, 1: unconditional
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, C))
        # 2. absolute position (per scale) + level embedding
        self.pos_1LC = nn.Parameter(torch.empty(1, self.L, C))
        self.lvl_embed = nn.Embedding(len(self.patch_nums), C)
        # 3. blocks
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), SharedAdaLin(C, 6 * C)) if cfg.shared_aln else nn.Identity()
        dpr = torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu").tolist()  # python floats, also under a meta device
        self.blocks = nn.ModuleList([
            AdaLNSelfAttn(C, cfg.num_heads, cfg.mlp_ratio, cfg.drop_rate, cfg.attn_drop_rate, dpr[i],
                          cfg.norm_eps, cfg.shared_aln, cfg.attn_l2_norm)
            for i in range(cfg.depth)
        ])
        self.cross = nn.ModuleList([CrossAttention(C, cfg.num_heads, cfg.norm_eps) for _ in range(cfg.depth)]) \
            if cfg.cross_attn else None
        # 4. block-causal mask: position i attends to j iff scale(j) <= scale(i)  (official buffers)
        d_1L1 = torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(self.patch_nums)]).view(1, self.L, 1)
        dT_11L = d_1L1.transpose(1, 2)
        self.register_buffer("lvl_1L", dT_11L[:, 0].contiguous())
        self.register_buffer("attn_bias_for_masking",
                             torch.where(d_1L1 >= dT_11L, 0.0, -torch.inf).reshape(1, 1, self.L, self.L).contiguous())
        # 5. head
        self.head_nm = AdaLNBeforeHead(C, cfg.norm_eps)
        self.head = nn.Linear(C, self.V)
        self.init_weights(init_std)

    # -- construction helpers --------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, pos_std: float) -> None:
        cfg = self.cfg
        std = cfg.init_std if cfg.init_std >= 0 else math.sqrt(1 / self.C / 3)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=std)
        for p in (self.pos_start, self.pos_1LC):
            nn.init.trunc_normal_(p, std=pos_std)
        self.head.weight.mul_(cfg.init_head)
        self.head.bias.zero_()
        self.head_nm.ada_lin[-1].weight.mul_(cfg.init_adaln)
        self.head_nm.ada_lin[-1].bias.zero_()
        for blk in self.blocks:
            blk.attn.proj.weight.div_(math.sqrt(2 * self.depth))
            blk.ffn.fc2.weight.div_(math.sqrt(2 * self.depth))
            if blk.shared_aln:
                blk.ada_gss[:, :, 2:].mul_(cfg.init_adaln)
                blk.ada_gss[:, :, :2].mul_(cfg.init_adaln_gamma)
            else:
                lin = blk.ada_lin[-1]
                lin.weight[2 * self.C:].mul_(cfg.init_adaln)
                lin.weight[: 2 * self.C].mul_(cfg.init_adaln_gamma)  # gates start near 0: blocks start near identity
                lin.bias.zero_()
        for xa in self.cross or ():
            xa.proj.weight.zero_()
            xa.proj.bias.zero_()

    @property
    def vqvae(self) -> Optional[nn.Module]:
        return self._vqvae[0] if self._vqvae else None

    def attach_vqvae(self, vqvae: nn.Module) -> None:
        self.cfg.resolved(vqvae)  # raises on a size mismatch
        self._vqvae = (vqvae,)

    @property
    def null_cond(self) -> int:
        """Index of the unconditional row of the condition embedding."""
        return self.num_classes if self.cond_mode == COND_CLASS else 1

    # -- pieces ---------------------------------------------------------------------------
    def cond_embed(self, cond_B: torch.Tensor) -> torch.Tensor:
        """Class labels (class mode) or condition indices 0/1 (external mode) -> (B, C)."""
        emb = self.class_emb if self.cond_mode == COND_CLASS else self.cond_emb
        return emb(cond_B)

    def lvl_pos(self) -> torch.Tensor:
        """(1, L, C) level + position embedding."""
        return self.lvl_embed(self.lvl_1L) + self.pos_1LC

    def front_end(self, cond_B: torch.Tensor, x_BLCv_wo_first_l: Optional[torch.Tensor]) -> torch.Tensor:
        """SOS (+pos_start) for the first scale, word_embed(teacher-forcing latents) for the rest,
        + level + position embeddings -> x_BLC (B, first_l + l, C). Computed in fp32."""
        B = cond_B.shape[0]
        dev_type = self.pos_1LC.device.type
        with torch.autocast(device_type=dev_type, enabled=False):
            sos_BlC = self.cond_embed(cond_B).unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, -1, -1)
            if x_BLCv_wo_first_l is not None and x_BLCv_wo_first_l.shape[1] > 0:
                # fp32 weights: fp32 here; a decoder stored in bf16 (to save memory) computes in bf16
                x_BLC = torch.cat((sos_BlC, self.word_embed(x_BLCv_wo_first_l.to(self.word_embed.weight.dtype))), dim=1)
            else:
                x_BLC = sos_BlC
            ed = x_BLC.shape[1]
            if ed > self.L:
                raise ValueError(f"VAR input has {ed} positions, more than L={self.L} (patch_nums={list(self.patch_nums)})")
            x_BLC = x_BLC + self.lvl_embed(self.lvl_1L[:, :ed].expand(B, -1)) + self.pos_1LC[:, :ed]
        return x_BLC

    def block_conds(self, cond_BD: torch.Tensor) -> List[Ada6]:
        gss = self.shared_ada_lin(cond_BD)
        return [blk.ada(gss) for blk in self.blocks]

    def context_kv(self, context: Optional[Context]) -> Tuple[Optional[List], Optional[torch.Tensor]]:
        """Per block the cross-attention keys/values of a context, and its (B, 1, 1, T) mask;
        (None, None) without a context. A context given to a decoder without cross-attention
        (or the reverse) is an error, not ignored."""
        if (context is None) != (self.cross is None):
            raise ValueError("VAR cross-attention needs a context and a context needs cross-attention "
                             f"(cross_attn={self.cross is not None}, context given: {context is not None})")
        if context is None:
            return None, None
        ctx_BTC, keep_BT = context
        return [xa.context(ctx_BTC) for xa in self.cross], keep_BT.bool()[:, None, None, :]

    def logits(self, h_BLC: torch.Tensor, cond_BD: torch.Tensor, head_ada=None) -> torch.Tensor:
        return fused_linear.linear(self.head_nm(h_BLC.float(), cond_BD, head_ada).to(self.head.weight.dtype), self.head).float()

    def drop_cond(self, cond_B: torch.Tensor) -> torch.Tensor:
        """Class mode, training: replace labels by the null class with prob cond_drop_rate."""
        if self.training and self.cond_mode == COND_CLASS and self.cond_drop_rate > 0:
            drop = torch.rand(cond_B.shape[0], device=cond_B.device) < self.cond_drop_rate
            cond_B = torch.where(drop, torch.full_like(cond_B, self.num_classes), cond_B)
        return cond_B

    # -- teacher-forced passes ------------------------------------------------------------
    def forward_blocks(self, h_BLC: torch.Tensor, cond_B: torch.Tensor,
                       cond_extra_BD: Optional[torch.Tensor] = None, context: Optional[Context] = None) -> torch.Tensor:
        """Blocks + head on given block inputs (B, l, C), l <= L a prefix of the sequence, under
        the block-causal mask -> logits (B, l, V). External mode: h_BLC are the LLM states
        (after the gen-out projector) and cond_B in {0: conditional, 1: unconditional};
        cond_extra_BD (B, C), when given, is added to the AdaLN condition (VARGPT var_cond
        gen_start: the projected LLM state at <|image_gen_start|>); context (cross_attn decoders
        only): (ctx (B, T, C), keep (B, T)) every block attends to after its self-attention."""
        l = h_BLC.shape[1]
        if l > self.L:
            raise ValueError(f"VAR block input has {l} positions, more than L={self.L}")
        cond_BD = self.cond_embed(cond_B)
        if cond_extra_BD is not None:
            cond_BD = cond_BD + cond_extra_BD.to(cond_BD.dtype)
        ada = self.block_conds(cond_BD)
        attn_bias = self.attn_bias_for_masking[:, :, :l, :l]
        x = h_BLC
        if x.dtype != attn_bias.dtype and torch.is_autocast_enabled(x.device.type):
            attn_bias = attn_bias.to(torch.get_autocast_dtype(x.device.type))
        xkv, keep = self.context_kv(context)
        for i, blk in enumerate(self.blocks):
            x = blk(x, ada[i], attn_bias)
            if xkv is not None:
                x = self.cross[i](x, xkv[i], keep)
        return self.logits(x, cond_BD)

    def forward(self, cond_B: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, L, V): the official `VAR.forward(label_B, x_BLCv_wo_first_l)`.
        Class dropout (cond_drop_rate) applies in training mode only."""
        cond_B = self.drop_cond(cond_B)
        return self.forward_blocks(self.front_end(cond_B, x_BLCv_wo_first_l), cond_B)

    def loss(self, logits_BLV: torch.Tensor, idx_list: Sequence[torch.Tensor]) -> torch.Tensor:
        """Mean cross entropy over all L tokens against the per-scale indices."""
        target_BL = torch.cat(list(idx_list), dim=1)
        return F.cross_entropy(logits_BLV.reshape(-1, self.V), target_BL.reshape(-1))

    # -- sampling -------------------------------------------------------------------------
    def sample(self, B: int, cond=None, cfg: float = 1.5, top_k: int = 0, top_p: float = 0.0,
               temperature: float = 1.0, generator: Optional[torch.Generator] = None,
               step_hook: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None,
               parity: bool = True, sampler: str = "auto", dtype: DTypeArg = "auto", **kw):
        """KV-cached next-scale sampling; see `var_sampling.sample_next_scale` for every option.
        Returns (idx_list, img) with img (B, 3, H, W) in [0, 1] (as the official sampler).

        parity=True (default): the official draws for a seed (official sampler, fp32).
        parity=False: the fast path, same distribution: sampler "fast" and compute dtype
        `default_sampling_dtype(self)` (bf16 autocast for wide models on bf16 hardware).
        sampler ("auto" | "official" | "fast") and dtype ("auto" | "fp32" | "bf16" | "fp16" |
        torch.dtype | None or "inherit" = the caller's autocast) override what parity picks."""
        return sample_next_scale(self, B, cond=cond, cfg=cfg, top_k=top_k, top_p=top_p, temperature=temperature,
                                 generator=generator, step_hook=step_hook, parity=parity, sampler=sampler,
                                 dtype=dtype, **kw)

    # -- loading --------------------------------------------------------------------------
    def load_official_state_dict(self, sd: Dict[str, torch.Tensor], allow_missing: Iterable[str] = (),
                                 allow_unexpected: Iterable[str] = ()) -> None:
        """Strict load of an official VAR state dict (var_d16.pth ... var_d30.pth layout): every
        missing / unexpected key and shape mismatch is listed in one StateDictMismatchError, except
        keys (or fnmatch patterns) the caller allows. External mode from a class checkpoint:
        `load_official_state_dict(sd, **EXTERNAL_FROM_CLASS_CKPT)`."""
        if "lvl_1L" in sd and sd["lvl_1L"].shape == self.lvl_1L.shape and not torch.equal(sd["lvl_1L"].to(self.lvl_1L), self.lvl_1L):
            raise StateDictMismatchError(
                f"VAR checkpoint buffer lvl_1L differs from the model's: the checkpoint was trained with "
                f"other patch_nums than {list(self.patch_nums)}"
            )
        load_strict(self, sd, tuple(allow_missing), tuple(allow_unexpected), source="VAR checkpoint", hint=LOAD_HINT)


@VAR_DECODERS.register("var")
def _build_var(cfg: VARConfig, vqvae: Optional[nn.Module] = None) -> VARDecoder:
    return VARDecoder(cfg, vqvae)


def build_var(cfg: VARConfig, vqvae: Optional[nn.Module] = None) -> VARDecoder:
    """Build the decoder; sizes left at 0 / empty in cfg are taken from `vqvae`."""
    return VAR_DECODERS.build(cfg, vqvae)
