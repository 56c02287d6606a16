"""VARGPT-v1.1 on the suite's data: the world's tokenizer and collated batches (``model.family:
vargpt11`` in a YAML). The model is ``VARGPT11`` (same parameter names, so an export writes the
released layout); this adds what the stages need: the text tokenizer's ids in place of the
release's, the collator (Qwen2-VL patches for input images, the BSQ resolution for targets, one
<|image_gen_pad|> slot per predicted token) and ``forward(batch)`` with the stages' output keys.

The world tokenizer has no <|vision_start|>/<|vision_end|>: an input image is its run of
<image> tokens (``positions_mrope`` finds images by their image-pad tokens and grids alone).
"""
from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any, Dict, Optional

import numpy as np
import torch

from datamodules.collate import Collator
from datamodules.config import ChatTemplateConfig, DataConfig
from datamodules.transforms import GenTransform
from modules.components.qwen2vl import image_to_patches, smart_resize
from modules.components.text_tokenizer import build_tokenizer, special_token_ids
from modules.gen_side import Packed
from modules.vargpt11 import TokenIds, VARGPT11, VARGPT11Config


class PatchTransform:
    """PIL image -> Qwen2-VL patches (n, 3*T*p*p) at a fixed square side (a multiple of p*merge)."""

    def __init__(self, side: int, llm_cfg):
        self.side, self.cfg = side, llm_cfg

    def __call__(self, im) -> torch.Tensor:
        from PIL import Image

        arr = np.asarray(im.convert("RGB").resize((self.side, self.side), Image.BICUBIC)).copy()
        return image_to_patches(torch.from_numpy(arr), self.cfg)[0]


class VARGPT11World(VARGPT11):
    def __init__(self, mcfg: Any, template: Optional[ChatTemplateConfig] = None, tokenizer: Any = None):
        tok = tokenizer if tokenizer is not None else build_tokenizer(mcfg.tokenizer)
        ids = special_token_ids(tok)
        cfg: VARGPT11Config = copy.deepcopy(mcfg.v11 or VARGPT11Config())
        pad = ids["pad"] if ids["pad"] is not None else (ids["eos"] or 0)
        cfg.ids = TokenIds(pad=pad, eos=ids["eos"] if ids["eos"] is not None else pad, vision_start=-1, vision_end=-1,
                           image_pad=ids["image"], gen_start=ids["gen_start"], gen_end=ids["gen_end"], gen_pad=ids["gen_pad"])
        # vocab_size 0: the tokenizer's length; else at least that many rows (the release keeps
        # 152064 rows for a 151,6xx-token tokenizer, so added tokens land in existing rows)
        rows = len(tok) if cfg.llm.vocab_size <= 0 else max(cfg.llm.vocab_size, len(tok))
        cfg.llm = replace(cfg.llm, vocab_size=rows)
        cfg.sos_rows = max(cfg.sos_rows, cfg.ids.gen_start + 1)
        super().__init__(cfg)
        self.tokenizer = tok
        self.template = template or ChatTemplateConfig()
        lc = cfg.llm
        f = lc.patch_size * lc.spatial_merge_size
        self.image_side = smart_resize(f * 2, f * 2, factor=f)[0] if not cfg.image_side else cfg.image_side
        self.gen_resolution = self.gen.resolution
        # Set by sharded training (modules/sharded.py): every rank must run every sharded unit each
        # step (each gathers its parameters with the other ranks), so a batch without input images or
        # without generation targets still runs the ViT / the generation side, on one blank input,
        # adding an exact 0 to the loss.
        self.run_every_part = False

    @property
    def num_image_tokens(self) -> int:
        g = self.image_side // self.cfg.llm.patch_size
        return g * g // self.cfg.llm.spatial_merge_size ** 2

    def collator_sizes(self) -> Dict[str, Any]:
        return {"num_image_tokens": self.num_image_tokens, "gen_num_tokens": self.gen.tokens_per_image}

    def collator(self, data: Optional[DataConfig] = None, *, train: bool = False) -> Collator:
        data = data if data is not None else DataConfig(chat=self.template)
        s = self.collator_sizes()
        data = replace(data, num_image_tokens=s["num_image_tokens"], gen_num_tokens=s["gen_num_tokens"],
                       prompt_dropout=data.prompt_dropout if train else 0.0, load_gen_images=True)
        return Collator.from_config(data, self.tokenizer, PatchTransform(self.image_side, self.cfg.llm),
                                    GenTransform(self.gen_resolution))

    def _idle_vision(self) -> torch.Tensor:
        """A finite scalar through the ViT (run_every_part): one blank merge window."""
        lc, dev = self.cfg.llm, self.lm_head.weight.device
        m = lc.spatial_merge_size
        px = torch.zeros(m * m, 3 * lc.temporal_patch_size * lc.patch_size ** 2, device=dev)
        return self.visual(px, grid_thw=torch.tensor([[1, m, m]], device=dev)).pooler_output.float().sum()

    def _idle_gen(self) -> torch.Tensor:
        """A finite scalar through the generation side (run_every_part): one blank target, a one-token prompt."""
        dev = self.lm_head.weight.device
        blank = torch.zeros(1, 3, self.gen_resolution, self.gen_resolution, device=dev)
        slot_x, state = self.gen.teacher_inputs(blank, self.gen.tokens_per_image, train=False, bsc_layers=0)
        prompt = Packed.from_rows([slot_x.new_zeros(1, self.cfg.llm.hidden_size)])
        return self.gen.train_outputs(slot_x, prompt, state)["loss_img"].float()

    def forward(self, batch: Dict[str, Any], return_logits: bool = False) -> Dict[str, torch.Tensor]:
        ids = batch["input_ids"]
        px = batch.get("pixel_values")
        grid = None
        if px is not None and px.numel():
            g = self.image_side // self.cfg.llm.patch_size
            grid = torch.tensor([[1, g, g]] * px.shape[0])
            px = px.reshape(-1, px.shape[-1])
        else:
            px = None
        gen = batch.get("gen_images")
        if gen is not None:
            rows = batch["gen_sample_idx"]
            if rows.numel() != rows.unique().numel():
                raise ValueError("VARGPT-v1.1 trains one generation target per sample; a sample holds several")
        # run_every_part: the idle parts run where the real ones would (the ViT before the LLM, the
        # decoder after it), so every rank gathers (and recomputes in backward) the units in one order
        idle = self._idle_vision() if self.run_every_part and px is None else None
        out = self.forward_train(ids, batch.get("attention_mask"), batch.get("labels"), px, grid, gen)
        if self.run_every_part and gen is None:
            idle = self._idle_gen() if idle is None else idle + self._idle_gen()
        res = {"loss": out["loss"] if idle is None else out["loss"] + 0.0 * idle, "loss_text": out["loss_text"]}
        if gen is not None:
            B, L = out["image_logits"].shape[:2]
            res.update(loss_img=out["loss_img"], acc_img=out["acc_img"], n_img_tokens=torch.tensor(B * L))
        else:
            res.update(loss_img=out["loss"].new_zeros(()), n_img_tokens=torch.tensor(0))
        return res
