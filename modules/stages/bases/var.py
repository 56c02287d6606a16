"""base_var: the class-conditional VAR on VQ indices of the world's ``class`` task
(24 (shape, colour) classes; ``self.net`` = VARDecoder), and with ``data.scene_labels: scene`` of
its generation scenes too (``record_labels``). The VQ indices are computed once
(fp32, eval mode) and cached under the run's output dir, keyed by the VQVAE fingerprint."""
from __future__ import annotations

import hashlib
from typing import Any, Dict, List, Tuple

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics import MeanMetric

from datamodules.paths import run_dir
from datamodules.pretokenize import tokenizer_fingerprint
from datamodules.world import class_label
from modules.components.var_decoder import build_var, noisy_teacher_inputs
from modules.components.vqvae import build_vqvae
from modules.stages.base import StageModule
from modules.stages.bases.data import InMemoryData, to_signed
from modules.weights import load_component

ENCODE_BATCH = 128  # images per VQVAE call when building the token cache


@torch.no_grad()
def encode_indices(vqvae: nn.Module, images_u8: torch.Tensor, batch: int = ENCODE_BATCH) -> torch.Tensor:
    """(N, 3, H, W) uint8 -> (N, L) int16/long VQ indices, scales concatenated (fp32, eval)."""
    vqvae.eval()
    out = []
    for i in range(0, len(images_u8), batch):
        idx = vqvae.img_to_idx(to_signed(images_u8[i:i + batch]))
        out.append(torch.cat(idx, 1))
    return torch.cat(out, 0)


def record_labels(records: List[Dict[str, Any]], num_classes: int, scene_labels: str = "label") -> List[int]:
    """Class index per record: its `label`; with scene_labels "scene", a record without one (a
    world generation scene) gets its object's class when the scene has exactly one object, else
    the null class `num_classes` (the row classifier-free guidance trains as unconditional)."""
    out, missing = [], []
    for r in records:
        if "label" in r:
            if not 0 <= int(r["label"]) < num_classes:
                raise ValueError(f"record {r.get('id', '?')}: label {r['label']} outside 0..{num_classes - 1} "
                                 f"(model.var.num_classes={num_classes})")
            out.append(int(r["label"]))
        elif scene_labels == "scene" and isinstance(r.get("scene"), dict):
            objs = r["scene"].get("objects") or []
            out.append(class_label(objs[0]["shape"], objs[0]["colour"]) if len(objs) == 1 else num_classes)
        else:
            missing.append(r.get("id", "?"))
    if missing:
        hint = ("set data.scene_labels: scene to train on generation scenes" if scene_labels == "label"
                else "these records have neither a `label` nor a `scene`")
        raise ValueError(f"base_var needs a class per record (the world `class` task has `label`); "
                         f"{len(missing)} records have none, e.g. {missing[:3]}: {hint}, or check data.sources")
    return out


class VARData(InMemoryData):
    """Class-task shards -> (label, VQ indices). Indices come from the shards when they were
    pre-tokenized by this VQVAE (``python -m experiments.pretokenize``), else they are encoded once and
    cached in ``<output_dir>/vq_cache/<fingerprint>-<split>-<hash of keys>.pt``."""

    def __init__(self, cfg: Any, vqvae: nn.Module):
        super().__init__(cfg, self._tensors, images=True)
        self.vqvae = vqvae
        self.fingerprint = tokenizer_fingerprint(vqvae, vqvae.patch_nums, vqvae.patch_nums[-1] * vqvae.downsample)
        self.cache_dir = run_dir(cfg) / "vq_cache"

    def _tensors(self, data: Dict[str, Any], split: str) -> Dict[str, torch.Tensor]:
        records = data["records"]
        ncls = self.cfg.model.var.num_classes
        labels = torch.tensor(record_labels(records, ncls, self.cfg.data.scene_labels), dtype=torch.long)
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
        if cfg.model.var.cond_mode != "class":
            raise ValueError("base_var trains the class-conditional VAR: set model.var.cond_mode: class")
        self.net = build_var(cfg.model.var, vqvae)
        self._vqvae = (vqvae,)  # a tuple: not a submodule, so not in the exported state dict
        self.splits = [pn * pn for pn in self.net.patch_nums]
        self.apply_trainable_set()
        # token-weighted means over the validation set
        self.val_ce, self.val_acc, self.val_ce1, self.val_acc_last = MeanMetric(), MeanMetric(), MeanMetric(), MeanMetric()

    def trainable_prefixes(self):
        return tuple(sorted({n.split(".")[0] for n, _ in self.net.named_parameters()}))

    def _forward(self, batch) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:
        idx_list = list(batch["idx"].split(self.splits, dim=1))
        # model.gen_input_noise applies to the base as to the VARGPT stages (training only)
        inputs = noisy_teacher_inputs(idx_list, self.cfg.model.gen_input_noise if self.training else 0.0, self.net.V)
        x_BLCv = self._vqvae[0].idx_to_var_input(inputs)
        logits_BLV = self.net(batch["label"], x_BLCv)
        return logits_BLV, torch.cat(idx_list, 1), idx_list

    def training_step(self, batch, batch_idx):
        logits_BLV, target_BL, idx_list = self._forward(batch)
        loss = self.net.loss(logits_BLV, idx_list)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True)
        self.log_throughput(target_BL.shape[0], target_BL.numel())
        return self.finite_or_skip(loss, {})

    def validation_step(self, batch, batch_idx):
        logits_BLV, target_BL, _ = self._forward(batch)
        ce_BL = F.cross_entropy(logits_BLV.transpose(1, 2), target_BL, reduction="none")
        ok_BL = (logits_BLV.argmax(-1) == target_BL).float()
        last = self.splits[-1]
        self.val_ce.update(ce_BL)
        self.val_acc.update(ok_BL)
        self.val_ce1.update(ce_BL[:, 0])
        self.val_acc_last.update(ok_BL[:, -last:])

    def on_validation_epoch_end(self) -> None:
        if self.val_ce.update_count == 0:
            return
        for name, m in (("val/loss", self.val_ce), ("val/token_acc", self.val_acc), ("val/ce_scale1", self.val_ce1),
                        ("val/token_acc_last_scale", self.val_acc_last)):
            self.log(name, m.compute())
            m.reset()


def load_frozen_vqvae(cfg: Any) -> nn.Module:
    """The VQVAE named by ``model.vqvae`` with the weights of its ``model.load`` entry (into: vqvae)."""
    vqvae = build_vqvae(cfg.model.vqvae)
    load_component(vqvae, cfg.model.load, "vqvae", f"stage {cfg.stage}",
                   "train it with `python -m experiments.run experiments/world/bases/vqvae.yaml`")
    return vqvae.eval().requires_grad_(False)


def build_base_var(cfg: Any) -> Tuple[L.LightningModule, L.LightningDataModule]:
    vqvae = load_frozen_vqvae(cfg)
    return VARModule(cfg, vqvae), VARData(cfg, vqvae)
