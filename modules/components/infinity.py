"""Image decoder family: the Infinity bitwise decoder of VARGPT-v1.1 (arXiv 2412.04431, 2504.02949).

Blocks (stored as ``block_chunks.{c}.module.{j}``, depth = chunks x per-chunk) each do

    x = x + gamma1 * SA(AdaLN(x; scale1, shift1))         cosine attention, per-scale 2-D RoPE
    x = x + CA(LayerNorm(x), prompt_kv)                   cross-attention to the prompt states
    x = x + gamma2 * FFN(AdaLN(x; scale2, shift2))

with (gamma1, gamma2, scale1, scale2, shift1, shift2) = ada_gss + shared_ada_lin(cond_BD) (B, 1, 6, C).
The condition cond_BD (B, D) is an attentive pool (one learned query) over the SOS key/value
tokens; in v1.1 that is one row of ``sos_embedding``. The head predicts every bit of a token as a
two-way logit: (B, L, 2d). Teacher-forced inputs are the BSQ codes of the earlier scales
(``BSQTokenizer.next_inputs``) through ``word_embed``; position 0 is the SOS (cond_BD + pos_start).

2-D RoPE: every scale (h, w) is placed on one fixed grid of ``rope_grid`` (the largest latent of
the model's resolution table, 64 x 64 for Infinity's 1:1 1M entry): row i of a scale sits at grid
row round(i * G_h / h), so scales share coordinates. Angles pair adjacent channels (x[2i], x[2i+1]);
the first half of the pairs rotate with the row, the second with the column.

Cross-attention precision: the released code casts q and kv to bf16 for flash-attn even in an fp32
model, and the kernel returns bf16. ``ca_bf16=True`` reproduces that (rounding q, kv and the
output to bf16, computing in fp32); ``False`` keeps fp32 throughout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from modules.components.registry import ComponentConfig, Registry

INFINITY_DECODERS = Registry("gen_decoder")

CaKV = Tuple[torch.Tensor, torch.Tensor, int]  # (kv_compact (N, C), cu_seqlens (B+1,) int32, max_len)


@dataclass
class InfinityConfig(ComponentConfig):
    """Sizes of the decoder. Defaults: the release (Infinity-2B width, 32 blocks as 8 x 4)."""

    family: ClassVar[str] = "gen_decoder"
    name: str = "infinity"
    embed_dim: int = 2048  # C
    depth: int = 32
    block_chunks: int = 8
    num_heads: int = 16
    ffn_hidden: int = 8192
    text_channels: int = 2048  # width of the SOS / cross-attention key-value tokens
    cond_dim: int = 2048  # D: width of cond_BD
    d_vae: int = 32  # bits per token
    levels: int = 15  # lvl_embed rows (scale index embedding)
    text_maxlen: int = 512  # cfg_uncond rows: the unconditional key/value tokens
    pool_head_dim: int = 128  # the SOS attentive pool's head width
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_grid: List[int] = field(default_factory=lambda: [64, 64])
    ca_bf16: bool = False  # released: True (see module doc)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], prefix: str = "", **over) -> "InfinityConfig":
        def shape(k: str) -> Tuple[int, ...]:
            if prefix + k not in sd:
                raise KeyError(f"Infinity state dict lacks {prefix + k!r} (expected the released "
                               f"{prefix}block_chunks.*, {prefix}word_embed.*, ... layout)")
            return tuple(sd[prefix + k].shape)

        C, d = shape("word_embed.weight")
        blocks = {tuple(k[len(prefix):].split(".")[1:4:2]) for k in sd if k.startswith(prefix + "block_chunks.")}
        chunks = len({c for c, _ in blocks})
        b0 = "block_chunks.0.module.0."
        vals = dict(
            embed_dim=C, d_vae=d, depth=len(blocks), block_chunks=chunks,
            num_heads=shape(b0 + "sa.scale_mul_1H11")[1], ffn_hidden=shape(b0 + "ffn.fc1.weight")[0],
            text_channels=shape("text_norm.weight")[0], cond_dim=shape("shared_ada_lin.1.weight")[1],
            levels=shape("lvl_embed.weight")[0], text_maxlen=shape("cfg_uncond")[0],
            pool_head_dim=shape("text_proj_for_sos.ca.mat_q")[2],
        )
        vals.update(over)
        return cls(**vals)


class RMSNorm(nn.Module):
    def __init__(self, C: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(C)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def ada_ln(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x.float(), (x.shape[-1],), eps=eps).mul(scale.add(1)).add_(shift)


def rope_angles(schedule: Sequence[Tuple[int, int]], head_dim: int, grid: Sequence[int], theta: float,
                pad_to: int = 0, start: int = 0, length: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (L, head_dim/2) for the tokens of ``schedule`` (rows start..start+length); rows past
    the schedule (padding up to ``pad_to``) get angle 0."""
    half = head_dim // 2
    inv = 1.0 / (theta ** (torch.arange(0, half, 2, dtype=torch.int64).float() / half))  # (half/2,)
    rows = []
    for h, w in schedule:
        ih = (torch.arange(h) * (grid[0] / h)).round()
        iw = (torch.arange(w) * (grid[1] / w)).round()
        fh = torch.outer(ih, inv)[:, None, :].expand(h, w, -1)
        fw = torch.outer(iw, inv)[None, :, :].expand(h, w, -1)
        rows.append(torch.cat([fh, fw], dim=-1).reshape(h * w, half))
    ang = torch.cat(rows)
    if pad_to > ang.shape[0]:
        ang = torch.cat([ang, ang.new_zeros(pad_to - ang.shape[0], half)])
    ang = ang[start:start + (length if length is not None else ang.shape[0] - start)]
    return ang.cos(), ang.sin()


def apply_rope(x_BHLc: torch.Tensor, cos_Lh: torch.Tensor, sin_Lh: torch.Tensor) -> torch.Tensor:
    x = x_BHLc.reshape(*x_BHLc.shape[:-1], -1, 2)  # pairs of adjacent channels
    a, b = x[..., 0], x[..., 1]
    return torch.stack([cos_Lh * a - sin_Lh * b, sin_Lh * a + cos_Lh * b], dim=-1).flatten(-2)


class SelfAttention(nn.Module):
    """Cosine attention: q, k l2-normalized, q scaled by exp(clamped learned log-scale) per head."""

    def __init__(self, C: int, H: int):
        super().__init__()
        self.H, self.c = H, C // H
        self.mat_qkv = nn.Linear(C, 3 * C, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(C)), nn.Parameter(torch.zeros(C))
        self.register_buffer("zero_k_bias", torch.zeros(C))  # released key; K has no bias
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, H, 1, 1), 4.0).log())
        self.proj = nn.Linear(C, C)
        self.max_log_scale = math.log(100.0)
        self.cache: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self.caching = False

    def forward(self, x: torch.Tensor, attn_bias: Optional[torch.Tensor], rope: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        B, L, C = x.shape
        qkv = F.linear(x, self.mat_qkv.weight, torch.cat((self.q_bias, self.zero_k_bias, self.v_bias)))
        q, k, v = qkv.view(B, L, 3, self.H, self.c).permute(2, 0, 3, 1, 4).unbind(0)  # B H L c
        q = F.normalize(q, dim=-1, eps=1e-12).mul(self.scale_mul_1H11.clamp_max(self.max_log_scale).exp())
        k = F.normalize(k, dim=-1, eps=1e-12)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.caching:
            if self.cache is not None:
                k, v = torch.cat((self.cache[0], k), 2), torch.cat((self.cache[1], v), 2)
            self.cache = (k, v)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=1.0)
        return self.proj(o.transpose(1, 2).reshape(B, L, C))


def varlen_attention(q_BLHc: torch.Tensor, kv_N2Hc: torch.Tensor, cu: torch.Tensor, scale: float, bf16: bool) -> torch.Tensor:
    """Non-causal attention of each row's queries to its own segment of a packed kv, computed
    per segment in fp32 (the order the released kernel stand-in used: with ``bf16`` the outputs
    then round to the same bf16 values, bit for bit on the vendored vectors)."""
    if bf16:  # what the released flash-attn call sees
        q_BLHc, kv_N2Hc = q_BLHc.to(torch.bfloat16).float(), kv_N2Hc.to(torch.bfloat16).float()
    out = []
    for b in range(q_BLHc.shape[0]):
        s, e = int(cu[b]), int(cu[b + 1])
        k_NHc, v_NHc = kv_N2Hc[s:e, 0], kv_N2Hc[s:e, 1]
        a_HLN = torch.einsum("lhc,nhc->hln", q_BLHc[b], k_NHc).mul(scale).softmax(-1)
        out.append(torch.einsum("hln,nhc->lhc", a_HLN, v_NHc))
    o = torch.stack(out)
    return o.to(torch.bfloat16).float() if bf16 else o


class CrossAttention(nn.Module):
    def __init__(self, C: int, kv_dim: int, H: int, pool: bool = False, bf16: bool = False):
        super().__init__()
        self.H, self.c, self.pool, self.bf16 = H, C // H, pool, bf16
        self.mat_q = nn.Parameter(torch.zeros(1, H, C // H)) if pool else nn.Linear(C, C)
        self.mat_kv = nn.Linear(kv_dim, 2 * C, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(C))
        self.register_buffer("zero_k_bias", torch.zeros(C))
        self.proj = nn.Linear(C, C)

    def forward(self, q_BLC: Optional[torch.Tensor], ca_kv: CaKV) -> torch.Tensor:
        kv, cu, _ = ca_kv
        kv = F.linear(kv, self.mat_kv.weight, torch.cat((self.zero_k_bias, self.v_bias))).view(-1, 2, self.H, self.c)
        if self.pool:
            B, L = cu.shape[0] - 1, 1
            q = self.mat_q.unsqueeze(0).expand(B, 1, self.H, self.c)
        else:
            B, L = q_BLC.shape[:2]
            q = self.mat_q(q_BLC).view(B, L, self.H, self.c)
        o = varlen_attention(q.float(), kv.float(), cu, 1 / math.sqrt(self.c), self.bf16)
        return self.proj(o.reshape(B, L, -1))


class FFN(nn.Module):
    def __init__(self, C: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(C, hidden), nn.Linear(hidden, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CrossAttnBlock(nn.Module):
    def __init__(self, cfg: InfinityConfig):
        super().__init__()
        C = cfg.embed_dim
        self.eps = cfg.norm_eps
        self.sa = SelfAttention(C, cfg.num_heads)
        self.ca = CrossAttention(C, C, cfg.num_heads, bf16=cfg.ca_bf16)
        self.ca_norm = nn.LayerNorm(C, eps=cfg.norm_eps)
        self.ffn = FFN(C, cfg.ffn_hidden)
        self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, C) / C ** 0.5)

    def forward(self, x, gss_B16C, ca_kv: CaKV, attn_bias, rope) -> torch.Tensor:
        g1, g2, s1, s2, b1, b2 = (self.ada_gss + gss_B16C).unbind(2)  # each (B, 1, C)
        x = x + self.sa(ada_ln(x, s1, b1, self.eps), attn_bias, rope).mul_(g1)
        x = x + self.ca(self.ca_norm(x), ca_kv).float()
        return x + self.ffn(ada_ln(x, s2, b2, self.eps)).mul(g2)


class _Chunk(nn.Module):
    def __init__(self, blocks: List[nn.Module]):
        super().__init__()
        self.module = nn.ModuleList(blocks)


class _Pool(nn.Module):
    """Attentive pool of the SOS key/value tokens into cond_BD (one learned query per head)."""

    def __init__(self, cfg: InfinityConfig):
        super().__init__()
        H = cfg.text_channels // cfg.pool_head_dim
        self.ca = CrossAttention(cfg.cond_dim, cfg.text_channels, H, pool=True, bf16=cfg.ca_bf16)

    def forward(self, ca_kv: CaKV) -> torch.Tensor:
        return self.ca(None, ca_kv).squeeze(1)


class _HeadNorm(nn.Module):
    def __init__(self, C: int, D: int, eps: float):
        super().__init__()
        self.C, self.eps = C, eps
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * C))

    def forward(self, x: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return ada_ln(x, scale, shift, self.eps)


class InfinityDecoder(nn.Module):
    """Parameters and the pieces of one decoder pass; the composed model decides what runs
    between ``embed`` and ``blocks`` (in v1.1: the LLM, through the generation projectors)."""

    def __init__(self, cfg: InfinityConfig):
        super().__init__()
        self.cfg = cfg
        C, D, T = cfg.embed_dim, cfg.cond_dim, cfg.text_channels
        if cfg.depth % cfg.block_chunks:
            raise ValueError(f"depth {cfg.depth} is not a multiple of block_chunks {cfg.block_chunks}")
        self.text_norm = RMSNorm(T, cfg.norm_eps)
        self.text_proj_for_sos = _Pool(cfg)
        self.text_proj_for_ca = nn.Sequential(nn.Linear(T, C), nn.GELU(approximate="tanh"), nn.Linear(C, C))
        self.cfg_uncond = nn.Parameter(torch.randn(cfg.text_maxlen, T) * 1.2 / T ** 0.5)
        self.pos_start = nn.Parameter(torch.randn(1, 1, C) * math.sqrt(1 / C / 3))
        self.word_embed = nn.Linear(cfg.d_vae, C)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * C))
        self.lvl_embed = nn.Embedding(cfg.levels, C)
        per = cfg.depth // cfg.block_chunks
        self.block_chunks = nn.ModuleList(
            _Chunk([CrossAttnBlock(cfg) for _ in range(per)]) for _ in range(cfg.block_chunks))
        self.head_nm = _HeadNorm(C, D, cfg.norm_eps)
        self.head = nn.Linear(C, 2 * cfg.d_vae)

    @property
    def head_dim(self) -> int:
        return self.cfg.embed_dim // self.cfg.num_heads

    def set_ca_bf16(self, on: bool) -> None:
        for m in self.modules():
            if isinstance(m, CrossAttention):
                m.bf16 = on

    def condition(self, sos_kv: CaKV) -> Tuple[torch.Tensor, torch.Tensor]:
        """SOS key/value tokens -> cond_BD (B, D) and the AdaLN inputs gss (B, 1, 6, C)."""
        kv, cu, n = sos_kv
        cond_BD = self.text_proj_for_sos((self.text_norm(kv), cu, n)).float()
        return cond_BD, self.shared_ada_lin(cond_BD).view(-1, 1, 6, self.cfg.embed_dim)

    def ca_kv(self, kv: CaKV) -> CaKV:
        """Prompt key/value tokens (N, text_channels) -> the blocks' cross-attention input."""
        t, cu, n = kv
        return self.text_proj_for_ca(self.text_norm(t)), cu, n

    def embed(self, cond_BD: torch.Tensor, x_BLd: Optional[torch.Tensor]) -> torch.Tensor:
        """[SOS = cond_BD + pos_start, word_embed(teacher-forced codes)] -> (B, 1 + L, C)."""
        sos = cond_BD.unsqueeze(1) + self.pos_start
        return sos if x_BLd is None else torch.cat((sos, self.word_embed(x_BLd.float())), 1)

    def add_levels(self, x_BLC: torch.Tensor, schedule: Sequence[Tuple[int, int]], first_scale: int = 0) -> torch.Tensor:
        """Adds lvl_embed[k] to the tokens of scale k (scales first_scale.. fill x from row 0;
        rows past them, the padding, are left alone)."""
        lv = torch.cat([torch.full((h * w,), first_scale + i, dtype=torch.long) for i, (h, w) in enumerate(schedule)])
        lv = lv.to(x_BLC.device)
        n = lv.numel()
        return torch.cat((x_BLC[:, :n] + self.lvl_embed(lv), x_BLC[:, n:]), 1)

    def blocks(self, x_BLC: torch.Tensor, gss: torch.Tensor, ca_kv: CaKV, attn_bias: Optional[torch.Tensor],
               rope: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        for chunk in self.block_chunks:
            for blk in chunk.module:
                x_BLC = blk(x_BLC, gss, ca_kv, attn_bias, rope)
        return x_BLC

    def logits(self, h_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        """(B, L, C) -> bit logits (B, L, 2d): two logits per bit, bit-major."""
        return self.head(self.head_nm(h_BLC.float(), cond_BD.float()))

    def rope(self, schedule: Sequence[Tuple[int, int]], pad_to: int = 0, scale_ind: Optional[int] = None,
             scale_offset: bool = True):
        """cos/sin for the whole (padded) sequence, or for scale ``scale_ind`` alone (caching).
        ``scale_offset=False`` starts every scale's rows at sequence position 0: what the
        release's non-fused block path computes with KV caching (it drops the scale index)."""
        g, t = self.cfg.rope_grid, self.cfg.rope_theta
        if scale_ind is None:
            return rope_angles(schedule, self.head_dim, g, t, pad_to=pad_to)
        start = sum(h * w for h, w in schedule[:scale_ind]) if scale_offset else 0
        h, w = schedule[scale_ind]
        return rope_angles(schedule, self.head_dim, g, t, start=start, length=h * w)

    def set_caching(self, on: bool) -> None:
        for m in self.modules():
            if isinstance(m, SelfAttention):
                m.caching, m.cache = on, None


def block_causal_bias(schedule: Sequence[Tuple[int, int]], pad_to: int = 0) -> torch.Tensor:
    """(1, 1, L, L) additive mask: a token sees its own and earlier scales; padded rows see
    column 0 only (so their softmax is defined), padded columns are hidden."""
    d = torch.cat([torch.full((h * w,), i) for i, (h, w) in enumerate(schedule)])
    L = d.numel()
    bias = torch.where(d[:, None] >= d[None, :], 0.0, -torch.inf)
    if pad_to > L:
        bias = F.pad(bias, (0, pad_to - L, 0, pad_to - L), value=-torch.inf)
        bias[L:, 0] = 0.0
    return bias.view(1, 1, *bias.shape)


@INFINITY_DECODERS.register("infinity")
def build_infinity(cfg: InfinityConfig) -> InfinityDecoder:
    return InfinityDecoder(cfg)
