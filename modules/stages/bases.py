"""Stage 0 of the embedded world: train the tiny stand-ins for the pretrained parts.

    base_vqvae       multi-scale VQVAE on world images             self.net = MultiScaleVQVAE
    base_var         class-conditional VAR on VQ indices of the     self.net = VARDecoder
                     `class` task (24 (shape, colour) classes)
    base_classifier  reference classifier (FID/IS features,         self.net = WorldCNN
                     attribute read-back)
    base_vision      tiny_vit tower + per-slot attribute heads      self.net = VisionEncoder
                     (only the tower is exported)
    base_llm         tiny Llama as a language model on world text   self.net = LlamaForCausalLM
                     (trains + saves the world tokenizer first if missing)

``self.net`` is exactly the component, so experiments.run's export (``module.net.state_dict()``
-> ``<output_dir>/model.safetensors``) loads into that component with a strict load, e.g.
``model.load: [{path: runs/bases/vqvae/model.safetensors, into: vqvae}]``.

Data. The world's shards are small (a few thousand 64 px images), so each base reads its
sources ONCE through the shared reader (``datamodules.stream.ShardStream``, eval pass) into
memory (uint8 images + scene records) and then draws random batches from RAM. On 2 cores this
removes PNG decoding and tar parsing from every step; the VAR's VQ indices are likewise
computed once (fp32, eval mode) and cached under its output_dir keyed by the VQVAE fingerprint.

Tokenizer. ``base_llm`` trains the world tokenizer (``train_world_tokenizer``) into
``model.tokenizer.path`` when that directory has no tokenizer yet; ``python -m
modules.stages.bases tokenizer --shards 'runs/data/world/train/*.tar' --out runs/bases/tokenizer``
does the same by hand.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import math
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import lightning as L
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset

from modules.stages.base import StageModule

log = logging.getLogger(__name__)

# VQVAE: extra L1 on object pixels (colour is learned last because objects cover ~10% of the
# image, WORLD_NOTES.md); weight relative to the plain L1. Not a config field (yet).
VQVAE_OBJECT_L1 = 3.0
# VAR token cache and data loading: images encoded per batch.
ENCODE_BATCH = 128


# ============================================================================ in-memory data


def read_world(sources: Sequence[Any], root: str = "", limit: int = 0, images: bool = True) -> Dict[str, Any]:
    """One ordered pass over ``sources`` with the shared shard reader, kept in memory.

    Returns ``{"images": (N, 3, H, W) uint8 or None, "records": [record...], "keys": [...]}``.
    Only each record's first image is kept (world records have one). ``limit`` > 0 stops early.
    """
    from datamodules.stream import ShardStream

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
    from modules.components.classifier import scene_targets

    tg = [scene_targets(r["scene"]) for r in records]
    return {"what": torch.stack([t["what"] for t in tg]), "size": torch.stack([t["size"] for t in tg])}


def slot_metrics(what_pred: torch.Tensor, size_pred: torch.Tensor, what: torch.Tensor, size: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Sums over a batch (divide by counts): slot accuracy, exact scene, count/shape/colour per slot."""
    from modules.components.classifier import IGNORE_INDEX

    ok_what = what_pred == what  # (B, 5)
    has = size != IGNORE_INDEX
    ok_size = (size_pred == size) | ~has
    scene_ok = (ok_what & ok_size).all(1)
    return {
        "slot_correct": ok_what.float().sum(), "slot_total": torch.tensor(float(what.numel())),
        "scene_correct": scene_ok.float().sum(), "scene_total": torch.tensor(float(what.shape[0])),
        "occupied_correct": (ok_what & (what > 0)).float().sum(), "occupied_total": (what > 0).float().sum(),
        "size_correct": ((size_pred == size) & has).float().sum(), "size_total": has.float().sum(),
    }


class _SumMeter:
    def __init__(self):
        self.sums: Dict[str, float] = {}

    def add(self, d: Dict[str, torch.Tensor]) -> None:
        for k, v in d.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)

    def ratio(self, num: str, den: str) -> float:
        return self.sums.get(num, 0.0) / max(self.sums.get(den, 0.0), 1e-12)


class _KeepBest:
    """Keep the net's weights at the best validation value; restored at the end of fit
    (WORLD_NOTES: a classifier run collapsed late; the best checkpoint is what gets exported)."""

    def __init__(self):
        self.best: Optional[float] = None
        self.state: Optional[Dict[str, torch.Tensor]] = None

    def update(self, value: float, net: nn.Module) -> None:
        if self.best is None or value > self.best:
            self.best = value
            self.state = {k: v.detach().clone() for k, v in net.state_dict().items()}

    def restore(self, net: nn.Module) -> None:
        if self.state is not None:
            net.load_state_dict(self.state)


# ============================================================================ base_vqvae


class VQVAEModule(StageModule):
    def __init__(self, cfg: Any):
        super().__init__(cfg)
        from modules.components.vqvae import build_vqvae

        self.net = build_vqvae(cfg.model.vqvae)
        res = self.net.patch_nums[-1] * self.net.downsample
        self.resolution = res
        self.apply_trainable_set()
        self._meter = _SumMeter()

    def trainable_prefixes(self):
        return ("encoder", "decoder", "quantize", "quant_conv", "post_quant_conv")

    def _check(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.resolution:
            raise ValueError(f"base_vqvae: world images are {x.shape[-1]} px but the VQVAE's resolution is "
                             f"{self.resolution} (patch_nums[-1] x 2^(len(ch_mult)-1)); fix model.vqvae")

    def training_step(self, batch, batch_idx):
        x8 = batch["image"]
        self._check(x8)
        x = to_signed(x8)
        recon, losses = self.net(x)
        loss = losses["loss"]
        if VQVAE_OBJECT_L1 > 0:
            m = object_mask(x8)
            obj_l1 = ((recon - x).abs() * m).sum() / (m.sum() * 3).clamp_min(1.0)
            loss = loss + VQVAE_OBJECT_L1 * self.cfg.model.vqvae.l1_weight * obj_l1
            self.log("train/obj_l1", obj_l1.detach(), on_step=True, on_epoch=False)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True)
        for k in ("l1", "mse", "vq", "usage", "dead_restarted"):
            self.log(f"train/{k}", losses[k].float(), on_step=True, on_epoch=False)
        self.log_throughput(x.shape[0])
        return loss

    def on_validation_epoch_start(self) -> None:
        self._meter = _SumMeter()
        self._hits = torch.zeros(self.net.V, dtype=torch.long)

    def validation_step(self, batch, batch_idx):
        x8 = batch["image"]
        x = to_signed(x8)
        with torch.no_grad():
            f = self.net.img_to_f(x)
            idx = self.net.quantize.f_to_idx(f, to_fhat=False)
            recon = self.net.idx_to_img(idx)
        # PSNR on [0, 1] images, per image then averaged (the usual reporting)
        mse_B = ((recon - x) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
        m = object_mask(x8)
        obj_err = (((recon - x) / 2).pow(2) * m).flatten(1).sum(1) / (m.flatten(1).sum(1) * 3).clamp_min(1.0)
        self._meter.add({"psnr": (-10 * torch.log10(mse_B)).sum(), "n": torch.tensor(float(x.shape[0])),
                         "obj_psnr": (-10 * torch.log10(obj_err.clamp_min(1e-10))).sum()})
        for t in idx:
            self._hits += t.flatten().bincount(minlength=self.net.V).cpu()

    def on_validation_epoch_end(self) -> None:
        if not self._meter.sums:
            return
        self.log("val/psnr", self._meter.ratio("psnr", "n"))
        self.log("val/obj_psnr", self._meter.ratio("obj_psnr", "n"))
        self.log("val/codebook_usage", (self._hits > 0).float().mean().item())


def _image_tensors(data: Dict[str, Any], split: str) -> Dict[str, torch.Tensor]:
    return {"image": data["images"]}


def build_base_vqvae(cfg: Any) -> Tuple[L.LightningModule, L.LightningDataModule]:
    return VQVAEModule(cfg), InMemoryData(cfg, _image_tensors)


# ============================================================================ base_var


def load_frozen_vqvae(cfg: Any) -> nn.Module:
    """The VQVAE named by ``model.vqvae``, weights from the ``model.load`` entry with into: vqvae."""
    from modules.checkpoint import read_state_dict
    from modules.checkpoint import load_strict
    from modules.components.vqvae import build_vqvae

    vqvae = build_vqvae(cfg.model.vqvae)
    specs = [s for s in cfg.model.load if s.into == "vqvae"]
    if not specs:
        raise ValueError(
            f"stage {cfg.stage}: needs the trained world VQVAE; add to the config "
            f"model.load: [{{path: runs/bases/vqvae/model.safetensors, into: vqvae}}] (run base_vqvae first)"
        )
    from experiments.config import resolve_path

    for s in specs:
        path = resolve_path(s.path)
        if not path.is_file():
            raise FileNotFoundError(f"model.load into vqvae: {path} not found; train it with "
                                    f"`python -m experiments.run experiments/world/bases/vqvae.yaml`")
        load_strict(vqvae, read_state_dict(path), s.allow_missing, s.allow_unexpected, source=f"VQVAE {path}")
    return vqvae.eval().requires_grad_(False)


@torch.no_grad()
def encode_indices(vqvae: nn.Module, images_u8: torch.Tensor, batch: int = ENCODE_BATCH) -> torch.Tensor:
    """(N, 3, H, W) uint8 -> (N, L) int16/long VQ indices, scales concatenated (fp32, eval)."""
    vqvae.eval()
    out = []
    for i in range(0, len(images_u8), batch):
        idx = vqvae.img_to_idx(to_signed(images_u8[i:i + batch]))
        out.append(torch.cat(idx, 1))
    return torch.cat(out, 0)


class VARData(InMemoryData):
    """Class-task shards -> (label, VQ indices). Indices come from the shards when they were
    pre-tokenized by this VQVAE (``datamodules.pretokenize``), else they are encoded once and
    cached in ``<output_dir>/vq_cache/<fingerprint>-<split>-<hash of keys>.pt``."""

    def __init__(self, cfg: Any, vqvae: nn.Module):
        super().__init__(cfg, self._tensors, images=True)
        self.vqvae = vqvae
        from datamodules.pretokenize import tokenizer_fingerprint
        from experiments.config import output_dir

        self.fingerprint = tokenizer_fingerprint(vqvae, vqvae.patch_nums, vqvae.patch_nums[-1] * vqvae.downsample)
        self.cache_dir = output_dir(cfg) / "vq_cache"

    def _tensors(self, data: Dict[str, Any], split: str) -> Dict[str, torch.Tensor]:
        records = data["records"]
        missing = [r.get("id", "?") for r in records if "label" not in r]
        if missing:
            raise ValueError(f"base_var trains on the world `class` task (records with `label`); "
                             f"{len(missing)} records have none, e.g. {missing[:3]}: check data.sources")
        labels = torch.tensor([int(r["label"]) for r in records], dtype=torch.long)
        ncls = self.cfg.model.var.num_classes
        if int(labels.max()) >= ncls:
            raise ValueError(f"label {int(labels.max())} >= model.var.num_classes={ncls}")
        h = hashlib.sha256("\n".join(data["keys"]).encode()).hexdigest()[:12]
        fp = self.fingerprint.replace("sha256:", "")
        path = self.cache_dir / f"{fp}-{split}-{h}.pt"
        if path.is_file():
            idx = torch.load(path, weights_only=True)
        else:
            idx = encode_indices(self.vqvae, data["images"])
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(idx, path)
        return {"label": labels, "idx": idx.long()}


class VARModule(StageModule):
    def __init__(self, cfg: Any, vqvae: nn.Module):
        super().__init__(cfg)
        from modules.components.var_decoder import build_var

        if cfg.model.var.cond_mode != "class":
            raise ValueError("base_var trains the class-conditional VAR: set model.var.cond_mode: class")
        self.net = build_var(cfg.model.var, vqvae)
        self._vqvae = (vqvae,)  # a tuple: not a submodule, so not in the exported state dict
        self.splits = [pn * pn for pn in self.net.patch_nums]
        self.apply_trainable_set()

    def trainable_prefixes(self):
        return tuple(sorted({n.split(".")[0] for n, _ in self.net.named_parameters()}))

    def _forward(self, batch) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:
        idx_list = list(batch["idx"].split(self.splits, dim=1))
        x_BLCv = self._vqvae[0].idx_to_var_input(idx_list)
        logits_BLV = self.net(batch["label"], x_BLCv)
        return logits_BLV, torch.cat(idx_list, 1), idx_list

    def training_step(self, batch, batch_idx):
        logits_BLV, target_BL, idx_list = self._forward(batch)
        loss = self.net.loss(logits_BLV, idx_list)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True)
        self.log_throughput(target_BL.shape[0], target_BL.numel())
        return loss

    def on_validation_epoch_start(self) -> None:
        self._meter = _SumMeter()

    def validation_step(self, batch, batch_idx):
        logits_BLV, target_BL, _ = self._forward(batch)
        ce_BL = F.cross_entropy(logits_BLV.transpose(1, 2), target_BL, reduction="none")
        ok_BL = (logits_BLV.argmax(-1) == target_BL).float()
        last = self.splits[-1]
        self._meter.add({"ce": ce_BL.sum(), "acc": ok_BL.sum(), "n": torch.tensor(float(target_BL.numel())),
                         "ce_first": ce_BL[:, 0].sum(), "nb": torch.tensor(float(target_BL.shape[0])),
                         "acc_last": ok_BL[:, -last:].sum(), "n_last": torch.tensor(float(ok_BL[:, -last:].numel()))})

    def on_validation_epoch_end(self) -> None:
        if not self._meter.sums:
            return
        self.log("val/loss", self._meter.ratio("ce", "n"))
        self.log("val/token_acc", self._meter.ratio("acc", "n"))
        self.log("val/ce_scale1", self._meter.ratio("ce_first", "nb"))
        self.log("val/token_acc_last_scale", self._meter.ratio("acc_last", "n_last"))


def build_base_var(cfg: Any) -> Tuple[L.LightningModule, L.LightningDataModule]:
    vqvae = load_frozen_vqvae(cfg)
    return VARModule(cfg, vqvae), VARData(cfg, vqvae)


# ============================================================================ base_classifier


def _scene_tensors(data: Dict[str, Any], split: str) -> Dict[str, torch.Tensor]:
    missing = [r.get("id", "?") for r in data["records"] if "scene" not in r]
    if missing:
        raise ValueError(f"records without a `scene` (not world shards?), e.g. {missing[:3]}")
    return {"image": data["images"], **scene_target_tensors(data["records"])}


class _SlotStage(StageModule):
    """Shared by the classifier and the vision base: per-slot (what, size) heads on world scenes."""

    def _slot_logits(self, batch) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def training_step(self, batch, batch_idx):
        from modules.components.classifier import slot_loss

        out = slot_loss(self._slot_logits(batch), batch)
        self.log("train/loss", out["loss"].detach(), on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/loss_what", out["what"].detach(), on_step=True, on_epoch=False)
        self.log("train/loss_size", out["size"].detach(), on_step=True, on_epoch=False)
        self.log_throughput(batch["what"].shape[0])
        return out["loss"]

    def on_validation_epoch_start(self) -> None:
        self._meter = _SumMeter()

    def validation_step(self, batch, batch_idx):
        logits = self._slot_logits(batch)
        self._meter.add(slot_metrics(logits["what"].argmax(-1), logits["size"].argmax(-1), batch["what"], batch["size"]))

    def on_validation_epoch_end(self) -> None:
        if not self._meter.sums:
            return
        m = self._meter
        scene = m.ratio("scene_correct", "scene_total")
        self.log("val/scene_acc", scene, prog_bar=True)
        self.log("val/slot_acc", m.ratio("slot_correct", "slot_total"))
        self.log("val/object_acc", m.ratio("occupied_correct", "occupied_total"))
        self.log("val/size_acc", m.ratio("size_correct", "size_total"))
        self.keep_best.update(scene, self.net)

    def on_train_end(self) -> None:
        self.keep_best.restore(self.net)


class ClassifierModule(_SlotStage):
    def __init__(self, cfg: Any):
        super().__init__(cfg)
        from modules.components.classifier import build_classifier

        self.net = build_classifier(cfg.model.classifier)
        self.keep_best = _KeepBest()
        self.apply_trainable_set()

    def trainable_prefixes(self):
        return tuple(sorted({n.split(".")[0] for n, _ in self.net.named_parameters()}))

    def _slot_logits(self, batch):
        return self.net(to_unit(batch["image"]))


def build_base_classifier(cfg: Any) -> Tuple[L.LightningModule, L.LightningDataModule]:
    return ClassifierModule(cfg), InMemoryData(cfg, _scene_tensors)


# ============================================================================ base_vision


class SlotHeads(nn.Module):
    """Patch features (B, N, C) -> per-slot (what, size) logits.

    Each patch token is squeezed to a few channels by one shared linear map, and the slot heads
    are linear in the concatenation (the token order carries the position). The per-token
    squeeze keeps the head weak: shape and colour have to be (nearly linearly) readable from
    each patch feature itself, which is what the understanding projector later relies on.
    """

    def __init__(self, dim: int, num_tokens: int, squeeze: int = 16):
        super().__init__()
        from modules.components.classifier import NUM_SLOTS, NUM_WHAT

        self.norm = nn.LayerNorm(dim)
        self.squeeze = nn.Linear(dim, squeeze)
        self.what = nn.Linear(num_tokens * squeeze, NUM_SLOTS * NUM_WHAT)
        self.size = nn.Linear(num_tokens * squeeze, NUM_SLOTS * 2)
        self.shape = (NUM_SLOTS, NUM_WHAT)

    def forward(self, feats_BNC: torch.Tensor) -> Dict[str, torch.Tensor]:
        h_BD = F.gelu(self.squeeze(self.norm(feats_BNC))).flatten(1)
        B = h_BD.shape[0]
        return {"what": self.what(h_BD).view(B, *self.shape), "size": self.size(h_BD).view(B, self.shape[0], 2)}


class VisionModule(_SlotStage):
    def __init__(self, cfg: Any):
        super().__init__(cfg)
        from modules.components.vision_encoders import build_vision_encoder

        self.net = build_vision_encoder(cfg.model.vision)
        self.heads = SlotHeads(self.net.out_dim, self.net.num_tokens)  # trained here, not exported
        t = self.net.image_transform()
        self.register_buffer("mean", torch.tensor(t.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(t.std).view(1, 3, 1, 1), persistent=False)
        self.keep_best = _KeepBest()
        self.apply_trainable_set()

    def trainable_prefixes(self):
        return ("tower",)

    def configure_optimizers(self):
        # The base optimiser covers self.net only; the heads train too.
        from modules.optim import build_optimizer, build_scheduler

        o = self.cfg.optim
        both = nn.ModuleDict({"net": self.net, "heads": self.heads})
        opt = build_optimizer(both, o.lr, o.weight_decay, o.betas, o.eps)
        sched = build_scheduler(opt, self.cfg.trainer.max_steps, o.warmup_steps, o.warmup_ratio, o.min_lr_ratio, o.schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _slot_logits(self, batch):
        x = batch["image"]
        if x.shape[-1] != self.net.image_size:
            x = F.interpolate(to_unit(x), size=(self.net.image_size,) * 2, mode="bicubic", align_corners=False)
        else:
            x = to_unit(x)
        feats_BNC = self.net((x - self.mean) / self.std)
        return self.heads(feats_BNC.float())

    def on_train_end(self) -> None:
        super().on_train_end()
        # Also the timm-layout weights, for `model.vision.pretrained_path` (tiny_vit / timm_vit).
        from experiments.config import output_dir
        from modules.checkpoint import save_state_dict

        if self.trainer is not None and self.trainer.is_global_zero and self.cfg.trainer.save_checkpoint:
            save_state_dict(self.net.tower.state_dict(), output_dir(self.cfg) / "tower.safetensors")


def build_base_vision(cfg: Any) -> Tuple[L.LightningModule, L.LightningDataModule]:
    return VisionModule(cfg), InMemoryData(cfg, _scene_tensors)


# ============================================================================ base_llm


def world_texts(records: Sequence[Dict[str, Any]], eos: str = "") -> List[str]:
    """World records -> chat-formatted text documents (Vicuna-v1 template of data.chat).

    The image placeholder is removed (a text-only LM); a generation answer stays as
    GEN_START GEN_END, so the LM learns where generation starts.
    """
    from datamodules.collate import render_conversation
    from datamodules.config import ChatTemplateConfig
    from datamodules.tokens import IMAGE_TOKEN

    tpl = ChatTemplateConfig()
    out = []
    for r in records:
        msgs = [{**m, "content": m["content"].replace(IMAGE_TOKEN + "\n", "").replace(IMAGE_TOKEN, "")}
                for m in r["messages"]]
        out.append(render_conversation(msgs, tpl, eos).text)
    return out


def tokenizer_corpus(records: Sequence[Dict[str, Any]]) -> List[str]:
    """What the world tokenizer is trained on: the templated conversations (system prompt included)."""
    return world_texts(records, eos="")


def ensure_world_tokenizer(cfg: Any, records: Optional[Sequence[Dict[str, Any]]] = None, vocab_size: int = 0):
    """Load the world tokenizer from ``model.tokenizer.path``; train and save it there first
    when the directory has none (from ``records`` or the training sources)."""
    from experiments.config import resolve_path
    from modules.components.text_tokenizer import build_tokenizer, train_world_tokenizer

    tcfg = cfg.model.tokenizer
    if tcfg.name != "world":
        return build_tokenizer(tcfg)
    if not tcfg.path:
        raise ValueError("model.tokenizer.path is empty: set it to where the world tokenizer lives "
                         "(e.g. runs/bases/tokenizer)")
    path = resolve_path(tcfg.path)
    if not (path / "tokenizer.json").is_file():
        if records is None:
            records = read_world(cfg.data.sources, cfg.data.root, images=False)["records"]
        vs = vocab_size or cfg.model.llm.vocab_size or 1024
        log.info("training the world tokenizer (vocab %d) on %d records -> %s", vs, len(records), path)
        train_world_tokenizer(tokenizer_corpus(records), path, vocab_size=vs)
    return build_tokenizer(type(tcfg)(**{**tcfg.__dict__, "path": str(path)}))


def pack_tokens(docs: Sequence[List[int]], block: int) -> torch.Tensor:
    """Concatenate token lists into (N, block + 1) rows (input + next-token target)."""
    flat = [t for d in docs for t in d]
    n = (len(flat) - 1) // block
    if n < 1:
        raise ValueError(f"only {len(flat)} tokens of text: fewer than one block of {block}")
    arr = torch.tensor(flat[: n * block + 1], dtype=torch.long)
    return torch.stack([arr[i * block: i * block + block + 1] for i in range(n)])


class LLMData(InMemoryData):
    def __init__(self, cfg: Any, tokenizer: Any, block: int):
        super().__init__(cfg, self._tensors, images=False)
        self.tokenizer, self.block = tokenizer, block

    def _tensors(self, data: Dict[str, Any], split: str) -> Dict[str, torch.Tensor]:
        tok = self.tokenizer
        texts = world_texts(data["records"], eos=tok.eos_token)
        docs = tok(texts, add_special_tokens=True)["input_ids"]
        return {"tokens": pack_tokens(docs, self.block)}


class LLMModule(StageModule):
    def __init__(self, cfg: Any, tokenizer: Any):
        super().__init__(cfg)
        from modules.components.llm import build_llm

        self.net = build_llm(cfg.model.llm, vocab_size=len(tokenizer))
        self.apply_trainable_set()

    def trainable_prefixes(self):
        return tuple(sorted({n.split(".")[0] for n, _ in self.net.named_parameters()}))

    def _loss(self, batch) -> torch.Tensor:
        t = batch["tokens"]
        logits = self.net(input_ids=t[:, :-1]).logits
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), t[:, 1:].reshape(-1))

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True)
        t = batch["tokens"]
        self.log_throughput(t.shape[0], t[:, 1:].numel())
        return loss

    def on_validation_epoch_start(self) -> None:
        self._meter = _SumMeter()

    def validation_step(self, batch, batch_idx):
        n = batch["tokens"][:, 1:].numel()
        self._meter.add({"ce": self._loss(batch) * n, "n": torch.tensor(float(n))})

    def on_validation_epoch_end(self) -> None:
        if self._meter.sums:
            ce = self._meter.ratio("ce", "n")
            self.log("val/loss", ce, prog_bar=True)
            self.log("val/ppl", math.exp(min(ce, 50.0)))


def build_base_llm(cfg: Any) -> Tuple[L.LightningModule, L.LightningDataModule]:
    tokenizer = ensure_world_tokenizer(cfg)
    block = cfg.data.max_length  # packed LM rows of this many tokens
    return LLMModule(cfg, tokenizer), LLMData(cfg, tokenizer, block)


# ============================================================================ CLI


def main(argv: Optional[List[str]] = None) -> int:
    from datamodules.config import SourceConfig
    from modules.components.text_tokenizer import train_world_tokenizer

    ap = argparse.ArgumentParser(prog="python -m modules.stages.bases", description="stage-0 helpers")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tokenizer", help="train the world tokenizer on world shards")
    t.add_argument("--shards", required=True, help="shard pattern, e.g. 'runs/data/world/train/*.tar'")
    t.add_argument("--out", required=True, help="output directory (model.tokenizer.path)")
    t.add_argument("--vocab-size", type=int, default=1024)
    args = ap.parse_args(argv)
    if args.cmd == "tokenizer":
        records = read_world([SourceConfig(name="text", shards=args.shards)], images=False)["records"]
        tok = train_world_tokenizer(tokenizer_corpus(records), args.out, vocab_size=args.vocab_size)
        print(f"world tokenizer: {len(tok)} tokens from {len(records)} records -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
