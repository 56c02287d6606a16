"""Harness-facing inference for any VARGPT: the two request kinds an evaluation harness sends
(lmms-eval's ``loglikelihood`` and ``generate_until``), without the harness.

  loglikelihood(net, images, contexts, continuations)
        log p(continuation | image, context) under the chat template the model was trained with:
        the context is the user turn (``<image>`` first when there is an image, as LLaVA-1.5), the
        continuation the assistant's answer. Batched (right padding), one forward per batch (the
        requests that show one image run their common prefix once: ``shared_prefix``), the
        LM head applied only at the continuation's positions. Returns per request the summed
        token log-probability, the number of tokens and whether greedy decoding would produce
        exactly these tokens: what multiple-choice tasks rank choices by. (lmms-eval ranks by
        the *lowest* value it is given, as its LLaVA models return the mean token loss; the
        harness adapter, experiments/lmms_eval_model.py, converts.)
  generation_settings(gen_kwargs) / answer_batch(net, images, contexts, settings)
        lmms-eval's text-generation conventions (``max_new_tokens``, ``temperature`` 0 = greedy,
        ``top_p``, ``do_sample``, ``num_beams`` 1, stop strings ``until``) mapped onto
        ``net.answer`` (KV-cached batched decoding), the stop strings applied to the text.

The continuation is the assistant's answer, so its boundary whitespace is the template's answer
separator (``data.chat.assistant_answer_sep``), exactly as in training: " B", "B" and "B " score
the same. The EOS that closes an answer in training is not part of the continuation (the
harness asks for the continuation's probability, not for "and nothing after it");
``include_eos=True`` adds it, which makes the score the negative of the training text loss.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from transformers import DynamicCache

from datamodules.tokens import IGNORE_INDEX, IMAGE_TOKEN


def _strip_image_token(context: str) -> str:
    """The harness may write ``<image>`` into a context; the model places its one image slot
    itself (first, as in training), so a written one is dropped."""
    return context.replace(IMAGE_TOKEN, "").strip() if IMAGE_TOKEN in context else context


def _user_content(context: str, has_image: bool) -> str:
    context = _strip_image_token(context)
    return f"{IMAGE_TOKEN}\n{context}" if has_image else context


def encode_continuation(collator: Any, context: str, continuation: str, has_image: bool,
                        include_eos: bool = False) -> Tuple[List[int], List[int]]:
    """(input ids, positions of the continuation's tokens) of one request, image slots expanded,
    tokenized as the training collator tokenizes a (user, assistant) exchange."""
    msgs = [{"role": "user", "content": _user_content(context, has_image)},
            {"role": "assistant", "content": continuation.strip()}]
    enc = collator.encode(msgs)
    pos = [i for i, lab in enumerate(enc.labels) if lab != IGNORE_INDEX]
    eos = collator.tok.eos_token_id
    if not include_eos and collator.template.eos_after_answer and pos and enc.input_ids[pos[-1]] == eos:
        pos = pos[:-1]
    if not pos:
        raise ValueError(f"continuation {continuation!r} has no tokens after the template's answer separator")
    return enc.input_ids, pos


class ContinuationScore(NamedTuple):
    logprob: float  # sum of the continuation's token log-probabilities
    n_tokens: int
    is_greedy: bool  # greedy decoding from the context gives exactly these tokens

    @property
    def mean_nll(self) -> float:
        """Mean negative log-likelihood per token (the text loss of these tokens)."""
        return -self.logprob / self.n_tokens


def shared_prefix(encs: Sequence[Tuple[List[int], List[int]]], keys: Sequence[Any]) -> Tuple[int, List[int]]:
    """(P, group of each row) for running the LLM once over a prefix that requests share.

    Rows with the same ``key`` (the same image object, or None for text only) embed equal token
    ids equally, so the rows of a key that agree on their first P token ids agree on the LLM's
    states there. P is the shortest such common prefix over the keys that hold two or more rows,
    and ends before every row's first scored token (its state at P - 1 is not needed). A judge
    asks ~9 questions of one image: P then covers the system prompt and the image slots, about
    4/5 of each request. 0 when no two rows share a key."""
    by_key: Dict[Any, List[int]] = {}
    for r, k in enumerate(keys):
        by_key.setdefault(k, []).append(r)
    if all(len(rows) < 2 for rows in by_key.values()):
        return 0, []
    P = min(pos[0] - 1 for _, pos in encs)
    for rows in by_key.values():
        if len(rows) < 2:
            continue
        first = encs[rows[0]][0]
        for r in rows[1:]:
            ids = encs[r][0]
            n = 0
            while n < min(P, len(ids)) and ids[n] == first[n]:
                n += 1
            P = n
    if P <= 0:
        return 0, []
    order = {k: g for g, k in enumerate(by_key)}
    return P, [order[k] for k in keys]


def _run_with_prefix(net: Any, emb_BTD: torch.Tensor, mask_BT: torch.Tensor, P: int, group: List[int]) -> torch.Tensor:
    """Last hidden states at positions P..T-1 of each row: the first P positions run once per
    group (its first row), their KV cache is copied to the group's rows, the rest runs per row.
    Same states as one forward over the whole rows (right padding: the prefix has none)."""
    device = emb_BTD.device
    B, T, _ = emb_BTD.shape
    G = max(group) + 1
    reps = [group.index(g) for g in range(G)]
    cache = DynamicCache()
    pos_P = torch.arange(P, device=device).expand(G, P)
    net.run_llm(emb_BTD[reps, :P], torch.ones(G, P, dtype=mask_BT.dtype, device=device), position_ids=pos_P,
                cache=cache, use_cache=True)
    cache.batch_select_indices(torch.tensor(group, device=device))  # (G, ...) -> (B, ...)
    pos_rest = torch.arange(P, T, device=device).expand(B, T - P)
    return net.run_llm(emb_BTD[:, P:], mask_BT, position_ids=pos_rest, cache=cache, use_cache=True).last_hidden_state


@torch.no_grad()
def loglikelihood(net: Any, images: Sequence[Any], contexts: Sequence[str], continuations: Sequence[str],
                  batch_size: int = 8, include_eos: bool = False) -> List[ContinuationScore]:
    """A ``ContinuationScore`` for each request; images are PIL images or None (text only).
    Per-request results do not depend on the batch (right padding, causal attention)."""
    if not (len(images) == len(contexts) == len(continuations)):
        raise ValueError(f"loglikelihood: {len(images)} images, {len(contexts)} contexts, "
                         f"{len(continuations)} continuations")
    col = net.collator()
    device = next(net.llm.parameters()).device
    tf = net.vision.image_transform()
    head = net.llm.get_output_embeddings()
    pad = col.pad_id
    out: List[ContinuationScore] = []
    for s in range(0, len(contexts), max(1, batch_size)):
        chunk = range(s, min(s + max(1, batch_size), len(contexts)))
        encs = [encode_continuation(col, contexts[i], continuations[i], images[i] is not None, include_eos)
                for i in chunk]
        T = max(len(ids) for ids, _ in encs)
        ids = torch.full((len(encs), T), pad, dtype=torch.long)
        mask = torch.zeros((len(encs), T), dtype=torch.long)
        for r, (row, _) in enumerate(encs):
            ids[r, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[r, :len(row)] = 1
        batch: Dict[str, Any] = {"input_ids": ids.to(device)}
        # Several requests often share one image (the choices of a multiple-choice question, the
        # questions a judge asks of one draw): the vision tower runs once per distinct image
        # object of the batch and its features go to every request that shows it.
        slot: Dict[int, int] = {}
        distinct: List[Any] = []
        rows_img: List[int] = []
        for i in chunk:
            if images[i] is not None:
                if id(images[i]) not in slot:
                    slot[id(images[i])] = len(distinct)
                    distinct.append(images[i])
                rows_img.append(slot[id(images[i])])
        if distinct:
            px = torch.stack([tf(im) for im in distinct]).to(device)
            feats = net.image_features(px.to(net.llm.get_input_embeddings().weight.dtype))
            batch["image_features"] = feats[torch.tensor(rows_img, device=device)]
        emb, _, _, _ = net.embed(batch, with_gen=False)
        keys = [id(images[i]) if images[i] is not None else None for i in chunk]
        P, group = shared_prefix(encs, keys)
        if P:
            h = _run_with_prefix(net, emb, mask.to(device), P, group)  # (B, T - P, D): positions P..T-1
        else:
            h = net.run_llm(emb, mask.to(device)).last_hidden_state  # (B, T, D)
        rows = torch.tensor([r for r, (_, pos) in enumerate(encs) for _ in pos], device=device)
        tgt_pos = torch.tensor([p for _, pos in encs for p in pos], device=device)
        logp = head(h[rows, tgt_pos - 1 - P]).float().log_softmax(-1)  # token p is predicted at p - 1
        targets = ids.to(device)[rows, tgt_pos]
        tok_lp = logp.gather(1, targets[:, None])[:, 0]
        hit = logp.argmax(-1) == targets
        k = 0
        for _, pos in encs:
            n = len(pos)
            out.append(ContinuationScore(float(tok_lp[k:k + n].sum()), n, bool(hit[k:k + n].all())))
            k += n
    return out


# ------------------------------------------------------------------------------------ generation
@dataclass
class GenerationSettings:
    """One group of lmms-eval ``generation_kwargs``, normalised for ``net.answer``."""

    max_new_tokens: int = 1024
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 0.0
    top_k: int = 0
    until: List[str] = field(default_factory=list)


def generation_settings(gen_kwargs: Optional[Dict[str, Any]], default_max_new_tokens: int = 1024,
                        max_new_tokens_cap: int = 0) -> GenerationSettings:
    """lmms-eval's conventions: ``temperature`` 0 (or absent, or ``do_sample: false``) is greedy;
    ``top_p`` 1 / None means no nucleus cut; ``until`` is a string or a list of stop strings;
    ``max_new_tokens`` defaults to 1024 as in the harness's LLaVA models (``max_new_tokens_cap``
    > 0 caps it, e.g. at what the LLM's context leaves). Beam search is not supported."""
    kw = dict(gen_kwargs or {})
    until = kw.pop("until", None)
    if isinstance(until, str):
        until = [until]
    elif until is None:
        until = []
    elif not isinstance(until, (list, tuple)):
        raise ValueError(f"generation_kwargs['until'] must be a string or a list, got {type(until).__name__}")
    if int(kw.get("num_beams", 1) or 1) != 1:
        raise ValueError(f"num_beams={kw['num_beams']}: beam search is not supported (greedy or sampling only)")
    temperature = float(kw.get("temperature", 0.0) or 0.0)
    do_sample = bool(kw.get("do_sample", temperature > 0)) and temperature > 0
    top_p = kw.get("top_p")
    top_p = 0.0 if top_p is None or float(top_p) >= 1.0 else float(top_p)
    n = int(kw.get("max_new_tokens", default_max_new_tokens) or default_max_new_tokens)
    if max_new_tokens_cap > 0:
        n = min(n, max_new_tokens_cap)
    return GenerationSettings(max_new_tokens=max(1, n), do_sample=do_sample,
                              temperature=temperature if do_sample else 1.0, top_p=top_p if do_sample else 0.0,
                              top_k=int(kw.get("top_k", 0) or 0) if do_sample else 0,
                              until=[u for u in until if u])


def truncate_at(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    cut = len(text)
    for u in until:
        i = text.find(u)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


@torch.no_grad()
def answer_batch(net: Any, images: Sequence[Any], contexts: Sequence[str], settings: GenerationSettings,
                 seed: int = 0) -> List[str]:
    """``net.answer`` on one batch under ``settings``, the stop strings applied to the text."""
    qs = [_strip_image_token(c) for c in contexts]
    preds = net.answer(list(images), qs, max_new_tokens=settings.max_new_tokens, do_sample=settings.do_sample,
                       temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p, seed=seed)
    return [truncate_at(p, settings.until) for p in preds]
