"""Vision encoder family: image -> patch features (B, N, C) for the understanding projector.

  hf_clip    HF ``CLIPVisionModel`` (LLaVA-1.5: CLIP ViT-L/14-336, layer -2, CLS dropped: 576 tokens)
  hf_siglip  HF ``SiglipVisionModel`` (no CLS token)
  timm_vit   a timm ViT by name (``vit_large_patch14_clip_336.openai``, ...)
  tiny_vit   timm's ``VisionTransformer`` class built from width/depth/heads: the world's encoder

Every tower builds with random weights (works under ``with torch.device("meta")`` for parameter
counts), from a named preset, the size fields, or, for hf_*, the architecture and preprocessing
of a local Hugging Face directory (``config_dir``). Pretrained weights arrive only through
``model.load`` (modules/weights.py: format ``hf`` or ``timm``, into ``vision``). Nothing downloads.

``feature_layer`` follows HF's ``hidden_states`` indexing for every tower: 0 is the embedding
output, k >= 1 the output of block k, negatives count from the end (-1 = last block, -2 = the
one before, LLaVA's choice). The tower's final norm is never applied, as in LLaVA.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from datamodules.paths import resolve_path
from modules.components.registry import ComponentConfig, Registry

VISION_ENCODERS = Registry("vision_encoder")

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)

# Config-only architectures (values of the public HF configs). Each maps to HF config kwargs.
HF_VISION_PRESETS: Dict[str, Dict[str, object]] = {
    # openai/clip-vit-large-patch14-336: LLaVA-1.5's tower (303.5M parameters).
    "clip-vit-l-14-336": dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        patch_size=14, image_size=336, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    ),
    "clip-vit-l-14": dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        patch_size=14, image_size=224, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    ),
    "clip-vit-b-16": dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        patch_size=16, image_size=224, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    ),
    # google/siglip-so400m-patch14-384
    "siglip-so400m-14-384": dict(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
        patch_size=14, image_size=384, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
    ),
    # google/siglip-base-patch16-224
    "siglip-base-16-224": dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        patch_size=16, image_size=224, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
    ),
}


@dataclass
class VisionEncoderConfig(ComponentConfig):
    family: ClassVar[str] = "vision_encoder"
    name: str = "tiny_vit"  # hf_clip | hf_siglip | timm_vit | tiny_vit
    model_name: str = ""  # timm_vit: the timm architecture name
    # hf_*: a local save_pretrained / hub-snapshot directory whose config.json (architecture) and
    # preprocessor_config.json (mean, std, size) to use; a full CLIP/SigLIP checkpoint is fine.
    # Its weights load through model.load (format hf, into vision). Relative to the repo root.
    config_dir: str = ""
    preset: str = ""  # hf_*: a key of HF_VISION_PRESETS (ignored when config_dir is set)
    # Size fields for config-only builds; 0 keeps the preset's / model's value.
    image_size: int = 0
    patch_size: int = 0
    width: int = 0
    depth: int = 0
    heads: int = 0
    mlp_ratio: float = 4.0  # tiny_vit (and hf_* when width is overridden without a preset)
    feature_layer: int = -2
    drop_cls: bool = True  # drop CLS / register (prefix) tokens; SigLIP has none
    # LLaVA-1.5's `image_aspect_ratio: pad`: pad to a square with the mean colour, then resize.
    # `crop`: resize the short side, centre-crop (the CLIP processor's own behaviour).
    resize_mode: str = "pad"
    # Empty: the tower's own normalisation (CLIP's, SigLIP's 0.5, timm's pretrained_cfg).
    image_mean: List[float] = field(default_factory=list)
    image_std: List[float] = field(default_factory=list)
    attn_implementation: str = "sdpa"  # hf_*: sdpa | eager
    # Weight dtype. A frozen tower in bfloat16 halves its memory (LLaVA keeps CLIP in the
    # training dtype); forward casts pixel values to it.
    dtype: str = "float32"  # float32 | bfloat16 | float16


class ImageTransform:
    """PIL image -> normalised float tensor (3, size, size): the tower's own preprocessing.

    A plain picklable class (DataLoader workers pickle it). ``pad`` reproduces LLaVA-1.5's
    expand2square (background = the mean colour) followed by the processor's bicubic resize.
    """

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], resize_mode: str = "pad"):
        if resize_mode not in ("pad", "crop"):
            raise ValueError(f"vision_encoder.resize_mode must be pad or crop, got {resize_mode!r}")
        self.size = int(size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.resize_mode = resize_mode

    def __call__(self, image) -> torch.Tensor:
        from PIL import Image

        image = image.convert("RGB")
        w, h = image.size
        if self.resize_mode == "pad":
            if w != h:
                side = max(w, h)
                bg = tuple(int(m * 255) for m in self.mean)
                canvas = Image.new("RGB", (side, side), bg)
                canvas.paste(image, ((side - w) // 2, (side - h) // 2))
                image = canvas
            image = image.resize((self.size, self.size), Image.BICUBIC)
        else:
            scale = self.size / min(w, h)
            nw, nh = max(self.size, round(w * scale)), max(self.size, round(h * scale))
            image = image.resize((nw, nh), Image.BICUBIC)
            left, top = (nw - self.size) // 2, (nh - self.size) // 2
            image = image.crop((left, top, left + self.size, top + self.size))
        x_HW3 = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
        x_3HW = x_HW3.permute(2, 0, 1)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return ((x_3HW - mean) / std).contiguous()

    def __repr__(self) -> str:
        return f"ImageTransform(size={self.size}, mean={self.mean}, std={self.std}, resize_mode={self.resize_mode!r})"


class VisionEncoder(nn.Module):
    """A vision tower plus the choice of layer and tokens: ``forward(B3HW) -> (B, N, C)``.

    Attributes: ``num_tokens`` (N), ``out_dim`` (C), ``image_size``, ``num_layers``, ``tower``
    (the wrapped HF/timm module; its state_dict keys are the source library's).
    """

    def __init__(
        self,
        tower: nn.Module,
        kind: str,
        *,
        num_layers: int,
        num_patches: int,
        num_prefix: int,
        out_dim: int,
        image_size: int,
        feature_layer: int,
        drop_cls: bool,
        mean: Sequence[float],
        std: Sequence[float],
        resize_mode: str,
    ):
        super().__init__()
        if not -(num_layers + 1) <= feature_layer <= num_layers:
            raise ValueError(
                f"vision_encoder.feature_layer {feature_layer} out of range for {num_layers} layers "
                f"(valid {-(num_layers + 1)}..{num_layers}, HF hidden_states indexing)"
            )
        self.tower = tower
        self.kind = kind  # "hf" | "timm"
        self.num_layers = num_layers
        self.num_prefix = num_prefix
        self.feature_layer = feature_layer
        # hidden_states index -> 0-based position in a list of num_layers + 1 states
        self._hs_index = feature_layer % (num_layers + 1)
        self.drop_cls = drop_cls
        self.num_tokens = num_patches + (0 if drop_cls else num_prefix)
        self.out_dim = out_dim
        self.image_size = image_size
        self._transform = ImageTransform(image_size, mean, std, resize_mode)

    def image_transform(self) -> Callable:
        return self._transform

    @property
    def dtype(self) -> torch.dtype:
        return next(self.tower.parameters()).dtype

    def forward(self, pixel_values_B3HW: torch.Tensor) -> torch.Tensor:
        x_B3HW = pixel_values_B3HW.to(self.dtype)
        if self.kind == "hf":
            out = self.tower(pixel_values=x_B3HW, output_hidden_states=True)
            feats_BNC = out.hidden_states[self._hs_index]
        else:
            feats_BNC = self._timm_features(x_B3HW)
        if self.drop_cls and self.num_prefix:
            feats_BNC = feats_BNC[:, self.num_prefix:]
        return feats_BNC

    def _timm_features(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        m = self.tower
        if self._hs_index == 0:
            # The embedding output (block input): forward_intermediates only returns block outputs.
            x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x_B3HW))))
            return x
        # forward_intermediates splits the prefix tokens off; take them back and re-join, so CLS
        # handling happens in one place (forward) for every tower. stop_early skips the blocks
        # after the chosen one (LLaVA's layer -2 skips the last block).
        kw = dict(indices=[self._hs_index - 1], norm=False, stop_early=True, output_fmt="NLC",
                  intermediates_only=True)
        if not m.num_prefix_tokens:
            return m.forward_intermediates(x_B3HW, **kw)[0]
        ((patches_BNC, prefix_BPC),) = m.forward_intermediates(x_B3HW, return_prefix_tokens=True, **kw)
        return torch.cat([prefix_BPC, patches_BNC], dim=1)


# ---------------------------------------------------------------------------------------------
# HF towers


def _hf_processor_stats(path: str) -> Tuple[List[float], List[float], int]:
    """mean, std, size from a local preprocessor_config.json ([], [], 0 where absent)."""
    f = Path(path) / "preprocessor_config.json"
    if not f.is_file():
        return [], [], 0
    d = json.loads(f.read_text())
    size = d.get("crop_size") or d.get("size") or 0
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge") or 0
    return list(d.get("image_mean") or []), list(d.get("image_std") or []), int(size or 0)


def _hf_tower(cfg: VisionEncoderConfig, model_type: str, has_cls: bool) -> VisionEncoder:
    from transformers import AutoModel, CLIPVisionConfig, SiglipVisionConfig

    config_cls = CLIPVisionConfig if model_type == "clip" else SiglipVisionConfig
    mean, std, proc_size = [], [], 0
    if cfg.config_dir:
        path = resolve_path(cfg.config_dir)
        if not path.is_dir():
            raise FileNotFoundError(
                f"vision_encoder {cfg.name}: config_dir {str(path)!r} is not a directory "
                "(expected a save_pretrained / hub-snapshot folder with config.json)"
            )
        config = config_cls.from_pretrained(str(path), local_files_only=True)
        tower = AutoModel.from_config(config, attn_implementation=cfg.attn_implementation)
        mean, std, proc_size = _hf_processor_stats(str(path))
    else:
        kw: Dict[str, object] = {}
        if cfg.preset:
            if cfg.preset not in HF_VISION_PRESETS:
                raise ValueError(
                    f"unknown vision_encoder.preset {cfg.preset!r}; valid: {', '.join(sorted(HF_VISION_PRESETS))}"
                )
            kw.update(HF_VISION_PRESETS[cfg.preset])
        for key, val in (
            ("image_size", cfg.image_size), ("patch_size", cfg.patch_size), ("hidden_size", cfg.width),
            ("num_hidden_layers", cfg.depth), ("num_attention_heads", cfg.heads),
        ):
            if val:
                kw[key] = val
        if cfg.width and not cfg.preset:
            kw["intermediate_size"] = int(cfg.width * cfg.mlp_ratio)
        if model_type == "siglip":
            kw["vision_use_head"] = False  # the attention-pool head is unused by LLaVA-style models
        config = config_cls(**kw)
        tower = AutoModel.from_config(config, attn_implementation=cfg.attn_implementation)
    c = tower.config
    image_size = int(c.image_size)
    if proc_size and proc_size != image_size:
        raise ValueError(f"{cfg.config_dir}: processor size {proc_size} != model image_size {image_size}")
    grid = image_size // int(c.patch_size)
    return VisionEncoder(
        tower, "hf",
        num_layers=int(c.num_hidden_layers), num_patches=grid * grid, num_prefix=1 if has_cls else 0,
        out_dim=int(c.hidden_size), image_size=image_size, feature_layer=cfg.feature_layer,
        drop_cls=cfg.drop_cls,
        mean=cfg.image_mean or mean or (OPENAI_CLIP_MEAN if model_type == "clip" else HALF),
        std=cfg.image_std or std or (OPENAI_CLIP_STD if model_type == "clip" else HALF),
        resize_mode=cfg.resize_mode,
    )


@VISION_ENCODERS.register("hf_clip")
def _hf_clip(cfg: VisionEncoderConfig) -> VisionEncoder:
    return _hf_tower(cfg, "clip", has_cls=True)


@VISION_ENCODERS.register("hf_siglip")
def _hf_siglip(cfg: VisionEncoderConfig) -> VisionEncoder:
    return _hf_tower(cfg, "siglip", has_cls=False)


# ---------------------------------------------------------------------------------------------
# timm towers


def _timm_encoder(model: nn.Module, cfg: VisionEncoderConfig, default_mean, default_std) -> VisionEncoder:
    if not hasattr(model, "forward_intermediates") or not hasattr(model, "patch_embed"):
        raise TypeError(f"timm model {type(model).__name__} is not a ViT with forward_intermediates")
    grid = model.patch_embed.grid_size
    image_size = int(model.patch_embed.img_size[0])
    pcfg = getattr(model, "pretrained_cfg", None) or {}
    mean = cfg.image_mean or list(pcfg.get("mean", default_mean))
    std = cfg.image_std or list(pcfg.get("std", default_std))
    return VisionEncoder(
        model, "timm",
        num_layers=len(model.blocks), num_patches=int(grid[0] * grid[1]),
        num_prefix=int(model.num_prefix_tokens), out_dim=int(model.embed_dim), image_size=image_size,
        feature_layer=cfg.feature_layer, drop_cls=cfg.drop_cls, mean=mean, std=std,
        resize_mode=cfg.resize_mode,
    )


@VISION_ENCODERS.register("timm_vit")
def _timm_vit(cfg: VisionEncoderConfig) -> VisionEncoder:
    import timm

    if not cfg.model_name:
        raise ValueError("vision_encoder timm_vit needs model_name (a timm architecture, e.g. vit_base_patch16_224)")
    kw: Dict[str, object] = {"num_classes": 0}
    if cfg.image_size:
        kw["img_size"] = cfg.image_size
    # pretrained=False always: weights come only through model.load (format timm), never the hub.
    model = timm.create_model(cfg.model_name, pretrained=False, **kw)
    return _timm_encoder(model, cfg, HALF, HALF)


@VISION_ENCODERS.register("tiny_vit")
def _tiny_vit(cfg: VisionEncoderConfig) -> VisionEncoder:
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(
        img_size=cfg.image_size or 64,
        patch_size=cfg.patch_size or 8,
        embed_dim=cfg.width or 128,
        depth=cfg.depth or 4,
        num_heads=cfg.heads or 4,
        mlp_ratio=cfg.mlp_ratio,
        num_classes=0,
        pre_norm=True,  # CLIP's layout (ln_pre), so the world tower matches the real one
    )
    return _timm_encoder(model, cfg, HALF, HALF)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_vision_encoder(cfg: VisionEncoderConfig) -> VisionEncoder:
    """Build the encoder named by ``cfg`` with random weights; works under
    ``with torch.device("meta")``."""
    if cfg.dtype not in _DTYPES:
        raise ValueError(f"vision_encoder.dtype must be one of {', '.join(_DTYPES)}, got {cfg.dtype!r}")
    if cfg.attn_implementation not in ("sdpa", "eager"):
        raise ValueError(f"vision_encoder.attn_implementation must be sdpa or eager, got {cfg.attn_implementation!r}")
    encoder = VISION_ENCODERS.build(cfg)
    return encoder.to(_DTYPES[cfg.dtype])
