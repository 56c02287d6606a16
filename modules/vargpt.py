"""The composed VARGPT model (a plain nn.Module): understanding + next-scale generation.

    understanding: pixels -> vision (B, n, C_vis) -> und_proj -> LLM inputs at the <image> slots
    generation:    target image -> frozen VQVAE -> per-scale indices -> VAR front end (N, L, C_var)
                   -> gen_in -> LLM inputs at the L <|image_gen_pad|> slots
                   -> LLM last hidden states at those slots (no shift) -> gen_out (N, L, C_var)
                   -> VAR blocks (AdaLN, block-causal) -> head -> logits (N, L, V)
    loss = loss_text (answer tokens) + w_img * loss_img (mean CE over the L tokens)

Every sample of a batch carries its own image slots and generation span, so understanding and
generation samples mix freely in one batch (the released code's if/elif cannot: see
`mixed_batches`). Per-sample losses do not depend on batch-mates (right padding + causal mask).

Released-behaviour switches read here (ModelConfig.switch; `behaviour: released` sets all):
mixed_batches, text_labels (the released labels: input ids with only <|image_gen_pad|> masked)
and cond_dropout (label: the VAR condition drops to the null row with cond_drop_rate, the prompt
stays; prompt: the collator's prompt dropout).

This file holds the parts, the training forward and the one collator builder (``collator``);
decoding (``answer``, ``generate_image``) lives in modules/inference.py and is mixed in.
"""
from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from datamodules.collate import Collator, released_text_labels
from datamodules.config import ChatTemplateConfig, DataConfig
from datamodules.tokens import GEN_PAD, IGNORE_INDEX
from datamodules.transforms import GenTransform
from modules.components.gen_lora import GenLoRA
from modules.components.linear_ce import linear_cross_entropy
from modules.components.llm import build_llm, is_gradient_checkpointing, llm_hidden_size
from modules.components.projectors import build_projector
from modules.components.prompt_encoder import PromptEncoder
from modules.components.text_tokenizer import build_tokenizer, special_token_ids
from modules.components.var_decoder import build_var, noisy_teacher_inputs
from modules.components.vision_encoders import build_vision_encoder
from modules.components.vqvae import build_vqvae
from modules.config import ModelConfig
from modules.inference import VARGPTInference


def training_attention(device_type: str, recomputed: bool = False):
    """The attention kernel of a training forward (LLM, vision tower, VAR blocks: every
    ``F.scaled_dot_product_attention`` inside it; the backward follows the forward's choice).
    Under CPU bf16/fp16 autocast: the math kernel, whose backward is bf16 matmuls; the CPU flash
    kernel's backward is 5-10x its forward there (train step -7%: gen batch 1.50 -> 1.40 s,
    mixed 1.50 -> 1.44 s, the 125M model of benchmarks.train_step_vs_official). fp32 and GPUs keep
    the default choice (on CPU fp32 the flash kernel is the faster one). ``recomputed``: parts of
    the forward run again in the backward (activation checkpointing: model.llm.gradient_checkpointing,
    sharded recompute), outside this context; the recomputation must pick the same kernel, so the
    default stays."""
    if recomputed:
        return contextlib.nullcontext()
    if device_type == "cpu" and torch.is_autocast_enabled("cpu") and \
            torch.get_autocast_dtype("cpu") in (torch.bfloat16, torch.float16):
        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()


def _compile_training_forward(m: nn.Module, dynamic: bool) -> None:
    """``m.forward`` becomes: the compiled forward in training mode, the eager one otherwise."""
    eager = m.forward
    compiled = torch.compile(eager, dynamic=dynamic)

    def forward(*args: Any, **kwargs: Any) -> Any:
        return compiled(*args, **kwargs) if m.training else eager(*args, **kwargs)

    m.forward = forward


class VARGPT(VARGPTInference, nn.Module):
    """Submodules (the names stages and `load:` refer to): vision, und_proj, llm, gen_lora
    (model.gen_lora_rank > 0, else None), gen_in, gen_out, gen_cond (var_cond gen_start /
    prompt_attn, else None), gen_cond_bigram (model.prompt_context_bigram, else None), prompt_enc
    (model.prompt_encoder_layers > 0, else None), vqvae
    (always frozen, fp32), var."""

    def __init__(self, cfg: ModelConfig, tokenizer: Any = None, template: Optional[ChatTemplateConfig] = None):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer if tokenizer is not None else build_tokenizer(cfg.tokenizer)
        self.template = template or ChatTemplateConfig()
        self.ids = special_token_ids(self.tokenizer)
        self.vision = build_vision_encoder(cfg.vision)
        self.llm = build_llm(cfg.llm, len(self.tokenizer))
        d_llm = llm_hidden_size(self.llm)
        # model.gen_lora_rank: the LLM's own deltas at the image slots (hooks on its linears)
        self.gen_lora: Optional[GenLoRA] = None
        if cfg.gen_lora_rank > 0:
            self.gen_lora = GenLoRA(self.llm.get_decoder().layers, cfg.gen_lora_rank, cfg.gen_lora_alpha)
        self.und_proj = build_projector(replace(cfg.und_projector, in_dim=self.vision.out_dim, out_dim=d_llm))
        self.vqvae = build_vqvae(cfg.vqvae)
        self.vqvae.requires_grad_(False)
        self.var = build_var(replace(cfg.var, cross_attn=cfg.var_cond == "prompt_attn"), self.vqvae)
        c_var = self.var.C
        self.gen_in = build_projector(replace(cfg.gen_in_projector, in_dim=c_var, out_dim=d_llm))
        self.gen_out = build_projector(replace(cfg.gen_out_projector, in_dim=d_llm, out_dim=c_var))
        # var_cond gen_start: the LLM state at <|image_gen_start|> -> (N, C_var) added to the VAR's
        # AdaLN condition; the last layer starts at zero so the model starts as v1 (label)
        # prompt_attn: the LLM states of the prompt -> (N, T, C_var), the VAR's cross-attention
        # context (there the cross-attention output starts at zero instead)
        self.gen_cond: Optional[nn.Module] = None
        if cfg.var_cond != "label":
            self.gen_cond = build_projector(replace(cfg.gen_cond_projector, in_dim=d_llm, out_dim=c_var))
        # model.prompt_context_bigram: [e_t, e_t-1, ..] (model.prompt_context_window tokens W) of the
        # prompt's input embeddings (N, P, W*D) -> (N, P, C_var) added to that context; zero at
        # init, so the model starts as without it
        self.gen_cond_bigram: Optional[nn.Linear] = None
        if cfg.prompt_context_bigram:
            self.gen_cond_bigram = nn.Linear(cfg.prompt_context_window * d_llm, c_var)
            nn.init.zeros_(self.gen_cond_bigram.weight)
            nn.init.zeros_(self.gen_cond_bigram.bias)
        # model.prompt_encoder_layers: self-attention with positions over that context (identity at init)
        self.prompt_enc: Optional[nn.Module] = None
        if cfg.prompt_encoder_layers > 0:
            self.prompt_enc = PromptEncoder(c_var, cfg.var.num_heads, cfg.prompt_encoder_layers)
        if cfg.var_cond == "gen_start":
            last = [m for m in self.gen_cond.modules() if isinstance(m, nn.Linear)][-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        if cfg.var_skip:  # start as the bare pretrained VAR: its own inputs, nothing added yet
            last = [m for m in self.gen_out.modules() if isinstance(m, nn.Linear)][-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        if cfg.projector_dtype != "float32":
            dt = getattr(torch, cfg.projector_dtype)
            for proj in (self.und_proj, self.gen_in, self.gen_out, self.gen_cond, self.gen_cond_bigram):
                if proj is not None:
                    proj.to(dt)
        if cfg.var_dtype != "float32":
            self.var.to(getattr(torch, cfg.var_dtype))
        self.d_llm, self.c_var = d_llm, c_var
        # Whether training builds the graph into the LLM's generation inputs (gen_in of the VAR's
        # front end). Stages 1 and 3 turn it off with model.stage1/stage3_through_llm false: with nothing
        # trainable before the frozen LLM, autograd records no LLM op and skips its backward.
        self.grad_into_llm = True
        # Under sharding (modules/sharded.py) every rank must run the same sharded units each step
        # (each one gathers its parameters with the other ranks): then a batch without images or
        # without generation targets still runs the vision tower / the generation side on zero
        # samples, adding an exact 0 to the loss, instead of skipping them.
        self.run_every_part = False
        self.L = self.var.L
        self.patch_nums = tuple(self.var.patch_nums)

    # ------------------------------------------------------------------ properties
    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_tokens

    @property
    def image_token_id(self) -> int:
        return self.ids["image"]

    @property
    def gen_pad_id(self) -> int:
        return self.ids["gen_pad"]

    def collator_sizes(self) -> Dict[str, Any]:
        """What the data collator needs from the model (so YAML states it once)."""
        return {"num_image_tokens": self.num_image_tokens, "gen_num_tokens": self.L,
                "gen_patch_nums": list(self.patch_nums), "vq_fingerprint": self.vqvae.fingerprint()}

    def collator(self, data: Optional[DataConfig] = None, *, train: bool = False) -> Collator:
        """The one collator builder for this model: sizes from ``collator_sizes()``, the vision
        tower's input transform and the VQVAE's target transform, options (max_length,
        text_loss_on, overlong, seed, prompt_dropout, ...) from ``data`` (the schema defaults
        when None, with this model's chat template). ``train=False`` turns prompt dropout off:
        evaluation and diagnostics see every instruction."""
        data = data if data is not None else DataConfig(chat=self.template)
        s = self.collator_sizes()
        # prompt dropout only where it is the condition dropout (cond_dropout: label drops the VAR
        # label in forward instead, the prompt stays)
        drop = data.prompt_dropout if train and self.cfg.switch("cond_dropout") == "prompt" else 0.0
        data = replace(data, num_image_tokens=s["num_image_tokens"], gen_num_tokens=s["gen_num_tokens"],
                       prompt_dropout=drop)
        return Collator.from_config(data, self.tokenizer, self.vision.image_transform(),
                                    GenTransform(self.vqvae.cfg.resolution), gen_patch_nums=s["gen_patch_nums"],
                                    vq_fingerprint=s["vq_fingerprint"])

    def train(self, mode: bool = True):
        super().train(mode)
        self.vqvae.eval()  # frozen tokenizer: no dropout, no codebook bookkeeping
        return self

    # ------------------------------------------------------------------ building blocks
    def compile_blocks(self, dynamic: bool = True) -> int:
        """Compile (``torch.compile``, inductor) the training forward of each LLM decoder layer and
        each VAR block. What it buys is the fusion of the blocks' elementwise work (norms, RoPE,
        AdaLN modulation, residuals, GELU, the autocast casts) and the dispatch overhead; the
        matmuls and attention stay the same oneDNN kernels. Only a module in training mode runs
        the compiled forward: evaluation and sampling (eval mode, KV caches whose shapes change at
        every decoding step) stay eager, where each new cache shape would otherwise recompile.
        Parameters, names and state-dict keys are unchanged (the module keeps its class; the
        compiled function is not a submodule); a deep copy of a compiled model shares the original's
        forwards, so copy before compiling. ``dynamic``: one graph for every sequence length (a
        batch is padded to its longest row), so a run compiles once and a resumed run gets the same
        kernels whatever its first batch. Results agree with eager to float rounding. The first
        training step pays the compilation (benchmarks/results/train_step_vs_official.md: 38 s wall
        on 2 cores for the 125M model, cold cache) and it pays back over a long run;
        ``trainer.compile`` decides (experiments.config.compile_decision). Returns the number of
        modules compiled."""
        mods = list(self.llm.get_decoder().layers) + list(self.var.blocks)
        for m in mods:
            _compile_training_forward(m, dynamic)
        return len(mods)

    @torch.no_grad()
    def encode_targets(self, batch: Dict[str, Any]) -> List[torch.Tensor]:
        """Per-scale VQ indices of the batch's generation targets: pre-tokenized when the batch
        has them (fingerprint checked by the collator), else encoded now in fp32."""
        if batch.get("gen_indices") is not None:
            return [t.long() for t in batch["gen_indices"]]
        imgs = batch["gen_images"].float()
        with torch.autocast(device_type=imgs.device.type, enabled=False):
            return self.vqvae.img_to_idx(imgs)

    def gen_front_end(self, idx_list: Sequence[torch.Tensor], uncond_N: torch.Tensor) -> torch.Tensor:
        """Teacher-forcing front end of the VAR decoder for N targets -> (N, L, C_var)."""
        x_NLCv = self.vqvae.idx_to_var_input(idx_list)
        return self.var.front_end(uncond_N.long(), x_NLCv)

    def image_features(self, px_BCHW: torch.Tensor) -> torch.Tensor:
        """Understanding features (B, tokens, D) of images: vision tower, then projector."""
        return self.und_proj(self.vision(px_BCHW))

    def embed(self, batch: Dict[str, Any], with_gen: bool = True, insert_gen: bool = True,
              front_out: Optional[List[torch.Tensor]] = None):
        """LLM input embeddings (B, T, D) with image features and generation inputs scattered into
        their slots (row-major over (sample, position) = the collator's placeholder order).
        ``insert_gen=False`` leaves the <|image_gen_pad|> embeddings in place (the released
        mixed batch) but still returns the targets. ``front_out`` (a list) receives the VAR
        front end (N, L, C_var) of the targets (model.var_skip adds it to the block inputs).
        Returns (embeds, gen_mask (B,T) or None, idx_list or None, uncond (N,) or None)."""
        ids = batch["input_ids"]
        emb = self.llm.get_input_embeddings()(ids)
        img_mask = ids == self.image_token_id
        if img_mask.any():
            feats = batch.get("image_features")  # (n_images, tokens, D), already projected (scoring reuses them)
            if feats is None:
                px = batch.get("pixel_values")
                if px is None:
                    raise ValueError("batch has <image> slots but no pixel_values")
                feats = self.image_features(px.to(emb.dtype) if px.is_floating_point() else px)
            n_slots, n_feat = int(img_mask.sum()), feats.shape[0] * feats.shape[1]
            if n_slots != n_feat:
                raise ValueError(f"batch has {n_slots} <image> slots but {feats.shape[0]} images x "
                                 f"{feats.shape[1]} tokens = {n_feat} features: collator num_image_tokens "
                                 f"must equal the vision encoder's {self.num_image_tokens}")
            emb = emb.masked_scatter(img_mask.unsqueeze(-1), feats.to(emb.dtype))
        elif self.run_every_part and batch.get("image_features") is None:
            size = self.vision.image_size
            px = emb.new_zeros(0, 3, size, size)  # zero images: (0, tokens, D) features, sum exactly 0
            emb = emb + self.image_features(px).sum().to(emb.dtype)
        gen_mask = ids == self.gen_pad_id
        no_gen = not with_gen or not gen_mask.any()
        if no_gen and not (with_gen and self.run_every_part):
            return emb, None, None, None
        # no target here but the generation side runs anyway (run_every_part): zero targets, (0, pn*pn) per scale
        idx_list = [ids.new_zeros(0, pn * pn) for pn in self.patch_nums] if no_gen else self.encode_targets(batch)
        n_gen = idx_list[0].shape[0]
        uncond = batch.get("gen_uncond")
        uncond = torch.zeros(n_gen, dtype=torch.long, device=ids.device) if uncond is None else uncond.to(ids.device).long()
        if self.training and self.cfg.switch("cond_dropout") == "label" and self.cfg.cond_drop_rate > 0:
            # released: the VAR label becomes the null row, the prompt stays (global RNG, as released)
            drop = torch.rand(n_gen, device=ids.device) < self.cfg.cond_drop_rate
            uncond = torch.where(drop, torch.ones_like(uncond), uncond)
        if int(gen_mask.sum()) != n_gen * self.L:
            raise ValueError(f"batch has {int(gen_mask.sum())} {GEN_PAD} slots but {n_gen} targets x L={self.L}: "
                             f"collator gen_num_tokens must equal the VAR decoder's L")
        front = self.gen_front_end(self.noisy_inputs(idx_list), uncond) if insert_gen or front_out is not None else None
        if front_out is not None:
            front_out.append(front)
        if not insert_gen:
            return emb, gen_mask, idx_list, uncond
        gen_in = self.gen_in((front if self.grad_into_llm else front.detach()).to(emb.dtype))
        emb = emb.masked_scatter(gen_mask.unsqueeze(-1), gen_in.to(emb.dtype))
        return emb, gen_mask, idx_list, uncond

    def noisy_inputs(self, idx_list: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """model.gen_input_noise in training (``noisy_teacher_inputs``); unchanged in eval mode."""
        return noisy_teacher_inputs(idx_list, self.cfg.gen_input_noise if self.training else 0.0, self.var.V)

    def _first_slots(self, gen_mask_BT: torch.Tensor) -> torch.Tensor:
        """(N, 2): (row, position) of each target's first <|image_gen_pad|> slot."""
        slots = gen_mask_BT.nonzero()  # (N*L, 2), row-major = the targets' order
        return slots.view(-1, self.L, 2)[:, 0]

    def prompt_condition(self, h_BTD: torch.Tensor, gen_mask_BT: torch.Tensor) -> Optional[torch.Tensor]:
        """var_cond gen_start: gen_cond of the LLM state just before each target's first
        <|image_gen_pad|> slot (its <|image_gen_start|>) -> (N, C_var); else None."""
        if self.cfg.var_cond != "gen_start":
            return None
        first = self._first_slots(gen_mask_BT)
        h_start = h_BTD[first[:, 0], first[:, 1] - 1]  # (N, D)
        return self.project_cond(h_start)

    def prompt_context(self, h_BTD: torch.Tensor, gen_mask_BT: torch.Tensor,
                       attention_mask_BT: Optional[torch.Tensor],
                       emb_BTD: Optional[torch.Tensor] = None) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """var_cond prompt_attn: per target, gen_cond of the LLM states of its row before its
        first <|image_gen_pad|> slot (the prompt, up to and including <|image_gen_start|>) ->
        (ctx (N, P, C_var), keep (N, P)), P the longest such prefix; else None. ``emb_BTD``: the
        LLM's input embeddings of the same rows (needed with model.prompt_context_bigram)."""
        if self.cfg.var_cond != "prompt_attn":
            return None
        first = self._first_slots(gen_mask_BT)
        rows, ends = first[:, 0], first[:, 1]
        P = int(ends.max()) if ends.numel() else 1  # no target (run_every_part): (0, 1, C_var) of nothing
        keep = torch.arange(P, device=h_BTD.device).view(1, P) < ends.view(-1, 1)  # (N, P)
        if attention_mask_BT is not None:
            keep = keep & attention_mask_BT[rows, :P].bool()
        emb_NPD = None if emb_BTD is None else emb_BTD[rows, :P]
        return self.cross_context(h_BTD[rows, :P], keep, emb_NPD), keep

    def cross_context(self, h_NPD: torch.Tensor, keep_NP: torch.Tensor,
                      emb_NPD: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The VAR's cross-attention context from the LLM states of the prompt (N, P, D) ->
        (N, P, C_var): gen_cond, plus the map of each token with the ones before it (window
        model.prompt_context_window) with model.prompt_context_bigram (from the input embeddings
        ``emb_NPD``), then the prompt
        encoder when there is one (model.prompt_encoder_layers). Training (prompt_context) and
        generation share this; padding (``keep_NP`` false) may sit on either side."""
        ctx_NPC = self.project_cond(h_NPD)
        if self.gen_cond_bigram is not None:
            if emb_NPD is None:
                raise ValueError("model.prompt_context_bigram: cross_context needs the prompt's input embeddings")
            w = self.gen_cond_bigram.weight
            e_NPD = emb_NPD.to(w.dtype) * keep_NP.unsqueeze(-1).to(w.dtype)  # padding contributes nothing
            P, window = e_NPD.shape[1], w.shape[1] // e_NPD.shape[-1]
            # [e_t, e_t-1, ..., e_t-W+1]: the tokens before each position (zeros before the first)
            grams = [e_NPD] + [F.pad(e_NPD, (0, 0, k, 0))[:, :P] for k in range(1, window)]
            ctx_NPC = ctx_NPC + self.gen_cond_bigram(torch.cat(grams, dim=-1)).float()
        return ctx_NPC if self.prompt_enc is None else self.prompt_enc(ctx_NPC, keep_NP)

    def project_cond(self, h: torch.Tensor) -> torch.Tensor:
        """gen_cond of LLM states (..., D) -> (..., C_var) in fp32, whatever the projector dtype:
        the one projection training (prompt_condition / prompt_context) and generation share."""
        return self.gen_cond(h.to(next(self.gen_cond.parameters()).dtype)).float()

    def run_llm(self, embeds: torch.Tensor, attention_mask: Optional[torch.Tensor],
                gen_mask: Optional[torch.Tensor] = None, **kw):
        """Last-layer hidden states (after the final norm) of the decoder stack. ``gen_mask``
        (B, T): the <|image_gen_pad|> slots of these inputs, where model.gen_lora's deltas act
        (None: no such slot). Every LLM call goes through here so that the mask is this call's."""
        if self.gen_lora is not None:
            self.gen_lora.set_mask(gen_mask)
        return self.llm.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask, **kw)

    def llm_states(self, embeds_BTD: torch.Tensor, attention_mask_BT: Optional[torch.Tensor],
                   gen_mask_BT: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Training forward's last hidden states (B, T, D). With model.llm_length_groups > 1 and
        right-padded rows, the rows run in length-sorted groups, each cut to its own longest row;
        positions past a row's length come back as zeros (every reader masks them: the text loss by
        its labels, the prompt context by the attention mask, the VAR by its pad slots)."""
        groups = self._length_groups(attention_mask_BT)
        if groups is None:
            # use_cache=False: a frozen LLM is in eval mode, where HF would otherwise build a KV cache
            return self.run_llm(embeds_BTD, attention_mask_BT, gen_mask=gen_mask_BT, use_cache=False).last_hidden_state
        B, T, _ = embeds_BTD.shape
        parts, order = [], []
        for rows, n in groups:  # rows (b,) of this group, n its longest row
            h = self.run_llm(embeds_BTD[rows, :n], attention_mask_BT[rows, :n],
                             gen_mask=None if gen_mask_BT is None else gen_mask_BT[rows, :n],
                             use_cache=False).last_hidden_state  # (b, n, D)
            parts.append(F.pad(h, (0, 0, 0, T - n)))
            order.append(rows)
        inverse = torch.empty(B, dtype=torch.long, device=embeds_BTD.device)
        inverse[torch.cat(order)] = torch.arange(B, device=embeds_BTD.device)
        return torch.cat(parts)[inverse]  # (B, T, D) in the batch's row order

    def _length_groups(self, mask_BT: Optional[torch.Tensor]) -> Optional[List[Tuple[torch.Tensor, int]]]:
        """The split of llm_states: [(rows, longest), ...] over the rows sorted by length, chosen
        (exhaustively, O(k B^2)) to minimise the positions computed, sum of rows x longest; None
        for one call (a single group is best, the option is off, or the padding is not on the right)."""
        k = self.cfg.llm_length_groups
        if k <= 1 or mask_BT is None or mask_BT.shape[0] < 2:
            return None
        lens = mask_BT.sum(1)
        if not torch.equal(mask_BT.long().cumprod(1).sum(1), lens.long()):  # not right-padded: keep one call
            return None
        sorted_lens, perm = torch.sort(lens)
        L = sorted_lens.tolist()
        B = len(L)
        # cost[j][i]: fewest positions for the i shortest rows in j groups; cut[j][i] its last group's start
        INF = float("inf")
        cost = [[INF] * (B + 1) for _ in range(k + 1)]
        cut = [[0] * (B + 1) for _ in range(k + 1)]
        cost[0][0] = 0
        for j in range(1, k + 1):
            for i in range(1, B + 1):
                for p in range(j - 1, i):
                    c = cost[j - 1][p] + (i - p) * L[i - 1]
                    if c < cost[j][i]:
                        cost[j][i], cut[j][i] = c, p
        j = min(range(1, k + 1), key=lambda g: cost[g][B])
        if j == 1:
            return None
        groups, i = [], B
        while j > 0:
            p = cut[j][i]
            groups.append((perm[p:i], int(L[i - 1])))
            i, j = p, j - 1
        return groups[::-1]

    # ------------------------------------------------------------------ training forward
    def forward(self, batch: Dict[str, Any], return_logits: bool = False) -> Dict[str, torch.Tensor]:
        """Losses for a collated batch (see datamodules/collate.py for its keys).

        Returns loss, loss_text, loss_img, per-sample losses (loss_text_per_sample (B,),
        loss_img_per_target (N,)), per-scale image accuracy acc_img_scale (K,), token counts;
        with return_logits also logits_text (B, T-1, V) and logits_img (N, L, V)."""
        # sharded runs (run_every_part) may recompute layers in the backward: see training_attention
        recomputed = self.run_every_part or is_gradient_checkpointing(self.llm)
        with training_attention(batch["input_ids"].device.type, recomputed):
            return self._forward(batch, return_logits)

    def _forward(self, batch: Dict[str, Any], return_logits: bool) -> Dict[str, torch.Tensor]:
        insert = True
        if self.cfg.switch("mixed_batches") == "released" and batch.get("pixel_values") is not None \
                and (batch["input_ids"] == self.image_token_id).any():
            # released if/elif: a batch with input images gets no VAR inputs in its pad slots, yet
            # its image loss is computed on the LLM states there
            insert = False
        front: List[torch.Tensor] = []
        emb, gen_mask, idx_list, uncond = self.embed(batch, insert_gen=insert,
                                                     front_out=front if self.cfg.var_skip else None)
        h = self.llm_states(emb, batch.get("attention_mask"), gen_mask)  # (B, T, D)
        out: Dict[str, torch.Tensor] = {}

        # text: next-token CE on supervised positions
        labels = batch["labels"]
        if gen_mask is not None and self.cfg.switch("text_labels") == "released":
            labels = released_text_labels(batch["input_ids"], self.gen_pad_id)
        tgt = labels[:, 1:]
        valid = (tgt != IGNORE_INDEX)
        head = self.llm.get_output_embeddings()
        if return_logits:
            logits = head(h[:, :-1])  # (B, T-1, V)
            out["logits_text"] = logits
            ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                 ignore_index=IGNORE_INDEX, reduction="none").view_as(tgt)
        else:
            # the head and its CE on the supervised positions only (VQA: the answer's few tokens of
            # ~120): the same per-position losses, without (B, T-1, V) logits in float32; fused
            # (linear_ce: no logits kept, ~40 ms less per step at 400 rows x 32k vocab)
            ce = h.new_zeros(tgt.shape, dtype=torch.float32)
            ce[valid] = linear_cross_entropy(h[:, :-1][valid], head.weight, head.bias, tgt[valid])
        n_tok = valid.sum(1)
        out["loss_text_per_sample"] = ce.sum(1) / n_tok.clamp(min=1)
        out["loss_text"] = ce.sum() / n_tok.sum().clamp(min=1)
        out["n_text_tokens"] = n_tok.sum()

        # image: VAR blocks on the LLM states at the L pad positions of each target
        if gen_mask is not None:
            n_gen = idx_list[0].shape[0]
            h_gen = h[gen_mask].view(n_gen, self.L, self.d_llm)
            h_var = self.gen_out(h_gen)  # (N, L, C_var)
            if self.cfg.var_skip:  # the residual around the LLM (model.var_skip)
                h_var = h_var + front[0].to(h_var.dtype)
            logits_img = self.var.forward_blocks(h_var, uncond, self.prompt_condition(h, gen_mask),
                                                 self.prompt_context(h, gen_mask, batch.get("attention_mask"), emb))  # (N, L, V)
            target = torch.cat(list(idx_list), dim=1)
            ce_img = F.cross_entropy(logits_img.float().reshape(-1, logits_img.shape[-1]), target.reshape(-1),
                                     reduction="none").view(n_gen, self.L)
            if return_logits:
                out["logits_img"] = logits_img
            out["loss_img_per_target"] = ce_img.mean(1)
            # zero targets (run_every_part): an exact 0 still connected to the generation side's graph
            out["loss_img"] = ce_img.mean() if n_gen else ce_img.sum()
            with torch.no_grad():
                hit = (logits_img.argmax(-1) == target).float()
                out["acc_img_scale"] = torch.stack([hit[:, b:e].mean() for b, e in self.var.begin_ends])
                out["acc_img"] = hit.mean()
            out["n_img_tokens"] = torch.tensor(n_gen * self.L, device=h.device)
        else:
            # keep the graph connected to every trainable parameter set (DDP) at zero cost
            out["loss_img"] = h.new_zeros(())
            out["n_img_tokens"] = torch.tensor(0, device=h.device)
        img_obj = out["loss_img"]
        if gen_mask is not None and self.cfg.img_loss_weighting == "scale" and n_gen:  # each scale alike
            img_obj = torch.stack([ce_img[:, b:e].mean() for b, e in self.var.begin_ends]).mean()
        out["loss"] = out["loss_text"] + self.cfg.w_img * img_obj
        return out
