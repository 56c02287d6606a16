"""base_classifier: the world's reference classifier (FID / IS features, attribute read-back),
``self.net`` = WorldCNN; and the per-slot training shared with base_vision (``SlotStage``)."""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import lightning as L
import torch
import torch.nn as nn
from torchmetrics import MeanMetric

from modules.components.classifier import IGNORE_INDEX, build_classifier, slot_loss
from modules.stages.base import StageModule
from modules.stages.bases.data import InMemoryData, scene_target_tensors, to_unit
from modules.stages.callbacks import KeepBest


def slot_hits(what_pred: torch.Tensor, size_pred: torch.Tensor, what: torch.Tensor, size: torch.Tensor) -> Dict[str, torch.Tensor]:
    """0/1 hits of a batch, one tensor per accuracy (averaged by the validation metrics): every
    slot (``slot``), whole scenes (``scene``), occupied slots (``object``), sizes where an
    object is (``size``)."""
    ok_what = what_pred == what  # (B, 5)
    has = size != IGNORE_INDEX
    ok_size = (size_pred == size) | ~has
    return {"slot": ok_what.float().flatten(), "scene": (ok_what & ok_size).all(1).float(),
            "object": ok_what[what > 0].float(), "size": (size_pred == size)[has].float()}


def scene_tensors(data: Dict[str, Any], split: str) -> Dict[str, torch.Tensor]:
    missing = [r.get("id", "?") for r in data["records"] if "scene" not in r]
    if missing:
        raise ValueError(f"records without a `scene` (not world shards?), e.g. {missing[:3]}")
    return {"image": data["images"], **scene_target_tensors(data["records"])}


class SlotStage(StageModule):
    """Shared by the classifier and the vision base: per-slot (what, size) heads on world scenes."""

    def _slot_logits(self, batch) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def training_step(self, batch, batch_idx):
        out = slot_loss(self._slot_logits(batch), batch)
        self.log("train/loss", out["loss"].detach(), on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/loss_what", out["what"].detach(), on_step=True, on_epoch=False)
        self.log("train/loss_size", out["size"].detach(), on_step=True, on_epoch=False)
        self.log_throughput(batch["what"].shape[0])
        return self.finite_or_skip(out["loss"], {"what": out["what"], "size": out["size"]})

    def init_metrics(self) -> None:
        self.val_slot = nn.ModuleDict({k: MeanMetric() for k in ("scene", "slot", "object", "size")})

    def configure_callbacks(self) -> List[L.Callback]:
        # A classifier run once collapsed late with a constant rate: export the best weights.
        return [KeepBest("val/scene_acc", "max")]

    def validation_step(self, batch, batch_idx):
        logits = self._slot_logits(batch)
        for k, v in slot_hits(logits["what"].argmax(-1), logits["size"].argmax(-1), batch["what"], batch["size"]).items():
            if v.numel():
                self.val_slot[k].update(v)

    def on_validation_epoch_end(self) -> None:
        m = self.val_slot
        if m["scene"].update_count == 0:
            return
        self.log("val/scene_acc", m["scene"].compute(), prog_bar=True)
        self.log("val/slot_acc", m["slot"].compute())
        self.log("val/object_acc", m["object"].compute() if m["object"].update_count else 0.0)
        self.log("val/size_acc", m["size"].compute() if m["size"].update_count else 0.0)
        for v in m.values():
            v.reset()


class ClassifierModule(SlotStage):
    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.net = build_classifier(cfg.model.classifier)
        self.init_metrics()
        self.apply_trainable_set()

    def trainable_prefixes(self):
        return tuple(sorted({n.split(".")[0] for n, _ in self.net.named_parameters()}))

    def _slot_logits(self, batch):
        return self.net(to_unit(batch["image"]))


def build_base_classifier(cfg: Any) -> Tuple[L.LightningModule, L.LightningDataModule]:
    return ClassifierModule(cfg), InMemoryData(cfg, scene_tensors)
