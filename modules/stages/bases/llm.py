"""base_llm: the tiny Llama as a language model on world text (``self.net`` = LlamaForCausalLM).

Trains and saves the world tokenizer (``train_world_tokenizer``) into ``model.tokenizer.path``
first when that directory has none; ``python -m experiments.bases tokenizer`` does the same by hand.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from datamodules.collate import render_conversation
from datamodules.config import ChatTemplateConfig
from datamodules.paths import resolve_path
from datamodules.tokens import IMAGE_TOKEN
from modules.components.llm import build_llm
from modules.components.text_tokenizer import build_tokenizer, train_world_tokenizer
from modules.stages.base import StageModule
from modules.stages.bases.data import InMemoryData, read_world

log = logging.getLogger(__name__)


def world_texts(records: Sequence[Dict[str, Any]], eos: str = "") -> List[str]:
    """World records -> chat-formatted text documents (Vicuna-v1 template of data.chat).

    The image placeholder is removed (a text-only LM); a generation answer stays as
    GEN_START GEN_END, so the LM learns where generation starts.
    """
    tpl = ChatTemplateConfig()
    out = []
    for r in records:
        msgs = [{**m, "content": m["content"].replace(IMAGE_TOKEN + "\n", "").replace(IMAGE_TOKEN, "")}
                for m in r["messages"]]
        out.append(render_conversation(msgs, tpl, eos).text)
    return out


def tokenizer_corpus(records: Sequence[Dict[str, Any]]) -> List[str]:
    """What the world tokenizer is trained on: the templated conversations (system prompt included)."""
    return world_texts(records, eos="")


def ensure_world_tokenizer(cfg: Any, records: Optional[Sequence[Dict[str, Any]]] = None, vocab_size: int = 0):
    """Load the world tokenizer from ``model.tokenizer.path``; train and save it there first
    when the directory has none (from ``records`` or the training sources)."""
    tcfg = cfg.model.tokenizer
    if tcfg.name != "world":
        return build_tokenizer(tcfg)
    if not tcfg.path:
        raise ValueError("model.tokenizer.path is empty: set it to where the world tokenizer lives "
                         "(e.g. runs/bases/tokenizer)")
    path = resolve_path(tcfg.path)
    if not (path / "tokenizer.json").is_file():
        if records is None:
            records = read_world(cfg.data.sources, cfg.data.root, images=False)["records"]
        vs = vocab_size or cfg.model.llm.vocab_size or 1024
        log.info("training the world tokenizer (vocab %d) on %d records -> %s", vs, len(records), path)
        train_world_tokenizer(tokenizer_corpus(records), path, vocab_size=vs)
    return build_tokenizer(type(tcfg)(**{**tcfg.__dict__, "path": str(path)}))


def pack_tokens(docs: Sequence[List[int]], block: int) -> torch.Tensor:
    """Concatenate token lists into (N, block + 1) rows (input + next-token target)."""
    flat = [t for d in docs for t in d]
    n = (len(flat) - 1) // block
    if n < 1:
        raise ValueError(f"only {len(flat)} tokens of text: fewer than one block of {block}")
    arr = torch.tensor(flat[: n * block + 1], dtype=torch.long)
    return torch.stack([arr[i * block: i * block + block + 1] for i in range(n)])


class LLMData(InMemoryData):
    def __init__(self, cfg: Any, tokenizer: Any, block: int):
        super().__init__(cfg, self._tensors, images=False)
        self.tokenizer, self.block = tokenizer, block

    def _tensors(self, data: Dict[str, Any], split: str) -> Dict[str, torch.Tensor]:
        tok = self.tokenizer
        texts = world_texts(data["records"], eos=tok.eos_token)
        docs = tok(texts, add_special_tokens=True)["input_ids"]
        return {"tokens": pack_tokens(docs, self.block)}


class LLMModule(StageModule):
    def __init__(self, cfg: Any, tokenizer: Any):
        super().__init__(cfg)
        self.net = build_llm(cfg.model.llm, vocab_size=len(tokenizer))
        self.val_ce = MeanMetric()
        self.apply_trainable_set()

    def trainable_prefixes(self):
        return tuple(sorted({n.split(".")[0] for n, _ in self.net.named_parameters()}))

    def _loss(self, batch) -> torch.Tensor:
        t = batch["tokens"]
        logits = self.net(input_ids=t[:, :-1]).logits
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), t[:, 1:].reshape(-1))

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True)
        t = batch["tokens"]
        self.log_throughput(t.shape[0], t[:, 1:].numel())
        return self.finite_or_skip(loss, {})

    def validation_step(self, batch, batch_idx):
        n = batch["tokens"][:, 1:].numel()
        self.val_ce.update(self._loss(batch), weight=n)  # token-weighted mean over batches

    def on_validation_epoch_end(self) -> None:
        if self.val_ce.update_count:
            ce = float(self.val_ce.compute())
            self.log("val/loss", ce, prog_bar=True)
            self.log("val/ppl", math.exp(min(ce, 50.0)))
            self.val_ce.reset()


def build_base_llm(cfg: Any) -> Tuple[L.LightningModule, L.LightningDataModule]:
    tokenizer = ensure_world_tokenizer(cfg)
    block = cfg.data.max_length  # packed LM rows of this many tokens
    return LLMModule(cfg, tokenizer), LLMData(cfg, tokenizer, block)
