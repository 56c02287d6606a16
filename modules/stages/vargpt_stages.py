"""The VARGPT stage LightningModules: thin wrappers that declare what trains.

                 trains                                   data (world default)
    llava_align  und_proj                                 captions            (LLaVA-1.5 step 1)
    llava_sft    und_proj + llm                           VQA / conversations (LLaVA-1.5 step 2)
    stage1       gen_in, gen_out, var.cond_emb/pos_start  generation instructions
                 (+ gen_cond, and var.cross with model.var_cond prompt_attn; + gen_cond_bigram,
                 gen_lora, prompt_enc; without gen_in, and no backward through the LLM, with
                 model.stage1_through_llm false)
    stage2       llm (+ und_proj with model.train_und_projector)   understanding + a few generation
    stage3       gen_in, gen_out, var (+ gen_cond,            generation instructions
                 gen_cond_bigram, gen_lora, prompt_enc when the model has them;
                 without gen_in, and no backward through the LLM, with
                 model.stage3_through_llm false)

Everything outside the trainable set is frozen and kept in eval mode (no dropout / drop-path),
so a frozen part computes exactly what it did when it was trained. `tests/test_stages.py`
checks that a step changes exactly the declared parameters.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar, Dict, List, Tuple

import lightning as L
import torch
import torch.nn as nn

from datamodules.datamodule import VargptDataModule
from datamodules.paths import resolve_path
from modules.evaluation import Evaluator
from modules.stages.base import StageModule
from modules.stages.callbacks import EvalCallback
from modules.vargpt import VARGPT
from modules.weights import load_weights


class VARGPTStage(StageModule):
    TRAINABLE: ClassVar[Tuple[str, ...]] = ()
    # The model.<name> switch that lets this stage run the frozen LLM forward only ("": none)
    THROUGH_LLM_SWITCH: ClassVar[str] = ""

    def __init__(self, cfg: Any, net: nn.Module | None = None):
        super().__init__(cfg)
        if cfg.model.var.cond_mode != "external":
            raise ValueError("model.var.cond_mode must be 'external' in the VARGPT stages (the LLM conditions VAR)")
        self.net = net if net is not None else VARGPT(cfg.model, template=cfg.data.chat)
        if net is None:  # every pretrained weight: model.load entries, then init_from
            load_weights(self.net, cfg.model.load, cfg.init_from, cfg.init_allow_missing, cfg.init_allow_unexpected)
        # set for every stage, so a net handed on from a forward-only stage gets its graph back
        self.net.grad_into_llm = self.through_llm()
        self.apply_trainable_set()

    def through_llm(self) -> bool:
        """Whether the image loss reaches the parts before the frozen LLM through it (VARGPT v1):
        false for a stage whose switch (model.stage1/stage3_through_llm) is off. Then gen_in stays
        frozen (``_without_gen_in``) and the LLM's generation inputs leave the graph, so the frozen
        LLM runs forward only."""
        return not self.THROUGH_LLM_SWITCH or bool(getattr(self.cfg.model, self.THROUGH_LLM_SWITCH))

    def trainable_prefixes(self) -> Tuple[str, ...]:
        return self.TRAINABLE

    def train(self, mode: bool = True):
        """Frozen subtrees stay in eval mode while the rest trains."""
        super().train(mode)
        if mode:
            _eval_frozen(self.net)
        return self

    # -------------------------------------------------------------- steps
    def transfer_batch_to_device(self, batch: Dict[str, Any], device: torch.device, dataloader_idx: int):
        """Move only tensors (and lists of tensors): Lightning's default walks every record,
        message and answer of the batch (~2.5 ms/step at batch 16, even on CPU)."""
        if device.type == "cpu":
            return batch

        def move(v: Any) -> Any:
            if torch.is_tensor(v):
                return v.to(device, non_blocking=True)
            if isinstance(v, (list, tuple)) and v and all(torch.is_tensor(t) for t in v):  # gen_indices
                return type(v)(t.to(device, non_blocking=True) for t in v)
            return v

        return {k: move(v) for k, v in batch.items()}

    def training_step(self, batch: Dict[str, Any], batch_idx: int):
        out = self.net(batch)
        B = batch["input_ids"].shape[0]
        self.count_bad_samples(batch)
        loss = self.finite_or_skip(out["loss"], {k: out[k] for k in ("loss_text", "loss_img")})
        if loss is None:
            return None  # skipped (trainer.on_nonfinite: skip)
        # token count from the collated mask (CPU tensor: no device sync)
        self.log_throughput(B, int(batch["attention_mask"].sum()) if batch["attention_mask"].device.type == "cpu" else 0)
        if not self.logging_step():
            return loss
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=B)
        self.log("train/loss_text", out["loss_text"], batch_size=B)
        if int(out["n_img_tokens"]) > 0:
            self.log("train/loss_img", out["loss_img"], prog_bar=True, batch_size=B)
            self.log("train/acc_img", out["acc_img"], batch_size=B)
        self.log_counters()
        return loss

    def validation_step(self, batch: Dict[str, Any], batch_idx: int, dataloader_idx: int = 0):
        out = self.net(batch)
        B = batch["input_ids"].shape[0]
        self.log("val/loss", out["loss"], batch_size=B, add_dataloader_idx=False)
        self.log("val/loss_text", out["loss_text"], batch_size=B, add_dataloader_idx=False)
        if int(out["n_img_tokens"]) > 0:
            self.log("val/loss_img", out["loss_img"], batch_size=B, add_dataloader_idx=False)
            self.log("val/acc_img", out["acc_img"], batch_size=B, add_dataloader_idx=False)


    # -------------------------------------------------------------- in-loop evaluation
    def configure_callbacks(self) -> List[L.Callback]:
        """The ``eval:`` protocol after every validation (modules/stages/callbacks.py)."""
        ev = Evaluator(self.cfg.eval, self.cfg.model, self.cfg.data.root)
        return [EvalCallback(ev)] if ev.tasks() else []


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
    THROUGH_LLM_SWITCH = "stage1_through_llm"

    def trainable_prefixes(self) -> Tuple[str, ...]:
        # the prompt's way into the VAR (model.var_cond: gen_cond, the VAR's cross-attention) is
        # condition, not decoder: it aligns here
        own = _without_gen_in(self.TRAINABLE, self.through_llm())
        return own + _optional(self.net, "gen_cond", "gen_cond_bigram", "var.cross", "prompt_enc", "gen_lora")


class Stage2(VARGPTStage):
    TRAINABLE = ("llm",)

    def trainable_prefixes(self) -> Tuple[str, ...]:
        return self.TRAINABLE + (("und_proj",) if self.cfg.model.train_und_projector else ())


class Stage3(VARGPTStage):
    TRAINABLE = ("gen_in", "gen_out", "var")
    THROUGH_LLM_SWITCH = "stage3_through_llm"

    def trainable_prefixes(self) -> Tuple[str, ...]:
        own = _without_gen_in(self.TRAINABLE, self.through_llm())
        return own + _optional(self.net, "gen_cond", "gen_cond_bigram", "prompt_enc", "gen_lora")


def _without_gen_in(prefixes: Tuple[str, ...], through_llm: bool) -> Tuple[str, ...]:
    """A generation stage's own trainable set: gen_in leaves it when the LLM runs forward only."""
    return prefixes if through_llm else tuple(p for p in prefixes if p != "gen_in")


def _optional(net: nn.Module, *names: str) -> Tuple[str, ...]:
    """The optional generation-side parts (dotted submodule names) this model has: gen_cond with
    model.var_cond gen_start / prompt_attn, var.cross with prompt_attn, gen_cond_bigram with
    model.prompt_context_bigram, prompt_enc with
    model.prompt_encoder_layers, gen_lora with model.gen_lora_rank. They train with that side."""
    def has(name: str) -> bool:
        owner, _, leaf = name.rpartition(".")
        return getattr(net.get_submodule(owner) if owner else net, leaf, None) is not None
    return tuple(n for n in names if has(n))


STAGE_CLASSES = {"llava_align": LlavaAlign, "llava_sft": LlavaSFT, "stage1": Stage1, "stage2": Stage2, "stage3": Stage3}


def build_datamodule(cfg: Any, net: VARGPT) -> VargptDataModule:
    """The mixed streaming DataModule with the model's collators (``VARGPT.collator``): the
    training one with prompt dropout, the evaluation one without."""
    data = replace(cfg.data, root=str(resolve_path(cfg.data.root)) if cfg.data.root else "")
    sizes = net.collator_sizes()
    data = replace(data, num_image_tokens=sizes["num_image_tokens"], gen_num_tokens=sizes["gen_num_tokens"])
    return VargptDataModule(data, net.collator(data, train=True), eval_collator=net.collator(data))


def build(name: str, cfg: Any):
    module = STAGE_CLASSES[name](cfg)
    return module, build_datamodule(cfg, module.net)
