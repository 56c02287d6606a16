"""base_vqvae: the multi-scale VQVAE on world images (``self.net`` = MultiScaleVQVAE)."""
from __future__ import annotations

from typing import Any, Dict, Tuple

import lightning as L
import torch
from torchmetrics import MeanMetric

from modules.components.vqvae import build_vqvae
from modules.stages.base import StageModule
from modules.stages.bases.data import InMemoryData, check_resolution, object_mask, to_signed

# Extra L1 on object pixels, relative to the plain L1: colour is learned last because objects
# cover about 10% of a world image, so without it reconstructions keep shapes and lose colours.
VQVAE_OBJECT_L1 = 3.0


class VQVAEModule(StageModule):
    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.net = build_vqvae(cfg.model.vqvae)
        res = self.net.patch_nums[-1] * self.net.downsample
        self.resolution = res
        self.apply_trainable_set()
        self.val_psnr, self.val_obj_psnr = MeanMetric(), MeanMetric()

    def trainable_prefixes(self):
        return ("encoder", "decoder", "quantize", "quant_conv", "post_quant_conv")

    def training_step(self, batch, batch_idx):
        x8 = batch["image"]
        check_resolution("base_vqvae", x8, self.resolution,
                         "VQVAE's resolution (patch_nums[-1] x 2^(len(ch_mult)-1))", "model.vqvae")
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
        return self.finite_or_skip(loss, {})

    def on_validation_epoch_start(self) -> None:
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
        self.val_psnr.update(-10 * torch.log10(mse_B))
        self.val_obj_psnr.update(-10 * torch.log10(obj_err.clamp_min(1e-10)))
        for t in idx:
            self._hits += t.flatten().bincount(minlength=self.net.V).cpu()

    def on_validation_epoch_end(self) -> None:
        if self.val_psnr.update_count == 0:
            return
        self.log("val/psnr", self.val_psnr.compute())
        self.log("val/obj_psnr", self.val_obj_psnr.compute())
        self.log("val/codebook_usage", (self._hits > 0).float().mean().item())
        self.val_psnr.reset()
        self.val_obj_psnr.reset()


def _image_tensors(data: Dict[str, Any], split: str) -> Dict[str, torch.Tensor]:
    return {"image": data["images"]}


def build_base_vqvae(cfg: Any) -> Tuple[L.LightningModule, L.LightningDataModule]:
    return VQVAEModule(cfg), InMemoryData(cfg, _image_tensors)
