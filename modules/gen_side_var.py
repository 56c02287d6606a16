"""VAR-v1's generation side behind the ``GenerationSide`` interface (modules/gen_side.py).

The parts and computations of v1 (``modules/vargpt.py``, ``modules/inference.py`` with
``model.var_cond: label``): the multi-scale VQVAE, the VAR decoder with its condition rows
(0 conditional, 1 unconditional), ``gen_in`` (VAR front end -> LLM inputs at the slots) and
``gen_out`` (LLM states -> VAR block inputs), token CE, and the KV-cached scale loop of
``VARDecoder.sample`` with the LLM consuming each scale's chunk. The unconditional half of the
guidance batch runs the LLM on its own cache without the prompt (v1 runs a null prompt through it).

``VARGPT11`` takes it with ``model.v11.gen_side: var``: a Qwen2-VL LLM with v1's VAR decoder. The
v1 composed model (``modules/vargpt.py``) still holds its own copy of this path (docs/v11.md).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from modules.components.projectors import ProjectorConfig, build_projector
from modules.components.var_decoder import VARConfig, build_var, noisy_teacher_inputs
from modules.components.vqvae import VQVAEConfig, build_vqvae
from modules.gen_side import GEN_SIDES, GenerationSide, LLMStep, Packed


class VARSide(GenerationSide):
    def __init__(self, vq_cfg: VQVAEConfig, var_cfg: VARConfig, llm_hidden: int, input_noise: float = 0.0):
        super().__init__()
        self.vqvae = build_vqvae(vq_cfg)
        self.vqvae.requires_grad_(False)
        self.var = build_var(replace(var_cfg, cond_mode="external"), self.vqvae)
        C = self.var.C
        self.gen_in = build_projector(ProjectorConfig(name="mlp", depth=2, in_dim=C, out_dim=llm_hidden))
        self.gen_out = build_projector(ProjectorConfig(name="mlp", depth=2, in_dim=llm_hidden, out_dim=C))
        self.input_noise = input_noise

    @classmethod
    def of(cls, net: Any) -> "VARSide":
        """A view of a v1 ``VARGPT``'s generation parts (``vqvae``, ``var``, ``gen_in``, ``gen_out``:
        the same modules, shared, so ``net``'s state dict is untouched) behind the interface, for
        the v1 configuration (``model.var_cond: label``, no ``var_skip``)."""
        if net.cfg.var_cond != "label" or net.cfg.var_skip:
            raise ValueError(f"VARSide.of: model.var_cond={net.cfg.var_cond}, var_skip={net.cfg.var_skip}; "
                             "the view covers v1 (label, no var_skip); docs/v11.md lists the rest")
        side = cls.__new__(cls)
        GenerationSide.__init__(side)
        side.vqvae, side.var, side.gen_in, side.gen_out = net.vqvae, net.var, net.gen_in, net.gen_out
        side.input_noise = net.cfg.gen_input_noise
        return side

    @property
    def tokens_per_image(self) -> int:
        return self.var.L

    @property
    def resolution(self) -> int:
        return self.vqvae.cfg.resolution

    def train(self, mode: bool = True):
        super().train(mode)
        self.vqvae.eval()
        return self

    def teacher_inputs(self, pixels_B3HW: torch.Tensor, n_slots: int, *, train: bool = True,
                       cond_drop_B: Optional[torch.Tensor] = None, **_: Any) -> Tuple[torch.Tensor, Dict[str, Any]]:
        B, L = pixels_B3HW.shape[0], self.var.L
        if n_slots != L:
            raise ValueError(f"{n_slots} image slots but the VAR predicts L={L} tokens (patch_nums "
                             f"{list(self.var.patch_nums)}): one <|image_gen_pad|> per token")
        with torch.no_grad():
            idx = self.vqvae.img_to_idx(pixels_B3HW.float())
        noisy = noisy_teacher_inputs(idx, self.input_noise if train else 0.0, self.var.V)
        uncond = torch.zeros(B, dtype=torch.long) if cond_drop_B is None else cond_drop_B.long()
        front = self.var.front_end(uncond, self.vqvae.idx_to_var_input(noisy))  # (B, L, C)
        return self.gen_in(front), {"idx": idx, "uncond": uncond}

    def train_outputs(self, slot_hidden_BSH: torch.Tensor, prompt_states: Packed,
                      state: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        logits = self.var.forward_blocks(self.gen_out(slot_hidden_BSH), state["uncond"])  # (B, L, V)
        target = torch.cat(list(state["idx"]), 1)
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1))
        with torch.no_grad():
            acc = (logits.argmax(-1) == target).float().mean()
        return {"image_logits": logits, "loss_img": ce, "acc_img": acc, "labels": target}

    @torch.no_grad()
    def generate(self, llm_step: LLMStep, prompt_states: Packed, cache: Any, next_position: torch.Tensor,
                 rope_delta: torch.Tensor, *, cfg: float = 3.0, top_k: int = 0, top_p: float = 0.0,
                 generator=None, trace: Optional[Dict] = None, **_: Any) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        B = prompt_states.cu.numel() - 1
        st = {"cache": cache, "pos": next_position + rope_delta, "ucache": None, "upos": torch.zeros(B, dtype=torch.long)}

        def step_hook(si: int, x_2BlC: torch.Tensor) -> torch.Tensor:
            l = x_2BlC.shape[1]
            e = self.gen_in(x_2BlC)
            pc = (st["pos"].view(B, 1) + torch.arange(l)).unsqueeze(0).expand(3, B, l)
            pu = (st["upos"].view(B, 1) + torch.arange(l)).unsqueeze(0).expand(3, B, l)
            hc, st["cache"] = llm_step(e[:B], pc, st["cache"])
            hu, st["ucache"] = llm_step(e[B:], pu, st["ucache"])
            st["pos"], st["upos"] = st["pos"] + l, st["upos"] + l
            return self.gen_out(torch.cat([hc, hu])).to(x_2BlC.dtype)

        idx, _ = self.var.sample(B, cond=torch.zeros(B, dtype=torch.long), cfg=cfg, top_k=top_k, top_p=top_p,
                                 generator=generator, step_hook=step_hook, vqvae=self.vqvae, parity=True, decode=False)
        return idx, idx

    def decode(self, latent: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.vqvae.idx_to_img(latent)

    def to_uint8(self, img_m1p1: torch.Tensor) -> torch.Tensor:
        return ((img_m1p1 + 1) / 2 * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


@GEN_SIDES.register("var")
def build_var_side(cfg: Any) -> VARSide:
    return VARSide(cfg.var_side.vqvae, cfg.var_side.var, cfg.llm.hidden_size, cfg.var_side.input_noise)
