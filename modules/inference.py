"""Inference on the composed model: batched answers and batched image generation.

``VARGPTInference`` is mixed into ``modules.vargpt.VARGPT``, so ``net.answer(...)`` and
``net.generate_image(...)`` work on any VARGPT; it holds only decoding loops and prompt
building, never parameters.

  answer(images, questions)       batched greedy / sampled decoding with the LLM's KV cache
  generate(prompt_ids, ...)       <|image_gen_start|> forced or (released) decoded greedily, then per
                                  scale one LLM chunk and one VAR step, both KV-cached; guidance
                                  from a real unconditional pass (the null prompt the model was
                                  trained with) or (released) noise states
  generate_image(prompts, ...)    the same from text prompts (the chat template applied)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from transformers import DynamicCache

from datamodules.collate import Collator, null_generation_messages
from datamodules.tokens import GEN_START, IMAGE_TOKEN
from modules.components.var_sampling import sample_top_k_top_p

log = logging.getLogger(__name__)


@dataclass
class Generation:
    """What ``generate`` returns. output_ids: per prompt the released ``generate()``'s sequence
    (the context up to and including <|image_gen_start|>, then the token after it, twice, as the
    official loop appends it before and after the image pass); images (B, 3, H, W) in [0, 1];
    indices: per scale (B, pn^2); started: whether the model emitted <|image_gen_start|> itself
    (always True with gen_start forced)."""

    output_ids: List[List[int]]
    images: torch.Tensor
    indices: List[torch.Tensor]
    started: List[bool]


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
    def _sampling_defaults(self, cfg, top_k, top_p) -> Tuple[float, int, float]:
        c = self.cfg
        return (float(c.switch("sample_cfg") if cfg is None else cfg), int(c.switch("sample_top_k") if top_k is None else top_k),
                float(c.switch("sample_top_p") if top_p is None else top_p))

    def _greedy_until(self, seqs: List[List[int]], stop_id: int, max_new_tokens: int) -> List[Tuple[List[int], bool]]:
        """Greedy text decoding (KV cache) of each prompt until it emits ``stop_id`` (included),
        EOS or ``max_new_tokens``: [(new ids, emitted stop_id?)] per prompt."""
        device = next(self.llm.parameters()).device
        ids, mask, pos = self._left_pad(seqs, device)
        B = len(seqs)
        out: List[List[int]] = [[] for _ in range(B)]
        done = [False] * B
        hit = [False] * B
        eos = self.tokenizer.eos_token_id
        cache = DynamicCache()
        emb = self.llm.get_input_embeddings()(ids)
        cur_pos = pos
        for step in range(max_new_tokens):
            h = self.run_llm(emb, mask, position_ids=cur_pos, cache=cache, use_cache=True).last_hidden_state
            nxt = self.llm.get_output_embeddings()(h[:, -1]).float().argmax(-1)
            for i in range(B):
                if not done[i]:
                    t = int(nxt[i])
                    if t == eos:
                        done[i] = True
                        continue
                    out[i].append(t)
                    if t == stop_id:
                        done[i] = hit[i] = True
            if all(done):
                break
            emb = self.llm.get_input_embeddings()(nxt.view(B, 1))
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=device)], 1)
            cur_pos = pos[:, -1:] + step + 1
        return list(zip(out, hit))

    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[Sequence[int]], cfg: Optional[float] = None, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, temperature: float = 1.0, seed: Union[int, Sequence[int]] = 0,
                 teacher_idx: Optional[Sequence[torch.Tensor]] = None,
                 logits_out: Optional[List[torch.Tensor]] = None, parity: Optional[bool] = None,
                 sampler: str = "auto", dtype: str = "auto") -> Generation:
        """Image generation from prompts given as token ids (chat template applied, BOS included).

        gen_start (switch): ``forced`` appends <|image_gen_start|> to each prompt; ``greedy`` (the
        released code) decodes greedily until the model emits it (at most gen_start_max_tokens;
        a prompt that never does is forced and marked ``started=False``). The image is then
        generated from the LLM states after that context, per scale: the VAR front-end chunk ->
        gen_in -> LLM (KV cache) -> gen_out -> VAR blocks (KV cache) -> guided logits -> top-k /
        top-p -> indices. Guidance's unconditional half: the null prompt (cfg_uncond null_prompt)
        or Gaussian noise in place of its LLM states (noise: the LLM runs on the conditional rows
        only; cfg_noise_rng sampler draws the noise from the sampling generator right before that
        scale's draw, the official order). infer_cond_row null: both halves use the VAR null
        condition row (released). cfg / top_k / top_p default to the model's sample_* switches.
        `seed` is one int for the batch or one per prompt (a prompt's image then does not depend
        on its batch). `teacher_idx` replaces sampling, `logits_out` collects the raw per-scale
        logits (2B, l, V).

        Speed (``VARDecoder.sample``): outside parity mode the VAR draws with the fast sampler
        (top-k candidates, one uniform per row) in the dtype measured best for its width
        (``default_sampling_dtype``); parity mode keeps the official draws in fp32. ``parity``
        None means parity for the released behaviour and for teacher-forced checks, else fast;
        ``sampler`` / ``dtype`` override either."""
        cfg, top_k, top_p = self._sampling_defaults(cfg, top_k, top_p)
        c = self.cfg
        B = len(prompt_ids)
        device = next(self.llm.parameters()).device
        start = self.ids["gen_start"]
        seqs = [list(map(int, s)) for s in prompt_ids]
        if c.switch("gen_start") == "greedy":
            decoded = self._greedy_until(seqs, start, c.gen_start_max_tokens)
            ctx = [s + new if hit else s + [start] for s, (new, hit) in zip(seqs, decoded)]
            started = [hit for _, hit in decoded]
        else:
            ctx, started = [s + [start] for s in seqs], [True] * B
        if not all(started):
            log.warning("generate: %d of %d prompt(s) never emitted %s within %d tokens; forced it after the prompt",
                        B - sum(started), B, GEN_START, c.gen_start_max_tokens)
        noise = c.switch("cfg_uncond") == "noise"
        rows = B if noise else 2 * B
        uncond = [] if noise else [self._prompt_encoder().encode_prompt(null_generation_messages()[:1]) + [start]] * B
        ids, mask, pos = self._left_pad(ctx + uncond, device)
        emb = self.llm.get_input_embeddings()(ids)
        cache = DynamicCache()
        h0 = self.run_llm(emb, mask, position_ids=pos, cache=cache, use_cache=True).last_hidden_state
        after = self.llm.get_output_embeddings()(h0[:B, -1]).float().argmax(-1).tolist()
        state = {"mask": mask, "next_pos": pos[:, -1:] + 1}

        if isinstance(seed, int):
            generator: Any = torch.Generator(device="cpu").manual_seed(seed)
        else:
            if len(seed) != B:
                raise ValueError(f"generate: {len(seed)} seeds for {B} prompts")
            generator = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seed]
        own_rng = torch.Generator(device="cpu").manual_seed(int(seed if isinstance(seed, int) else seed[0]) + 7919)

        def draw_noise(shape, dtype) -> torch.Tensor:
            if c.switch("cfg_noise_rng") == "own":
                return torch.randn(shape, generator=own_rng, dtype=dtype)
            if isinstance(generator, list):
                return torch.stack([torch.randn(shape[1:], generator=g, dtype=dtype) for g in generator])
            return torch.randn(shape, generator=generator, dtype=dtype)

        def step_hook(si: int, x_2BlC: torch.Tensor) -> torch.Tensor:
            l = x_2BlC.shape[1]
            m = torch.cat([state["mask"], torch.ones(rows, l, dtype=state["mask"].dtype, device=device)], 1)
            p = state["next_pos"] + torch.arange(l, device=device).view(1, l)
            e = self.gen_in(x_2BlC[:rows].to(emb.dtype))
            # every position of this chunk is an image slot (model.gen_lora acts on all of them)
            slots = torch.ones(e.shape[:2], device=device) if self.gen_lora is not None else None
            h = self.run_llm(e, m, gen_mask=slots, position_ids=p, cache=cache, use_cache=True).last_hidden_state
            state["mask"], state["next_pos"] = m, p[:, -1:] + 1
            if noise:
                h = torch.cat([h, draw_noise(tuple(h.shape), h.dtype).to(h.device)])
            out = self.gen_out(h).to(x_2BlC.dtype)
            return out + x_2BlC if c.var_skip else out  # model.var_skip: the residual around the LLM

        cond_extra = context = None
        if self.gen_cond is not None and noise:
            raise ValueError(f"model.var_cond={c.var_cond} needs model.cfg_uncond=null_prompt")
        if c.var_cond == "gen_start":  # the state at <|image_gen_start|> (the last position), 2B rows
            cond_extra = self.project_cond(h0[:, -1])
        elif c.var_cond == "prompt_attn":  # every (left-padded) prompt state, 2B rows
            context = (self.cross_context(h0, mask.bool(), emb), mask.bool())
        cond_row = torch.full((B,), self.var.null_cond if c.switch("infer_cond_row") == "null" else 0, dtype=torch.long)
        if parity is None:
            parity = c.behaviour == "released" or teacher_idx is not None or logits_out is not None
        idx_list, img = self.var.sample(B, cond=cond_row, cfg=cfg, top_k=top_k, top_p=top_p, temperature=temperature,
                                        generator=generator, step_hook=step_hook, vqvae=self.vqvae,
                                        teacher_idx=teacher_idx, logits_out=logits_out,
                                        parity=parity, sampler=sampler, dtype=dtype, cond_extra=cond_extra, context=context)
        out_ids = [s + [a, a] for s, a in zip(ctx, after)]
        return Generation(out_ids, img, idx_list, started)

    def generation_prompt_ids(self, prompts: Sequence[str]) -> List[List[int]]:
        """Token ids of generation prompts: the chat template up to "ASSISTANT:", BOS first."""
        enc = self._prompt_encoder()
        return [enc.encode_prompt([{"role": "user", "content": p}]) for p in prompts]

    @torch.no_grad()
    def generate_image(self, prompts: Sequence[str], cfg: Optional[float] = None, top_k: Optional[int] = None,
                       top_p: Optional[float] = None, temperature: float = 1.0, seed: Union[int, Sequence[int]] = 0,
                       return_indices: bool = False, teacher_idx: Optional[Sequence[torch.Tensor]] = None,
                       logits_out: Optional[List[torch.Tensor]] = None, parity: Optional[bool] = None,
                       sampler: str = "auto", dtype: str = "auto"):
        """Images (B, 3, H, W) in [0, 1] for text prompts (the chat template applied); see
        ``generate`` for the switches and arguments."""
        out = self.generate(self.generation_prompt_ids(prompts), cfg=cfg, top_k=top_k, top_p=top_p,
                            temperature=temperature, seed=seed, teacher_idx=teacher_idx, logits_out=logits_out,
                            parity=parity, sampler=sampler, dtype=dtype)
        return (out.images, out.indices) if return_indices else out.images
