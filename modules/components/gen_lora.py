"""Low-rank deltas on the LLM's linear layers that act only at the image-generation slots.

``model.gen_lora_rank`` > 0 (beyond VARGPT v1): every ``nn.Linear`` of the LLM's decoder layers
(attention q/k/v/o and the MLP) gets a LoRA pair, ``y = W x + (alpha / r) * B(A(x)) * m``, where
``m`` is 1 at the <|image_gen_pad|> slots and 0 elsewhere. In v1 the LLM states at those slots
are what the VAR reads (through gen_out), and stage 3 trains everything on the generation side
except the LLM, which stage 2 trained mostly on understanding. These deltas give the image
positions their own trainable LLM (they attend over the prompt in order, with positions, through
all the LLM's layers) while every text position before an image slot computes exactly what the
frozen LLM computes: understanding and the prompt states do not change, whatever the deltas
learn (text after a generated image, e.g. <|image_gen_end|>, attends to the changed slots).

``B`` starts at zero, so a model with the deltas computes what the model without them does and
an export without them loads at identity. The deltas are forward hooks on the LLM's own linear
modules (the LLM's state-dict keys stay those of the released layout); their parameters live in
this module (``gen_lora.<linear path with dots as '__'>.A/B``).

The mask: ``set_mask(m_BT)`` before each LLM call (``VARGPT.run_llm``), one (B, T) value per
input position, or None (no generation slot: no delta). It stays set until the next call, on
purpose: activation checkpointing recomputes the layers during the backward pass, after the
forward has returned, and must see the mask the forward saw.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn as nn


class _Delta(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, dtype: torch.dtype):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # nn.Linear's init; B = 0 makes the delta 0

    def forward(self, x_BTI: torch.Tensor) -> torch.Tensor:
        return (x_BTI @ self.A.t()) @ self.B.t()  # (B, T, out)


class _AddDelta:
    """The forward hook of one adapted linear. An object, not a closure, so that a deep copy of
    the model (tests, EMA) hooks the copy's linears to the copy's deltas."""

    def __init__(self, owner: "GenLoRA", key: str):
        self.owner, self.key = owner, key

    def __call__(self, module: nn.Module, inputs, out: torch.Tensor) -> Optional[torch.Tensor]:
        return self.owner.add_delta(self.key, inputs[0], out)


class GenLoRA(nn.Module):
    """LoRA deltas (rank ``rank``, scale ``alpha / rank``) on every linear layer of ``layers``,
    applied where the mask is set. Holds the parameters and the hooks; the LLM stays as it was."""

    def __init__(self, layers: nn.Module, rank: int, alpha: float = 0.0):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"GenLoRA rank must be positive, got {rank}")
        self.rank = rank
        self.scale = (alpha or rank) / rank
        self.deltas = nn.ModuleDict()
        self._mask: Optional[torch.Tensor] = None
        targets: Dict[str, nn.Linear] = {n: m for n, m in layers.named_modules() if isinstance(m, nn.Linear)}
        if not targets:
            raise ValueError("GenLoRA: the LLM's decoder layers hold no nn.Linear to adapt")
        for name, lin in targets.items():
            key = name.replace(".", "__")
            self.deltas[key] = _Delta(lin.in_features, lin.out_features, rank, lin.weight.dtype)
            lin.register_forward_hook(_AddDelta(self, key))

    def add_delta(self, key: str, x: torch.Tensor, out: torch.Tensor) -> Optional[torch.Tensor]:
        """The hooked linear's output ``out`` for input ``x`` (B, T, in), plus its masked delta."""
        m_BT = self._mask
        if m_BT is None:
            return None  # no generation slot in this call: the frozen LLM's output as is
        if tuple(m_BT.shape) != tuple(x.shape[:-1]):
            raise RuntimeError(f"GenLoRA: mask {tuple(m_BT.shape)} for an input of {tuple(x.shape)}: call "
                               "the LLM through VARGPT.run_llm (it sets the mask per call)")
        delta = self.deltas[key]
        d = delta(x.to(delta.A.dtype))
        return out + (d * (self.scale * m_BT.unsqueeze(-1).to(d.dtype))).to(out.dtype)

    def set_mask(self, m_BT: Optional[torch.Tensor]) -> None:
        """1 where the deltas act (the <|image_gen_pad|> slots of this call's inputs), else 0;
        None for none at all."""
        self._mask = m_BT
