"""Loading weights into the composed model: `model.load` specs and `init_from`, all strict.

Explicit state-dict adapters (one function per foreign layout) turn a file's keys into ours;
nothing is loaded with strict=False. What may be missing or unexpected is written in the
config (`allow_missing` / `allow_unexpected`) or is a documented fact of the adapter (the VAR
class embedding, which VARGPT replaces by its two-row condition embedding).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Iterable, Sequence

import torch
import torch.nn as nn

from modules.checkpoint import load_strict, read_state_dict
from modules.config import LoadSpec

# LLaVA-1.5 (liuhaotian/llava-v1.5-*) key layout -> ours. The vision tower is not in those
# checkpoints (LLaVA loads CLIP separately): point model.vision at the CLIP directory.
_LLAVA_RULES = (
    (re.compile(r"^model\.mm_projector\.(.*)$"), r"und_proj.\1"),
    (re.compile(r"^model\.vision_tower\..*$"), None),  # dropped: loaded by model.vision
    (re.compile(r"^lm_head\.(.*)$"), r"llm.lm_head.\1"),
    (re.compile(r"^model\.(.*)$"), r"llm.model.\1"),
)


def adapt_llava(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out: Dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        for pat, repl in _LLAVA_RULES:
            if pat.match(k):
                if repl is not None:
                    out[pat.sub(repl, k)] = v
                break
        else:
            out[k] = v  # left as is: strict loading will name it if it fits nowhere
    return out


def _grow_vocab_rows(model: nn.Module, sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A checkpoint saved before the VARGPT special tokens were added has fewer embedding /
    lm_head rows than the model: copy its rows and keep the model's rows for the new tokens
    (initialised to the mean embedding by build_llm, as LLaVA does)."""
    own = model.state_dict()
    for k in list(sd):
        if k in own and sd[k].ndim == 2 and own[k].ndim == 2 and sd[k].shape[1] == own[k].shape[1] \
                and sd[k].shape[0] < own[k].shape[0] and (k.endswith("embed_tokens.weight") or "lm_head" in k):
            grown = own[k].detach().clone()
            grown[: sd[k].shape[0]] = sd[k].to(grown.dtype)
            sd[k] = grown
    return sd


def _select(sd: Dict[str, torch.Tensor], keys: Sequence[str]) -> Dict[str, torch.Tensor]:
    if not keys:
        return sd
    return {k: v for k, v in sd.items() if any(k == p or k.startswith(p + ".") for p in keys)}


def apply_load_spec(model: nn.Module, spec: LoadSpec, root: Path) -> None:
    """Load one `model.load` entry into `model` (a VARGPT) strictly."""
    path = Path(spec.path)
    path = path if path.is_absolute() else root / path
    if not path.exists():
        raise FileNotFoundError(f"model.load: weights file not found: {path} (format {spec.format}, into "
                                f"{spec.into or 'the whole model'}); check the path or build it first")
    sd = read_state_dict(path)
    src = f"{path} ({spec.format})"
    if spec.format == "official_var":
        target = getattr(model, spec.into or "var")
        missing = list(spec.allow_missing)
        unexpected = list(spec.allow_unexpected)
        if getattr(target, "cond_mode", "class") == "external":
            missing.append("cond_emb.weight")
            unexpected.append("class_emb.weight")
        target.load_official_state_dict(sd, allow_missing=missing, allow_unexpected=unexpected)
        return
    if spec.format == "official_vqvae":
        getattr(model, spec.into or "vqvae").load_official_state_dict(
            sd, allow_missing=spec.allow_missing, allow_unexpected=spec.allow_unexpected)
        return
    if spec.format == "llava":
        sd = adapt_llava(sd)
    target = getattr(model, spec.into) if spec.into else model
    sd = _grow_vocab_rows(target, dict(sd))
    if spec.into:
        load_strict(target, sd, spec.allow_missing, spec.allow_unexpected, source=src)
        return
    sd = _select(sd, spec.keys)
    if spec.keys:
        # strict within the selected submodules; the rest of the model is not this file's business
        for name in spec.keys:
            sub_sd = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")}
            allow_m = [p[len(name) + 1:] for p in spec.allow_missing if p.startswith(name + ".")]
            allow_u = [p[len(name) + 1:] for p in spec.allow_unexpected if p.startswith(name + ".")]
            load_strict(getattr(model, name), sub_sd, allow_m, allow_u, source=f"{src}[{name}]")
        return
    load_strict(model, sd, spec.allow_missing, spec.allow_unexpected, source=src)


def load_all(model: nn.Module, specs: Iterable[LoadSpec], root: Path) -> None:
    for spec in specs:
        apply_load_spec(model, spec, root)


def init_from(model: nn.Module, path: str, allow_missing: Sequence[str], root: Path) -> None:
    """Start from another run's exported model (stage N -> N+1): every key must match."""
    p = Path(path)
    p = p if p.is_absolute() else root / p
    if p.is_dir():
        p = p / "model.safetensors"
    sd = _grow_vocab_rows(model, dict(read_state_dict(p)))
    load_strict(model, sd, allow_missing=allow_missing, source=str(p))
