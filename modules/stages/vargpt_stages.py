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
        # token count from the collated mask (CPU tensor: no device sync)
        self.log_throughput(B, int(batch["attention_mask"].sum()) if batch["attention_mask"].device.type == "cpu" else 0)
        if not self.logging_step():
            return out["loss"]
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=B)
        self.log("train/loss_text", out["loss_text"], batch_size=B)
        if int(out["n_img_tokens"]) > 0:
            self.log("train/loss_img", out["loss_img"], prog_bar=True, batch_size=B)
            self.log("train/acc_img", out["acc_img"], batch_size=B)
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


    # -------------------------------------------------------------- in-loop evaluation
    def on_validation_epoch_end(self) -> None:
        """VQA accuracy on a fixed question subset and FID / IS / attribute accuracy on a fixed
        prompt set (eval.*), every time validation runs; a grid and a table go to MLflow."""
        e = self.cfg.eval
        if self.trainer.sanity_checking or not (e.vqa_shards or e.gen_shards):
            return
        if not self.trainer.is_global_zero:
            return
        from modules import evaluation as ev

        root = self._data_root()
        step = self.global_step
        was_training = self.net.training
        self.net.eval()
        try:
            if e.vqa_shards:
                if getattr(self, "_vqa_set", None) is None:
                    self._vqa_set = list(ev.iter_records(e.vqa_shards, root, e.num_vqa))
                r = ev.evaluate_vqa(self.net, self._vqa_set, e)
                self._log_scalars({"val/vqa_accuracy": r["vqa_accuracy"], "val/vqa_prior_baseline": r["vqa_prior_baseline"],
                                   **({"val/vqa_blind_baseline": r["vqa_blind_baseline"]} if "vqa_blind_baseline" in r else {}),
                                   **{f"val/vqa_{k}": v for k, v in r["vqa_per_type"].items()}})
                self._log_json(f"eval/vqa_rows_step{step:06d}.json", r["vqa_rows"])
            if e.gen_shards:
                if getattr(self, "_gen_set", None) is None:
                    self._gen_set = list(ev.iter_records(e.gen_shards, root, e.num_gen))
                    self._classifier = ev.load_world_classifier(str(self._path(e.classifier_path)), self.cfg.model) \
                        if e.classifier_path else None
                r = ev.evaluate_generation(self.net, self._gen_set, e, self._classifier,
                                           real_key=f"{e.gen_shards}@{root}")
                self._log_scalars({f"val/{k}": v for k, v in r.items()
                                   if isinstance(v, float) and (k.startswith(("gen_attr", "gen_prompt")) or k in ("fid", "inception_score"))})
                self._log_grid(f"eval/samples_step{step:06d}.png", r["gen_images"][: e.grid_images], r["gen_prompts"])
        finally:
            self.net.train(was_training)
            if was_training:
                _eval_frozen(self.net)

    def _data_root(self) -> str:
        from experiments.config import resolve_path

        return str(resolve_path(self.cfg.data.root)) if self.cfg.data.root else ""

    @staticmethod
    def _path(p: str):
        from experiments.config import resolve_path

        return resolve_path(p)

    def _log_scalars(self, metrics: Dict[str, float]) -> None:
        for k, v in metrics.items():
            self.log(k, float(v), on_step=False, on_epoch=True, rank_zero_only=True)

    def _mlflow(self):
        lg = self.logger
        return lg if lg is not None and hasattr(lg, "run_id") and hasattr(lg, "experiment") else None

    def _log_json(self, name: str, obj: Any) -> None:
        lg = self._mlflow()
        if lg is not None:
            lg.experiment.log_dict(lg.run_id, obj, name)

    def _log_grid(self, name: str, images: torch.Tensor, prompts) -> None:
        lg = self._mlflow()
        if lg is None or len(images) == 0:
            return
        from torchvision.utils import make_grid

        grid = make_grid(images, nrow=min(8, len(images)), padding=2, pad_value=1.0)
        arr = (grid.permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype("uint8")
        lg.experiment.log_image(lg.run_id, arr, artifact_file=name)
        lg.experiment.log_text(lg.run_id, "\n".join(f"{i}: {p}" for i, p in enumerate(prompts[: len(images)])),
                               name.replace(".png", "_prompts.txt"))


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
