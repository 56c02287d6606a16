"""LLM backbone family: a Hugging Face causal LM (LLaMA/Vicuna, Qwen2, or any local one).

  hf_causal  the architecture of a local directory's config.json (weights: model.load, format hf)
  llama      ``LlamaForCausalLM`` from a named preset and/or size fields (random weights)
  qwen2      ``Qwen2ForCausalLM`` likewise

The config-only builders are what make the real recipes checkable without weights: under
``with torch.device("meta")`` a Vicuna-7B builds in milliseconds with exact parameter counts.

``build_llm(cfg, vocab_size)`` grows the embedding matrix (and an untied lm_head) to the
tokenizer's length after the VARGPT special tokens were added, initialising the new rows to
the mean of the old ones, as LLaVA does. It never shrinks a matrix: Qwen2 checkpoints carry
more rows than their tokenizer has tokens, and those rows may be trained.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict

import torch
import torch.nn as nn

from datamodules.paths import resolve_path
from modules.components.registry import ComponentConfig, Registry

LLMS = Registry("llm")

# Config-only architectures. Keys are HF config kwargs; values from the public configs.
LLAMA_PRESETS: Dict[str, Dict[str, Any]] = {
    # The world's text LLM: 1,115,264 parameters at a 1024-token vocabulary.
    "tiny": dict(
        hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=1024, rms_norm_eps=1e-5,
    ),
    # lmsys/vicuna-7b-v1.5 (LLaVA-1.5-7B's LLM): 6,738,415,616 parameters at vocab 32000.
    "vicuna-7b": dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False,
    ),
    # lmsys/vicuna-13b-v1.5 (LLaVA-1.5-13B)
    "vicuna-13b": dict(
        hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
        num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False,
    ),
}
QWEN2_PRESETS: Dict[str, Dict[str, Any]] = {
    "tiny": dict(
        hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=True,
    ),
    # Qwen/Qwen2-0.5B
    "qwen2-0.5b": dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_theta=1000000.0, tie_word_embeddings=True,
    ),
    # Qwen/Qwen2-1.5B
    "qwen2-1.5b": dict(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_theta=1000000.0, tie_word_embeddings=True,
    ),
    # Qwen/Qwen2-7B
    "qwen2-7b": dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_theta=1000000.0, tie_word_embeddings=False,
    ),
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LLMConfig(ComponentConfig):
    family: ClassVar[str] = "llm"
    name: str = "llama"  # hf_causal | llama | qwen2
    path: str = ""  # hf_causal: a local directory (save_pretrained / hub-snapshot layout)
    preset: str = ""  # llama / qwen2: a key of LLAMA_PRESETS / QWEN2_PRESETS; "" = fields only
    # Size fields override the preset where non-zero (llama / qwen2 only).
    hidden_size: int = 0
    num_layers: int = 0
    num_heads: int = 0
    num_kv_heads: int = 0  # 0: num_heads if that is set, else the preset's
    intermediate_size: int = 0
    # 0: the preset's value, else the tokenizer's length passed to build_llm.
    vocab_size: int = 0
    max_position_embeddings: int = 0
    gradient_checkpointing: bool = False
    attn_implementation: str = "sdpa"  # sdpa | eager
    dtype: str = "float32"  # float32 | bfloat16 | float16
    # Round the resized vocabulary up to a multiple (64 helps tensor cores); 0 = exact length.
    # The extra rows are never produced by the tokenizer.
    pad_vocab_to_multiple_of: int = 0


def _dtype(cfg: LLMConfig) -> torch.dtype:
    if cfg.dtype not in _DTYPES:
        raise ValueError(f"llm.dtype must be one of {', '.join(_DTYPES)}, got {cfg.dtype!r}")
    return _DTYPES[cfg.dtype]


def _config_kwargs(cfg: LLMConfig, presets: Dict[str, Dict[str, Any]], vocab_size: int) -> Dict[str, Any]:
    kw: Dict[str, Any] = {}
    if cfg.preset:
        if cfg.preset not in presets:
            raise ValueError(f"unknown llm.preset {cfg.preset!r} for {cfg.name}; valid: {', '.join(sorted(presets))}")
        kw.update(presets[cfg.preset])
    for key, val in (
        ("hidden_size", cfg.hidden_size), ("num_hidden_layers", cfg.num_layers),
        ("num_attention_heads", cfg.num_heads), ("num_key_value_heads", cfg.num_kv_heads),
        ("intermediate_size", cfg.intermediate_size), ("vocab_size", cfg.vocab_size),
        ("max_position_embeddings", cfg.max_position_embeddings),
    ):
        if val:
            kw[key] = val
    if cfg.num_heads and not cfg.num_kv_heads:
        kw["num_key_value_heads"] = cfg.num_heads  # overriding the heads drops a preset's GQA
    if "vocab_size" not in kw:
        if vocab_size <= 0:
            raise ValueError(f"llm {cfg.name}: no vocab_size in the preset or config, and build_llm got none")
        kw["vocab_size"] = vocab_size
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads") if k not in kw]
    if missing:
        raise ValueError(f"llm {cfg.name}: set a preset or the size fields; missing {missing}")
    if "intermediate_size" not in kw:
        kw["intermediate_size"] = 4 * kw["hidden_size"]
    kw.setdefault("num_key_value_heads", kw["num_attention_heads"])
    return kw


def _from_config(config, cfg: LLMConfig) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config, attn_implementation=cfg.attn_implementation, dtype=_dtype(cfg))


@LLMS.register("llama")
def _llama(cfg: LLMConfig, vocab_size: int = 0) -> nn.Module:
    from transformers import LlamaConfig

    return _from_config(LlamaConfig(**_config_kwargs(cfg, LLAMA_PRESETS, vocab_size)), cfg)


@LLMS.register("qwen2")
def _qwen2(cfg: LLMConfig, vocab_size: int = 0) -> nn.Module:
    from transformers import Qwen2Config

    return _from_config(Qwen2Config(**_config_kwargs(cfg, QWEN2_PRESETS, vocab_size)), cfg)


@LLMS.register("hf_causal")
def _hf_causal(cfg: LLMConfig, vocab_size: int = 0) -> nn.Module:
    """Any causal LM whose architecture a local directory's config.json describes (random
    weights; its weights load through model.load, format hf, into llm)."""
    from transformers import AutoConfig

    path = resolve_path(cfg.path) if cfg.path else None
    if path is None or not path.is_dir():
        raise FileNotFoundError(
            f"llm hf_causal: path {cfg.path!r} is not a directory; point llm.path at a local "
            "save_pretrained / hub-snapshot folder (nothing is downloaded)"
        )
    return _from_config(AutoConfig.from_pretrained(str(path), local_files_only=True), cfg)


def get_input_embeddings(model: nn.Module) -> nn.Embedding:
    return model.get_input_embeddings()


def llm_hidden_size(model: nn.Module) -> int:
    return int(model.config.get_text_config().hidden_size)


@torch.no_grad()
def resize_embeddings_mean(model: nn.Module, new_vocab: int, pad_to_multiple_of: int = 0) -> int:
    """Grow input (and untied output) embeddings to ``new_vocab`` rows; new rows = mean of old rows.

    LLaVA's recipe (``smart_tokenizer_and_embedding_resize``): the mean is deterministic, unlike
    HF's default ``mean_resizing`` (a sample from a Gaussian fit, whose covariance costs d^2 memory
    and fails on the meta device). Returns the final row count (unchanged if already enough).
    """
    emb = model.get_input_embeddings()
    old = emb.weight.shape[0]
    target = new_vocab
    if pad_to_multiple_of > 0:
        target = -(-new_vocab // pad_to_multiple_of) * pad_to_multiple_of
    if target <= old:
        return old
    model.resize_token_embeddings(target, mean_resizing=False)
    if emb.weight.device.type != "meta":
        in_W = model.get_input_embeddings().weight
        in_W[old:] = in_W[:old].float().mean(0, keepdim=True).to(in_W.dtype)
        out = model.get_output_embeddings()
        if out is not None and out.weight is not in_W:  # tied heads share the rows just set
            out_W = out.weight
            out_W[old:] = out_W[:old].float().mean(0, keepdim=True).to(out_W.dtype)
            if getattr(out, "bias", None) is not None:
                out.bias[old:] = out.bias[:old].float().mean().to(out.bias.dtype)
    return target


def set_gradient_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Switch activation checkpointing (transformers 5 renamed it; the old name warns).

    Checkpointed layers run only in train mode with grad enabled; pass ``use_cache=False`` in
    training forwards (HF drops the cache there anyway, with a warning). Inference with a KV cache
    is unaffected.
    """
    if enabled:
        # use_reentrant=False: works with frozen inputs and with inputs_embeds (no grad on the
        # embedding output needed), and is torch's recommended mode.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:  # transformers < 5
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def is_gradient_checkpointing(model: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def build_llm(cfg: LLMConfig, vocab_size: int = 0) -> nn.Module:
    """Build the causal LM and grow its vocabulary to ``vocab_size`` (the tokenizer's length).

    Works under ``with torch.device("meta")`` for the config-only builders.
    """
    if cfg.attn_implementation not in ("sdpa", "eager"):
        raise ValueError(f"llm.attn_implementation must be sdpa or eager, got {cfg.attn_implementation!r}")
    model = LLMS.build(cfg, vocab_size)
    if vocab_size > 0:
        resize_embeddings_mean(model, vocab_size, cfg.pad_vocab_to_multiple_of)
    if cfg.gradient_checkpointing:
        set_gradient_checkpointing(model, True)
    return model
