"""VQ pre-tokenization: store every generation target's multi-scale indices beside its image.

    python -m datamodules.pretokenize --shards 'data/world/train/gen-*.tar' --out data/world_vq/train \
        --vqvae-config vqvae.yaml --checkpoint bases/vqvae.safetensors [--key-prefix vqvae.] [--batch-size 64]

Targets go through GenTransform (deterministic resize of the shorter side + centre crop, fp32,
eval mode), unlike the released code (bf16, random crops). Output shards keep their names,
sample order and image bytes; each generation target i gains `img{i}.vq.npy` (all scales
concatenated, uint16 when the codebook fits, else int32) and the record gains
`vq = {fingerprint, patch_nums, resolution}`; manifest.json records the same under `vq`.

The fingerprint is the VQVAE's own `fingerprint()` (architecture + weights), the value the model
passes to the Collator; `tokenizer_fingerprint` is the fallback for other encoders. The loader refuses indices whose fingerprint differs from the model's VQVAE and falls back to
on-the-fly encoding where indices are absent.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from datamodules.schema import ShardSample, ShardWriter, image_kinds, iter_tar, read_manifest, vq_member, write_manifest
from datamodules.stream import expand_shards
from datamodules.transforms import GenTransform

# encoder(x_B3HW in [-1, 1]) -> list over scales of (B, pn*pn) long indices (VAR's img_to_idxBl)
Encoder = Callable[[torch.Tensor], List[torch.Tensor]]


def tokenizer_fingerprint(vqvae: torch.nn.Module, patch_nums: Sequence[int], resolution: int) -> str:
    """Stable id of a VQ tokenizer: weights (as fp32 bytes, sorted by name) + scales + resolution."""
    h = hashlib.sha256()
    h.update(json.dumps({"patch_nums": list(patch_nums), "resolution": int(resolution)}).encode())
    for name, t in sorted(vqvae.state_dict().items()):
        t = t.detach().to("cpu")
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update((t.float() if t.is_floating_point() else t).contiguous().numpy().tobytes())
    return "sha256:" + h.hexdigest()[:20]


@torch.no_grad()
def encode_images(encoder: Encoder, images: List[Image.Image], resolution: int, patch_nums: Sequence[int],
                  device: str = "cpu") -> np.ndarray:
    """(N, L) int64 indices of N images, scales concatenated in order."""
    tf = GenTransform(resolution)
    x = torch.stack([tf(im) for im in images]).to(device=device, dtype=torch.float32)
    idx = encoder(x)
    if len(idx) != len(patch_nums):
        raise ValueError(f"encoder returned {len(idx)} scales, expected {len(patch_nums)} ({list(patch_nums)})")
    for k, (t, pn) in enumerate(zip(idx, patch_nums)):
        if t.shape != (x.shape[0], pn * pn):
            raise ValueError(f"scale {k}: encoder returned {tuple(t.shape)}, expected ({x.shape[0]}, {pn * pn})")
    return torch.cat([t.long() for t in idx], dim=1).cpu().numpy()


def pretokenize_shards(
    patterns: str,
    out_dir: str,
    encoder: Encoder,
    patch_nums: Sequence[int],
    resolution: int,
    fingerprint: str,
    vocab_size: int = 65536,
    batch_size: int = 64,
    device: str = "cpu",
) -> Dict[str, Any]:
    urls = expand_shards(patterns)
    if not urls:
        raise FileNotFoundError(f"--shards {patterns!r} matches no files")
    dtype = np.uint16 if vocab_size <= 65536 else np.int32
    vq_meta = {"fingerprint": fingerprint, "patch_nums": list(patch_nums), "resolution": resolution,
               "dtype": np.dtype(dtype).name}
    os.makedirs(out_dir, exist_ok=True)
    shard_entries: List[Dict[str, Any]] = []
    manifests: Dict[str, Dict[str, Any]] = {}
    for url in urls:
        d = os.path.dirname(os.path.abspath(url))
        if d not in manifests and os.path.exists(os.path.join(d, "manifest.json")):
            manifests[d] = read_manifest(d)
        name = os.path.basename(url)
        prefix = name.rsplit("-", 1)[0]
        samples = list(iter_tar(url))
        # Encode all generation targets of the shard in batches.
        todo: List[tuple] = []  # (sample index, image index)
        for si, raw in enumerate(samples):
            rec = json.loads(raw["json"])
            raw["_rec"] = rec
            for i, kind in enumerate(image_kinds(rec)):
                if kind == "gen":
                    todo.append((si, i))
        codes: Dict[tuple, np.ndarray] = {}
        for b in range(0, len(todo), batch_size):
            chunk = todo[b:b + batch_size]
            ims = [Image.open(io.BytesIO(samples[si][samples[si]["_rec"]["images"][i]])) for si, i in chunk]
            idx = encode_images(encoder, ims, resolution, patch_nums, device)
            if idx.max(initial=0) >= vocab_size:
                raise ValueError(f"index {idx.max()} >= vocab_size {vocab_size}")
            for (si, i), row in zip(chunk, idx):
                codes[(si, i)] = row.astype(dtype)
        w = ShardWriter(out_dir, prefix, shard_size=max(1, len(samples)),
                        start_index=int(name.rsplit("-", 1)[1].split(".")[0]))  # keep the file name
        for si, raw in enumerate(samples):
            rec = raw.pop("_rec")
            files = {k: v for k, v in raw.items() if not k.startswith("__") and k != "json" and not k.endswith(".vq.npy")}
            gens = [i for i, kind in enumerate(image_kinds(rec)) if kind == "gen"]
            if gens:
                rec["vq"] = vq_meta
                for i in gens:
                    buf = io.BytesIO()
                    np.save(buf, codes[(si, i)], allow_pickle=False)
                    files[vq_member(i)] = buf.getvalue()
            w.write(ShardSample(key=raw["__key__"], record=rec, files=files))
        entry = w.close()[-1]
        entry["task"] = prefix
        shard_entries.append(entry)
    extra: Dict[str, Any] = {"pretokenized_from": sorted(manifests)}
    src = next(iter(manifests.values()), {})
    for k in ("world", "converter"):
        if k in src:
            extra[k] = src[k]
    return write_manifest(out_dir, shard_entries, source=src.get("source", "pretokenize"), vq=vq_meta,
                          skipped=src.get("skipped"), extra=extra)


def load_vqvae(config_path: str, checkpoint: str, key_prefix: str = "") -> torch.nn.Module:
    """The project's VQVAE (modules/components/vqvae.py) from a YAML of VQVAEConfig + weights.

    key_prefix: take the sub-dict under this prefix (e.g. "vqvae." from a whole-model file).
    """
    from omegaconf import OmegaConf

    from modules.checkpoint import read_state_dict
    from modules.components.vqvae import VQVAEConfig, build_vqvae

    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(VQVAEConfig), OmegaConf.load(config_path)))
    model = build_vqvae(cfg)
    sd = read_state_dict(checkpoint)
    if key_prefix:
        sd = {k[len(key_prefix):]: v for k, v in sd.items() if k.startswith(key_prefix)}
        if not sd:
            raise SystemExit(f"{checkpoint}: no keys start with {key_prefix!r}")
    model.load_state_dict(sd, strict=True)
    return model.eval().float()


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m datamodules.pretokenize", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", required=True, help="glob/brace pattern of input shards")
    ap.add_argument("--out", required=True)
    ap.add_argument("--vqvae-config", required=True, help="YAML of the VQVAE component config (VQVAEConfig fields)")
    ap.add_argument("--checkpoint", required=True, help=".safetensors or .pth state dict")
    ap.add_argument("--key-prefix", default="", help="sub-dict of a whole-model checkpoint, e.g. 'vqvae.'")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    vqvae = load_vqvae(args.vqvae_config, args.checkpoint, args.key_prefix).to(args.device)
    patch_nums = list(vqvae.patch_nums)
    resolution = vqvae.cfg.resolution  # the VQVAE only accepts its own input size
    # The model compares against vqvae.fingerprint(), so the shards carry exactly that.
    fp = vqvae.fingerprint()
    m = pretokenize_shards(args.shards, args.out, vqvae.img_to_idx, patch_nums, resolution, fp,
                           int(vqvae.vocab_size), args.batch_size, args.device)
    print(f"{m['num_samples']} samples -> {args.out} (VQVAE fingerprint {fp}, {resolution} px, scales {patch_nums})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
