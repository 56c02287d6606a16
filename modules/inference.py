"""Inference on the composed model: batched answers and batched image generation.

``VARGPTInference`` is mixed into ``modules.vargpt.VARGPT``, so ``net.answer(...)`` and
``net.generate_image(...)`` work on any VARGPT; it holds only decoding loops and prompt
building, never parameters.

  answer(images, questions)       batched greedy / sampled decoding with the LLM's KV cache
  generate_image(prompts, ...)    forced <|image_gen_start|>, then per scale one LLM chunk and one
                                  VAR step, both KV-cached; classifier-free guidance from a real
                                  unconditional pass (the null prompt the model was trained with)
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from transformers import DynamicCache

from datamodules.collate import Collator, generation_prompt, null_generation_prompt
from datamodules.tokens import IMAGE_TOKEN
from modules.components.var_sampling import sample_top_k_top_p


class VARGPTInference:
    """Decoding loops over a VARGPT's parts (``llm``, ``vision``, ``gen_in``, ``gen_out``, ``var``,
    ``vqvae``, ``tokenizer``, ``template``); see modules/vargpt.py for the training forward."""

    # ------------------------------------------------------------------ prompts
    def _prompt_encoder(self) -> Collator:
        """The model's own collator (``VARGPT.collator``): prompts are encoded exactly as the
        training text was."""
        if getattr(self, "_collator", None) is None:
            self._collator = self.collator()
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
