"""Per-row cross-entropy of a linear head's logits, without keeping the logits.

    ce_N = linear_cross_entropy(h_ND, head.weight, head.bias, target_N)   # == F.cross_entropy(head(h).float(), t, reduction="none")

The text head of a VARGPT step maps (N, D) states to (N, V) logits with V = 32k: the unfused
path writes the logits, a float32 copy of them (under autocast), log-softmax output, then in the
backward a zero-filled (N, V) gradient, the log-softmax gradient and its cast back: about seven
passes over N x V floats besides the three matmuls. Here the forward computes the logits (in
blocks of vocabulary columns), their log-sum-exp and loss, and the gradient of the loss with
respect to the logits (softmax minus one-hot, float32, in place of the logits) in one go; the backward scales that by the incoming per-row gradient and runs
the two matmuls. The matmuls are the same (same dtype: the autocast dtype when autocast is on,
as ``F.linear`` would use), the rest is float32 as in ``F.cross_entropy(logits.float(), ...)``;
results agree to float rounding.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

# vocabulary columns per matmul: a (N, 4096) output block stays in cache; 1 thread, N 402, D 512,
# V 32064 fp32: logits 93 -> 105 GFLOP/s, the weight gradient 92 -> 115 GFLOP/s against one matmul
CHUNK_COLS = 4096


def _compute_dtype(h: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(h.dtype, w.dtype)


class _LinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND, w_VD, b_V, target_N, dtype):
        x, w = h_ND.to(dtype), w_VD.to(dtype)
        b = None if b_V is None else b_V.to(dtype)
        N, V = x.shape[0], w.shape[0]
        g = torch.empty(N, V, dtype=torch.float32, device=x.device)  # logits, then d loss / d logits
        for a in range(0, V, CHUNK_COLS):
            z = x @ w[a:a + CHUNK_COLS].t() if b is None else torch.addmm(b[a:a + CHUNK_COLS], x, w[a:a + CHUNK_COLS].t())
            g[:, a:a + CHUNK_COLS].copy_(z)  # float32, as F.cross_entropy(logits.float())
        t = target_N.unsqueeze(1)
        z_t = g.gather(1, t).squeeze(1)
        m = g.amax(1, keepdim=True)
        g.sub_(m).exp_()
        s = g.sum(1, keepdim=True)
        loss = (m + s.log()).squeeze(1) - z_t
        g.div_(s)  # softmax
        g.scatter_add_(1, t, torch.full_like(z_t, -1.0).unsqueeze(1))  # minus one-hot
        grad_logits = g
        ctx.save_for_backward(x, w, grad_logits)
        ctx.has_bias, ctx.dtypes = b_V is not None, (h_ND.dtype, w_VD.dtype, None if b_V is None else b_V.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_N: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        x, w, g_NV = ctx.saved_tensors
        # (softmax - onehot) * upstream, cast once to the matmul dtype (as the unfused path's cast)
        g = torch.mul(g_NV, grad_N.float().unsqueeze(1)).to(x.dtype)
        hd, wd, bd = ctx.dtypes
        grad_h = (g @ w).to(hd) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = torch.empty(w.shape, dtype=x.dtype, device=x.device)
            for a in range(0, w.shape[0], CHUNK_COLS):
                torch.mm(g[:, a:a + CHUNK_COLS].t(), x, out=grad_w[a:a + CHUNK_COLS])
            grad_w = grad_w.to(wd)
        grad_b = g.sum(0).to(bd) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_h, grad_w, grad_b, None, None


def linear_cross_entropy(h_ND: torch.Tensor, weight_VD: torch.Tensor, bias_V: Optional[torch.Tensor],
                         target_N: torch.Tensor) -> torch.Tensor:
    """Per-row CE (N,) float32 of ``F.linear(h, weight, bias)`` against ``target_N`` (every
    target a valid class: filter ignored rows first). Without grad it takes the plain path."""
    if h_ND.dim() != 2 or target_N.shape != h_ND.shape[:1]:
        raise ValueError(f"linear_cross_entropy: h (N, D) and target (N,), got {tuple(h_ND.shape)}, {tuple(target_N.shape)}")
    dtype = _compute_dtype(h_ND, weight_VD)
    if not torch.is_grad_enabled() or not (h_ND.requires_grad or weight_VD.requires_grad):
        z = torch.nn.functional.linear(h_ND, weight_VD, bias_V)
        return torch.nn.functional.cross_entropy(z.float(), target_N, reduction="none")
    with torch.autocast(h_ND.device.type, enabled=False):
        return _LinearCE.apply(h_ND, weight_VD, bias_V, target_N, dtype)
