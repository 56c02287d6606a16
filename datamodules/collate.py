"""Collation: decoded samples -> model batch (token ids with expanded image spans, masks, pixels).

Per sample (Vicuna-v1 template by default, see ChatTemplateConfig):

    [BOS] {system} USER: <image>\n{question} ASSISTANT: {answer}</s>USER: ... ASSISTANT:<gen span></s>

  <image>      -> num_image_tokens x IMAGE_TOKEN id          labels -100
  <image_gen>  -> GEN_START + L x GEN_PAD + GEN_END           GEN_START supervised (an answer
                                                              token), pads and GEN_END -100
  answers + their EOS: supervised; everything else -100 (text_loss_on="answers").
  text_loss_on="all_tokens" (released behaviour, generation samples only): every text token of
  the sample is supervised; image slots and pads still are not. Batch padding never is, so a
  sample's loss does not depend on what it is batched with.

The whole conversation string is tokenized in one call and supervision is assigned from
character offsets, so tokens at segment joins are what the tokenizer produces at inference
(`build_prompt` gives the same text up to "ASSISTANT:"). When an answer starts with a
placeholder no space follows "ASSISTANT:", so generation training matches inference, which
forces GEN_START right after the prompt.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from datamodules.config import ChatTemplateConfig, DataConfig, TEXT_LOSS_ON
from datamodules.tokens import GEN_END, GEN_PAD, GEN_START, IGNORE_INDEX, IMAGE_GEN_PLACEHOLDER, IMAGE_TOKEN

log = logging.getLogger(__name__)
_PH_RE = re.compile(re.escape(IMAGE_TOKEN) + "|" + re.escape(IMAGE_GEN_PLACEHOLDER))

# The unconditional branch: the instruction is dropped to an empty user message. Training
# (prompt dropout) and inference (the CFG unconditional pass) both build it from here.
NULL_PROMPT = ""


def null_generation_messages(num_targets: int = 1) -> List[Dict[str, str]]:
    """Conversation of a dropped (unconditional) generation sample, answer included."""
    return [
        {"role": "user", "content": NULL_PROMPT},
        {"role": "assistant", "content": IMAGE_GEN_PLACEHOLDER * num_targets},
    ]


def null_generation_prompt(template: Optional[ChatTemplateConfig] = None) -> str:
    """Prompt text (up to "ASSISTANT:") of the unconditional pass; append GEN_START to generate."""
    return build_prompt([{"role": "user", "content": NULL_PROMPT}], template)


def generation_prompt(instruction: str, template: Optional[ChatTemplateConfig] = None) -> str:
    """Prompt text of a conditional generation request; append GEN_START to generate."""
    return build_prompt([{"role": "user", "content": instruction}], template)


def released_text_labels(input_ids: torch.Tensor, gen_pad_id: int) -> torch.Tensor:
    """The text labels of the released VARGPT code for a batch with generation targets: the input
    ids themselves with only <|image_gen_pad|> masked, so BOS, the prompt, image slots and the
    batch padding are all supervised (``model.text_labels: released``)."""
    labels = input_ids.clone()
    labels[input_ids == gen_pad_id] = IGNORE_INDEX
    return labels


@dataclass
class _Rendered:
    text: str
    answers: List[Tuple[int, int]] = field(default_factory=list)  # char ranges, EOS included


def render_conversation(
    messages: Sequence[Dict[str, str]], template: ChatTemplateConfig, eos: str, add_generation_prompt: bool = False
) -> _Rendered:
    """Conversation -> template text with <image>, GEN_START+GEN_END in place of <image_gen>.

    add_generation_prompt: end with "ASSISTANT:" after a final user turn (inference prompts).
    """
    t = template
    msgs = list(messages)
    system = t.system
    if msgs and msgs[0]["role"] == "system":
        system = msgs[0]["content"]
        msgs = msgs[1:]
    out = _Rendered(text=(system + t.system_suffix) if system else "")
    for m in msgs:
        content = m["content"].replace(IMAGE_GEN_PLACEHOLDER, GEN_START + GEN_END)
        if m["role"] == "user":
            out.text += t.user_prefix + content + t.user_suffix
        elif m["role"] == "assistant":
            sep = "" if m["content"].startswith(IMAGE_GEN_PLACEHOLDER) else t.assistant_answer_sep
            out.text += t.assistant_prefix
            # The separator belongs to the answer: inference prompts end at "ASSISTANT:", so the
            # model must learn to emit it. With word tokens it is merged into the first answer
            # token anyway ("Ġgreen"), but a tokenizer that splits digits gives " 1" -> "Ġ", "1",
            # and an unsupervised "Ġ" would leave the model unable to start a numeric answer.
            start = len(out.text)
            out.text += sep
            out.text += content + (eos if t.eos_after_answer else "")
            out.answers.append((start, len(out.text)))
        else:
            raise ValueError(f"role {m['role']!r} after the first message; valid: user, assistant")
    if add_generation_prompt and msgs and msgs[-1]["role"] == "user":
        out.text += t.assistant_prefix
    return out


def build_prompt(messages: Sequence[Dict[str, str]], template: Optional[ChatTemplateConfig] = None, eos: str = "</s>") -> str:
    """Inference prompt text: the conversation so far (ending with a user turn) + "ASSISTANT:".

    `<image>` stays as one token per image here; `Collator.encode_prompt` expands it.
    """
    msgs = list(messages)
    if not msgs or msgs[-1]["role"] != "user":
        raise ValueError("an inference prompt must end with a user message")
    return render_conversation(msgs, template or ChatTemplateConfig(), eos, add_generation_prompt=True).text


@dataclass
class Encoded:
    input_ids: List[int]
    labels: List[int]
    spans: List[Tuple[int, int, str]]  # (start, end) token positions of each image span + kind
    n_prompt: int  # tokens before the last answer (the eval prompt length)


class Collator:
    """Builds model batches from decoded samples; see the module docstring for the layout.

    A decoded sample is a dict with: key, task (source task kind), record (the JSON record),
    images (PIL images in placeholder order), optional vq (per image: flat int array or None),
    vq_fingerprint, n_unreadable (bad samples skipped just before it by the reader).
    """

    def __init__(
        self,
        tokenizer: Any,
        num_image_tokens: int,
        gen_num_tokens: int,
        image_transform: Callable[[Any], torch.Tensor],
        gen_transform: Callable[[Any], torch.Tensor],
        template: Optional[ChatTemplateConfig] = None,
        max_length: int = 2048,
        text_loss_on: str = "answers",
        prompt_dropout: float = 0.0,
        seed: int = 0,
        overlong: str = "clip",
        gen_patch_nums: Optional[Sequence[int]] = None,
        vq_fingerprint: Optional[str] = None,
        load_gen_images: bool = True,
    ):
        if text_loss_on not in TEXT_LOSS_ON:
            raise ValueError(f"text_loss_on={text_loss_on!r}; valid: {', '.join(TEXT_LOSS_ON)}")
        if overlong not in ("clip", "drop"):
            raise ValueError(f"overlong={overlong!r}; valid: clip, drop")
        if gen_patch_nums is not None and sum(p * p for p in gen_patch_nums) != gen_num_tokens:
            raise ValueError(f"gen_num_tokens={gen_num_tokens} but sum(pn^2) of {list(gen_patch_nums)} = "
                             f"{sum(p * p for p in gen_patch_nums)}")
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("Collator needs a fast (Rust) HF tokenizer: supervision uses offset mappings")
        self.tok = tokenizer
        self.num_image_tokens = num_image_tokens
        self.gen_num_tokens = gen_num_tokens
        self.image_transform = image_transform
        self.gen_transform = gen_transform
        self.template = template or ChatTemplateConfig()
        self.max_length = max_length
        self.text_loss_on = text_loss_on
        self.prompt_dropout = prompt_dropout
        self.seed = seed
        self.overlong = overlong
        self.gen_patch_nums = list(gen_patch_nums) if gen_patch_nums is not None else None
        self.vq_fingerprint = vq_fingerprint
        self.load_gen_images = load_gen_images
        self._rng: Optional[np.random.Generator] = None
        self.rank: Optional[int] = None  # None: the process's rank (data.replicate_across_ranks sets 0)

        ids = {}
        for t in (IMAGE_TOKEN, GEN_START, GEN_END, GEN_PAD):
            enc = tokenizer(t, add_special_tokens=False)["input_ids"]
            if len(enc) != 1 or enc[0] == tokenizer.unk_token_id:
                raise ValueError(
                    f"tokenizer does not have {t!r} as one special token (got {enc}); add them with "
                    "tokenizer.add_special_tokens({'additional_special_tokens': datamodules.tokens.SPECIAL_TOKENS})"
                )
            ids[t] = enc[0]
        self.image_id, self.gen_start_id, self.gen_end_id, self.gen_pad_id = (
            ids[IMAGE_TOKEN], ids[GEN_START], ids[GEN_END], ids[GEN_PAD])
        if self.template.eos_after_answer and tokenizer.eos_token is None:
            raise ValueError("template.eos_after_answer needs tokenizer.eos_token")
        self.eos = tokenizer.eos_token or ""
        self.bos_id = tokenizer.bos_token_id if self.template.add_bos else None
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0)
        # The Rust tokenizer directly is ~2x faster than the HF call (the loader's largest cost);
        # used only where it gives exactly the same ids and offsets on a probe conversation.
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        if self._backend is not None:
            probe = render_conversation([{"role": "user", "content": f"{IMAGE_TOKEN}\nWhat is it?"},
                                         {"role": "assistant", "content": f"A red circle.{IMAGE_GEN_PLACEHOLDER}"}],
                                        self.template, self.eos).text
            if self._encode_hf(probe) != self._encode_backend(probe):
                self._backend = None

    @classmethod
    def from_config(cls, cfg: DataConfig, tokenizer: Any, image_transform: Callable, gen_transform: Callable,
                    **kw: Any) -> "Collator":
        return cls(tokenizer, cfg.num_image_tokens, cfg.gen_num_tokens, image_transform, gen_transform,
                   template=cfg.chat, max_length=cfg.max_length, text_loss_on=cfg.text_loss_on,
                   prompt_dropout=cfg.prompt_dropout, seed=cfg.seed, overlong=cfg.overlong,
                   load_gen_images=cfg.load_gen_images, **kw)

    # ------------------------------------------------------------------ text

    def _rng_get(self) -> np.random.Generator:
        # Seeded lazily inside the worker: each DataLoader worker (and rank) draws its own
        # stream, reproducible for a fixed worker count.
        if self._rng is None:
            info = torch.utils.data.get_worker_info()
            wid = info.id if info is not None else 0
            rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
            rank = rank if self.rank is None else self.rank
            self._rng = np.random.default_rng([self.seed, rank, wid, 7919])
        return self._rng

    def _encode_hf(self, text: str) -> Tuple[List[int], List[Tuple[int, int]]]:
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    def _encode_backend(self, text: str) -> Tuple[List[int], List[Tuple[int, int]]]:
        enc = self._backend.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]

    def _encode_text(self, text: str) -> Tuple[List[int], List[Tuple[int, int]]]:
        return self._encode_backend(text) if self._backend is not None else self._encode_hf(text)

    def encode(self, messages: Sequence[Dict[str, str]], all_tokens: bool = False) -> Encoded:
        # A conversation ending with a user turn (an eval question) ends with "ASSISTANT:".
        r = render_conversation(messages, self.template, self.eos, add_generation_prompt=True)
        ids_in, offsets = self._encode_text(r.text)
        ids: List[int] = []
        labels: List[int] = []
        spans: List[Tuple[int, int, str]] = []
        if self.bos_id is not None:
            ids.append(self.bos_id)
            labels.append(self.bos_id if all_tokens else IGNORE_INDEX)
        last_ans_start = r.answers[-1][0] if r.answers else len(r.text)
        n_prompt = None
        k = 0  # answer range pointer (ranges and tokens are both in text order)
        for tid, (s, e) in zip(ids_in, offsets):
            while k < len(r.answers) and r.answers[k][1] <= s:
                k += 1
            in_answer = k < len(r.answers) and s < r.answers[k][1] and e > r.answers[k][0]
            if n_prompt is None and e > last_ans_start:  # first token of the last answer
                n_prompt = len(ids)
            if tid == self.image_id:
                spans.append((len(ids), len(ids) + self.num_image_tokens, "input"))
                ids.extend([self.image_id] * self.num_image_tokens)
                labels.extend([IGNORE_INDEX] * self.num_image_tokens)
            elif tid == self.gen_start_id:
                spans.append((len(ids), len(ids) + self.gen_num_tokens + 2, "gen"))
                ids.append(tid)
                labels.append(tid if (in_answer or all_tokens) else IGNORE_INDEX)
                ids.extend([self.gen_pad_id] * self.gen_num_tokens)
                labels.extend([IGNORE_INDEX] * self.gen_num_tokens)
            elif tid == self.gen_end_id:
                ids.append(tid)
                labels.append(tid if all_tokens else IGNORE_INDEX)
            else:
                ids.append(tid)
                labels.append(tid if (in_answer or all_tokens) else IGNORE_INDEX)
        return Encoded(ids, labels, spans, len(ids) if n_prompt is None else n_prompt)

    def encode_prompt(self, messages: Sequence[Dict[str, str]]) -> List[int]:
        """Token ids of an inference prompt (ends with "ASSISTANT:"), image slots expanded."""
        text = build_prompt(messages, self.template, self.eos)
        ids, _ = self._encode_text(text)
        out = [self.bos_id] if self.bos_id is not None else []
        for tid in ids:
            out.extend([tid] * self.num_image_tokens if tid == self.image_id else [tid])
        return out

    # ------------------------------------------------------------------ batch

    def __call__(self, samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        rows: List[Tuple[Dict[str, Any], Encoded, List[int], List[bool]]] = []
        n_clipped = n_dropped = 0
        dropped: List[str] = []
        n_unreadable = sum(int(s.get("n_unreadable", 0)) for s in samples)
        for s in samples:
            rec = s["record"]
            messages = rec["messages"]
            kinds = ["gen" if p == IMAGE_GEN_PLACEHOLDER else "input" for m in messages for p in _PH_RE.findall(m["content"])]
            if len(kinds) != len(s["images"]):
                self._skip_bad(s, f"{len(kinds)} placeholders but {len(s['images'])} images")
                n_unreadable += 1
                continue
            n_gen = kinds.count("gen")
            is_gen = n_gen > 0
            uncond = False
            if is_gen and n_gen == len(kinds) and self.prompt_dropout > 0 and self._rng_get().random() < self.prompt_dropout:
                # Unconditional branch: drop the instruction (and any text around the target).
                sys_msg = [m for m in messages[:1] if m["role"] == "system"]
                messages = sys_msg + null_generation_messages(n_gen)
                uncond = True
            enc = self.encode(messages, all_tokens=is_gen and self.text_loss_on == "all_tokens")
            if len(enc.spans) != len(kinds):
                self._skip_bad(s, f"{len(kinds)} placeholders became {len(enc.spans)} image spans; does the text "
                                  "contain raw special tokens?")
                n_unreadable += 1
                continue
            keep = list(range(len(kinds)))
            if len(enc.input_ids) > self.max_length:
                if self.overlong == "drop":
                    n_dropped += 1
                    dropped.append(s.get("key", "?"))
                    continue
                cut = self.max_length
                for a, b, _ in enc.spans:  # never cut inside an image span
                    if a < cut < b:
                        cut = a
                keep = [i for i, (a, b, _) in enumerate(enc.spans) if b <= cut]
                enc = Encoded(enc.input_ids[:cut], enc.labels[:cut], [enc.spans[i] for i in keep], min(enc.n_prompt, cut))
                n_clipped += 1
                if s.get("task") != "vqa_eval" and all(l == IGNORE_INDEX for l in enc.labels):
                    n_dropped += 1
                    dropped.append(s.get("key", "?"))
                    n_clipped -= 1
                    continue
            rows.append((s, enc, keep, [uncond] * len(kinds)))
        if n_clipped or n_dropped:
            log.info("collate: %d sample(s) clipped, %d dropped (max_length=%d): %s", n_clipped, n_dropped,
                     self.max_length, dropped[:5])
        return self._assemble(rows, n_clipped, n_dropped, dropped, n_unreadable)

    @staticmethod
    def _skip_bad(s: Dict[str, Any], why: str) -> None:
        # Counted with the reader's unreadable samples (batch["num_unreadable"]), never silent.
        log.warning("collate: sample %s (%s) skipped: %s", s.get("key"), s.get("url", "?"), why)

    def _assemble(self, rows, n_clipped: int, n_dropped: int, dropped: List[str], n_unreadable: int) -> Dict[str, Any]:
        B = len(rows)
        T = max((len(e.input_ids) for _, e, _, _ in rows), default=0)
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        pix, pix_idx, gen_refs, gen_idx, gen_unc, gen_vq = [], [], [], [], [], []
        for b, (s, e, keep, unc) in enumerate(rows):
            n = len(e.input_ids)
            input_ids[b, :n] = torch.tensor(e.input_ids, dtype=torch.long)
            attention_mask[b, :n] = 1
            labels[b, :n] = torch.tensor(e.labels, dtype=torch.long)
            kinds = [k for _, _, k in e.spans]
            vq = s.get("vq") or [None] * len(s["images"])
            for i, kind in zip(keep, kinds):
                if kind == "input":
                    pix.append(self.image_transform(s["images"][i]))
                    pix_idx.append(b)
                else:
                    gen_idx.append(b)
                    gen_unc.append(unc[i])
                    gen_vq.append(self._check_vq(s, i, vq[i]))
                    gen_refs.append(s["images"][i])
        batch: Dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "pixel_values": torch.stack(pix) if pix else torch.zeros(0),
            "image_sample_idx": torch.tensor(pix_idx, dtype=torch.long),
            "gen_sample_idx": torch.tensor(gen_idx, dtype=torch.long),
            "gen_uncond": torch.tensor(gen_unc, dtype=torch.bool),
            "task": [s.get("task", s["record"].get("task")) for s, _, _, _ in rows],
            "key": [s.get("key") for s, _, _, _ in rows],
            "source": [s.get("source", "") for s, _, _, _ in rows],
            "answers": [s["record"].get("answers") for s, _, _, _ in rows],
            "records": [s["record"] for s, _, _, _ in rows],
            "prompt_len": torch.tensor([e.n_prompt for _, e, _, _ in rows], dtype=torch.long),
            "num_clipped": n_clipped,
            "num_dropped": n_dropped,
            "dropped_keys": dropped,
            "num_unreadable": n_unreadable,
        }
        use_vq = bool(gen_vq) and all(v is not None for v in gen_vq)
        if gen_refs and (self.load_gen_images or not use_vq):
            batch["gen_images"] = torch.stack([self.gen_transform(im) for im in gen_refs])
        if use_vq:
            flat = torch.from_numpy(np.stack(gen_vq).astype(np.int64))  # (N_gen, L)
            pns = self.gen_patch_nums or [int(round(self.gen_num_tokens ** 0.5))]
            batch["gen_indices"] = list(torch.split(flat, [p * p for p in pns], dim=1))
        if any(t == "vqa_eval" for t in batch["task"]):
            # Left-padded prompts (up to "ASSISTANT:") for batched answer generation.
            P = max((e.n_prompt for _, e, _, _ in rows), default=0)
            p_ids = torch.full((B, P), self.pad_id, dtype=torch.long)
            p_mask = torch.zeros((B, P), dtype=torch.long)
            for b, (_, e, _, _) in enumerate(rows):
                p_ids[b, P - e.n_prompt:] = torch.tensor(e.input_ids[: e.n_prompt], dtype=torch.long)
                p_mask[b, P - e.n_prompt:] = 1
            batch["prompt_input_ids"], batch["prompt_attention_mask"] = p_ids, p_mask
        return batch

    def _check_vq(self, s: Dict[str, Any], i: int, vq: Optional[np.ndarray]) -> Optional[np.ndarray]:
        if vq is None or self.vq_fingerprint is None:
            return None  # no indices, or the model encodes on the fly: fall back to images
        fp = s.get("vq_fingerprint")
        if fp != self.vq_fingerprint:
            raise ValueError(
                f"sample {s.get('key')} ({s.get('url', '?')}): stored VQ indices were made by tokenizer "
                f"{fp}, the model's VQVAE is {self.vq_fingerprint}; re-run experiments.pretokenize with this "
                "VQVAE or set data.use_pretokenized=false"
            )
        if vq.shape[-1] != self.gen_num_tokens:
            raise ValueError(f"sample {s.get('key')}: {vq.shape[-1]} stored VQ indices, model expects L={self.gen_num_tokens}")
        return vq
