"""base_bsq: the world's BSQ bit tokenizer (VARGPT-v1.1's visual tokenizer), ``self.net`` = BSQTokenizer.

The v1.1 counterpart of base_vqvae: the architecture is ``model.v11.tokenizer`` (the world v1.1's
bit depth and scale schedule, experiments/v11/world.yaml), so the export loads into the v1.1
generation side's ``vae_local`` by key name. Training quantizes as inference does (the bits of
scale k are the signs of the area-down-sampled residual left by scales < k, codes +-1/sqrt(d)),
with straight-through gradients on each scale's l2-normalized residual, as the release's
multi-scale BSQ. Losses (``model.v11.tokenizer.loss``): L1 + MSE reconstruction, the VQVAE base's
extra object-pixel L1, commitment ||f - sg(f_hat)||^2 and the release's soft entropy penalty.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Tuple

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from modules.components.bsq import BSQConfig, BSQTokenizer
from modules.stages.base import StageModule
from modules.stages.bases.data import InMemoryData, check_resolution, object_mask, to_signed
from modules.stages.bases.vqvae import VQVAE_OBJECT_L1


def _binary_entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p + 1e-8) + (1 - p) * torch.log(1 - p + 1e-8))


def bsq_train_forward(tok: BSQTokenizer, x_B3HW: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Differentiable multi-scale quantization + decoding of ``x`` in [-1, 1].

    Returns ``recon`` (B, 3, H, W) (not clamped), ``f`` / ``f_hat`` (B, d, h, w) and the loss parts
    ``commit``, ``entropy`` (zeta-weighted penalty before entropy_weight), ``sample_entropy`` and
    ``codebook_entropy`` (nats per token, summed over bits, averaged over scales). The forward
    values of ``f_hat`` equal ``tok.summed_codes(tok.quantize(f))``: the same bits as inference.
    """
    lc = tok.cfg.loss
    d = tok.d
    f = tok.encoder(x_B3HW.float())
    H, W = f.shape[-2:]
    sched = tok.schedule()
    if tuple(sched[-1]) != (H, W):
        raise ValueError(f"base_bsq: the last scale {sched[-1]} is not the latent size {(H, W)} "
                         f"(image side / 2^(len(ch_mult)-1)); fix model.v11.tokenizer.scales")
    rest, f_hat = f, torch.zeros_like(f)
    ps_ent, cb_ent = [], []
    for hw in sched:
        r = rest if hw == (H, W) else F.interpolate(rest.unsqueeze(2), size=(1, *hw), mode="area").squeeze(2)
        u = F.normalize(r, dim=1)  # (B, d, h, w) on the unit sphere over bits
        hard = torch.where(r > 0, 1.0, -1.0) / math.sqrt(d)
        code = u + (hard - u).detach()  # forward: the hard code; backward: through u
        up = tok._up(code, (H, W))
        f_hat = f_hat + up
        rest = rest - up
        p = torch.sigmoid(4 * u / math.sqrt(d) * lc.inv_temperature)  # P(bit = 1), (B, d, h, w)
        ps_ent.append(_binary_entropy(p).sum(1).mean())
        cb_ent.append(_binary_entropy(p.transpose(0, 1).flatten(1).mean(1)).sum())
    sample_entropy = torch.stack(ps_ent).mean()
    codebook_entropy = torch.stack(cb_ent).mean()
    return {"recon": tok.decoder(f_hat), "f": f, "f_hat": f_hat,
            "commit": F.mse_loss(f, f_hat.detach()),
            "entropy": sample_entropy - lc.codebook_entropy_weight * codebook_entropy,
            "sample_entropy": sample_entropy.detach(), "codebook_entropy": codebook_entropy.detach()}


def bsq_loss(tok: BSQTokenizer, x8_B3HW: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The base's training loss on uint8 images and its parts (detached)."""
    lc = tok.cfg.loss
    x = to_signed(x8_B3HW)
    out = bsq_train_forward(tok, x)
    err = out["recon"] - x
    l1, mse = err.abs().mean(), err.pow(2).mean()
    m = object_mask(x8_B3HW)
    obj_l1 = (err.abs() * m).sum() / (m.sum() * 3).clamp_min(1.0)
    loss = (lc.l1_weight * (l1 + VQVAE_OBJECT_L1 * obj_l1) + lc.mse_weight * mse
            + lc.commit_weight * out["commit"] + lc.entropy_weight * out["entropy"])
    parts = {"l1": l1, "mse": mse, "obj_l1": obj_l1, "commit": out["commit"],
             "sample_entropy": out["sample_entropy"], "codebook_entropy": out["codebook_entropy"]}
    return loss, {k: v.detach() for k, v in parts.items()}


@torch.no_grad()
def bsq_reconstructions(tok: BSQTokenizer, images_B3HW: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """uint8 images -> uint8 reconstructions through the bits (the inference path: encode, bits, decode)."""
    outs: List[torch.Tensor] = []
    for i in range(0, len(images_B3HW), batch):
        x = to_signed(images_B3HW[i:i + batch])
        rec = tok.decode_bits(tok.encode(x)["bits"])
        outs.append(((rec + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
    return torch.cat(outs)


class BSQModule(StageModule):
    def __init__(self, cfg: Any):
        super().__init__(cfg)
        v11 = cfg.model.v11
        if v11 is None:
            raise ValueError("base_bsq: model.v11.tokenizer is the architecture; set model.v11 "
                             "(see experiments/world/bases/bsq.yaml)")
        tcfg = v11.tokenizer
        if not isinstance(tcfg, BSQConfig):  # a DictConfig from the structured schema
            from omegaconf import OmegaConf  # lazy: only for a config not yet an object

            tcfg = OmegaConf.to_object(tcfg)
        self.net = BSQTokenizer(tcfg)
        self.resolution = tcfg.downsample * tcfg.scales[-1][0]
        self.apply_trainable_set()
        self.val_psnr, self.val_obj_psnr, self.val_bit_balance = MeanMetric(), MeanMetric(), MeanMetric()

    def trainable_prefixes(self):
        return ("encoder", "decoder")

    def training_step(self, batch, batch_idx):
        x8 = batch["image"]
        check_resolution("base_bsq", x8, self.resolution,
                         "tokenizer's resolution (last scale x 2^(len(ch_mult)-1))", "model.v11.tokenizer")
        loss, parts = bsq_loss(self.net, x8)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True)
        if self.logging_step():
            for k, v in parts.items():
                self.log(f"train/{k}", v.float(), on_step=True, on_epoch=False)
        self.log_throughput(x8.shape[0])
        return self.finite_or_skip(loss, {})

    def validation_step(self, batch, batch_idx):
        x8 = batch["image"]
        x = to_signed(x8)
        with torch.no_grad():
            bits = self.net.encode(x)["bits"]
            recon = self.net.decode_bits(bits)
        mse_B = ((recon - x) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
        m = object_mask(x8)
        obj_err = (((recon - x) / 2).pow(2) * m).flatten(1).sum(1) / (m.flatten(1).sum(1) * 3).clamp_min(1.0)
        self.val_psnr.update(-10 * torch.log10(mse_B))
        self.val_obj_psnr.update(-10 * torch.log10(obj_err.clamp_min(1e-10)))
        # bit balance: 1 - |2 P(bit=1) - 1| averaged over bits and scales (1: every bit half on)
        bal = torch.stack([1 - (2 * b.float().mean((0, 1)) - 1).abs().mean() for b in bits]).mean()
        self.val_bit_balance.update(bal)

    def on_validation_epoch_end(self) -> None:
        if self.val_psnr.update_count == 0:
            return
        self.log("val/psnr", self.val_psnr.compute())
        self.log("val/obj_psnr", self.val_obj_psnr.compute())
        self.log("val/bit_balance", self.val_bit_balance.compute())
        for m in (self.val_psnr, self.val_obj_psnr, self.val_bit_balance):
            m.reset()


def _image_tensors(data: Dict[str, Any], split: str) -> Dict[str, torch.Tensor]:
    return {"image": data["images"]}


def build_base_bsq(cfg: Any) -> Tuple[L.LightningModule, L.LightningDataModule]:
    return BSQModule(cfg), InMemoryData(cfg, _image_tensors)
