"""KV-cached next-scale sampling for `VARDecoder` (both condition modes).

One step per scale k = 0..K-1 on a fused 2B batch (conditional rows first, unconditional rows
second, as the official sampler):

    x_chunk (2B, pn_k^2, C)  --step_hook?-->  blocks (KV cache)  -->  head  -->  logits (2B, l, V)
    t = cfg * k / (K-1);  logits = (1 + t) * cond - t * uncond          (guidance ramps over scales)
    / temperature -> top-k (keeps ties) -> top-p -> multinomial(generator)  -> idx (B, l)
    f_hat += phi_k(bicubic_up(E[idx]));  next chunk = word_embed(area_down(f_hat)) + lvl/pos emb

Why it is fast: the AdaLN parameters of every block and of the head depend only on the condition
and are computed once (not once per scale); keys/values go into one preallocated buffer per block
(no torch.cat re-allocation per scale); attention is F.scaled_dot_product_attention; the image is
decoded once at the end, and not at all with decode=False.

With the same generator state this reproduces the official `autoregressive_infer_cfg` draws
(tests/test_var_parity.py), as long as temperature is 1: that is parity mode (parity=True, the
default of `sample_next_scale` / `VARDecoder.sample`), fp32 and the official sampler.

The fast path (parity=False) draws from the same distribution with the cheaper `fast` sampler,
runs the blocks and the head under bf16 autocast where `default_sampling_dtype` says it pays (a
measured width rule, see BF16_MIN_WIDTH) with the KV cache in bf16, and decodes a channels-last
latent on CPU; the condition front-end, the next-scale input, sampling and the VQVAE stay fp32.
Against the official code at equal weights, 256 px, batch 4, one CPU thread: see
benchmarks/results/var_sampling_vs_official.md (`python -m benchmarks.var_sampling --official`).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from modules.components import fused_linear

StepHook = Callable[[int, torch.Tensor], torch.Tensor]
DTypeArg = Union[None, str, torch.dtype]

# bf16 autocast pays for the VAR blocks from this width (embed_dim) on, on hardware with fast bf16
# matmuls. Measured with `python -m benchmarks.var_sampling --dtype-sweep` (depth 2, fast sampler,
# 1 thread, process CPU time, best of 3; AMD EPYC with AVX512-BF16, no AMX;
# benchmarks/results/var_sampling_dtype.md), fp32 time / bf16 time:
#   width                                  128    256    384    512    768
#   64 px world sizes, cfg 3 top-k 100, B 4   1.11   1.36   1.43   1.59   1.72
#                                       B 16  1.39   1.48   1.64   1.74   1.83
#                                       B 48  1.43   1.64   1.74   1.82   1.88
#   256 px, cfg 1.5 top-k 900 top-p .96, B 4  1.13   1.25   1.35   1.43   1.64
# The rule: bf16 where it gains >= 1.2x at every measured size, i.e. from width 256. At 128 the
# gain is small or batch dependent here, and on an AMX CPU the 128-wide world sizes measured
# slower in bf16 than fp32, so small models keep exact fp32 (pass dtype="bf16" to override).
BF16_MIN_WIDTH = 256
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


def sample_top_k_top_p(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0,
                       generator: Union[None, torch.Generator, Sequence[torch.Generator]] = None) -> torch.Tensor:
    """Draw one index per row; modifies logits in place. top-k keeps every logit tied with the
    k-th largest; top-p removes the smallest tokens whose ascending cumulative probability is
    <= 1 - top_p (the largest always stays). Same operations as the official sampler, so the same
    generator gives the same draws. Returns idx (B, l)."""
    B, l, V = logits_BlV.shape
    top = None  # (values descending, their indices) of the top-k, when they are all the survivors
    if top_k > 0:
        k = min(top_k, V)
        # sorted top-k (the official takes them unsorted): the same k-th value, and with top-p
        # the sorted survivors below come for free (one partial sort instead of a sort over V)
        vals, ids = logits_BlV.topk(k, largest=True, sorted=top_p > 0, dim=-1)
        kth_Bl1 = vals.amin(dim=-1, keepdim=True)
        below = logits_BlV < kth_Bl1
        logits_BlV.masked_fill_(below, -torch.inf)
        if top_p > 0 and k < V and bool((V - below.sum(dim=-1) == k).all()):  # no ties at the k-th value
            top = vals, ids
    if top_p > 0:
        if top is None:
            sorted_logits, sorted_idx = logits_BlV.sort(dim=-1, descending=False)
        else:
            # The official ascending sort over V is (V - k) -inf's then the k survivors ascending:
            # build exactly those values (so the softmax and the cumsum below are the official
            # ones, bit for bit) from the sorted top-k. The -inf's need no index: their removal
            # flag changes nothing (they are already -inf). Ties among survivors are ordered
            # arbitrarily here, as by the official (unstable) sort.
            vals, ids = top
            sorted_logits = torch.cat((vals.new_full((B, l, V - vals.shape[-1]), -torch.inf), vals.flip(-1)), dim=-1)
            sorted_idx = ids.flip(-1)
        remove_sorted = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        remove_sorted[..., -1:] = False
        remove_sorted = remove_sorted[..., V - sorted_idx.shape[-1]:]  # the survivors' flags (all with a full sort)
        logits_BlV.masked_fill_(torch.zeros_like(logits_BlV, dtype=torch.bool).scatter_(-1, sorted_idx, remove_sorted),
                                -torch.inf)
    probs_NV = logits_BlV.softmax(dim=-1).view(-1, V)
    if isinstance(generator, (list, tuple)):
        # One generator per row: a row's draws do not depend on its batch-mates, so a batched
        # call reproduces one-by-one calls with the same per-sample seeds.
        if len(generator) != B:
            raise ValueError(f"{len(generator)} generators for a batch of {B}")
        probs_BlV = probs_NV.view(B, l, V)
        return torch.stack([torch.multinomial(probs_BlV[b], num_samples=1, replacement=True, generator=g).view(l)
                            for b, g in enumerate(generator)])
    return torch.multinomial(probs_NV, num_samples=1, replacement=True, generator=generator).view(B, l)


def sample_top_k_top_p_fast(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0,
                            generator=None) -> torch.Tensor:
    """The same distribution as `sample_top_k_top_p` (up to ties at the k-th logit, which are cut
    here), several times cheaper for a large V: top-k candidates only, one uniform per row and an
    inverse-CDF lookup, instead of torch.multinomial's V exponentials per row. Gives other draws
    than the official sampler for the same seed. `generator` may be one per batch row, as above.
    Returns idx (B, l)."""
    B, l, V = logits_BlV.shape
    if 0 < top_k < V:
        vals, ids = logits_BlV.topk(top_k, dim=-1, largest=True, sorted=True)
    else:
        vals, ids = logits_BlV.sort(dim=-1, descending=True)
    probs = vals.softmax(dim=-1)
    if top_p > 0:
        # official rule: drop tokens whose ascending cumulative mass is <= 1 - top_p, i.e. keep a
        # token while the mass of the larger tokens before it is < top_p (the largest always stays)
        mass_before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(mass_before >= top_p, 0.0)
    cdf = probs.cumsum(dim=-1)
    if isinstance(generator, (list, tuple)):
        if len(generator) != B:
            raise ValueError(f"{len(generator)} generators for a batch of {B}")
        u = torch.stack([torch.rand(l, 1, generator=g, device=g.device) for g in generator]).to(cdf)
    else:
        u = torch.rand(B, l, 1, device=cdf.device, dtype=cdf.dtype, generator=generator)
    j = torch.searchsorted(cdf, u * cdf[..., -1:], right=True).clamp_(max=cdf.shape[-1] - 1)
    return ids.gather(-1, j).view(B, l)


SAMPLERS = {"official": sample_top_k_top_p, "fast": sample_top_k_top_p_fast}


def fast_bf16(device: Union[str, torch.device]) -> bool:
    """Whether the device has fast bf16 matmuls: CUDA with bf16 support, or a CPU with AVX512-BF16
    or AMX-BF16 (without them CPU bf16 is emulated and slower than fp32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        caps = getattr(torch.cpu, "get_capabilities", None)  # torch >= 2.8
        if caps is not None:
            c = caps()
            return bool(c.get("avx512_bf16") or c.get("amx_bf16"))
        return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
    return False


def default_sampling_dtype(var: nn.Module, device: Union[None, str, torch.device] = None) -> torch.dtype:
    """The compute dtype of the fast path for this model: bf16 when the model is at least
    BF16_MIN_WIDTH wide and the device has fast bf16, else fp32 (the measured rule above)."""
    device = var.pos_1LC.device if device is None else device
    return torch.bfloat16 if var.C >= BF16_MIN_WIDTH and fast_bf16(device) else torch.float32


def resolve_sampling(var: nn.Module, parity: bool = True, sampler: str = "auto",
                     dtype: DTypeArg = "auto") -> Tuple[str, Optional[torch.dtype]]:
    """(sampler name, compute dtype) for `sample_next_scale`. parity=True: defaults that reproduce
    the official draws ("official" sampler, fp32); parity=False: the fast path ("fast" sampler,
    `default_sampling_dtype(var)`). Explicit values override: sampler "official" | "fast";
    dtype "fp32" | "bf16" | "fp16" | a torch.dtype, or None / "inherit" = the caller's autocast state."""
    if sampler == "auto":
        sampler = "official" if parity else "fast"
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be 'auto' or one of {sorted(SAMPLERS)}, got {sampler!r}")
    if dtype == "inherit":  # the config spelling of None
        dtype = None
    if isinstance(dtype, str):
        if dtype == "auto":
            return sampler, (torch.float32 if parity else default_sampling_dtype(var))
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be 'auto', 'inherit', None or one of {sorted(_DTYPES)}, got {dtype!r}")
        dtype = _DTYPES[dtype]
    if dtype is not None and dtype not in _DTYPES.values():
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    return sampler, dtype


def _precision(device_type: str, dtype: Optional[torch.dtype]):
    """Autocast region for the VAR blocks + head: fp32 = autocast off, None = the caller's state."""
    if dtype is None:
        return nullcontext()
    if dtype == torch.float32:
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=dtype)


class KVCache:
    """Preallocated keys/values for every block: (depth, N, H, L, head_dim) each. Pass L = the
    positions that later steps attend to (all but the last scale): the last chunk attends to the
    buffer plus itself without being stored (see SelfAttention), which saves pn_K^2 / L of the
    cache (38% at 256 px)."""

    def __init__(self, depth: int, N: int, H: int, L: int, hd: int, device, dtype):
        self.k = torch.empty(depth, N, H, L, hd, device=device, dtype=dtype)
        self.v = torch.empty_like(self.k)
        self.pos = 0  # tokens already stored

    def slot(self, i: int):
        return (self.k[i], self.v[i], self.pos)

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


def _conditions(var, B: int, cond, generator, device) -> torch.Tensor:
    """Fused (2B,) condition indices: conditional first half, unconditional second half."""
    if var.cond_mode == "class":
        if cond is None:  # random classes, drawn from the generator first (as the official sampler)
            uniform = torch.full((1, var.num_classes), 1.0 / var.num_classes, device=device)
            if isinstance(generator, (list, tuple)):  # one generator per row: one label from each
                cond = torch.cat([torch.multinomial(uniform, 1, replacement=True, generator=g).reshape(1) for g in generator])
            else:
                cond = torch.multinomial(uniform, num_samples=B, replacement=True, generator=generator).reshape(B)
        elif isinstance(cond, int):
            cond = torch.full((B,), var.num_classes if cond < 0 else cond, device=device, dtype=torch.long)
        cond = torch.as_tensor(cond, device=device).long().reshape(B)
    else:
        cond = torch.zeros(B, dtype=torch.long, device=device) if cond is None else torch.as_tensor(cond, device=device).long().reshape(B)
    return torch.cat((cond, torch.full_like(cond, var.null_cond)))


@torch.no_grad()
def sample_next_scale(
    var: nn.Module,
    B: int,
    cond: Union[None, int, torch.Tensor] = None,
    cfg: float = 1.5,
    top_k: int = 0,
    top_p: float = 0.0,
    temperature: float = 1.0,
    generator: Union[None, torch.Generator, Sequence[torch.Generator]] = None,
    step_hook: Optional[StepHook] = None,
    vqvae: Optional[nn.Module] = None,
    decode: bool = True,
    teacher_idx: Optional[Sequence[torch.Tensor]] = None,
    logits_out: Optional[List[torch.Tensor]] = None,
    use_cache: bool = True,
    parity: bool = True,
    sampler: str = "auto",
    dtype: DTypeArg = "auto",
    cond_extra: Optional[torch.Tensor] = None,
    context: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> Tuple[List[torch.Tensor], Optional[torch.Tensor]]:
    """Generate B images scale by scale. Returns (idx_list, img): idx_list[k] is (B, pn_k^2),
    img (B, 3, H, W) in [0, 1] (None with decode=False).

    cond: class mode: labels (B,) / one int for all (negative = null class) / None = random
          classes from `generator`. External mode: condition indices for the first half (default
          0 = conditional); the second half always uses the unconditional row.
    generator: one torch.Generator, or one per sample (then a sample's draws do not depend on
          its batch-mates; with bf16 compute a batch-mate can still move a logit by a rounding step).
    cfg: guidance strength at the last scale; t = cfg * k / (K-1). The 2B batch always runs.
    step_hook(k, x_chunk_2BlC) -> h_chunk_2BlC: replaces the block input of scale k (VARGPT:
          the LLM consumes the front-end chunk with its own KV cache and returns its projected
          states). Rows [:B] are conditional, [B:] unconditional. Called for every scale, under
          the caller's autocast state (the `dtype` below applies to the VAR blocks only); x_chunk
          is fp32.
    teacher_idx: use these indices instead of sampling (teacher forcing through the cache) for
          the first len(teacher_idx) scales, then sample the rest (a prefix of the scales: is it
          the coarse layout or the fine detail that a model gets wrong?); with logits_out (a list)
          the raw per-scale logits (2B, l, V) before guidance are appended.
    parity: True (default) = the official draws: sampler "official" and fp32. False = the fast
          path: sampler "fast" and `default_sampling_dtype(var)` (bf16 autocast for wide models
          on bf16 hardware). `sampler` / `dtype` override either; see `resolve_sampling`.
    sampler: "auto" | "official" (torch.multinomial over all V, the official random stream) |
          "fast" (same distribution, far cheaper; see sample_top_k_top_p_fast).
    dtype: "auto" | "fp32" | "bf16" | "fp16" | torch.dtype | None or "inherit" (the caller's autocast):
          compute dtype of the VAR blocks and head; the rest (condition, next-scale input,
          f_hat, sampling, VQVAE) is fp32.
    use_cache=False: recompute the whole prefix every scale under the block-causal mask (a
          benchmark baseline; same results).
    cond_extra: (2B, C) added to the AdaLN condition of the blocks and the head (not to the SOS),
          rows as the fused batch (VARGPT var_cond gen_start).
    context: (ctx (2B, T, C), keep (2B, T)) for a decoder with cross-attention (VARGPT var_cond
          prompt_attn): its keys/values are computed once and read at every scale.
    """
    vq = vqvae if vqvae is not None else var.vqvae
    if vq is None:
        raise ValueError("sampling needs the VQVAE: build_var(cfg, vqvae) / var.attach_vqvae(vqvae) or sample(..., vqvae=)")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    sampler, compute = resolve_sampling(var, parity, sampler, dtype)
    draw = SAMPLERS[sampler]
    quant = vq.quantize
    device = var.pos_1LC.device
    dt = device.type
    K = len(var.patch_nums)
    HW = var.patch_nums[-1]
    caller = (torch.is_autocast_enabled(dt), torch.get_autocast_dtype(dt))  # restored around step_hook
    if compute is None:  # the blocks run under the caller's autocast state
        low = caller[1] if caller[0] else None
    else:
        low = None if compute == torch.float32 else compute

    with _precision(dt, torch.float32):  # the condition front-end in fp32 (as the official sampler)
        cond_2B = _conditions(var, B, cond, generator, device)
        cond_BD = var.cond_embed(cond_2B)  # (2B, C): the SOS and the AdaLN condition
        sos_BD = cond_BD
        if cond_extra is not None:
            if tuple(cond_extra.shape) != tuple(cond_BD.shape):
                raise ValueError(f"cond_extra has shape {tuple(cond_extra.shape)}, expected {tuple(cond_BD.shape)}")
            cond_BD = cond_BD + cond_extra.to(device=device, dtype=cond_BD.dtype)
        ada = var.block_conds(cond_BD)  # once for all scales (and in fp32: they scale every row)
        head_ada = var.head_nm.ada(cond_BD)
        lvl_pos_1LC = var.lvl_pos()
        x_chunk = (sos_BD.unsqueeze(1).expand(2 * B, var.first_l, -1) + var.pos_start.expand(2 * B, -1, -1)
                   + lvl_pos_1LC[:, :var.first_l])
    # fp32: the last scale is not stored (38% less cache); low precision (half the bytes): the
    # whole sequence, so the last scale attends to the buffer without a torch.cat copy per block
    cache_len = var.L - var.patch_nums[-1] ** 2 if K > 1 and low is None else var.L
    cache = KVCache(var.depth, 2 * B, var.num_heads, cache_len, var.C // var.num_heads, device,
                    low or var.pos_1LC.dtype) if use_cache else None  # in the compute dtype: no cast per read
    prefix: List[torch.Tensor] = []  # block inputs so far (use_cache=False only)
    f_hat = torch.zeros(B, var.Cvae, HW, HW, device=device)
    idx_list: List[torch.Tensor] = []
    cur = 0
    # one region for all scales: autocast then casts a (trainable) weight once per call, not per
    # scale; in bf16 on a CPU the VAR's linears run as fused oneDNN calls on bf16 weights kept
    # between calls (fused_linear: bias and GELU in the matmul, no weight cast per call)
    with _precision(dt, compute), fused_linear.bf16_inference(low == torch.bfloat16 and dt == "cpu"):
        xkv, keep = var.context_kv(context)
        for si, pn in enumerate(var.patch_nums):
            l = pn * pn
            if step_hook is not None:
                with torch.autocast(dt, dtype=caller[1], enabled=caller[0]):
                    h = step_hook(si, x_chunk)
                if tuple(h.shape) != tuple(x_chunk.shape):
                    raise ValueError(f"step_hook at scale {si} returned {tuple(h.shape)}, expected {tuple(x_chunk.shape)}")
                x_chunk = h
            if use_cache:
                x = x_chunk
                for i, blk in enumerate(var.blocks):
                    x = blk(x, ada[i], None, cache.slot(i))
                    if xkv is not None:
                        x = var.cross[i](x, xkv[i], keep)
                cache.pos += l
            else:
                prefix.append(x_chunk)
                x = torch.cat(prefix, dim=1)
                mask = var.attn_bias_for_masking[:, :, : cur + l, : cur + l]
                mask = mask.to(low) if low is not None else mask
                for i, blk in enumerate(var.blocks):
                    x = blk(x, ada[i], mask)
                    if xkv is not None:
                        x = var.cross[i](x, xkv[i], keep)
                x = x[:, cur:]
            cur += l
            logits_2BlV = var.logits(x, cond_BD, head_ada)
            if logits_out is not None:
                logits_out.append(logits_2BlV.clone())

            with _precision(dt, torch.float32):
                if teacher_idx is not None and si < len(teacher_idx):
                    idx_Bl = teacher_idx[si].to(device)
                else:
                    t = cfg * si / (K - 1) if K > 1 else cfg
                    logits_BlV = (1 + t) * logits_2BlV[:B] - t * logits_2BlV[B:]
                    if temperature != 1.0:
                        logits_BlV = logits_BlV / temperature
                    idx_Bl = draw(logits_BlV, top_k=top_k, top_p=top_p, generator=generator)
                idx_list.append(idx_Bl)

                h_BChw = quant.embedding(idx_Bl).transpose(1, 2).reshape(B, var.Cvae, pn, pn)
                nxt_BChw = quant.next_ar_input(si, f_hat, h_BChw)
                if nxt_BChw is not None:
                    nl = var.patch_nums[si + 1] ** 2
                    x_chunk = var.word_embed(nxt_BChw.flatten(2).transpose(1, 2).to(var.word_embed.weight.dtype)) \
                        + lvl_pos_1LC[:, cur:cur + nl]
                    x_chunk = x_chunk.repeat(2, 1, 1)  # same input for both halves of the guidance batch

    if not decode:
        return idx_list, None
    if not parity and dt == "cpu":
        # a channels-last latent makes the (fp32) decoder convolutions run channels-last (oneDNN):
        # measured 1.46x faster decode at ch 32, B 4, 256 px and 1.12x at ch 160 (the official
        # VQVAE), 1 thread; the pixels move by ~1e-4 (other accumulation order), so parity keeps NCHW
        f_hat = f_hat.contiguous(memory_format=torch.channels_last)
    img = vq.fhat_to_img(f_hat).add_(1).mul_(0.5).contiguous()
    return idx_list, img
