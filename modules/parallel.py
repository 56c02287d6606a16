"""Which layers of the composed model are the units of sharded training (FSDP wrapping,
activation checkpointing), by name, so a YAML can say it without import strings.

    llm_decoder_layer   LlamaDecoderLayer, Qwen2DecoderLayer   (32 x 202M params in Vicuna-7B)
    var_block           the VAR decoder's AdaLNSelfAttn blocks  (30 x 67M in VAR-d30)
    vision_layer        CLIPEncoderLayer, SiglipEncoderLayer, timm's ViT Block
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Set, Type

import torch.nn as nn

from modules.components.var_decoder import AdaLNSelfAttn


def _classes() -> Dict[str, List[Type[nn.Module]]]:
    from timm.models.vision_transformer import Block
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer
    from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

    return {"llm_decoder_layer": [LlamaDecoderLayer, Qwen2DecoderLayer], "var_block": [AdaLNSelfAttn],
            "vision_layer": [CLIPEncoderLayer, SiglipEncoderLayer, Block]}


LAYER_GROUPS = ("llm_decoder_layer", "var_block", "vision_layer")


def layer_classes(names: Sequence[str]) -> Set[Type[nn.Module]]:
    """The module classes of the named layer groups (ValueError naming the valid ones)."""
    bad = [n for n in names if n not in LAYER_GROUPS]
    if bad:
        raise ValueError(f"unknown layer group(s) {bad}; valid: {', '.join(LAYER_GROUPS)}")
    table = _classes()
    return {c for n in names for c in table[n]}
