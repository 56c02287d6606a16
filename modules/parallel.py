"""Which layers of the composed model are the units of sharded training (FSDP wrapping,
activation checkpointing), by name, so a YAML can say it without import strings.

    llm_decoder_layer   LlamaDecoderLayer, Qwen2DecoderLayer,  (32 x 202M params in Vicuna-7B)
                        Qwen2VLDecoderLayer                    (28 x 233M in VARGPT-v1.1's LLM)
    var_block           the VAR decoder's AdaLNSelfAttn blocks  (30 x 67M in VAR-d30), the Infinity
                        decoder's CrossAttnBlock               (32 x 67M in VARGPT-v1.1)
    vision_layer        CLIPEncoderLayer, SiglipEncoderLayer, timm's ViT Block, Qwen2VLVisionBlock
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Set, Tuple, Type

import torch.nn as nn

from modules.components.infinity import CrossAttnBlock
from modules.components.var_decoder import AdaLNSelfAttn


def _classes() -> Dict[str, List[Type[nn.Module]]]:
    from timm.models.vision_transformer import Block
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLDecoderLayer, Qwen2VLVisionBlock
    from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

    return {"llm_decoder_layer": [LlamaDecoderLayer, Qwen2DecoderLayer, Qwen2VLDecoderLayer],
            "var_block": [AdaLNSelfAttn, CrossAttnBlock],
            "vision_layer": [CLIPEncoderLayer, SiglipEncoderLayer, Block, Qwen2VLVisionBlock]}


LAYER_GROUPS = ("llm_decoder_layer", "var_block", "vision_layer")

# Layers whose parameters are also used outside their own forward become sharding units through
# these children instead (each called as a module inside the layer's code): a VAR block's AdaLN
# parameters (ada_lin, C -> 6C) are computed once per condition by the decoder (VARDecoder.
# block_conds calls blk.ada) before the blocks run, so the block itself cannot gather its
# parameters in its own forward. Parameters outside these children (shared_aln's ada_gss, 6C)
# stay in the root unit.
UNIT_PARTS: Dict[Type[nn.Module], Tuple[str, ...]] = {AdaLNSelfAttn: ("attn", "ffn", "ada_lin")}


def sharding_units(layer: nn.Module) -> List[nn.Module]:
    """The modules of one wrapped layer that become sharding units: the layer itself, or its
    UNIT_PARTS children where its class has them."""
    parts = UNIT_PARTS.get(type(layer))
    if parts is None:
        return [layer]
    return [m for m in (getattr(layer, n, None) for n in parts) if isinstance(m, nn.Module) and any(True for _ in m.parameters())]


def layer_classes(names: Sequence[str]) -> Set[Type[nn.Module]]:
    """The module classes of the named layer groups (ValueError naming the valid ones)."""
    bad = [n for n in names if n not in LAYER_GROUPS]
    if bad:
        raise ValueError(f"unknown layer group(s) {bad}; valid: {', '.join(LAYER_GROUPS)}")
    table = _classes()
    return {c for n in names for c in table[n]}
