"""Projector family: maps features between spaces.

Three projectors in VARGPT, all from this family:
  und      vision features (B, N, C_vis) -> LLM embeddings (B, N, d_llm)  (LLaVA-1.5: mlp2x_gelu)
  gen_in   VAR front-end states (B, L, C_var) -> LLM embeddings (B, L, d_llm)
  gen_out  LLM hidden states (B, L, d_llm) -> VAR block inputs (B, L, C_var)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn as nn

from modules.components.registry import ComponentConfig, Registry

PROJECTORS = Registry("projector")


@dataclass
class ProjectorConfig(ComponentConfig):
    family: ClassVar[str] = "projector"
    name: str = "mlp"  # linear | mlp
    depth: int = 2  # number of Linear layers for `mlp` (LLaVA-1.5's mlp2x_gelu is depth 2)
    # Widths are filled in by the composed model from the parts it connects; a YAML may leave
    # them at 0.
    in_dim: int = 0
    out_dim: int = 0
    hidden_dim: int = 0  # 0 -> the width `hidden_from` names
    # The hidden width when hidden_dim is 0: "out" (LLaVA's mlp2x_gelu) or "in" (VARGPT's gen
    # projectors, GenPatchMerger: Linear(in, in), GELU, Linear(in, out)).
    hidden_from: str = "out"


@PROJECTORS.register("linear")
def _linear(cfg: ProjectorConfig) -> nn.Module:
    return nn.Linear(cfg.in_dim, cfg.out_dim)


@PROJECTORS.register("mlp")
def _mlp(cfg: ProjectorConfig) -> nn.Module:
    if cfg.depth < 1:
        raise ValueError(f"projector depth must be >= 1, got {cfg.depth}")
    if cfg.hidden_from not in ("out", "in"):
        raise ValueError(f"projector hidden_from must be out or in, got {cfg.hidden_from!r}")
    hidden = cfg.hidden_dim or (cfg.in_dim if cfg.hidden_from == "in" else cfg.out_dim)
    dims = [cfg.in_dim] + [hidden] * (cfg.depth - 1) + [cfg.out_dim]
    layers: list[nn.Module] = []
    for i in range(cfg.depth):
        if i > 0:
            layers.append(nn.GELU())
        layers.append(nn.Linear(dims[i], dims[i + 1]))
    # LLaVA's key layout: Sequential indices 0, 2, ... are the Linear layers.
    return nn.Sequential(*layers)


def build_projector(cfg: ProjectorConfig) -> nn.Module:
    if cfg.in_dim <= 0 or cfg.out_dim <= 0:
        raise ValueError(f"projector needs in_dim and out_dim > 0, got {cfg.in_dim}, {cfg.out_dim}")
    return PROJECTORS.build(cfg)
