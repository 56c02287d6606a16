"""The `model:` section of an experiment config.

Each part of the composed model is a component family (modules/components/*), chosen by
``name`` and sized by its own typed config. Widths that follow from other parts (a projector's
in/out dims) are filled in when the model is built, so YAML files state each size once.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from modules.components.projectors import ProjectorConfig


@dataclass
class ModelConfig:
    # vision features -> LLM embeddings (LLaVA-1.5: mlp2x_gelu)
    und_projector: ProjectorConfig = field(default_factory=lambda: ProjectorConfig(name="mlp", depth=2))
    # VAR front-end states -> LLM embeddings, and LLM states -> VAR block inputs
    gen_in_projector: ProjectorConfig = field(default_factory=lambda: ProjectorConfig(name="mlp", depth=2))
    gen_out_projector: ProjectorConfig = field(default_factory=lambda: ProjectorConfig(name="mlp", depth=2))
