"""The released VARGPT layout (VARGPT-family/VARGPT_LLaVA-v1) and llava-hf/llava-1.5-7b-hf: their
configs as our ``ModelConfig``, their key names as ours and back.

A released directory holds ``config.json`` (a ``VARGPTLlavaConfig``: ``text_config`` a Llama,
``vision_config`` a CLIP vision tower, the special-token ids) and the weights as one
``model.safetensors`` or shards + ``model.safetensors.index.json``. The VAR decoder and the VQVAE
have no entry in config.json (the official code fixes them in its constructor): their sizes are
read from the tensor shapes (safetensors headers only) and the scale layout from the
``vargpt_gen.lvl_1L`` buffer.

    ours            released key                                       note
    vision.tower.*  vision_tower.[vision_model.]*                      both layouts load
    und_proj.0/2    multi_modal_projector.linear_1/2
    llm.model.*     language_model.model.*  |  model.language_model.*
    llm.lm_head     language_model.lm_head  |  lm_head
    vqvae.*         vae_local.*                                        official VQVAE names
    var.*           vargpt_gen.*                                       official VAR names
    var.cond_emb    vargpt_gen.class_emb rows gen_start, gen_start + 1  (see below)
    gen_in.0/2      image_gen_projector.mlp.0/2
    gen_out.0/2     image_gen_projector_out.mlp.0/2

Documented facts of the released model (they are why a strict load may skip these keys):
- ``vargpt_gen.class_emb`` has gen_start + 2 rows, but only two are ever read: row gen_start
  (the condition of a training sample) and row gen_start + 1 (the null row, used when the label
  is dropped and, at inference, for both halves of guidance). They become our two-row
  ``cond_emb`` (0: conditional, 1: null); export writes them back and zeros in the other rows.
- ``image_gen_projector[_out].ln_q`` (a LayerNorm) is built but never applied: not loaded;
  export writes an identity LayerNorm (weight 1, bias 0).
- The gen projectors' hidden width is their *input* width (``ProjectorConfig.hidden_from: in``).
"""
from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from datamodules.collate import build_prompt
from datamodules.config import ChatTemplateConfig
from modules.components.projectors import ProjectorConfig
from modules.components.text_tokenizer import TokenizerConfig, special_token_ids
from modules.components.vision_encoders import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from modules.components.vqvae import VQVAEConfig
from modules.config import ModelConfig

CONFIG_JSON = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
# The official sampler's scale layout (VARGPTLlavaForConditionalGeneration fixes it): L = 680.
OFFICIAL_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
# llava-hf/llava-1.5-7b-hf's chat template (the processor's `chat_template`), which VARGPT's
# processor uses: no system prompt, "USER: " + images + text + " ", then "ASSISTANT:".
LLAVA_HF_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] "
    "!= 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# The same prompts as our template (datamodules.collate.build_prompt renders "USER: ... ASSISTANT:").
LLAVA_HF_TEMPLATE = ChatTemplateConfig(system="", system_suffix="", user_prefix="USER: ", user_suffix=" ",
                                       assistant_prefix="ASSISTANT:", assistant_answer_sep=" ",
                                       eos_after_answer=True, add_bos=True)

DROP = ("drop",)  # a key the adapter skips by a documented fact (see the module docstring)
KeyMap = Callable[[str], Any]  # released key -> (our key, transform or None) | DROP | None (unknown)


class FormatError(ValueError):
    """A directory or config this adapter cannot represent exactly (the message names the field)."""


# ----------------------------------------------------------------------------------- config.json
def read_config(d: str | Path) -> Dict[str, Any]:
    f = Path(d) / CONFIG_JSON
    if not f.is_file():
        raise FileNotFoundError(f"{f} not found: a released VARGPT / llava-hf directory has config.json beside "
                                "its safetensors")
    return json.loads(f.read_text())


def released_ids(hf: Mapping[str, Any]) -> Dict[str, int]:
    """Token ids the released model is built around (config.json), by our names."""
    sp = hf.get("special_tokens") or {}
    tc = hf.get("text_config") or {}
    ids = {"image": hf.get("image_token_index"), "pad": hf.get("pad_token_id"),
           "gen_start": sp.get("image_gen_start_token_id"), "gen_end": sp.get("image_gen_end_token_id"),
           "gen_pad": sp.get("image_gen_pad_token_id"), "bos": tc.get("bos_token_id", 1),
           "eos": tc.get("eos_token_id", 2)}
    missing = [k for k, v in ids.items() if v is None and k not in ("bos", "eos")]
    if missing:
        raise FormatError(f"config.json has no id for {missing} (image_token_index, pad_token_id, "
                          "special_tokens.image_gen_*_token_id)")
    return {k: int(v) for k, v in ids.items() if v is not None}


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise FormatError(f"not representable by this suite's model: {what}")


def _llm_fields(tc: Mapping[str, Any]) -> Dict[str, Any]:
    _need(tc.get("model_type", "llama") == "llama", f"text_config.model_type {tc.get('model_type')!r} (llama only)")
    h, heads = int(tc["hidden_size"]), int(tc["num_attention_heads"])
    checks = {"hidden_act": ("silu", tc.get("hidden_act", "silu")),
              "rms_norm_eps": (1e-5, float(tc.get("rms_norm_eps", 1e-6))),
              "rope_theta": (10000.0, float(tc.get("rope_theta", (tc.get("rope_parameters") or {}).get("rope_theta", 10000.0)))),
              "rope_scaling": (None, tc.get("rope_scaling")),
              "attention_bias": (False, bool(tc.get("attention_bias", False))),
              "mlp_bias": (False, bool(tc.get("mlp_bias", False))),
              "tie_word_embeddings": (False, bool(tc.get("tie_word_embeddings", False))),
              "head_dim": (h // heads, int(tc.get("head_dim") or h // heads))}
    for k, (want, got) in checks.items():
        _need(got == want, f"text_config.{k} = {got!r} (the llama builder has {want!r})")
    # the vicuna-7b preset carries rms_norm_eps 1e-5, rope_theta 1e4, untied; the fields set the sizes
    return dict(name="llama", path="", preset="vicuna-7b", hidden_size=h, num_layers=int(tc["num_hidden_layers"]),
                num_heads=heads, num_kv_heads=int(tc.get("num_key_value_heads") or heads),
                intermediate_size=int(tc["intermediate_size"]), vocab_size=int(tc["vocab_size"]),
                max_position_embeddings=int(tc.get("max_position_embeddings", 4096)), pad_vocab_to_multiple_of=0)


def _vision_fields(hf: Mapping[str, Any], image_mean=(), image_std=()) -> Dict[str, Any]:
    vc = hf["vision_config"]
    _need(vc.get("model_type", "clip_vision_model") in ("clip_vision_model", "clip"),
          f"vision_config.model_type {vc.get('model_type')!r} (CLIP only)")
    _need(vc.get("hidden_act", "quick_gelu") == "quick_gelu", f"vision_config.hidden_act {vc.get('hidden_act')!r}")
    _need(float(vc.get("layer_norm_eps", 1e-5)) == 1e-5, f"vision_config.layer_norm_eps {vc.get('layer_norm_eps')}")
    _need(int(vc.get("num_channels", 3)) == 3, "vision_config.num_channels != 3")
    strategy = hf.get("vision_feature_select_strategy", "default")
    _need(strategy in ("default", "full"), f"vision_feature_select_strategy {strategy!r}")
    layer = hf.get("vision_feature_layer", -2)
    _need(isinstance(layer, int), f"vision_feature_layer {layer!r} (one layer only)")
    w = int(vc["hidden_size"])
    return dict(
        name="hf_clip", model_name="", config_dir="", preset="", image_size=int(vc["image_size"]),
        patch_size=int(vc["patch_size"]), width=w, depth=int(vc["num_hidden_layers"]),
        heads=int(vc["num_attention_heads"]), mlp_ratio=int(vc["intermediate_size"]) / w, feature_layer=layer,
        drop_cls=strategy == "default",
        # the released processor is CLIPImageProcessor: shortest side to the size, centre crop
        resize_mode="crop", image_mean=list(image_mean or OPENAI_CLIP_MEAN), image_std=list(image_std or OPENAI_CLIP_STD))


def _count(shapes: Mapping[str, Any], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in shapes if (m := rx.match(k))})


_VQVAE_ARCH = ("vocab_size", "z_channels", "ch", "ch_mult", "num_res_blocks", "using_sa", "using_mid_sa",
               "quant_conv_ks", "share_quant_resi", "default_qresi_counts", "patch_nums")


def _vqvae_config(shapes: Mapping[str, Sequence[int]], patch_nums: Sequence[int], p: str = "vae_local.") -> VQVAEConfig:
    V, cv = shapes[p + "quantize.embedding.weight"]
    ch = int(shapes[p + "encoder.conv_in.weight"][0])
    levels = _count(shapes, re.escape(p) + r"encoder\.down\.(\d+)\.")
    ch_mult = [int(shapes[f"{p}encoder.down.{i}.block.0.conv2.weight"][0]) // ch for i in range(levels)]
    n_share = _count(shapes, re.escape(p) + r"quantize\.quant_resi\.qresi_ls\.(\d+)\.")
    n_plain = _count(shapes, re.escape(p) + r"quantize\.quant_resi\.(\d+)\.")
    share = n_share if n_share else (1 if p + "quantize.quant_resi.qresi.weight" in shapes else 0)
    return VQVAEConfig(
        vocab_size=int(V), z_channels=int(cv), ch=ch, ch_mult=ch_mult,
        num_res_blocks=_count(shapes, re.escape(p) + r"encoder\.down\.0\.block\.(\d+)\."),
        using_sa=any(k.startswith(f"{p}encoder.down.{levels - 1}.attn.") for k in shapes),
        using_mid_sa=p + "encoder.mid.attn_1.qkv.weight" in shapes,
        quant_conv_ks=int(shapes[p + "quant_conv.weight"][-1]), share_quant_resi=share,
        default_qresi_counts=n_plain if share == 0 else 0, patch_nums=list(patch_nums))


def _var_fields(shapes: Mapping[str, Sequence[int]], patch_nums: Sequence[int], p: str = "vargpt_gen.") -> Dict[str, Any]:
    C = int(shapes[p + "word_embed.weight"][0])
    depth = _count(shapes, re.escape(p) + r"blocks\.(\d+)\.")
    l2 = p + "blocks.0.attn.scale_mul_1H11" in shapes
    return dict(depth=depth, embed_dim=C, num_heads=int(shapes[p + "blocks.0.attn.scale_mul_1H11"][1]) if l2 else depth,
                mlp_ratio=int(shapes[p + "blocks.0.ffn.fc1.weight"][0]) / C,
                shared_aln=p + "shared_ada_lin.1.weight" in shapes, attn_l2_norm=l2, cond_mode="external",
                norm_eps=1e-6, patch_nums=list(patch_nums), vocab_size=0, cvae=0)


def patch_nums_from(lvl_1L: Optional[torch.Tensor], L: int) -> List[int]:
    """The scale layout: per scale k, pn_k^2 positions carry level k in ``lvl_1L``; without the
    buffer only the official layout (L = 680) is known."""
    if lvl_1L is None:
        _need(L == sum(p * p for p in OFFICIAL_PATCH_NUMS), f"L = {L} without a vargpt_gen.lvl_1L buffer")
        return list(OFFICIAL_PATCH_NUMS)
    counts = torch.bincount(lvl_1L.reshape(-1).long()).tolist()
    pns = [int(round(c ** 0.5)) for c in counts]
    _need(all(p * p == c for p, c in zip(pns, counts)), f"vargpt_gen.lvl_1L counts {counts} are not squares")
    return pns


def model_config_from_vargpt(hf: Mapping[str, Any], shapes: Mapping[str, Sequence[int]],
                             patch_nums: Optional[Sequence[int]] = None, base: Optional[ModelConfig] = None,
                             tokenizer_dir: str = "", image_mean=(), image_std=()) -> ModelConfig:
    """Our ModelConfig for a released checkpoint: LLM and vision tower from config.json, the
    VQVAE and VAR sizes from the tensor shapes (``shapes``: key -> shape, headers only), the
    scale layout ``patch_nums`` (see ``patch_nums_from``). ``base`` supplies everything else
    (behaviour switches, loss weights, dtypes)."""
    shapes = {_strip_model_prefix(k): tuple(v) for k, v in shapes.items()}
    ids = released_ids(hf)
    pn = list(patch_nums) if patch_nums is not None else patch_nums_from(None, int(shapes["vargpt_gen.pos_1LC"][1]))
    base = base if base is not None else ModelConfig()
    llm = replace(base.llm, **_llm_fields(hf["text_config"]))
    _need(int(hf.get("image_seq_length", 0) or 0) in (0, _vision_tokens(hf)),
          f"image_seq_length {hf.get('image_seq_length')} != the tower's {_vision_tokens(hf)} tokens")
    rows = int(shapes["vargpt_gen.class_emb.weight"][0])
    _need(rows >= ids["gen_start"] + 2, f"vargpt_gen.class_emb has {rows} rows; the null row gen_start + 1 = "
                                        f"{ids['gen_start'] + 1} must exist")
    var = replace(base.var, **_var_fields(shapes, pn))
    gin = shapes["image_gen_projector.mlp.0.weight"]
    _need(gin[0] == gin[1] == var.embed_dim, f"image_gen_projector.mlp.0 {gin}: hidden width must equal its input")
    tok = TokenizerConfig(name="hf", path=tokenizer_dir) if tokenizer_dir else base.tokenizer
    vqvae = replace(base.vqvae, **{k: v for k, v in _vqvae_config(shapes, pn).__dict__.items()
                                   if k in _VQVAE_ARCH})
    return replace(base, tokenizer=tok, vision=replace(base.vision, **_vision_fields(hf, image_mean, image_std)), llm=llm,
                   und_projector=ProjectorConfig(name="mlp", depth=2),
                   gen_in_projector=ProjectorConfig(name="mlp", depth=2, hidden_from="in"),
                   gen_out_projector=ProjectorConfig(name="mlp", depth=2, hidden_from="in"),
                   vqvae=vqvae, var=var, load=[])


def _vision_tokens(hf: Mapping[str, Any]) -> int:
    vc = hf["vision_config"]
    n = (int(vc["image_size"]) // int(vc["patch_size"])) ** 2
    return n + (0 if hf.get("vision_feature_select_strategy", "default") == "default" else 1)


def find_chat_template(d: str | Path) -> Optional[str]:
    """The chat template a directory ships (chat_template.jinja / chat_template.json, or the
    processor's / tokenizer's config), None if none."""
    d = Path(d)
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text()
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        f = d / name
        if f.is_file():
            tpl = json.loads(f.read_text()).get("chat_template")
            if isinstance(tpl, str) and tpl:
                return tpl
    return None


def chat_template_mismatch(chat_template: str, template: ChatTemplateConfig) -> Optional[str]:
    """None if the jinja ``chat_template`` renders inference prompts (text, image + text) exactly
    as our ``template`` does (datamodules.collate.build_prompt), else what differs."""
    from transformers.utils.chat_template_utils import render_jinja_template

    for parts, ours in (([{"type": "text", "text": "Draw a cat."}], "Draw a cat."),
                        ([{"type": "image"}, {"type": "text", "text": "What is it?"}], "<image>\nWhat is it?")):
        theirs = render_jinja_template(conversations=[[{"role": "user", "content": parts}]],
                                       chat_template=chat_template, add_generation_prompt=True)[0][0]
        mine = build_prompt([{"role": "user", "content": ours}], template)
        if theirs != mine:
            return f"the checkpoint's chat template renders {theirs!r}, this suite's template {mine!r}"
    return None


def has_tokenizer(d: str | Path) -> bool:
    return any((Path(d) / f).is_file() for f in TOKENIZER_FILES)


def processor_stats(d: str | Path) -> Tuple[List[float], List[float]]:
    """image_mean / image_std of a directory's preprocessor_config.json ([] where absent)."""
    f = Path(d) / "preprocessor_config.json"
    if not f.is_file():
        return [], []
    p = json.loads(f.read_text())
    return list(p.get("image_mean") or []), list(p.get("image_std") or [])


# ----------------------------------------------------------------------------------- key maps
def _strip_model_prefix(k: str) -> str:
    """Newer transformers nest the Llava parts under ``model.``: back to the released names."""
    if k.startswith("model.language_model."):
        return "language_model.model." + k[len("model.language_model."):]
    if k.startswith("lm_head."):
        return "language_model." + k
    for part in ("vision_tower.", "multi_modal_projector.", "vargpt_gen.", "vae_local.", "image_gen_projector"):
        if k.startswith("model." + part):
            return k[len("model."):]
    return k


# released prefix <-> ours: one table, read one way to load (_RULES) and the other to export (_REVERSE)
_PREFIXES: Tuple[Tuple[str, str], ...] = (
    ("multi_modal_projector.linear_1.", "und_proj.0."),
    ("multi_modal_projector.linear_2.", "und_proj.2."),
    ("language_model.model.", "llm.model."),
    ("language_model.lm_head.", "llm.lm_head."),
    ("vae_local.", "vqvae."),
    ("image_gen_projector.mlp.", "gen_in."),
    ("image_gen_projector_out.mlp.", "gen_out."),
    ("vargpt_gen.", "var."),
)
_RULES: Tuple[Tuple[re.Pattern, str], ...] = tuple(
    (re.compile("^" + re.escape(theirs) + "(.*)$"), ours + r"\1") for theirs, ours in _PREFIXES)
_LN_Q = re.compile(r"^image_gen_projector(_out)?\.ln_q\.(weight|bias)$")


def _vision_key(rest: str, nested: bool) -> str:
    rest = rest.removeprefix("vision_model.")
    return f"vision.tower.vision_model.{rest}" if nested else f"vision.tower.{rest}"


def vargpt_key_map(gen_start: int, nested_vision: bool) -> KeyMap:
    """Released key -> (our key, transform or None), DROP for the documented unread tensors, or
    None for a key this layout does not have."""
    def cond_rows(t: torch.Tensor) -> torch.Tensor:
        return t[gen_start:gen_start + 2].clone()

    def key_map(key: str):
        k = _strip_model_prefix(key)
        if k.startswith("vision_tower."):
            return _vision_key(k[len("vision_tower."):], nested_vision), None
        if _LN_Q.match(k):
            return DROP
        if k == "vargpt_gen.class_emb.weight":
            return "var.cond_emb.weight", cond_rows
        for pat, repl in _RULES:
            if pat.match(k):
                return pat.sub(repl, k), None
        return None
    return key_map


def llava_hf_key_map(nested_vision: bool) -> KeyMap:
    """llava-hf/llava-1.5-7b-hf (LlavaForConditionalGeneration, either transformers layout):
    vision tower, projector and LLM; the generation parts are not in those files."""
    inner = vargpt_key_map(0, nested_vision)

    def key_map(key: str):
        k = _strip_model_prefix(key)
        if k.startswith(("vision_tower.", "multi_modal_projector.", "language_model.")):
            return inner(k)
        return None
    return key_map


LLAVA_HF_PARTS = ("vision", "und_proj", "llm")


# ----------------------------------------------------------------------------------- export
_REVERSE: Tuple[Tuple[re.Pattern, str], ...] = tuple(
    (re.compile("^" + re.escape(ours) + "(.*)$"), theirs + r"\1") for theirs, ours in _PREFIXES)


def check_exportable(model: nn.Module) -> None:
    """The released layout fixes what our config leaves open: fail naming the setting."""
    _need(getattr(model, "gen_cond", None) is None, "model.var_cond must be label (the released layout has no "
                                                    "prompt condition, gen_cond)")
    _need(getattr(model, "gen_lora", None) is None, "model.gen_lora_rank must be 0 (the released layout has no "
                                                    "LLM deltas at the image slots, gen_lora)")
    cfg = getattr(model, "cfg", None)
    # var_skip changes what the blocks compute, not which tensors exist: the released code would
    # load the weights and silently run without the residual
    _need(not getattr(cfg, "var_skip", False), "model.var_skip must be false (the released VAR blocks read "
                                               "gen_out(LLM states) only)")
    for name in ("und_proj", "gen_in", "gen_out"):
        m = getattr(model, name)
        _need(isinstance(m, nn.Sequential) and len(m) == 3 and isinstance(m[1], nn.GELU),
              f"{name} must be a depth-2 mlp (model.{name}: {{name: mlp, depth: 2}})")
    for name in ("gen_in", "gen_out"):
        lin = getattr(model, name)[0]
        _need(lin.in_features == lin.out_features, f"{name} hidden width {lin.out_features} != its input "
                                                   f"{lin.in_features}: set model.{name}_projector.hidden_from: in")
    _need(model.var.cond_mode == "external", "var.cond_mode must be external")
    _need(model.vision.kind == "hf", "the vision tower must be hf_clip (the released CLIPVisionModel)")
    _need(not model.llm.config.tie_word_embeddings, "a tied lm_head (the released model is untied)")


def to_vargpt(model: nn.Module, gen_start: int, num_class_rows: int) -> Iterator[Tuple[str, torch.Tensor]]:
    """(released key, tensor) for every tensor of the released layout, from a VARGPT's state
    dict (tensors are the model's own, not copies, except the rebuilt class table and ln_q)."""
    check_exportable(model)
    for k, t in model.state_dict().items():
        if k == "var.cond_emb.weight":
            table = torch.zeros(num_class_rows, t.shape[1], dtype=t.dtype, device=t.device)
            table[gen_start:gen_start + 2] = t
            yield "vargpt_gen.class_emb.weight", table
            continue
        if k.startswith("vision.tower."):
            rest = k[len("vision.tower."):].removeprefix("vision_model.")
            yield "vision_tower.vision_model." + rest, t
            continue
        for pat, repl in _REVERSE:
            if pat.match(k):
                yield pat.sub(repl, k), t
                break
        else:
            raise FormatError(f"{k}: no place in the released layout")
    for name, proj in (("image_gen_projector", model.gen_in), ("image_gen_projector_out", model.gen_out)):
        w = proj[0].in_features
        dt = proj[0].weight.dtype
        yield f"{name}.ln_q.weight", torch.ones(w, dtype=dt, device=proj[0].weight.device)
        yield f"{name}.ln_q.bias", torch.zeros(w, dtype=dt, device=proj[0].weight.device)


def export_dtype(key: str, t: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.dtype:
    """The released file's dtypes: the VQVAE fp32, buffers as they are, other parameters bf16."""
    if key.startswith("vae_local.") or not t.is_floating_point():
        return t.dtype
    if key.endswith(("lvl_1L", "attn_bias_for_masking", "zero_k_bias")):
        return torch.float32
    return dtype


def vargpt_config_json(model: nn.Module, ids: Mapping[str, int], base: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """config.json of the released layout for ``model`` (``base``, e.g. the config.json it was
    loaded from, supplies every field we do not own)."""
    llm_c = model.llm.config
    tower_c = model.vision.tower.config
    out: Dict[str, Any] = json.loads(json.dumps(dict(base))) if base else {}
    tc = dict(out.get("text_config") or {})
    tc.update(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=llm_c.hidden_size,
              intermediate_size=llm_c.intermediate_size, num_hidden_layers=llm_c.num_hidden_layers,
              num_attention_heads=llm_c.num_attention_heads, num_key_value_heads=llm_c.num_key_value_heads,
              head_dim=llm_c.hidden_size // llm_c.num_attention_heads, vocab_size=model.llm.get_input_embeddings().weight.shape[0],
              max_position_embeddings=llm_c.max_position_embeddings, rms_norm_eps=llm_c.rms_norm_eps,
              rope_theta=10000.0, rope_scaling=None, hidden_act="silu", attention_bias=False, mlp_bias=False,
              tie_word_embeddings=False, bos_token_id=ids.get("bos", 1), eos_token_id=ids.get("eos", 2))
    vc = dict(out.get("vision_config") or {})
    vc.update(model_type="clip_vision_model", hidden_size=tower_c.hidden_size, intermediate_size=tower_c.intermediate_size,
              num_hidden_layers=tower_c.num_hidden_layers, num_attention_heads=tower_c.num_attention_heads,
              image_size=tower_c.image_size, patch_size=tower_c.patch_size, hidden_act="quick_gelu",
              layer_norm_eps=1e-5, num_channels=3)
    vc.setdefault("projection_dim", 768)
    enc = model.vision
    out.update(
        architectures=["VARGPTLlavaForConditionalGeneration"], model_type="vargpt_llava",
        hidden_size=llm_c.hidden_size, ignore_index=-100, image_token_index=ids["image"], pad_token_id=ids["pad"],
        projector_hidden_act="gelu", image_seq_length=enc.num_tokens, vision_feature_layer=enc.feature_layer,
        vision_feature_select_strategy="default" if enc.drop_cls else "full", vocab_size=tc["vocab_size"],
        tie_word_embeddings=False, text_config=tc, vision_config=vc,
        special_tokens={"image_gen_start": "<|image_gen_start|>", "image_gen_start_token_id": ids["gen_start"],
                        "image_gen_end": "<|image_gen_end|>", "image_gen_end_token_id": ids["gen_end"],
                        "image_gen_pad": "<|image_gen_pad|>", "image_gen_pad_token_id": ids["gen_pad"]},
    )
    out.setdefault("train_from_scratch", False)
    out.setdefault("transformers_version", "4.46.1")
    return out


def processor_files(model: nn.Module) -> Dict[str, Dict[str, Any]]:
    """preprocessor_config.json (CLIPImageProcessor, as the released processor) and
    chat_template.json for the released layout."""
    tf = model.vision.image_transform()
    pre = {"image_processor_type": "CLIPImageProcessor", "processor_class": "LlavaProcessor",
           "crop_size": {"height": tf.size, "width": tf.size}, "size": {"shortest_edge": tf.size},
           "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True, "do_rescale": True,
           "do_resize": True, "rescale_factor": 1 / 255, "resample": 3,
           "image_mean": list(tf.mean), "image_std": list(tf.std)}
    return {"preprocessor_config.json": pre, "chat_template.json": {"chat_template": LLAVA_HF_CHAT_TEMPLATE}}


# ----------------------------------------------------------------------------------- tokenizer
def id_tokenizer(ids: Mapping[str, int], vocab_size: int):
    """A tokenizer for a checkpoint shipped without tokenizer files: one word per id ("t<i>"),
    the special tokens at the checkpoint's ids. Prompts are given as ids (parity, tests); text
    round-trips as the t<i> words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = {ids["image"]: "<image>", ids["pad"]: "<pad>", ids["gen_start"]: "<|image_gen_start|>",
             ids["gen_end"]: "<|image_gen_end|>", ids["gen_pad"]: "<|image_gen_pad|>",
             ids.get("bos", 1): "<s>", ids.get("eos", 2): "</s>"}
    n = max(vocab_size, max(names) + 1)
    vocab = {names.get(i, f"t{i}"): i for i in range(n)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="t0", extra_special_tokens=["<image>", "<|image_gen_start|>",
                                                                        "<|image_gen_end|>", "<|image_gen_pad|>"])
    return tok


def check_tokenizer(tokenizer, ids: Mapping[str, int]) -> None:
    """The tokenizer must give the special tokens the ids the checkpoint was trained with."""
    got = special_token_ids(tokenizer)
    bad = {k: (got.get(k), v) for k, v in ids.items() if got.get(k) != v}
    if bad:
        raise FormatError(f"tokenizer ids differ from config.json ({{name: (tokenizer, config)}}): {bad}")
