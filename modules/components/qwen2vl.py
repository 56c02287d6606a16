"""Qwen2-VL language model, vision encoder and position schemes (the LLM side of VARGPT-v1.1).

Which classes: transformers' ``Qwen2VLTextModel`` (decoder stack + final norm, released keys
``model.*``) and ``Qwen2VisionTransformerPretrainedModel`` (ViT + 2x2 merger, released keys
``visual.*``). Their numbers match the release (transformers 4.46.1 copy) on the vendored
vectors to float rounding: the only difference between the releases is packaging, and positions
are always passed in explicitly, so no version-dependent default position logic is reached.
``lm_head`` is a plain Linear beside them (untied).

The position seam (``POSITION_SCHEMES``): how an LLM sequence's rotary positions are made.
``mrope`` is Qwen2-VL's 3-D scheme (text: t = h = w = running index; image tokens: (t, h, w)
of the merged grid offset by the text before them), ``1d`` broadcasts 0..L-1 to the three
sections, which is what the released training ``forward`` does (it never computes 3-D
positions). Both return (3, B, L) int64 and per-row ``deltas`` (B, 1) = max position + 1 - L,
the offset a cached continuation adds to its cache index.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from modules.components.registry import ComponentConfig, Registry

POSITION_SCHEMES = Registry("position_scheme")
QWEN2VL = Registry("qwen2vl")

# CLIP statistics: what the Qwen2-VL image processor normalizes with
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class Qwen2VLConfig(ComponentConfig):
    """Sizes of the LLM + ViT. Defaults: the release (Qwen2-VL-7B) at its 152064-row vocabulary."""

    family: ClassVar[str] = "qwen2vl"
    name: str = "qwen2vl"
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    mrope_section: List[int] = field(default_factory=lambda: [16, 24, 24])
    max_position_embeddings: int = 32768
    # vision
    vision_depth: int = 32
    vision_embed_dim: int = 1280
    vision_num_heads: int = 16
    vision_mlp_ratio: int = 4
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    attn_implementation: str = "sdpa"

    @classmethod
    def from_released(cls, config: Mapping[str, Any], **over) -> "Qwen2VLConfig":
        """From a released ``config.json`` (keys as the official config class writes them)."""
        def need(k: str, d: Mapping[str, Any] = config, where: str = "config.json") -> Any:
            if k not in d:
                raise KeyError(f"{where} lacks {k!r}: not a Qwen2-VL / VARGPT-v1.1 config")
            return d[k]

        vc = need("vision_config")
        rope = config.get("rope_scaling") or {}
        vals = dict(
            vocab_size=need("vocab_size"), hidden_size=need("hidden_size"),
            intermediate_size=need("intermediate_size"), num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=need("num_attention_heads"),
            num_key_value_heads=config.get("num_key_value_heads", config["num_attention_heads"]),
            rms_norm_eps=config.get("rms_norm_eps", 1e-6), rope_theta=config.get("rope_theta", 1e6),
            mrope_section=list(need("mrope_section", rope, "config.json rope_scaling")),
            max_position_embeddings=config.get("max_position_embeddings", 32768),
            vision_depth=need("depth", vc, "config.json vision_config"),
            vision_embed_dim=need("embed_dim", vc, "config.json vision_config"),
            vision_num_heads=need("num_heads", vc, "config.json vision_config"),
            vision_mlp_ratio=vc.get("mlp_ratio", 4), patch_size=vc.get("spatial_patch_size", vc.get("patch_size", 14)),
            temporal_patch_size=vc.get("temporal_patch_size", 2), spatial_merge_size=vc.get("spatial_merge_size", 2),
        )
        vals.update(over)
        return cls(**vals)

    def to_released(self) -> Dict[str, Any]:
        """The LLM / vision part of a released ``config.json``."""
        return {
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta, "max_position_embeddings": self.max_position_embeddings,
            "max_window_layers": self.num_hidden_layers, "sliding_window": self.max_position_embeddings,
            "use_sliding_window": False, "hidden_act": "silu", "attention_dropout": 0.0, "tie_word_embeddings": False,
            "rope_scaling": {"mrope_section": list(self.mrope_section), "rope_type": "default", "type": "default"},
            "vision_config": {"depth": self.vision_depth, "embed_dim": self.vision_embed_dim,
                              "hidden_size": self.hidden_size, "in_chans": 3, "mlp_ratio": self.vision_mlp_ratio,
                              "model_type": "vargpt_qwen2_vl", "num_heads": self.vision_num_heads,
                              "spatial_patch_size": self.patch_size},
        }


def build_text_model(cfg: Qwen2VLConfig) -> nn.Module:
    from transformers import Qwen2VLTextConfig, Qwen2VLTextModel

    hf = Qwen2VLTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings, use_sliding_window=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta, "mrope_section": list(cfg.mrope_section)},
    )
    hf._attn_implementation = cfg.attn_implementation
    return Qwen2VLTextModel(hf)


def build_vision_model(cfg: Qwen2VLConfig) -> nn.Module:
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    hf = Qwen2VLVisionConfig(
        depth=cfg.vision_depth, embed_dim=cfg.vision_embed_dim, hidden_size=cfg.hidden_size,
        num_heads=cfg.vision_num_heads, mlp_ratio=cfg.vision_mlp_ratio, patch_size=cfg.patch_size,
        temporal_patch_size=cfg.temporal_patch_size, spatial_merge_size=cfg.spatial_merge_size,
    )
    hf._attn_implementation = cfg.attn_implementation
    return Qwen2VisionTransformerPretrainedModel(hf)


def image_to_patches(img_HWC_u8: torch.Tensor, cfg: Qwen2VLConfig) -> Tuple[torch.Tensor, torch.Tensor]:
    """One RGB uint8 image (H, W, 3), H and W multiples of patch*merge, -> (patches (N, 3*T*p*p),
    grid (3,) = (1, H/p, W/p)), ordered as Qwen2-VL's processor orders them (merge windows
    contiguous) and normalized with the CLIP statistics. Images of other sizes must be resized
    to such multiples first (``smart_resize``)."""
    p, m, T = cfg.patch_size, cfg.spatial_merge_size, cfg.temporal_patch_size
    H, W = img_HWC_u8.shape[:2]
    if H % (p * m) or W % (p * m):
        raise ValueError(f"image {H}x{W} is not a multiple of patch*merge = {p * m}; resize it first (smart_resize)")
    x = img_HWC_u8.permute(2, 0, 1).float().div(255)
    x = (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    x = x.unsqueeze(0).expand(T, -1, -1, -1)  # one still image fills the temporal patch
    gh, gw = H // p, W // p
    x = x.reshape(1, T, 3, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # grid_t, h/m, w/m, m, m, C, T, p, p
    return x.reshape(gh * gw, 3 * T * p * p), torch.tensor([1, gh, gw])


def smart_resize(h: int, w: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280) -> Tuple[int, int]:
    """Qwen2-VL's target size: multiples of ``factor``, area within [min_pixels, max_pixels]."""
    import math

    hb, wb = max(factor, round(h / factor) * factor), max(factor, round(w / factor) * factor)
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb, wb = math.floor(h / beta / factor) * factor, math.floor(w / beta / factor) * factor
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return hb, wb


def preprocess_image(img_HWC_u8: torch.Tensor, cfg: Qwen2VLConfig, min_pixels: int = 56 * 56,
                     max_pixels: int = 28 * 28 * 1280) -> Tuple[torch.Tensor, torch.Tensor]:
    """Qwen2-VL's image processor: ``smart_resize`` (PIL bicubic when the size changes), CLIP
    normalization, patches -> (patches (N, 3*T*p*p), grid (1, 3)). Equal to transformers'
    Qwen2VLImageProcessorPil on the vendored images and on random sizes (tests)."""
    f = cfg.patch_size * cfg.spatial_merge_size
    H, W = img_HWC_u8.shape[:2]
    h, w = smart_resize(H, W, factor=f, min_pixels=min_pixels, max_pixels=max_pixels)
    if (h, w) != (H, W):
        import numpy as np
        from PIL import Image  # lazy: only for images that need resizing

        img_HWC_u8 = torch.from_numpy(np.asarray(Image.fromarray(img_HWC_u8.numpy()).resize((w, h), Image.BICUBIC)).copy())
    p, g = image_to_patches(img_HWC_u8, cfg)
    return p, g.view(1, 3)


# ---------------------------------------------------------------------------------------------
# position schemes


@dataclass
class PositionIds:
    image_token_id: int
    vision_start_id: int
    spatial_merge_size: int = 2


def positions_1d(input_ids_BL: torch.Tensor, attention_mask_BL: Optional[torch.Tensor] = None,
                 image_grid_thw: Optional[torch.Tensor] = None, ids: Optional[PositionIds] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    B, L = input_ids_BL.shape
    pos = torch.arange(L, device=input_ids_BL.device).view(1, 1, L).expand(3, B, L).clone()
    return pos, torch.zeros(B, 1, dtype=torch.long, device=input_ids_BL.device)


def positions_mrope(input_ids_BL: torch.Tensor, attention_mask_BL: Optional[torch.Tensor] = None,
                    image_grid_thw: Optional[torch.Tensor] = None, ids: Optional[PositionIds] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Qwen2-VL 3-D positions -> (3, B, L), deltas (B, 1). Padded positions (mask 0) hold 1.

    Per row, over the unpadded tokens: a text run continues t = h = w from the running maximum
    + 1; an image of merged grid (t, h, w), whose t*h*w ``<|image_pad|>`` tokens start at the
    next image_pad, takes (t_i, h_i, w_i) + offset, so the next text starts at offset +
    max(t, h, w). Grids are consumed in order over the rows (``image_grid_thw``)."""
    if ids is None:
        raise ValueError("mrope positions need the image token id (PositionIds)")
    B, L = input_ids_BL.shape
    dev = input_ids_BL.device
    mask = torch.ones_like(input_ids_BL) if attention_mask_BL is None else attention_mask_BL
    pos = torch.ones(3, B, L, dtype=torch.long, device=dev)
    deltas = torch.zeros(B, 1, dtype=torch.long, device=dev)
    grids = [] if image_grid_thw is None else [tuple(int(v) for v in g) for g in image_grid_thw]
    gi = 0
    m = ids.spatial_merge_size
    for b in range(B):
        toks = input_ids_BL[b][mask[b] == 1].tolist()
        parts: List[torch.Tensor] = []
        nxt, i, n = 0, 0, len(toks)
        while i < n:
            if toks[i] == ids.image_token_id:
                if gi >= len(grids):
                    raise ValueError(f"row {b}: more image placeholders than image_grid_thw rows ({len(grids)})")
                t, h, w = grids[gi][0], grids[gi][1] // m, grids[gi][2] // m
                gi += 1
                ti = torch.arange(t).view(-1, 1).expand(-1, h * w).flatten()
                hi = torch.arange(h).view(1, -1, 1).expand(t, -1, w).flatten()
                wi = torch.arange(w).view(1, 1, -1).expand(t, h, -1).flatten()
                parts.append(torch.stack([ti, hi, wi]) + nxt)
                nxt = int(parts[-1].max()) + 1
                i += t * h * w
            else:
                j = i
                while j < n and toks[j] != ids.image_token_id:
                    j += 1
                parts.append(torch.arange(nxt, nxt + j - i).view(1, -1).expand(3, -1))
                nxt += j - i
                i = j
        llm = torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long)
        pos[:, b, mask[b] == 1] = llm.to(dev)
        deltas[b, 0] = (int(llm.max()) + 1 if llm.numel() else 0) - L
    return pos, deltas


POSITION_SCHEMES.register("1d")(lambda: positions_1d)
POSITION_SCHEMES.register("mrope")(lambda: positions_mrope)


def position_fn(name: str) -> Callable[..., Tuple[torch.Tensor, torch.Tensor]]:
    return POSITION_SCHEMES.get(name, "position scheme")()


@QWEN2VL.register("qwen2vl")
def build_qwen2vl(cfg: Qwen2VLConfig) -> Tuple[nn.Module, nn.Module]:
    """(text model, vision model) of one config."""
    return build_text_model(cfg), build_vision_model(cfg)
