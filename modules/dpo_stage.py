"""Stage ``v11_dpo``: DPO on image bits (modules/dpo.py) for a VARGPT-v1.1 model, on preference
pairs (datamodules/pairs.py, a ``task: dpo`` source). The trainable set is a release stage's
(``dpo.trainable``); the reference is frozen values of exactly those parameters."""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Dict, Tuple

import torch
import torch.nn as nn

from datamodules.datamodule import VargptDataModule
from datamodules.pairs import PairCollator
from datamodules.paths import resolve_path
from modules.dpo import DPOConfig, FrozenReference, dpo_step, reference_tensors
from modules.stages.v11_stages import RELEASE_STAGES, V11Stage


class V11DPO(V11Stage):
    STAGE = "v11_dpo"

    def __init__(self, cfg: Any, net: nn.Module | None = None):
        super().__init__(cfg, net)
        self.reference = FrozenReference(reference_tensors(self.net, self.dpo_cfg))
        self._seeds: torch.Generator | None = None

    @property
    def dpo_cfg(self) -> DPOConfig:
        return getattr(self.cfg, "dpo", None) or DPOConfig()

    def trainable_prefixes(self) -> Tuple[str, ...]:
        return RELEASE_STAGES[self.dpo_cfg.trainable]

    def configure_model(self) -> None:
        from modules.sharded import is_sharded  # lazy: the layer classes of every family

        if self._trainer is not None and is_sharded(self.trainer):
            raise ValueError("stage v11_dpo does not run under trainer.strategy=fsdp yet (its reference swaps "
                             "whole parameters in): use trainer.strategy=ddp or auto")

    def next_seeds(self) -> Tuple[int, int]:
        """(reference draw, policy draw) of this step: from cfg.seed and the rank, reproducible."""
        if self._seeds is None:
            self._seeds = torch.Generator().manual_seed(int(self.cfg.seed) * 1_000_003 + int(self.global_rank))
        a, b = torch.randint(0, 2 ** 31 - 1, (2,), generator=self._seeds).tolist()
        return a, b

    def training_step(self, batch: Dict[str, Any], batch_idx: int):
        res = dpo_step(self.net, batch, self.reference.params(), self.dpo_cfg, self.next_seeds())
        B = batch["input_ids"].shape[0]
        self.count_bad_samples(batch)
        loss = self.finite_or_skip(res["loss"], {"loss_dpo": res["loss"]})
        if loss is None:
            return None
        if self.logging_step():
            self.log("train/loss", res["loss"], prog_bar=True, batch_size=B)
            self.log("train/dpo_margin", res["margin"].mean(), batch_size=B)
            self.log("train/dpo_acc", res["acc"], batch_size=B)
            self.log("train/logp_chosen", res["logp_chosen"].mean(), batch_size=B)
            self.log("train/logp_rejected", res["logp_rejected"].mean(), batch_size=B)
            self.log_counters()
        return loss

    def validation_step(self, batch: Dict[str, Any], batch_idx: int, dataloader_idx: int = 0):
        res = dpo_step(self.net, batch, self.reference.params(), self.dpo_cfg, self.next_seeds())
        B = batch["input_ids"].shape[0]
        self.log("val/loss", res["loss"], batch_size=B, add_dataloader_idx=False)
        self.log("val/dpo_acc", res["acc"], batch_size=B, add_dataloader_idx=False)


def build(cfg: Any):
    module = V11DPO(cfg)
    net = module.net
    data = replace(cfg.data, root=str(resolve_path(cfg.data.root)) if cfg.data.root else "")
    sizes = net.collator_sizes()
    # both images of a pair are scored under the prompt: no prompt dropout
    data = replace(data, num_image_tokens=sizes["num_image_tokens"], gen_num_tokens=sizes["gen_num_tokens"],
                   prompt_dropout=0.0)
    return module, VargptDataModule(data, PairCollator(net.collator(data, train=True)),
                                    eval_collator=PairCollator(net.collator(data)))
