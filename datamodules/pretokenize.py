"""VQ pre-tokenization: store every generation target's multi-scale indices beside its image.

The shard side: ``pretokenize_shards`` takes any encoder callable, so the data layer never
imports the model; the command that runs the project's VQVAE is ``python -m experiments.pretokenize``.

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

import hashlib
import io
import json
import os
from typing import Any, Callable, Dict, List, Sequence

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
