"""The released VARGPT-v1.1 directory in and out (``config.json`` + safetensors, single or sharded).

The release writes the LLM / ViT sizes and token ids into ``config.json`` but not the decoder or
tokenizer sizes (its code hard-codes them); those are read from the tensor shapes here
(``InfinityConfig.from_state_dict``, ``BSQConfig.from_state_dict``), from the safetensors headers
alone. Loading is strict and streamed: one shard in memory at a time, each tensor copied into
the model's parameter, a missing or stray key refused by name. Key layout: the release's names,
with this suite's generation side under ``gen.`` (``vae_local.*``, ``vargpt_gen.*``,
``image_gen_projector{,_out}.*``, ``sos_embedding.*``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

GEN_PREFIXES = ("vae_local.", "vargpt_gen.", "image_gen_projector.", "image_gen_projector_out.", "sos_embedding.")
# the schedules of Infinity's 1:1 resolution table (pn name -> square scale sides)
PN_SCALES = {
    "0.06M": [1, 2, 4, 6, 8, 12, 16],
    "0.25M": [1, 2, 4, 6, 8, 12, 16, 20, 24, 32],
    "1M": [1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64],
}


class ReleasedLayoutError(ValueError):
    pass


def to_released_key(k: str) -> str:
    return k[len("gen."):] if k.startswith("gen.") else k


def from_released_key(k: str) -> str:
    return "gen." + k if k.startswith(GEN_PREFIXES) else k


def weight_map(d: Path) -> Dict[str, str]:
    """key -> shard file name, from model.safetensors.index.json or a single model.safetensors."""
    d = Path(d)
    idx = d / "model.safetensors.index.json"
    if idx.is_file():
        wm = json.loads(idx.read_text()).get("weight_map")
        if not isinstance(wm, dict):
            raise ReleasedLayoutError(f"{idx}: no 'weight_map' (a Hugging Face shard index maps key -> file)")
        for f in sorted(set(wm.values())):
            if not (d / f).is_file():
                raise ReleasedLayoutError(f"{idx} names shard {f!r}, which is not in {d}")
        return wm
    single = d / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), "pt") as f:
            return {k: "model.safetensors" for k in f.keys()}
    raise ReleasedLayoutError(f"{d}: neither model.safetensors.index.json nor model.safetensors "
                              f"(expected a released VARGPT-v1.1 directory)")


def shapes(d: Path) -> Dict[str, Tuple[int, ...]]:
    """key -> shape, read from the safetensors headers (no tensor data)."""
    from safetensors import safe_open

    out: Dict[str, Tuple[int, ...]] = {}
    wm = weight_map(d)
    for shard in sorted(set(wm.values())):
        with safe_open(str(Path(d) / shard), "pt") as f:
            for k in f.keys():
                out[k] = tuple(f.get_slice(k).get_shape())
    return out


class _Shape:
    def __init__(self, s):
        self.shape = s


def config_from_released(d: Path, scales: Optional[List[List[int]]] = None, pn: str = "0.25M", **switches):
    """VARGPT11Config of a released directory: config.json + tensor shapes (+ a schedule)."""
    from modules.components.bsq import BSQConfig  # lazy: keeps this module import-light
    from modules.components.infinity import InfinityConfig  # lazy: same
    from modules.components.qwen2vl import Qwen2VLConfig  # lazy: same
    from modules.vargpt11 import TokenIds, V11Switches, VARGPT11Config  # lazy: vargpt11 imports gen_side

    d = Path(d)
    cj = d / "config.json"
    if not cj.is_file():
        raise ReleasedLayoutError(f"{d}: no config.json (expected a released VARGPT-v1.1 directory)")
    conf = json.loads(cj.read_text())
    sh = {k: _Shape(v) for k, v in shapes(d).items()}
    if scales is None:
        if pn not in PN_SCALES:
            raise ReleasedLayoutError(f"unknown pn {pn!r}; choose one of {sorted(PN_SCALES)} or give scales")
        scales = [[s, s] for s in PN_SCALES[pn]]
    st = conf.get("special_tokens", {})
    need = ["image_gen_start_token_id", "image_gen_end_token_id", "image_gen_pad_token_id"]
    for k in need:
        if k not in st:
            raise ReleasedLayoutError(f"{cj}: special_tokens lacks {k!r} (a VARGPT-v1.1 config names its image tokens)")
    ids = TokenIds(pad=conf.get("pad_token_id", conf.get("bos_token_id")), eos=conf["eos_token_id"],
                   vision_start=conf["vision_start_token_id"], vision_end=conf["vision_end_token_id"],
                   image_pad=conf["image_token_id"], gen_start=st["image_gen_start_token_id"],
                   gen_end=st["image_gen_end_token_id"], gen_pad=st["image_gen_pad_token_id"])
    sw = V11Switches(**switches)
    tok = BSQConfig.from_state_dict(sh, prefix="vae_local.", scales=scales)
    dec = InfinityConfig.from_state_dict(sh, prefix="vargpt_gen.", ca_bf16=sw.ca_bf16)
    llm = Qwen2VLConfig.from_released(conf)
    if "sos_embedding.weight" not in sh:
        raise ReleasedLayoutError(f"{d}: no 'sos_embedding.weight' tensor (not a VARGPT-v1.1 checkpoint)")
    return VARGPT11Config(llm=llm, tokenizer=tok, decoder=dec, ids=ids, switches=sw,
                          sos_rows=sh["sos_embedding.weight"].shape[0])


def expected_keys(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Released key -> parameter / persistent buffer of ``model``."""
    return {to_released_key(k): v for k, v in model.state_dict(keep_vars=True).items()}


def load_released(model: nn.Module, d: Path) -> List[str]:
    """Strict, shard by shard. Returns the loaded keys; raises naming the first missing/stray keys.
    A model built under ``modules.checkpoint.empty_parameters`` (parameters on the meta device)
    gets each tensor assigned as it is read: memory is the model plus one tensor."""
    from safetensors import safe_open

    from modules.checkpoint import _assign  # lazy: keeps this module import-light

    d = Path(d)
    wm = weight_map(d)
    want = expected_keys(model)
    stray = sorted(set(wm) - set(want))
    missing = sorted(set(want) - set(wm))
    if stray or missing:
        raise ReleasedLayoutError(
            f"{d}: checkpoint keys differ from the model's: stray {stray[:5]}{' ...' if len(stray) > 5 else ''} "
            f"({len(stray)}), missing {missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)}); "
            f"check config.json / the schedule against the directory")
    done = []
    for shard in sorted(set(wm.values())):
        with safe_open(str(d / shard), "pt") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                p = want[k]
                if tuple(t.shape) != tuple(p.shape):
                    raise ReleasedLayoutError(f"{d / shard}: {k!r} has shape {tuple(t.shape)}, the model {tuple(p.shape)}")
                _assign(model, from_released_key(k), t.to(p.dtype))
                done.append(k)
    return done


def released_state_dict(model: nn.Module, dtype: Optional[torch.dtype] = torch.bfloat16) -> Dict[str, torch.Tensor]:
    """The released key layout (floats cast to ``dtype``: the release is stored in bf16)."""
    out = {}
    for k, v in model.state_dict().items():
        t = v.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[to_released_key(k)] = t.contiguous()
    return out


def write_released(model: nn.Module, cfg, out_dir: Path, max_shard_bytes: int = 5 * 2 ** 30,
                   dtype: Optional[torch.dtype] = torch.bfloat16) -> Path:
    """config.json + model-XXXXX-of-XXXXX.safetensors + index, as the release is laid out."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = released_state_dict(model, dtype)
    shards: List[Dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(sd):
        n = sd[k].numel() * sd[k].element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = sd[k]
        size += n
    wm = {}
    for i, s in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(s, str(out / name), metadata={"format": "pt"})
        wm.update({k: name for k in s})
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in sd.values())}, "weight_map": wm}, indent=2))
    (out / "config.json").write_text(json.dumps(released_config(cfg), indent=2))
    return out


def released_config(cfg) -> Dict:
    ids = cfg.ids
    c = {"architectures": ["VARGPTQwen2VLForConditionalGeneration"], "model_type": "vargpt_qwen2_vl",
         "bos_token_id": ids.pad, "eos_token_id": ids.eos, "pad_token_id": ids.pad,
         "image_token_id": ids.image_pad, "video_token_id": ids.image_pad + 1,
         "vision_start_token_id": ids.vision_start, "vision_end_token_id": ids.vision_end,
         "vision_token_id": ids.vision_start + 2, "torch_dtype": "bfloat16", "use_cache": True,
         "special_tokens": {"image_gen_start": "<|image_gen_start|>", "image_gen_start_token_id": ids.gen_start,
                            "image_gen_end": "<|image_gen_end|>", "image_gen_end_token_id": ids.gen_end,
                            "image_gen_pad": "<|image_gen_pad|>", "image_gen_pad_token_id": ids.gen_pad}}
    c.update(cfg.llm.to_released())
    return c


def build_released(d: Path, device: str = "cpu", **kw):
    """Model of a released directory with its weights (fp32)."""
    from modules.vargpt11 import VARGPT11  # lazy: vargpt11 imports transformers

    from modules.checkpoint import empty_parameters  # lazy: same

    cfg = config_from_released(d, **kw)
    with empty_parameters():  # no random init of what the checkpoint overwrites
        model = VARGPT11(cfg)
    load_released(model, d)
    return model.eval(), cfg
