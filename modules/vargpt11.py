"""VARGPT-v1.1 composed: a Qwen2-VL LLM (+ its ViT) with a generation side behind one seam.

    input_ids ──embed──┬─ <|image_pad|> slots  <- visual(pixel_values)           (understanding)
                       └─ <|image_gen_pad|> slots <- gen.teacher_inputs(pixels)  (generation)
    positions <- POSITION_SCHEMES[switches.train_positions]   (1-D released, M-RoPE corrected)
    hidden = model(embeds, positions) ─ lm_head -> text logits / CE
                                      └ gen.train_outputs(hidden at slots, prompt states) -> bit CE

The generation side (``modules/gen_side.py``) is the only place that knows about the tokenizer,
the decoder, the prompt path and the sampler; this file never branches on its kind. Parameter
names are the released ones except the ``gen.`` prefix of the generation side
(``modules/vargpt11_format.py`` maps it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from modules.components.bsq import BSQConfig
from modules.components.infinity import InfinityConfig
from modules.components.qwen2vl import (PositionIds, Qwen2VLConfig, build_text_model, build_vision_model,
                                        position_fn)
from modules.components.var_decoder import VARConfig
from modules.components.vqvae import VQVAEConfig
from modules.gen_side import GEN_SIDES, GenSwitches, Packed
from modules import gen_side_var  # noqa: F401  (registers the "var" generation side)


@dataclass
class TokenIds:
    """Special token ids (the release's Qwen2 ids; read from config.json when loading it)."""

    pad: int = 151643
    eos: int = 151645
    vision_start: int = 151652
    vision_end: int = 151653
    image_pad: int = 151655
    gen_start: int = 151657
    gen_end: int = 151658
    gen_pad: int = 151659


@dataclass
class V11Switches(GenSwitches):
    """Every released behaviour that changes a number, corrected by default.
    ``V11Switches.released()`` is the one set that reproduces the release (parity mode)."""

    train_positions: str = "mrope"  # released "1d": training never computes 3-D positions
    gen_positions: str = "mrope"  # generate() uses M-RoPE in the release too
    text_labels: str = "labels"  # released "input_ids": CE on input_ids minus gen pads (system, prompt, padding)

    @classmethod
    def released(cls) -> "V11Switches":
        return cls(ca_bf16=True, uncond_path="released", cond_drop="sos", bsc_in_eval=True,
                   gen_positions_with_deltas=False, uint8="truncate", train_positions="1d", text_labels="input_ids")


@dataclass
class VarSideConfig:
    """``gen_side: var``: v1's VQVAE + VAR decoder behind the generation seam."""

    vqvae: VQVAEConfig = field(default_factory=VQVAEConfig)
    var: VARConfig = field(default_factory=lambda: VARConfig(cond_mode="external"))
    input_noise: float = 0.0  # v1 extension: random codes in the teacher-forced inputs (training)


@dataclass
class VARGPT11Config:
    # the generation side (modules/gen_side.py GEN_SIDES): infinity (v1.1) | var (v1's VAR decoder)
    gen_side: str = "infinity"
    var_side: VarSideConfig = field(default_factory=VarSideConfig)
    llm: Qwen2VLConfig = field(default_factory=Qwen2VLConfig)
    tokenizer: BSQConfig = field(default_factory=BSQConfig)
    decoder: InfinityConfig = field(default_factory=InfinityConfig)
    ids: TokenIds = field(default_factory=TokenIds)
    switches: V11Switches = field(default_factory=V11Switches)
    sos_rows: int = 0  # sos_embedding rows; 0 = gen_start + 1
    image_side: int = 0  # suite data: input images resized to this square side; 0 = 2 x patch x merge
    cond_drop_rate: float = 0.1
    bsc_max_strength: float = 0.3
    bsc_layers: int = -1  # scales that get bit flips; -1 = all
    loss_img_weight: float = 1.0  # the 3x of the release is inside the image loss
    cfg: float = 3.0
    tau: float = 0.5
    top_k: int = 900
    top_p: float = 0.97


class VARGPT11(nn.Module):
    def __init__(self, cfg: VARGPT11Config):
        super().__init__()
        self.cfg = cfg
        lc = cfg.llm
        self.model = build_text_model(lc)
        self.visual = build_vision_model(lc)
        self.lm_head = nn.Linear(lc.hidden_size, lc.vocab_size, bias=False)
        self.gen = GEN_SIDES.get(cfg.gen_side, "model.v11.gen_side")(cfg)
        self.pos_ids = PositionIds(cfg.ids.image_pad, cfg.ids.vision_start, lc.spatial_merge_size)

    @property
    def sw(self) -> V11Switches:
        return self.cfg.switches

    # --- LLM ------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None,
              image_grid_thw: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        slots = input_ids == self.cfg.ids.image_pad
        if pixel_values is not None:
            img = self.visual(pixel_values, grid_thw=image_grid_thw).pooler_output
            if int(slots.sum()) != img.shape[0]:
                raise ValueError(f"{int(slots.sum())} <|image_pad|> tokens but the images give {img.shape[0]} "
                                 f"merged tokens (image_grid_thw {image_grid_thw.tolist()})")
            x = x.masked_scatter(slots.unsqueeze(-1), img.to(x.dtype))
        elif bool(slots.any()):
            raise ValueError("input_ids hold <|image_pad|> tokens but no pixel_values were given")
        return x

    def positions(self, scheme: str, input_ids, attention_mask=None, image_grid_thw=None):
        return position_fn(scheme)(input_ids, attention_mask, image_grid_thw, self.pos_ids)

    def llm(self, embeds, positions, attention_mask=None, cache=None, use_cache=False):
        out = self.model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions,
                         cache=cache, use_cache=use_cache)
        return out.last_hidden_state, getattr(out, "cache", None)

    def understand_logits(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                          positions: Optional[str] = None) -> torch.Tensor:
        pos, _ = self.positions(positions or self.sw.train_positions, input_ids, attention_mask, image_grid_thw)
        h, _ = self.llm(self.embed(input_ids, pixel_values, image_grid_thw), pos, attention_mask)
        return self.lm_head(h)

    # --- training forward -------------------------------------------------------------------
    def _prompt_states(self, hidden_BLH: torch.Tensor, input_ids: torch.Tensor) -> Packed:
        """Hidden states of every token before each row's <|image_gen_start|> (the decoder's keys)."""
        rows = []
        for b in range(input_ids.shape[0]):
            where = (input_ids[b] == self.cfg.ids.gen_start).nonzero()
            if where.numel() != 1:
                raise ValueError(f"row {b}: expected one <|image_gen_start|> ({self.cfg.ids.gen_start}), found {where.numel()}")
            rows.append(hidden_BLH[b, : int(where[0, 0])])
        return Packed.from_rows(rows)

    def text_loss(self, logits_BLV, input_ids, labels=None, attention_mask=None) -> torch.Tensor:
        if self.sw.text_labels == "input_ids":
            tgt = input_ids.masked_fill(input_ids == self.cfg.ids.gen_pad, -100)
        else:
            if labels is None:
                raise ValueError("text_labels 'labels' needs batch labels (or set switches.text_labels: input_ids)")
            tgt = labels.masked_fill(input_ids == self.cfg.ids.gen_pad, -100)
            if attention_mask is not None:
                tgt = tgt.masked_fill(attention_mask == 0, -100)
        return F.cross_entropy(logits_BLV[:, :-1].reshape(-1, logits_BLV.shape[-1]).float(), tgt[:, 1:].reshape(-1),
                               ignore_index=-100), tgt

    def forward_train(self, input_ids, attention_mask=None, labels=None, pixel_values=None, image_grid_thw=None,
                      pixel_gen=None, *, train: Optional[bool] = None, cond_drop_B=None, strength_rng=None,
                      generator: Optional[torch.Generator] = None, flipped=None) -> Dict[str, Any]:
        """Text CE (+ bit CE when ``pixel_gen`` (N, 3, H, W) in [-1, 1] is given: one target per
        row that holds <|image_gen_pad|> slots, in row order; other rows are text / understanding)."""
        train = self.training if train is None else train
        x = self.embed(input_ids, pixel_values, image_grid_thw)
        out: Dict[str, Any] = {}
        slots = input_ids == self.cfg.ids.gen_pad
        gen_rows = slots.any(1).nonzero().flatten()
        if pixel_gen is not None:
            if pixel_gen.shape[0] != gen_rows.numel():
                raise ValueError(f"{pixel_gen.shape[0]} target images for {gen_rows.numel()} rows with "
                                 f"<|image_gen_pad|> slots (one target per row)")
            n = slots[gen_rows].sum(1)
            if int(n.min()) != int(n.max()):
                raise ValueError(f"rows hold different numbers of <|image_gen_pad|> slots: {n.tolist()}")
            N = pixel_gen.shape[0]
            if cond_drop_B is None and train and self.cfg.cond_drop_rate > 0:
                cond_drop_B = torch.rand(N, generator=generator) < self.cfg.cond_drop_rate
            slot_x, state = self.gen.teacher_inputs(pixel_gen, int(n[0]), train=train, cond_drop_B=cond_drop_B,
                                                    strength_rng=strength_rng, generator=generator,
                                                    bsc_max_strength=self.cfg.bsc_max_strength,
                                                    bsc_layers=self.cfg.bsc_layers, flipped=flipped)
            x = x.masked_scatter(slots.unsqueeze(-1), slot_x.to(x.dtype))
            out["gen_state"] = state
        pos, _ = self.positions(self.sw.train_positions, input_ids, attention_mask, image_grid_thw)
        h, _ = self.llm(x, pos, attention_mask)
        logits = self.lm_head(h)
        out["loss_text"], out["text_labels"] = self.text_loss(logits, input_ids, labels, attention_mask)
        out["logits"], out["hidden"] = logits, h
        out["loss"] = out["loss_text"]
        if pixel_gen is not None:
            slot_h = h[slots].view(pixel_gen.shape[0], -1, h.shape[-1])
            prompt = self._prompt_states(h[gen_rows], input_ids[gen_rows])
            g = self.gen.train_outputs(slot_h, prompt, out["gen_state"])
            out.update(g, prompt_states=prompt, gen_hidden=slot_h)
            out["loss"] = out["loss_text"] + self.cfg.loss_img_weight * g["loss_img"]
        return out

    @staticmethod
    def bit_logps(out: Dict[str, Any]) -> torch.Tensor:
        """Per generation row of ``forward_train``'s output: the sum over the image's tokens and bits
        of log p(label bit) (N,), the text not scored (what DPO compares; the release's
        ``get_batch_image_logps`` with ``sum``). Labels are the bitwise-self-correction ones."""
        if "image_logits" not in out or "labels" not in out.get("gen_state", {}):
            raise ValueError("bit_logps needs forward_train output with generation targets on a bit (infinity) side")
        lab = out["gen_state"]["labels"].long()  # (N, L, d)
        N, L, d = lab.shape
        lp = F.log_softmax(out["image_logits"].float().view(N, L, d, 2), -1)
        return lp.gather(-1, lab.unsqueeze(-1)).squeeze(-1).sum((1, 2))

    # --- inference --------------------------------------------------------------------------
    def _llm_step(self, embeds, positions, cache):
        from transformers import DynamicCache  # lazy: transformers only for generation

        if cache is None:
            cache = DynamicCache()
        h, cache = self.llm(embeds, positions, cache=cache, use_cache=True)
        return h, cache

    @torch.no_grad()
    def prefill(self, input_ids, pixel_values=None, image_grid_thw=None):
        """Prompt (B=1 rows of equal length) -> (hidden, cache, next cache_position, rope delta)."""
        pos, delta = self.positions(self.sw.gen_positions, input_ids, None, image_grid_thw)
        h, cache = self._llm_step(self.embed(input_ids, pixel_values, image_grid_thw), pos, None)
        return h, cache, torch.full((input_ids.shape[0],), input_ids.shape[1], dtype=torch.long), delta.view(-1)

    @torch.no_grad()
    def generate_text(self, input_ids, pixel_values=None, image_grid_thw=None, max_new_tokens: int = 16) -> torch.Tensor:
        """Greedy continuation; the step positions are cache_position + the prompt's rope delta."""
        h, cache, nxt, delta = self.prefill(input_ids, pixel_values, image_grid_thw)
        ids = input_ids
        logits = [self.lm_head(h[:, -1])]
        for _ in range(max_new_tokens):
            tok = logits[-1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, tok], 1)
            if bool((tok == self.cfg.ids.eos).all()) or len(logits) == max_new_tokens:
                break
            p = (nxt + delta).view(1, -1, 1).expand(3, -1, 1)
            h, cache = self._llm_step(self.model.embed_tokens(tok), p, cache)
            nxt = nxt + 1
            logits.append(self.lm_head(h[:, -1]))
        self._last_step_logits = torch.stack(logits, 1)
        return ids

    @torch.no_grad()
    def generate_image(self, input_ids, pixel_values=None, image_grid_thw=None, *, seed=0,
                       trace: Optional[Dict] = None) -> Dict[str, torch.Tensor]:
        """Prompts (B rows of one length) -> images. The start token is appended (forced), its
        step runs, then the generation side samples every scale. ``seed``: an int (row b draws
        from a generator seeded seed + b) or one seed per row; a row's draws never depend on its
        batch-mates, and nothing reads the clock."""
        h, cache, nxt, delta = self.prefill(input_ids, pixel_values, image_grid_thw)
        B = input_ids.shape[0]
        start = torch.full((B, 1), self.cfg.ids.gen_start, dtype=torch.long)
        p = (nxt + delta).view(1, -1, 1).expand(3, -1, 1)
        hs, cache = self._llm_step(self.model.embed_tokens(start), p, cache)
        nxt = nxt + 1
        prompt = Packed.from_rows([h[b] for b in range(B)])
        seeds = [int(seed) + b for b in range(B)] if isinstance(seed, int) else [int(x) for x in seed]
        if len(seeds) != B:
            raise ValueError(f"{len(seeds)} seeds for {B} prompts")
        g = [torch.Generator().manual_seed(x) for x in seeds]
        cfg = self.cfg
        summed, bits = self.gen.generate(self._llm_step, prompt, cache, nxt, delta, cfg=cfg.cfg, tau=cfg.tau,
                                         top_k=cfg.top_k, top_p=cfg.top_p, generator=g, trace=trace)
        img = self.gen.decode(summed)
        if trace is not None:
            trace.update(llm_hidden_prompt_and_gen_start=torch.cat([h, hs], 1),
                         next_token=self.lm_head(hs[:, -1]).argmax(-1))
        return {"summed_codes": summed, "bits": bits, "image": img, "uint8": self.gen.to_uint8(img)}
