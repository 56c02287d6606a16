"""The VARGPT stage LightningModules: thin wrappers that declare what trains.

                 trains                                   data (world default)
    llava_align  und_proj                                 captions            (LLaVA-1.5 step 1)
    llava_sft    und_proj + llm                           VQA / conversations (LLaVA-1.5 step 2)
    stage1       gen_in, gen_out, var.cond_emb/pos_start  generation instructions
    stage2       llm (+ und_proj with model.train_und_projector)   understanding + a few generation
    stage3       gen_in, gen_out, var                     generation instructions

Everything outside the trainable set is frozen and kept in eval mode (no dropout / drop-path),
so a frozen part computes exactly what it did when it was trained. `tests/test_stages.py`
checks that a step changes exactly the declared parameters.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar, Dict, Tuple

import torch
import torch.nn as nn

from modules.stages.base import StageModule


class VARGPTStage(StageModule):
    TRAINABLE: ClassVar[Tuple[str, ...]] = ()

    def __init__(self, cfg: Any, net: nn.Module | None = None):
        super().__init__(cfg)
        from experiments.config import REPO_ROOT
        from modules.vargpt import VARGPT
        from modules.weights import init_from, load_all

        if cfg.model.var.cond_mode != "external":
            raise ValueError("model.var.cond_mode must be 'external' in the VARGPT stages (the LLM conditions VAR)")
        self.net = net if net is not None else VARGPT(cfg.model, template=cfg.data.chat)
        if net is None:
            load_all(self.net, cfg.model.load, REPO_ROOT)
            if cfg.init_from:
                init_from(self.net, cfg.init_from, cfg.init_allow_missing, REPO_ROOT)
        self.apply_trainable_set()

    def trainable_prefixes(self) -> Tuple[str, ...]:
        return self.TRAINABLE

    def train(self, mode: bool = True):
        """Frozen subtrees stay in eval mode while the rest trains."""
        super().train(mode)
        if mode:
            _eval_frozen(self.net)
        return self

    # -------------------------------------------------------------- steps
    def training_step(self, batch: Dict[str, Any], batch_idx: int):
        out = self.net(batch)
        B = batch["input_ids"].shape[0]
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=B)
        self.log("train/loss_text", out["loss_text"], batch_size=B)
        if int(out["n_img_tokens"]) > 0:
            self.log("train/loss_img", out["loss_img"], prog_bar=True, batch_size=B)
            self.log("train/acc_img", out["acc_img"], batch_size=B)
        n_tok = int(batch["attention_mask"].sum())
        self.log_throughput(B, n_tok)
        for key in ("num_clipped", "num_dropped", "num_unreadable"):
            if batch.get(key):
                self.log(f"train/{key}", float(batch[key]), reduce_fx="sum", on_step=False, on_epoch=True, batch_size=B)
        return out["loss"]

    def validation_step(self, batch: Dict[str, Any], batch_idx: int, dataloader_idx: int = 0):
        out = self.net(batch)
        B = batch["input_ids"].shape[0]
        self.log("val/loss", out["loss"], batch_size=B, add_dataloader_idx=False)
        self.log("val/loss_text", out["loss_text"], batch_size=B, add_dataloader_idx=False)
        if int(out["n_img_tokens"]) > 0:
            self.log("val/loss_img", out["loss_img"], batch_size=B, add_dataloader_idx=False)
            self.log("val/acc_img", out["acc_img"], batch_size=B, add_dataloader_idx=False)


def _eval_frozen(module: nn.Module) -> None:
    """Put every subtree without a trainable parameter in eval mode."""
    for child in module.children():
        if not any(p.requires_grad for p in child.parameters()):
            child.eval()
        else:
            _eval_frozen(child)


class LlavaAlign(VARGPTStage):
    TRAINABLE = ("und_proj",)


class LlavaSFT(VARGPTStage):
    TRAINABLE = ("und_proj", "llm")


class Stage1(VARGPTStage):
    TRAINABLE = ("gen_in", "gen_out", "var.cond_emb", "var.pos_start")


class Stage2(VARGPTStage):
    TRAINABLE = ("llm",)

    def trainable_prefixes(self) -> Tuple[str, ...]:
        return self.TRAINABLE + (("und_proj",) if self.cfg.model.train_und_projector else ())


class Stage3(VARGPTStage):
    TRAINABLE = ("gen_in", "gen_out", "var")


STAGE_CLASSES = {"llava_align": LlavaAlign, "llava_sft": LlavaSFT, "stage1": Stage1, "stage2": Stage2, "stage3": Stage3}


def build_datamodule(cfg: Any, net: nn.Module):
    """The mixed streaming DataModule, with the collator sized from the model."""
    from datamodules.collate import Collator
    from datamodules.datamodule import VargptDataModule
    from datamodules.transforms import GenTransform

    from experiments.config import resolve_path

    sizes = net.collator_sizes()
    data = replace(cfg.data, num_image_tokens=sizes["num_image_tokens"], gen_num_tokens=sizes["gen_num_tokens"],
                   root=str(resolve_path(cfg.data.root)) if cfg.data.root else "")
    kw = dict(gen_patch_nums=sizes["gen_patch_nums"], vq_fingerprint=sizes["vq_fingerprint"])
    image_tf = net.vision.image_transform()
    gen_tf = GenTransform(net.vqvae.cfg.resolution)
    train = Collator.from_config(data, net.tokenizer, image_tf, gen_tf, **kw)
    evalc = Collator.from_config(replace(data, prompt_dropout=0.0), net.tokenizer, image_tf, gen_tf, **kw)
    return VargptDataModule(data, train, eval_collator=evalc)


def build(name: str, cfg: Any):
    module = STAGE_CLASSES[name](cfg)
    return module, build_datamodule(cfg, module.net)
