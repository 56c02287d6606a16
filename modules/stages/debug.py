"""The ``debug`` stage: exercises the launcher, config and MLflow plumbing in seconds.

A projector (``model.und_projector``) learns a fixed random linear map on synthetic data. It is
not a VARGPT stage; tests and `make smoke` use it so the plumbing is checked without models.
"""
from __future__ import annotations

from typing import Any, Tuple

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from modules.components.projectors import build_projector
from modules.stages.base import StageModule

IN_DIM, OUT_DIM = 16, 8


class DebugModule(StageModule):
    def __init__(self, cfg: Any):
        super().__init__(cfg)
        pc = cfg.model.und_projector
        pc = type(pc)(**{**pc.__dict__, "in_dim": pc.in_dim or IN_DIM, "out_dim": pc.out_dim or OUT_DIM})
        self.net = nn.ModuleDict({"proj": build_projector(pc)})
        self.apply_trainable_set()

    def trainable_prefixes(self):
        return ("proj",)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.finite_or_skip(F.mse_loss(self.net["proj"](x), y), {})
        if loss is None:
            return None
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        self.log_throughput(x.shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", F.mse_loss(self.net["proj"](x), y), on_epoch=True)


class DebugData(L.LightningDataModule):
    def __init__(self, cfg: Any):
        super().__init__()
        g = torch.Generator().manual_seed(cfg.seed)
        w = torch.randn(IN_DIM, OUT_DIM, generator=g) / IN_DIM**0.5
        x = torch.randn(512, IN_DIM, generator=g)
        self.train_set = TensorDataset(x[:448], x[:448] @ w)
        self.val_set = TensorDataset(x[448:], x[448:] @ w)
        self.batch_size = cfg.data.batch_size

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size)


def build(cfg: Any) -> Tuple[L.LightningModule, L.LightningDataModule]:
    return DebugModule(cfg), DebugData(cfg)
