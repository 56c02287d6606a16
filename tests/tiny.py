"""A tiny VARGPT for tests: the debug-model preset of experiments/tiny/model.yaml (the one place
its sizes live), built in about a second.

Sizes: 32 px input images (tiny ViT, patch 8 -> 16 tokens), 16 px generation targets through a
4x VQVAE (4x4 latent, patch_nums 1,2,4 -> L = 21), a 2-layer Llama of width 64, a 1-block VAR.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Dict, List, Sequence

from omegaconf import OmegaConf
from PIL import Image

from datamodules.config import DataConfig
from datamodules.paths import REPO_ROOT
from datamodules.tokens import IMAGE_GEN_PLACEHOLDER, IMAGE_TOKEN
from modules.components.text_tokenizer import train_world_tokenizer
from modules.config import ModelConfig

TINY_YAML = REPO_ROOT / "experiments" / "tiny" / "model.yaml"
# Text the tiny tokenizers are trained on: the world's words and the chat template.
CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions.",
    "USER: ASSISTANT: Describe the image briefly. What is in this picture? Give a short caption.",
    "There is a large red circle on the left and two small blue squares at the top.",
    "The image shows a green triangle at the bottom, a yellow cross in the centre, a purple square on the right.",
    "What colour is the circle? What shape is the black object? How many objects are there? Where is the red cross?",
    "Is there a blue triangle in the image? Is the square green? yes no 0 1 2 3 one two three circles squares "
    "triangles crosses Answer with a single word. Draw I need an image of Generate a picture with Please paint",
]


def tiny_tokenizer(extra_corpus: Sequence[str] = (), vocab_size: int = 600) -> Any:
    """A real HF fast tokenizer with the VARGPT special tokens, trained in milliseconds by the
    world tokenizer trainer (the one trainer) on CORPUS (+ ``extra_corpus``); cached per process."""
    key = (tuple(extra_corpus), vocab_size)
    if key not in _TOKENIZERS:
        with tempfile.TemporaryDirectory() as d:
            _TOKENIZERS[key] = train_world_tokenizer(list(CORPUS) + list(extra_corpus), d, vocab_size=vocab_size)
    return _TOKENIZERS[key]


_TOKENIZERS: Dict[Any, Any] = {}


def tiny_tokenizer_dir(root: Path) -> Path:
    d = root / "tok"
    if not (d / "tokenizer.json").is_file():
        train_world_tokenizer(list(CORPUS) * 3, d, vocab_size=400)
    return d


def tiny_model_config(root: Path, **over: Any) -> ModelConfig:
    """The preset's `model:` section with a tokenizer trained under ``root``; ``over`` replaces
    top-level ModelConfig fields."""
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(TINY_YAML).model)
    cfg: ModelConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    cfg.tokenizer.path = str(tiny_tokenizer_dir(root))
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


def collator_for(net, **data_kw):
    """``net.collator`` with DataConfig options (prompt dropout off unless given)."""
    data = DataConfig(chat=net.template, **{"prompt_dropout": 0.0, **data_kw})
    return net.collator(data, train=True)


def teacher_forced_per_scale(net, prompts: Sequence[str], sample: Dict[str, Any]):
    """(training-forward logits_img (1, L, V) of `sample`; the conditional rows' logits of
    generate_image teacher-forced through the KV caches with `sample`'s target for every prompt,
    all scales, (len(prompts), L, V)). prompts[0] should be `sample`'s instruction."""
    import torch

    col = collator_for(net)
    with torch.no_grad():
        out = net(col([sample]), return_logits=True)
        idx = net.encode_targets(col([sample]))
        per_scale: List[Any] = []
        n = len(prompts)
        net.generate_image(list(prompts), cfg=0.0, seed=list(range(n)), teacher_idx=[t.repeat(n, 1) for t in idx],
                           logits_out=per_scale)
    return out["logits_img"], torch.cat([l[:n] for l in per_scale], dim=1)


def assert_inference_is_training(net):
    """KV-cached generation, teacher-forced, gives the training forward's logits for the first
    prompt, batched with a longer one (its left padding must not reach the VAR's context)."""
    import torch

    train, got = teacher_forced_per_scale(
        net, ["Draw a red circle on the left.", "Can you make an image showing two blue squares at the top?"],
        gen_sample("g0", instr="Draw a red circle on the left."))
    torch.testing.assert_close(got[:1], train, atol=1e-4, rtol=1e-4)


def plain_and_variant(root: Path, variant: Dict[str, Any], new_prefix: str, warm: Sequence[str] = ("var.cross",)):
    """(plain, variant), both in eval mode: a tiny world-default model (var_cond prompt_attn,
    var_skip) whose zero-initialised parts named in ``warm`` get random weights (so it already
    reads its prompt), and the same model with the ModelConfig fields ``variant`` set, loaded from
    the plain one's state dict: only parameters under ``new_prefix`` may be new."""
    from dataclasses import replace

    import torch

    from modules.vargpt import VARGPT

    cfg = replace(tiny_model_config(root), var_cond="prompt_attn", var_skip=True)
    torch.manual_seed(0)
    plain = VARGPT(cfg).eval()
    with torch.no_grad():
        for name in warm:
            for p in plain.get_submodule(name).parameters():
                p.normal_(0, 0.3)
    other = VARGPT(replace(cfg, **variant)).eval()
    missing, unexpected = other.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith(new_prefix + ".") for k in missing), (unexpected, missing)
    return plain, other
