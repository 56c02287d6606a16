"""base_vision: the tiny_vit tower trained with per-slot attribute heads on world scenes
(``self.net`` = VisionEncoder; only the tower is exported, the heads stay here)."""
from __future__ import annotations

from typing import Any, Dict, Tuple

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F

from modules.components.classifier import NUM_SLOTS, NUM_WHAT
from modules.components.vision_encoders import build_vision_encoder
from modules.optim import build_optimizer, build_scheduler
from modules.stages.bases.classifier import SlotStage, scene_tensors
from modules.stages.bases.data import InMemoryData, to_unit


class SlotHeads(nn.Module):
    """Patch features (B, N, C) -> per-slot (what, size) logits.

    Each patch token is squeezed to a few channels by one shared linear map, and the slot heads
    are linear in the concatenation (the token order carries the position). The per-token
    squeeze keeps the head weak: shape and colour have to be (nearly linearly) readable from
    each patch feature itself, which is what the understanding projector later relies on.
    """

    def __init__(self, dim: int, num_tokens: int, squeeze: int = 16):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.squeeze = nn.Linear(dim, squeeze)
        self.what = nn.Linear(num_tokens * squeeze, NUM_SLOTS * NUM_WHAT)
        self.size = nn.Linear(num_tokens * squeeze, NUM_SLOTS * 2)
        self.shape = (NUM_SLOTS, NUM_WHAT)

    def forward(self, feats_BNC: torch.Tensor) -> Dict[str, torch.Tensor]:
        h_BD = F.gelu(self.squeeze(self.norm(feats_BNC))).flatten(1)
        B = h_BD.shape[0]
        return {"what": self.what(h_BD).view(B, *self.shape), "size": self.size(h_BD).view(B, self.shape[0], 2)}


class VisionModule(SlotStage):
    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.net = build_vision_encoder(cfg.model.vision)
        self.heads = SlotHeads(self.net.out_dim, self.net.num_tokens)  # trained here, not exported
        t = self.net.image_transform()
        self.register_buffer("mean", torch.tensor(t.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(t.std).view(1, 3, 1, 1), persistent=False)
        self.init_metrics()
        self.apply_trainable_set()

    def trainable_prefixes(self):
        return ("tower",)

    def configure_optimizers(self):
        # The base optimiser covers self.net only; the heads train too.
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

    def exports(self) -> Dict[str, Dict[str, torch.Tensor]]:
        # also the bare timm tower, loadable with model.load format timm (into vision)
        return {**super().exports(), "tower.safetensors": self.net.tower.state_dict()}


def build_base_vision(cfg: Any) -> Tuple[L.LightningModule, L.LightningDataModule]:
    return VisionModule(cfg), InMemoryData(cfg, scene_tensors)
