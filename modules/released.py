"""The released VARGPT-7B as a model of this suite: build it from a released directory (config
from its config.json, weights shard by shard onto a meta-initialised model) and write one back.

    net, info = load_released("checkpoints/VARGPT_LLaVA-v1")             # eval mode, fp32
    net, info = load_released(d, behaviour="released", llm_dtype="bfloat16")
    export_released(net, "out/", source_config=info.hf_config)          # config.json, shards, tokenizer

A directory without tokenizer files (the tiny test checkpoint) gets an id-only tokenizer with the
checkpoint's special-token ids (``vargpt_format.id_tokenizer``); prompts are then given as ids.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from datamodules.config import ChatTemplateConfig
from datamodules.paths import resolve_path
from modules.checkpoint import (read_safetensors_tensor, safetensors_shapes, save_sharded_safetensors,
                                _write_text_atomic)
from modules.components.text_tokenizer import build_tokenizer
from modules.config import LoadSpec, ModelConfig
from modules.vargpt import VARGPT
from modules.vargpt_format import (LLAVA_HF_TEMPLATE, chat_template_mismatch, check_tokenizer, export_dtype,
                                   find_chat_template, has_tokenizer, id_tokenizer,
                                   model_config_from_vargpt, patch_nums_from, processor_files, processor_stats,
                                   read_config, released_ids, to_vargpt, vargpt_config_json)
from modules.weights import apply_load_spec, empty_parameters

log = logging.getLogger(__name__)
# 5 GB shards, as the released checkpoint
MAX_SHARD_BYTES = 5 * 10**9


@dataclass
class Released:
    """What was read from a released directory besides the weights."""

    path: Path
    hf_config: Dict[str, Any]
    ids: Dict[str, int]
    model_config: ModelConfig
    template: ChatTemplateConfig
    has_tokenizer: bool


def released_config(d: str | Path, base: Optional[ModelConfig] = None) -> Released:
    """Our ModelConfig (and chat template, ids) for a released directory: sizes from config.json
    and the tensor headers, the scale layout from the vargpt_gen.lvl_1L buffer."""
    d = resolve_path(d)
    hf = read_config(d)
    shapes = safetensors_shapes(d)
    key = "vargpt_gen.lvl_1L" if "vargpt_gen.lvl_1L" in shapes else "model.vargpt_gen.lvl_1L"
    lvl = read_safetensors_tensor(d, key) if key in shapes else None
    pn = patch_nums_from(lvl, int(shapes.get("vargpt_gen.pos_1LC", shapes.get("model.vargpt_gen.pos_1LC"))[1]))
    mean, std = processor_stats(d)
    tok = has_tokenizer(d)
    cfg = model_config_from_vargpt(hf, shapes, pn, base=base, tokenizer_dir=str(d) if tok else "",
                                   image_mean=mean, image_std=std)
    tpl = find_chat_template(d)
    problem = chat_template_mismatch(tpl, LLAVA_HF_TEMPLATE) if tpl else None
    if problem:
        log.warning("%s: %s; prompts follow this suite's llava-hf template (data.chat)", d, problem)
    return Released(d, hf, released_ids(hf), cfg, LLAVA_HF_TEMPLATE, tok)


def build_from_config(cfg: ModelConfig, ids: Dict[str, int], tokenizer: Any = None, tokenizer_dir: str = "",
                      template: Optional[ChatTemplateConfig] = None, meta: bool = True) -> VARGPT:
    """A VARGPT of these sizes with the checkpoint's tokenizer (or an id-only one), parameters on
    the meta device when ``meta`` (load them next)."""
    if tokenizer is None:
        tokenizer = build_tokenizer(cfg.tokenizer) if tokenizer_dir else id_tokenizer(ids, cfg.llm.vocab_size)
    check_tokenizer(tokenizer, ids)
    if meta:
        with empty_parameters():
            return VARGPT(cfg, tokenizer=tokenizer, template=template)
    return VARGPT(cfg, tokenizer=tokenizer, template=template)


def load_released(d: str | Path, base: Optional[ModelConfig] = None, behaviour: Optional[str] = None,
                  llm_dtype: str = "", var_dtype: str = "", tokenizer: Any = None, train: bool = False) -> tuple:
    """(VARGPT with the released weights, Released). Built on the meta device and loaded shard
    by shard (format ``vargpt``): the peak memory is the model plus one tensor. ``llm_dtype``
    (e.g. bfloat16) sets the weight dtype of the LLM, the vision tower and the projectors,
    ``var_dtype`` the VAR decoder's; the VQVAE stays fp32."""
    info = released_config(d, base)
    cfg = info.model_config
    if behaviour:
        cfg = replace(cfg, behaviour=behaviour)
    if llm_dtype:
        cfg = replace(cfg, llm=replace(cfg.llm, dtype=llm_dtype), vision=replace(cfg.vision, dtype=llm_dtype),
                      projector_dtype=llm_dtype)
    if var_dtype:
        cfg = replace(cfg, var_dtype=var_dtype)
    net = build_from_config(cfg, info.ids, tokenizer, cfg.tokenizer.path if info.has_tokenizer else "", info.template)
    apply_load_spec(net, LoadSpec(path=str(info.path), format="vargpt"))
    info.model_config = cfg
    return net.train(train), info


def num_class_rows(ids: Dict[str, int]) -> int:
    """Rows of the released class table: num_classes + 1 with num_classes = gen_start + 1."""
    return ids["gen_start"] + 2


@torch.no_grad()
def export_released(net: nn.Module, out_dir: str | Path, source_config: Optional[Dict[str, Any]] = None,
                    max_shard_bytes: int = MAX_SHARD_BYTES, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write ``net`` in the released layout: config.json, shards + model.safetensors.index.json
    (parameters in ``dtype``, the VQVAE fp32, as released), the tokenizer files,
    preprocessor_config.json and chat_template.json. Returns the index path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = {k: v for k, v in net.ids.items() if v is not None}
    items = [(k, t, export_dtype(k, t, dtype)) for k, t in to_vargpt(net, ids["gen_start"], num_class_rows(ids))]
    index = save_sharded_safetensors(items, out, max_shard_bytes=max_shard_bytes)
    del items
    conf = vargpt_config_json(net, ids, source_config)
    conf["torch_dtype"] = str(dtype).removeprefix("torch.")
    _write_text_atomic(out / "config.json", json.dumps(conf, indent=2) + "\n")
    for name, content in processor_files(net).items():
        _write_text_atomic(out / name, json.dumps(content, indent=2) + "\n")
    net.tokenizer.save_pretrained(str(out))
    return index
