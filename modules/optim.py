"""Optimiser and schedule shared by every stage.

AdamW with no weight decay on norms, biases, embeddings and position parameters (decaying them
hurts and is what most LLM/VAR recipes avoid), linear warmup then cosine to a floor.
"""
from __future__ import annotations

import math
from typing import Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

# Parameter-name fragments that never get weight decay.
_NO_DECAY_TOKENS = ("bias", "norm", "ln_", "embed", "pos_", "pos_start", "lvl_", "class_emb", "cond_emb", "scale_shift")


def split_decay(named: Iterable[Tuple[str, nn.Parameter]]) -> Tuple[List[nn.Parameter], List[nn.Parameter]]:
    """(decay, no_decay) among trainable parameters: matrices decay; 1-D tensors, norms,
    embeddings and position parameters do not."""
    decay, no_decay = [], []
    for name, p in named:
        if not p.requires_grad:
            continue
        lname = name.lower()
        if p.ndim < 2 or any(t in lname for t in _NO_DECAY_TOKENS):
            no_decay.append(p)
        else:
            decay.append(p)
    return decay, no_decay


def build_optimizer(module: nn.Module, lr: float, weight_decay: float, betas, eps: float) -> torch.optim.Optimizer:
    decay, no_decay = split_decay(module.named_parameters())
    if not decay and not no_decay:
        raise ValueError("no trainable parameters: check the stage's trainable set")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    # fused/foreach kernels only help on GPU; the default picks foreach there.
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)


def lr_lambda(step: int, total: int, warmup: int, min_ratio: float, schedule: str = "cosine") -> float:
    """Multiplier on the base lr at optimizer step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"optim.schedule must be 'cosine' or 'constant', got {schedule!r}")
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(opt: torch.optim.Optimizer, total_steps: int, warmup_steps: int, warmup_ratio: float,
                    min_lr_ratio: float, schedule: str) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = warmup_steps or int(round(warmup_ratio * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_lambda(s, total_steps, warmup, min_lr_ratio, schedule)
    )


def param_counts(module: nn.Module) -> Tuple[int, int]:
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return total, trainable


# AdamW keeps two moments per weight (exp_avg, exp_avg_sq), each of the weight's shape and dtype.
ADAMW_MOMENTS = 2


def checkpoint_bytes(params: Iterable[torch.Tensor], master_dtype: Optional[torch.dtype] = None) -> int:
    """Bytes of the tensors in a training checkpoint of these parameters: each trainable weight and
    its AdamW moments, (1 + 2) x numel x bytes of the dtype the optimizer steps in (``master_dtype``;
    None: each parameter's own). Frozen parameters are left out (a checkpoint keeps their hash).
    The recipes train bf16-mixed over fp32 weights: 12 bytes per trainable parameter, 80.9 GB for
    stage 2's 6.74B. The one place a planned checkpoint size is computed (benchmarks.gpu_check)."""
    total = 0
    for p in params:
        if p.requires_grad:
            size = torch.finfo(master_dtype).bits // 8 if master_dtype is not None else p.element_size()
            total += (1 + ADAMW_MOMENTS) * p.numel() * size
    return total
