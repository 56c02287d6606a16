"""In-memory data for the stage-0 bases: the world's shards read once, then random batches from RAM.

The world's shards are small (a few thousand 64 px images), so each base reads its sources ONCE
through the shared reader (``datamodules.stream.ShardStream``, eval pass) into memory (uint8
images + scene records) and then draws random batches from RAM. On 2 cores this removes PNG
decoding and tar parsing from every step.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterator, List, Optional, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset

from datamodules.stream import ShardStream
from modules.components.classifier import scene_targets


def read_world(sources: Sequence[Any], root: str = "", limit: int = 0, images: bool = True) -> Dict[str, Any]:
    """One ordered pass over ``sources`` with the shared shard reader, kept in memory.

    Returns ``{"images": (N, 3, H, W) uint8 or None, "records": [record...], "keys": [...]}``.
    Only each record's first image is kept (world records have one). ``limit`` > 0 stops early.
    """
    stream = ShardStream(list(sources), mode="eval", root=root, shuffle_buffer=0, resampled=False,
                         rank=0, world_size=1)
    imgs: List[np.ndarray] = []
    records: List[Dict[str, Any]] = []
    keys: List[str] = []
    for s in stream:
        if images:
            if not s["images"]:
                raise ValueError(f"sample {s['key']} ({s['url']}) has no image; base stages need image records")
            imgs.append(np.asarray(s["images"][0].convert("RGB"), dtype=np.uint8))
        records.append(s["record"])
        keys.append(s["key"])
        if limit and len(records) >= limit:
            break
    if not records:
        raise ValueError(f"no samples read from {[s.shards for s in sources]} (root {root!r})")
    out: Dict[str, Any] = {"records": records, "keys": keys, "images": None}
    if images:
        sizes = {a.shape for a in imgs}
        if len(sizes) != 1:
            raise ValueError(f"world images of different sizes {sorted(sizes)}: regenerate with one --size")
        out["images"] = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
    return out


class RandomBatches(IterableDataset):
    """Infinite random batches (with replacement across batches, none within) from tensors in RAM."""

    def __init__(self, tensors: Dict[str, torch.Tensor], batch_size: int, seed: int = 0):
        n = {len(t) for t in tensors.values()}
        if len(n) != 1:
            raise ValueError(f"tensors of different lengths: { {k: len(t) for k, t in tensors.items()} }")
        self.tensors, self.n, self.batch_size, self.seed = tensors, n.pop(), batch_size, seed
        self.epoch = 0

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        self.epoch += 1
        bs = min(self.batch_size, self.n)
        while True:
            perm = torch.randperm(self.n, generator=g)
            for i in range(0, self.n - bs + 1, bs):
                idx = perm[i:i + bs]
                yield {k: t[idx] for k, t in self.tensors.items()}


class OrderedBatches(IterableDataset):
    """One ordered pass (validation)."""

    def __init__(self, tensors: Dict[str, torch.Tensor], batch_size: int):
        self.tensors, self.batch_size = tensors, batch_size
        self.n = len(next(iter(tensors.values())))

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        for i in range(0, self.n, self.batch_size):
            yield {k: t[i:i + self.batch_size] for k, t in self.tensors.items()}

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)


class InMemoryData(L.LightningDataModule):
    """Reads train / val sources once (``read_world``), turns them into tensors with
    ``make_tensors(split_data) -> dict of tensors`` and serves random / ordered batches."""

    def __init__(self, cfg: Any, make_tensors, images: bool = True):
        super().__init__()
        if not cfg.data.sources:
            raise ValueError(f"stage {cfg.stage}: data.sources is empty; list the world shards "
                             f"(see experiments/stages/{cfg.stage}.yaml)")
        self.cfg = cfg
        self.make_tensors = make_tensors
        self.images = images
        self.train_tensors: Optional[Dict[str, torch.Tensor]] = None
        self.val_tensors: Optional[Dict[str, torch.Tensor]] = None

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_tensors is None:
            d = self.cfg.data
            self.train_tensors = self.make_tensors(read_world(d.sources, d.root, images=self.images), "train")
            if d.val_sources:
                self.val_tensors = self.make_tensors(read_world(d.val_sources, d.root, images=self.images), "val")

    def train_dataloader(self) -> DataLoader:
        self.setup()
        ds = RandomBatches(self.train_tensors, self.cfg.data.batch_size, self.cfg.data.seed)
        return DataLoader(ds, batch_size=None, num_workers=0)

    def val_dataloader(self) -> Any:
        self.setup()
        if self.val_tensors is None:
            return []
        bs = self.cfg.data.val_batch_size or self.cfg.data.batch_size
        return DataLoader(OrderedBatches(self.val_tensors, bs), batch_size=None, num_workers=0)


def to_unit(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float in [0, 1]."""
    return x_uint8.float().div_(255.0)


def to_signed(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float in [-1, 1] (the VQVAE's range)."""
    return x_uint8.float().div_(127.5).sub_(1.0)


def check_resolution(stage: str, x: torch.Tensor, resolution: int, how: str, fix: str) -> None:
    """Image bases (VQVAE, BSQ) train at one resolution: world images of another size are a config
    error, named with the key that sets it (``how``: how the base's resolution is derived)."""
    if x.shape[-1] != resolution:
        raise ValueError(f"{stage}: world images are {x.shape[-1]} px but the {how} is {resolution}; fix {fix}")


def object_mask(x_uint8: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) float mask of world object pixels, dilated by one pixel.

    The background is light grey (200-235) with a tint and texture of a few levels; every object
    colour is saturated (channel spread > 60) or dark (black: max channel < 110).
    """
    x = x_uint8.float()
    spread = x.amax(1, keepdim=True) - x.amin(1, keepdim=True)
    mask = ((spread > 60) | (x.amax(1, keepdim=True) < 110)).float()
    return F.max_pool2d(mask, 3, stride=1, padding=1)


def scene_target_tensors(records: Sequence[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
    tg = [scene_targets(r["scene"]) for r in records]
    return {"what": torch.stack([t["what"] for t in tg]), "size": torch.stack([t["size"] for t in tg])}
