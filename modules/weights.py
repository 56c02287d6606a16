"""Weights in: the one way pretrained weights enter a model, all strict.

Components build with random weights (modules/components/*); every pretrained weight arrives
here, through ``model.load`` entries (``LoadSpec``: path, format, into, keys) and then
``init_from`` (another run's export, a ``native`` load of the whole model). One adapter per
foreign layout turns a file's keys into ours (``from_<layout>``); nothing is loaded with
strict=False: what may be missing or unexpected is written in the config (``allow_missing`` /
``allow_unexpected``) or is a documented fact of the adapter. Paths are resolved by
``datamodules.paths.resolve_path`` (relative to the repository root).

    format          file                                     into (a top-level name or a dotted path: gen.vae_local)
    native          our own names (an experiments.run export, or a component's state dict)
    official_var    FoundationVision/VAR var_d*.pth         var (class embedding -> cond_emb)
    official_vqvae  vae_ch160v4096z32.pth                    vqvae
    llava           a LLaVA-1.5 checkpoint (LLM + mm_projector)   the whole model
    hf              a Hugging Face save_pretrained directory llm (CausalLM) or vision (CLIP/SigLIP)
    timm            a timm ViT state dict                    vision
    vargpt          a released VARGPT directory              the whole model (or `keys`)
                    (config.json + model.safetensors or shards + index; modules/vargpt_format.py)
    llava_hf        llava-hf/llava-1.5-7b-hf (a directory)   vision, und_proj, llm
    llama_qwen2     the suite's Llama (`llm.` keys of an export  a v1.1 model's LLM (model, lm_head)
                    or a base, e.g. assets/world/llava.safetensors)

The directory formats (vargpt, llava_hf) load shard by shard, tensor by tensor, onto the model as
it is: a model built under ``empty_parameters()`` (parameters on the meta device) gets each
tensor assigned, so the checkpoint and the model are never both in memory (peak: the model plus
one tensor); a materialised model gets each tensor copied in place.

The stage-0 bases load their frozen parts through ``load_into`` (the same adapters, one component).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn as nn

from datamodules.paths import resolve_path
from modules.checkpoint import (StateDictMismatchError, _assign, _matches, iter_safetensors_shards, load_strict,
                                read_state_dict)
from modules.checkpoint import empty_parameters  # noqa: F401 (re-exported: modules/released.py)
from modules.config import LOAD_FORMATS, LoadSpec
from modules.vargpt_format import DROP, LLAVA_HF_PARTS, KeyMap, llava_hf_key_map, read_config, released_ids, \
    vargpt_key_map

StateDict = Dict[str, torch.Tensor]

# ----------------------------------------------------------------------------------- adapters
# LLaVA-1.5 (liuhaotian/llava-v1.5-*) key layout -> ours. The vision tower is not in those
# checkpoints (LLaVA loads CLIP separately): load it with format hf into vision.
_LLAVA_RULES = (
    (re.compile(r"^model\.mm_projector\.(.*)$"), r"und_proj.\1"),
    (re.compile(r"^model\.vision_tower\..*$"), None),  # dropped: loaded into vision separately
    (re.compile(r"^lm_head\.(.*)$"), r"llm.lm_head.\1"),
    (re.compile(r"^model\.(.*)$"), r"llm.model.\1"),
)


def from_llava(sd: StateDict) -> StateDict:
    out: StateDict = {}
    for k, v in sd.items():
        for pat, repl in _LLAVA_RULES:
            if pat.match(k):
                if repl is not None:
                    out[pat.sub(repl, k)] = v
                break
        else:
            out[k] = v  # left as is: strict loading will name it if it fits nowhere
    return out


# A full CLIP / SigLIP checkpoint (CLIPModel) also holds the text tower and the projections:
# the vision encoder takes `vision_model.*` only (as LLaVA does).
_HF_VISION_DROP = re.compile(r"^(text_model\.|visual_projection\.|text_projection\.|logit_scale|logit_bias)")


def from_hf_vision(sd: StateDict, nested: bool) -> StateDict:
    """HF CLIPVisionModel / CLIPModel / SigLIP keys -> our VisionEncoder (``tower.`` + the HF
    names). Transformers versions differ in whether the vision model's keys carry
    ``vision_model.``: both layouts load, into a tower that has it (``nested``) or not."""
    out: StateDict = {}
    for k, v in sd.items():
        if _HF_VISION_DROP.match(k):
            continue
        k = k.removeprefix("vision_model.")
        out[f"tower.vision_model.{k}" if nested else f"tower.{k}"] = v
    return out


def from_timm(sd: StateDict) -> StateDict:
    """A timm ViT state dict -> our VisionEncoder; the classification head is not part of the
    encoder (built with num_classes=0)."""
    return {f"tower.{k}": v for k, v in sd.items() if not k.startswith("head.")}


def grow_vocab_rows(model: nn.Module, sd: StateDict) -> StateDict:
    """A checkpoint saved before the VARGPT special tokens were added has fewer embedding /
    lm_head rows than the model: copy its rows and give the new tokens the mean of the
    checkpoint's rows (LLaVA's rule for added tokens)."""
    own = model.state_dict()
    for k in list(sd):
        if k in own and sd[k].ndim == 2 and own[k].ndim == 2 and sd[k].shape[1] == own[k].shape[1] \
                and sd[k].shape[0] < own[k].shape[0] and (k.endswith("embed_tokens.weight") or "lm_head" in k):
            n = sd[k].shape[0]
            grown = own[k].detach().clone()
            grown[:n] = sd[k].to(grown.dtype)
            grown[n:] = sd[k].float().mean(0).to(grown.dtype)
            sd[k] = grown
    return sd


def from_llama_qwen2(sd: StateDict) -> StateDict:
    """The suite's Llama (``llm.model.*`` / ``llm.lm_head.*``, as every v1 export and the world's
    LLM bases hold it) -> the v1.1 LLM's names (``model.*`` / ``lm_head.*``, Qwen2-VL's text model).
    Only the file's ``llm.`` keys are read (a LLaVA-style export also holds ``vision.`` /
    ``und_proj.``, which have no place in a v1.1 model). A Qwen2 layer is a Llama layer plus q/k/v
    biases: they arrive as zeros, so the function is the same when the v1.1 LLM's sizes, rope_theta
    and rms_norm_eps are the Llama's (on text, M-RoPE's three equal position components are 1-D
    RoPE; tests/test_llama_qwen2.py compares the logits)."""
    out: StateDict = {}
    for k, v in sd.items():
        if not k.startswith("llm."):
            continue
        k = k[len("llm."):]
        out[k] = v
        m = re.fullmatch(r"(model\.layers\.\d+\.self_attn\.[qkv]_proj)\.weight", k)
        if m:
            out[f"{m.group(1)}.bias"] = torch.zeros(v.shape[0], dtype=v.dtype)
    if not out:
        raise ValueError("format llama_qwen2: the file has no llm.* keys (expected the suite's Llama names, "
                         "llm.model.layers.N... and llm.lm_head.weight: a v1 export or a world LLM base)")
    return out


# ----------------------------------------------------------------------------------- loaders
def _load_official_var(target: nn.Module, sd: StateDict, spec: LoadSpec, src: str) -> None:
    missing, unexpected = list(spec.allow_missing), list(spec.allow_unexpected)
    if getattr(target, "cond_mode", "class") == "external":
        # VARGPT conditions VAR with its own two-row embedding, not the class table
        missing.append("cond_emb.weight")
        unexpected.append("class_emb.weight")
    if getattr(target, "cross", None) is not None:
        missing.append("cross.*")  # cross-attention to the prompt (VARGPT var_cond prompt_attn) is new
    target.load_official_state_dict(sd, allow_missing=missing, allow_unexpected=unexpected)


def _load_official_vqvae(target: nn.Module, sd: StateDict, spec: LoadSpec, src: str) -> None:
    target.load_official_state_dict(sd, allow_missing=spec.allow_missing, allow_unexpected=spec.allow_unexpected)


def _load_mapped(adapter: Optional[Callable[[StateDict], StateDict]]):
    def load(target: nn.Module, sd: StateDict, spec: LoadSpec, src: str) -> None:
        if adapter is not None:
            sd = adapter(sd)
        load_strict(target, grow_vocab_rows(target, dict(sd)), spec.allow_missing, spec.allow_unexpected, source=src)
    return load


def _load_llama_qwen2(target: nn.Module, sd: StateDict, spec: LoadSpec, src: str) -> None:
    # strict within the LLM (model.*, lm_head.*): every one of its keys must arrive; the rest of the
    # v1.1 model (visual, gen) is not this file's business
    if not (isinstance(getattr(target, "model", None), nn.Module) and hasattr(target, "lm_head")):
        raise ValueError(f"{src}: format llama_qwen2 loads into a VARGPT-v1.1 model (model.family: vargpt11, "
                         "into: ''), whose LLM is model.* / lm_head.*; this target has none")
    missing = list(spec.allow_missing) + ["visual.*", "gen.*"]
    load_strict(target, grow_vocab_rows(target, from_llama_qwen2(sd)), missing, spec.allow_unexpected, source=src)


def _load_hf(target: nn.Module, sd: StateDict, spec: LoadSpec, src: str) -> None:
    # into: vision -> the encoder's tower; into: llm (a CausalLM) -> its own names
    if spec.into == "vision":
        nested = any(k.startswith("tower.vision_model.") for k in target.state_dict())
        sd = from_hf_vision(sd, nested)
    _load_mapped(None)(target, sd, spec, src)


LOADERS: Dict[str, Callable[[nn.Module, StateDict, LoadSpec, str], None]] = {
    "native": _load_mapped(None),
    "official_var": _load_official_var,
    "official_vqvae": _load_official_vqvae,
    "llava": _load_mapped(from_llava),
    "hf": _load_hf,
    "timm": _load_mapped(from_timm),
    "llama_qwen2": _load_llama_qwen2,
}


# ----------------------------------------------------------------------------------- directories
def stream_load(model: nn.Module, path: Path, key_map: KeyMap, spec: LoadSpec, src: str,
                parts: Sequence[str] = ()) -> Dict[str, int]:
    """Load a safetensors checkpoint directory into ``model`` shard by shard, tensor by tensor,
    through ``key_map`` (file key -> (our key, transform) | DROP | None). Strict within ``parts``
    (submodule names; () = the whole model): every key of the model there must arrive, every key
    of the file must map, shapes must agree, except what ``spec`` allows. Returns counts."""
    own = model.state_dict(keep_vars=True)

    def inside(k: str) -> bool:
        return not parts or any(k == p or k.startswith(p + ".") for p in parts)

    loaded: set = set()
    unexpected, shape, dropped = [], [], 0
    for _, entries in iter_safetensors_shards(path):
        for key, get in entries:
            m = key_map(key)
            if m is DROP:
                dropped += 1
                continue
            if m is None or m[0] not in own:
                if not _matches(key, spec.allow_unexpected):
                    unexpected.append(key if m is None else f"{key} (-> {m[0]})")
                continue
            ours, fn = m
            if not inside(ours):
                continue
            t = get()
            t = fn(t) if fn is not None else t
            if tuple(t.shape) != tuple(own[ours].shape):
                shape.append(f"{key} -> {ours}: checkpoint {tuple(t.shape)} vs model {tuple(own[ours].shape)}")
                continue
            _assign(model, ours, t)
            loaded.add(ours)
            del t
    missing = [k for k in own if inside(k) and k not in loaded and not _matches(k, spec.allow_missing)]
    if missing or unexpected or shape:
        lines = [f"cannot load {src} strictly:"]
        for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shape)):
            if keys:
                lines.append(f"  {what} ({len(keys)}): {', '.join(keys[:20])}" + (" ..." if len(keys) > 20 else ""))
        lines.append("  fix: a checkpoint of this layout and size (the model config must come from its config.json), "
                     "or allow the keys explicitly (allow_missing / allow_unexpected)")
        raise StateDictMismatchError("\n".join(lines))
    return {"loaded": len(loaded), "dropped": dropped}


def _nested_vision(model: nn.Module) -> bool:
    return any(k.startswith("vision.tower.vision_model.") for k in model.state_dict(keep_vars=True))


def _check_ids(model: nn.Module, ids: Dict[str, int], src: str) -> None:
    own = getattr(model, "ids", None)
    if own is None:
        return
    bad = {k: (own.get(k), v) for k, v in ids.items() if k in ("image", "gen_start", "gen_end", "gen_pad")
           and own.get(k) != v}
    if bad:
        raise StateDictMismatchError(f"{src}: the model's tokenizer gives other ids than the checkpoint's "
                                     f"config.json ({{name: (model, checkpoint)}}): {bad}; use the checkpoint's "
                                     "tokenizer (model.tokenizer: {name: hf, path: <the directory>})")


def _load_vargpt_dir(model: nn.Module, path: Path, spec: LoadSpec, src: str) -> Dict[str, int]:
    ids = released_ids(read_config(path))
    _check_ids(model, ids, src)
    key_map = vargpt_key_map(ids["gen_start"], _nested_vision(model))
    return stream_load(model, path, key_map, spec, src, parts=spec.keys)


def _load_llava_hf_dir(model: nn.Module, path: Path, spec: LoadSpec, src: str) -> Dict[str, int]:
    # the file holds the LLaVA parts only: strict within them, the generation parts untouched
    parts = spec.keys or [p for p in LLAVA_HF_PARTS if hasattr(model, p)]
    return stream_load(model, path, llava_hf_key_map(_nested_vision(model)), spec, src, parts=parts)


def _load_vargpt11_dir(model: nn.Module, path: Path, spec: LoadSpec, src: str) -> Dict[str, int]:
    # the released VARGPT-v1.1 directory into a VARGPT11 model: strict, one shard at a time
    from modules.vargpt11_format import load_released  # lazy: pulls the Qwen2-VL classes

    if spec.keys or spec.allow_missing or spec.allow_unexpected:
        raise ValueError(f"{src}: format vargpt11 loads the whole model strictly (no keys / allow_* lists)")
    done = load_released(model, path)
    return {"tensors": len(done)}


# Formats whose file is a directory read shard by shard (a model composed as VARGPT, into "").
DIR_LOADERS: Dict[str, Callable[[nn.Module, Path, LoadSpec, str], Dict[str, int]]] = {
    "vargpt": _load_vargpt_dir,
    "llava_hf": _load_llava_hf_dir,
    "vargpt11": _load_vargpt11_dir,
}
assert set(LOADERS) | set(DIR_LOADERS) == set(LOAD_FORMATS), "modules/config.py LOAD_FORMATS and LOADERS disagree"
# The submodule a format loads into when `into` is not given.
_DEFAULT_INTO = {"official_var": "var", "official_vqvae": "vqvae", "timm": "vision"}


def _select(sd: StateDict, keys: Sequence[str]) -> StateDict:
    return {k: v for k, v in sd.items() if any(k == p or k.startswith(p + ".") for p in keys)}


def load_into(target: nn.Module, spec: LoadSpec, into: str = "") -> None:
    """Load one ``model.load`` entry into ``target``: a component itself (``into`` names which,
    for the adapters that care), or a composed model whose submodule ``spec.into`` is chosen."""
    path = resolve_path(spec.path)
    if not path.exists():
        raise FileNotFoundError(f"model.load: weights not found: {path} (format {spec.format}, into "
                                f"{spec.into or 'the whole model'}); check the path or build it first")
    if spec.format in DIR_LOADERS:
        if spec.into:
            raise ValueError(f"model.load format {spec.format} loads the whole model (into: ''); choose parts "
                             f"with keys: [...]")
        if not path.is_dir():
            raise FileNotFoundError(f"model.load format {spec.format}: {path} must be a directory (config.json + "
                                    "safetensors shards)")
        DIR_LOADERS[spec.format](target, path, spec, f"{path} ({spec.format})")
        return
    sd = read_state_dict(path)
    src = f"{path} ({spec.format})"
    loader = LOADERS[spec.format]
    if not spec.keys:
        loader(target, sd, spec, src)
        return
    # strict within the selected submodules; the rest of the model is not this file's business
    sd = _select(from_llava(sd) if spec.format == "llava" else sd, spec.keys)
    for name in spec.keys:
        sub_sd = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")}
        sub = LoadSpec(path=spec.path, into=name, format="native",
                       allow_missing=[p[len(name) + 1:] for p in spec.allow_missing if p.startswith(name + ".")],
                       allow_unexpected=[p[len(name) + 1:] for p in spec.allow_unexpected if p.startswith(name + ".")])
        LOADERS["native"](getattr(target, name), sub_sd, sub, f"{src}[{name}]")


def submodule(model: nn.Module, into: str, where: str = "model.load") -> nn.Module:
    """The submodule a ``model.load`` entry's ``into`` names: a top-level name (``vqvae``) or a
    dotted path (``gen.vae_local``, the v1.1 tokenizer). A name that is not there is refused with
    the names that are, at the level where the path stopped matching."""
    try:
        return model.get_submodule(into)
    except AttributeError:
        pass
    # the deepest prefix that exists: its children are the names to offer
    parts, mod, done = into.split("."), model, []
    while parts and parts[0] and isinstance(mod._modules.get(parts[0]), nn.Module):
        mod = mod._modules[parts[0]]
        done.append(parts.pop(0))
    part, here = parts[0], ".".join(done)
    names = [f"{here}.{n}" if here else n for n, _ in mod.named_children()]
    raise ValueError(f"{where}: into={into!r} names no submodule of {type(model).__name__} "
                     f"({'no ' + repr(part) + ' under ' + repr(here) if here else 'no top-level ' + repr(part)}); "
                     f"available {'under ' + repr(here) if here else 'top-level'}: {', '.join(names) or 'none'}. "
                     "Fix: a top-level name or a dotted path to a submodule (e.g. gen.vae_local)")


def apply_load_spec(model: nn.Module, spec: LoadSpec, where: str = "model.load") -> None:
    """One ``model.load`` entry into a composed model (``into`` picks the submodule, dotted for
    a nested one); ``where`` names the entry in errors (``model.load[2]``)."""
    into = spec.into or _DEFAULT_INTO.get(spec.format, "")
    target = submodule(model, into, f"{where} ({spec.path})") if into else model
    load_into(target, LoadSpec(**{**spec.__dict__, "into": into}))


def init_spec(path: str, allow_missing: Sequence[str] = (), allow_unexpected: Sequence[str] = ()) -> LoadSpec:
    """``init_from: RUN_DIR`` as the ``model.load`` entry it is: that run's whole exported model."""
    p = resolve_path(path)
    return LoadSpec(path=str(p / "model.safetensors" if p.is_dir() else p), format="native",
                    allow_missing=list(allow_missing), allow_unexpected=list(allow_unexpected))


def load_weights(model: nn.Module, specs: Iterable[LoadSpec], init_from: str = "",
                 init_allow_missing: Sequence[str] = (), init_allow_unexpected: Sequence[str] = ()) -> None:
    """Every pretrained weight of a composed model: the ``model.load`` entries in order (a later
    file overwrites an earlier one), then ``init_from`` (stage N -> N+1: every key must match)."""
    entries: List[LoadSpec] = list(specs)
    if init_from:
        entries.append(init_spec(init_from, init_allow_missing, init_allow_unexpected))
    for i, spec in enumerate(entries):
        apply_load_spec(model, spec, "init_from" if init_from and i == len(entries) - 1 else f"model.load[{i}]")


def load_component(component: nn.Module, specs: Iterable[LoadSpec], into: str, what: str, hint: str) -> nn.Module:
    """The ``model.load`` entries for one submodule (``into``) applied to a bare component, e.g.
    the frozen VQVAE a stage-0 base trains against; ``hint`` says how to make a missing file."""
    mine = [s for s in specs if s.into == into]
    if not mine:
        raise ValueError(f"{what} needs trained {into} weights: add to the config model.load: "
                         f"[{{path: ..., into: {into}}}] ({hint})")
    for s in mine:
        if not resolve_path(s.path).exists():
            raise FileNotFoundError(f"model.load into {into}: {resolve_path(s.path)} not found; {hint}")
        load_into(component, s)
    return component
