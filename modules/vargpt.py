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

Inference:
  answer(images, questions)       batched greedy / sampled decoding with the LLM's KV cache
  generate_image(prompts, ...)    forced <|image_gen_start|>, then per scale one LLM chunk and one
                                  VAR step, both KV-cached; classifier-free guidance from a real
                                  unconditional pass (the null prompt the model was trained with)
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from datamodules.config import ChatTemplateConfig
from datamodules.tokens import GEN_PAD, IGNORE_INDEX, IMAGE_TOKEN
from modules.components.llm import build_llm, llm_hidden_size
from modules.components.projectors import build_projector
from modules.components.text_tokenizer import build_tokenizer, special_token_ids
from modules.components.var_decoder import build_var
from modules.components.vision_encoders import build_vision_encoder
from modules.components.vqvae import build_vqvae
from modules.config import ModelConfig


class VARGPT(nn.Module):
    """Submodules (the names stages and `load:` refer to): vision, und_proj, llm, gen_in, gen_out,
    vqvae (always frozen, fp32), var."""

    def __init__(self, cfg: ModelConfig, tokenizer: Any = None, template: Optional[ChatTemplateConfig] = None):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer if tokenizer is not None else build_tokenizer(cfg.tokenizer)
        self.template = template or ChatTemplateConfig()
        self.ids = special_token_ids(self.tokenizer)
        self.vision = build_vision_encoder(cfg.vision)
        self.llm = build_llm(cfg.llm, len(self.tokenizer))
        d_llm = llm_hidden_size(self.llm)
        self.und_proj = build_projector(replace(cfg.und_projector, in_dim=self.vision.out_dim, out_dim=d_llm))
        self.vqvae = build_vqvae(cfg.vqvae)
        self.vqvae.requires_grad_(False)
        self.var = build_var(cfg.var, self.vqvae)
        c_var = self.var.C
        self.gen_in = build_projector(replace(cfg.gen_in_projector, in_dim=c_var, out_dim=d_llm))
        self.gen_out = build_projector(replace(cfg.gen_out_projector, in_dim=d_llm, out_dim=c_var))
        self.d_llm, self.c_var = d_llm, c_var
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

    def collator(self, **kw: Any):
        """A Collator in the training layout for this model: sizes from collator_sizes(), the
        vision tower's input transform and the VQVAE's target transform (kw: Collator options)."""
        from datamodules.collate import Collator
        from datamodules.transforms import GenTransform

        s = self.collator_sizes()
        return Collator(self.tokenizer, s["num_image_tokens"], s["gen_num_tokens"], self.vision.image_transform(),
                        GenTransform(self.vqvae.cfg.resolution), template=self.template,
                        gen_patch_nums=s["gen_patch_nums"], vq_fingerprint=s["vq_fingerprint"], **kw)

    def train(self, mode: bool = True):
        super().train(mode)
        self.vqvae.eval()  # frozen tokenizer: no dropout, no codebook bookkeeping
        return self

    # ------------------------------------------------------------------ building blocks
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

    def embed(self, batch: Dict[str, Any], with_gen: bool = True):
        """LLM input embeddings (B, T, D) with image features and generation inputs scattered into
        their slots (row-major over (sample, position) = the collator's placeholder order).
        Returns (embeds, gen_mask (B,T) or None, idx_list or None, uncond (N,) or None)."""
        ids = batch["input_ids"]
        emb = self.llm.get_input_embeddings()(ids)
        img_mask = ids == self.image_token_id
        if img_mask.any():
            px = batch.get("pixel_values")
            if px is None:
                raise ValueError("batch has <image> slots but no pixel_values")
            feats = self.und_proj(self.vision(px.to(emb.dtype) if px.is_floating_point() else px))
            n_slots, n_feat = int(img_mask.sum()), feats.shape[0] * feats.shape[1]
            if n_slots != n_feat:
                raise ValueError(f"batch has {n_slots} <image> slots but {feats.shape[0]} images x "
                                 f"{feats.shape[1]} tokens = {n_feat} features: collator num_image_tokens "
                                 f"must equal the vision encoder's {self.num_image_tokens}")
            emb = emb.masked_scatter(img_mask.unsqueeze(-1), feats.to(emb.dtype))
        gen_mask = ids == self.gen_pad_id
        if not with_gen or not gen_mask.any():
            return emb, None, None, None
        idx_list = self.encode_targets(batch)
        n_gen = idx_list[0].shape[0]
        uncond = batch.get("gen_uncond")
        uncond = torch.zeros(n_gen, dtype=torch.long, device=ids.device) if uncond is None else uncond.to(ids.device).long()
        if int(gen_mask.sum()) != n_gen * self.L:
            raise ValueError(f"batch has {int(gen_mask.sum())} {GEN_PAD} slots but {n_gen} targets x L={self.L}: "
                             f"collator gen_num_tokens must equal the VAR decoder's L")
        gen_in = self.gen_in(self.gen_front_end(idx_list, uncond).to(emb.dtype))
        emb = emb.masked_scatter(gen_mask.unsqueeze(-1), gen_in.to(emb.dtype))
        return emb, gen_mask, idx_list, uncond

    def run_llm(self, embeds: torch.Tensor, attention_mask: Optional[torch.Tensor], **kw):
        """Last-layer hidden states (after the final norm) of the decoder stack."""
        out = self.llm.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask, **kw)
        return out

    # ------------------------------------------------------------------ training forward
    def forward(self, batch: Dict[str, Any], return_logits: bool = False) -> Dict[str, torch.Tensor]:
        """Losses for a collated batch (see datamodules/collate.py for its keys).

        Returns loss, loss_text, loss_img, per-sample losses (loss_text_per_sample (B,),
        loss_img_per_target (N,)), per-scale image accuracy acc_img_scale (K,), token counts."""
        with_gen = True
        if self.cfg.mixed_batches == "released" and batch.get("pixel_values") is not None \
                and (batch["input_ids"] == self.image_token_id).any():
            with_gen = False  # released if/elif: a batch with input images never trains generation
        emb, gen_mask, idx_list, uncond = self.embed(batch, with_gen=with_gen)
        h = self.run_llm(emb, batch.get("attention_mask")).last_hidden_state  # (B, T, D)
        out: Dict[str, torch.Tensor] = {}

        # text: next-token CE on supervised positions
        labels = batch["labels"]
        logits = self.llm.get_output_embeddings()(h[:, :-1])  # (B, T-1, V)
        tgt = labels[:, 1:]
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                             ignore_index=IGNORE_INDEX, reduction="none").view_as(tgt)
        valid = (tgt != IGNORE_INDEX)
        n_tok = valid.sum(1)
        out["loss_text_per_sample"] = ce.sum(1) / n_tok.clamp(min=1)
        out["loss_text"] = ce.sum() / n_tok.sum().clamp(min=1)
        out["n_text_tokens"] = n_tok.sum()

        # image: VAR blocks on the LLM states at the L pad positions of each target
        if gen_mask is not None:
            n_gen = idx_list[0].shape[0]
            h_gen = h[gen_mask].view(n_gen, self.L, self.d_llm)
            h_var = self.gen_out(h_gen)
            logits_img = self.var.forward_blocks(h_var, uncond)  # (N, L, V)
            target = torch.cat(list(idx_list), dim=1)
            ce_img = F.cross_entropy(logits_img.float().reshape(-1, logits_img.shape[-1]), target.reshape(-1),
                                     reduction="none").view(n_gen, self.L)
            if return_logits:
                out["logits_img"] = logits_img
            out["loss_img_per_target"] = ce_img.mean(1)
            out["loss_img"] = ce_img.mean()
            with torch.no_grad():
                hit = (logits_img.argmax(-1) == target).float()
                out["acc_img_scale"] = torch.stack([hit[:, b:e].mean() for b, e in self.var.begin_ends])
                out["acc_img"] = hit.mean()
            out["n_img_tokens"] = torch.tensor(n_gen * self.L, device=h.device)
        else:
            # keep the graph connected to every trainable parameter set (DDP) at zero cost
            out["loss_img"] = h.new_zeros(())
            out["n_img_tokens"] = torch.tensor(0, device=h.device)
        out["loss"] = out["loss_text"] + self.cfg.w_img * out["loss_img"]
        return out

    # ------------------------------------------------------------------ prompts
    def _prompt_encoder(self):
        from datamodules.collate import Collator

        if getattr(self, "_collator", None) is None:
            self._collator = Collator(self.tokenizer, num_image_tokens=self.num_image_tokens, gen_num_tokens=self.L,
                                      image_transform=lambda im: im, gen_transform=lambda im: im,
                                      template=self.template)
        return self._collator

    def _left_pad(self, seqs: List[List[int]], device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-pad prompts so all end at the same position (new chunks append to every row at
        once). Returns ids (B,T), attention_mask (B,T), position_ids (B,T) counting real tokens."""
        T = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(seqs), T), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, T - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, T - len(s):] = 1
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        return ids.to(device), mask.to(device), pos.to(device)

    # ------------------------------------------------------------------ answer()
    @torch.no_grad()
    def answer(self, images: Sequence[Any], questions: Sequence[str], max_new_tokens: int = 16,
               do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 0.0,
               seed: int = 0, use_cache: bool = True, pixel_values: Optional[torch.Tensor] = None) -> List[str]:
        """Batched answers to questions about images (one image per question, or None for a
        text-only question). `images` are PIL images (the vision encoder's transform is applied)
        unless `pixel_values` (N_img, 3, H, W) are given for the non-None ones."""
        device = next(self.llm.parameters()).device
        enc = self._prompt_encoder()
        seqs, px = [], []
        tf = self.vision.image_transform()
        for im, q in zip(images, questions):
            content = f"{IMAGE_TOKEN}\n{q}" if im is not None else q
            seqs.append(enc.encode_prompt([{"role": "user", "content": content}]))
            if im is not None and pixel_values is None:
                px.append(tf(im))
        ids, mask, pos = self._left_pad(seqs, device)
        batch = {"input_ids": ids}
        if pixel_values is not None:
            batch["pixel_values"] = pixel_values.to(device)
        elif px:
            batch["pixel_values"] = torch.stack(px).to(device)
        emb, _, _, _ = self.embed(batch, with_gen=False)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        eos = self.tokenizer.eos_token_id
        B = ids.shape[0]
        out_ids: List[List[int]] = [[] for _ in range(B)]
        done = torch.zeros(B, dtype=torch.bool, device=device)
        embed_fn = self.llm.get_input_embeddings()
        head = self.llm.get_output_embeddings()
        cache = None
        cur_emb, cur_mask, cur_pos = emb, mask, pos
        all_emb = emb
        for step in range(max_new_tokens):
            if use_cache:
                from transformers import DynamicCache

                if cache is None:
                    cache = DynamicCache()
                o = self.run_llm(cur_emb, cur_mask, position_ids=cur_pos, cache=cache, use_cache=True)
            else:
                o = self.run_llm(all_emb, cur_mask, position_ids=(cur_mask.cumsum(1) - 1).clamp(min=0))
            logits = head(o.last_hidden_state[:, -1]).float()  # (B, V)
            nxt = self._pick(logits, do_sample, temperature, top_k, top_p, gen)
            for i in range(B):
                if not done[i]:
                    if eos is not None and int(nxt[i]) == eos:
                        done[i] = True
                    else:
                        out_ids[i].append(int(nxt[i]))
            if bool(done.all()):
                break
            new_emb = embed_fn(nxt.to(device).view(B, 1))
            new_pos = (pos[:, -1:] + step + 1) if use_cache else None
            cur_mask = torch.cat([cur_mask, torch.ones(B, 1, dtype=cur_mask.dtype, device=device)], 1)
            if use_cache:
                cur_emb, cur_pos = new_emb, new_pos
            else:
                all_emb = torch.cat([all_emb, new_emb], 1)
        return [self.tokenizer.decode(o, skip_special_tokens=True).strip() for o in out_ids]

    @staticmethod
    def _pick(logits_BV: torch.Tensor, do_sample: bool, temperature: float, top_k: int, top_p: float,
              gen: torch.Generator) -> torch.Tensor:
        if not do_sample:
            return logits_BV.argmax(-1)
        from modules.components.var_sampling import sample_top_k_top_p

        x = (logits_BV / max(temperature, 1e-6)).cpu().unsqueeze(1)
        return sample_top_k_top_p(x, top_k=top_k, top_p=top_p, generator=gen).view(-1).to(logits_BV.device)

    # ------------------------------------------------------------------ generate_image()
    @torch.no_grad()
    def generate_image(self, prompts: Sequence[str], cfg: float = 3.0, top_k: int = 0, top_p: float = 0.0,
                       temperature: float = 1.0, seed: Union[int, Sequence[int]] = 0,
                       return_indices: bool = False, teacher_idx: Optional[Sequence[torch.Tensor]] = None,
                       logits_out: Optional[List[torch.Tensor]] = None):
        """Images (B, 3, H, W) in [0, 1] for text prompts.

        The prompt is the chat template up to "ASSISTANT:" followed by a forced
        <|image_gen_start|>; the conditional rows use the prompts, the unconditional rows the
        null prompt the model saw under prompt dropout (`cfg_uncond: null_prompt`), or Gaussian
        noise in place of their LLM states (`cfg_uncond: noise`, the released behaviour).
        Per scale k: the VAR front-end chunk -> gen_in -> LLM (KV cache) -> gen_out -> VAR blocks
        (KV cache) -> guided logits -> top-k / top-p -> indices. `seed` is one int for the batch
        or one per prompt; with per-prompt seeds a prompt's image does not depend on its batch.
        `teacher_idx` (per-scale indices) replaces sampling and `logits_out` collects the raw
        per-scale logits (2B, l, V): the check that inference computes what training trained.
        """
        from datamodules.collate import generation_prompt, null_generation_prompt
        from transformers import DynamicCache

        B = len(prompts)
        device = next(self.llm.parameters()).device
        enc = self._prompt_encoder()
        start = self.ids["gen_start"]

        def encode(text: str) -> List[int]:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            bos = [self.tokenizer.bos_token_id] if enc.bos_id is not None else []
            return bos + list(ids) + [start]

        cond_seqs = [encode(generation_prompt(p, self.template)) for p in prompts]
        uncond_seqs = [encode(null_generation_prompt(self.template))] * B
        ids, mask, pos = self._left_pad(cond_seqs + uncond_seqs, device)
        emb = self.llm.get_input_embeddings()(ids)
        cache = DynamicCache()
        self.run_llm(emb, mask, position_ids=pos, cache=cache, use_cache=True)
        state = {"mask": mask, "next_pos": pos[:, -1:] + 1}
        noise_gen = torch.Generator(device="cpu").manual_seed(int(seed if isinstance(seed, int) else seed[0]) + 7919)

        def step_hook(si: int, x_2BlC: torch.Tensor) -> torch.Tensor:
            l = x_2BlC.shape[1]
            m = torch.cat([state["mask"], torch.ones(2 * B, l, dtype=state["mask"].dtype, device=device)], 1)
            p = state["next_pos"] + torch.arange(l, device=device).view(1, l)
            e = self.gen_in(x_2BlC.to(emb.dtype))
            h = self.run_llm(e, m, position_ids=p, cache=cache, use_cache=True).last_hidden_state
            state["mask"], state["next_pos"] = m, p[:, -1:] + 1
            if self.cfg.cfg_uncond == "noise":
                h = h.clone()
                h[B:] = torch.randn(h[B:].shape, generator=noise_gen).to(h)
            return self.gen_out(h).to(x_2BlC.dtype)

        if isinstance(seed, int):
            generator: Any = torch.Generator(device="cpu").manual_seed(seed)
        else:
            if len(seed) != B:
                raise ValueError(f"generate_image: {len(seed)} seeds for {B} prompts")
            generator = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seed]
        idx_list, img = self.var.sample(B, cond=None, cfg=cfg, top_k=top_k, top_p=top_p, temperature=temperature,
                                        generator=generator, step_hook=step_hook, vqvae=self.vqvae,
                                        teacher_idx=teacher_idx, logits_out=logits_out)
        return (img, idx_list) if return_indices else img
