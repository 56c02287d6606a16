"""A tiny VARGPT for tests: every component family at toy size, built in about a second.

Sizes: 32 px input images (tiny ViT, patch 8 -> 16 tokens), 16 px generation targets through a
4x VQVAE (4x4 latent, patch_nums 1,2,4 -> L = 21), a 2-layer Llama of width 64, a 1-block VAR.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from PIL import Image

from datamodules.testing import _CORPUS
from datamodules.tokens import IMAGE_GEN_PLACEHOLDER, IMAGE_TOKEN
from modules.components.llm import LLMConfig
from modules.components.text_tokenizer import TokenizerConfig, train_world_tokenizer
from modules.components.var_decoder import VARConfig
from modules.components.vision_encoders import VisionEncoderConfig
from modules.components.vqvae import VQVAEConfig
from modules.config import ModelConfig


def tiny_tokenizer_dir(root: Path) -> Path:
    d = root / "tok"
    if not (d / "tokenizer.json").is_file():
        train_world_tokenizer(list(_CORPUS) * 3, d, vocab_size=400)
    return d


def tiny_model_config(root: Path, **over: Any) -> ModelConfig:
    cfg = ModelConfig(
        tokenizer=TokenizerConfig(name="world", path=str(tiny_tokenizer_dir(root))),
        vision=VisionEncoderConfig(name="tiny_vit", image_size=32, patch_size=8, width=32, depth=2, heads=2,
                                   feature_layer=-1),
        llm=LLMConfig(name="llama", preset="tiny", hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=2,
                      intermediate_size=128, max_position_embeddings=512),
        vqvae=VQVAEConfig(vocab_size=32, z_channels=8, ch=16, ch_mult=[1, 1, 2], num_res_blocks=1, norm_groups=8,
                          patch_nums=[1, 2, 4], using_sa=False, using_mid_sa=False),
        var=VARConfig(depth=1, embed_dim=32, num_heads=2, cond_mode="external", attn_l2_norm=True),
    )
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def und_sample(key: str, q: str = "What colour is the circle?", a: str = "red", colour=(200, 30, 30)) -> Dict[str, Any]:
    messages = [{"role": "user", "content": f"{IMAGE_TOKEN}\n{q}"}, {"role": "assistant", "content": a}]
    return _sample(key, messages, [Image.new("RGB", (32, 32), colour)], "understanding")


def gen_sample(key: str, instr: str = "Draw a red circle on the left.", colour=(30, 30, 200)) -> Dict[str, Any]:
    messages = [{"role": "user", "content": instr}, {"role": "assistant", "content": IMAGE_GEN_PLACEHOLDER}]
    im = Image.new("RGB", (16, 16), (230, 230, 230))
    im.paste(colour, (2, 2, 10, 10))
    return _sample(key, messages, [im], "generation")


def _sample(key: str, messages: List[Dict[str, str]], images: List[Image.Image], task: str) -> Dict[str, Any]:
    record = {"id": key, "task": task, "source": "test", "messages": messages,
              "images": [f"img{i}.png" for i in range(len(images))]}
    return {"key": key, "task": task, "record": record, "images": images, "vq": [None] * len(images),
            "n_unreadable": 0}


def collator_for(net, **kw):
    return net.collator(**kw)
