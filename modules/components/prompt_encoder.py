"""A small trainable encoder over the prompt context the VAR cross-attends to (model.prompt_encoder_layers).

Why: with ``var_cond: prompt_attn`` the VAR's cross-attention reads the frozen LLM's prompt
states as an unordered set (the LLM's rotary positions do not reach the keys), so it can pair a
colour with a shape only if the state at one word already carries the other. On the world, a
linear probe reads an object's colour from the frozen LLM's state at its shape word only
0.59-0.65 of the time (6 colours; `experiments.probe --prompt-binding`), and generated multi-object scenes show it: the right colours and
the right shapes, paired at random. These layers let the generation side relate neighbouring
words itself: bidirectional self-attention over the projected prompt states, with learned
positions counted back from the prompt's end (the <|image_gen_start|> state is position 0), so
a right-padded training row and a left-padded generation row give the same positions.

Each layer is pre-norm ``x += attn(LN(x) + pos)``, ``x += mlp(LN(x))`` with both output layers
starting at zero: a model that gains these layers computes exactly what it did before until
they train (and an export without them loads with them at identity).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PromptEncoderLayer(nn.Module):
    def __init__(self, C: int, H: int, max_len: int, mlp_ratio: float = 2.0):
        super().__init__()
        self.H, self.hd = H, C // H
        self.ln1 = nn.LayerNorm(C)
        self.pos = nn.Embedding(max_len, C)  # distance from the prompt's last token
        nn.init.normal_(self.pos.weight, std=0.02)
        self.qk = nn.Linear(C, 2 * C)
        self.v = nn.Linear(C, C)
        self.proj = nn.Linear(C, C)
        self.ln2 = nn.LayerNorm(C)
        self.mlp = nn.Sequential(nn.Linear(C, round(C * mlp_ratio)), nn.GELU(), nn.Linear(round(C * mlp_ratio), C))
        for last in (self.proj, self.mlp[-1]):  # start as the identity
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def forward(self, x_NPC: torch.Tensor, keep_NP: torch.Tensor, pos_NP: torch.Tensor) -> torch.Tensor:
        N, P, C = x_NPC.shape
        h = self.ln1(x_NPC)
        q, k = self.qk(h + self.pos(pos_NP)).view(N, P, 2, self.H, self.hd).permute(2, 0, 3, 1, 4).unbind(0)
        v = self.v(h).view(N, P, self.H, self.hd).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep_NP.view(N, 1, 1, P))  # padding never read
        x_NPC = x_NPC + self.proj(o.transpose(1, 2).reshape(N, P, C))
        return x_NPC + self.mlp(self.ln2(x_NPC))


class PromptEncoder(nn.Module):
    """``forward(ctx (N, P, C), keep (N, P) bool) -> (N, P, C)``; keep marks the real prompt
    tokens (each row's last kept position is its prompt's end)."""

    def __init__(self, C: int, H: int, depth: int, max_len: int = 512):
        super().__init__()
        self.max_len = max_len
        self.layers = nn.ModuleList(PromptEncoderLayer(C, H, max_len) for _ in range(depth))

    def forward(self, ctx_NPC: torch.Tensor, keep_NP: torch.Tensor) -> torch.Tensor:
        # position = number of kept tokens after this one (0 at the prompt's end); padding gets 0
        # too, but it is masked out as a key and never read downstream
        after = keep_NP.flip(1).long().cumsum(1).flip(1) - keep_NP.long()
        pos = (after * keep_NP.long()).clamp(max=self.max_len - 1)
        for layer in self.layers:
            ctx_NPC = layer(ctx_NPC, keep_NP, pos)
        return ctx_NPC
