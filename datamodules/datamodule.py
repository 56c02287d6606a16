"""LightningDataModule over the mixed shard streams (datamodules/stream.py).

Built from a DataConfig and a Collator (the model side constructs the collator from its
tokenizer, image processor and VQ tokenizer, so nothing here hard-codes them):

    dm = VargptDataModule(cfg.data, collator)
    trainer.fit(model, datamodule=dm)

train: resampled weighted mix (infinite; use max_steps / limit_train_batches), seeded.
val/test: finite ordered passes over `val_sources` / `test_sources`, split by rank and worker
without duplicates.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, List, Optional, Sequence

import lightning as L
from torch.utils.data import DataLoader

from datamodules.config import DataConfig, SourceConfig, validate_data_config
from datamodules.schema import read_manifest
from datamodules.stream import BatchedStream, ShardStream, expand_shards, pass_batches

log = logging.getLogger(__name__)


def check_vq_fingerprints(sources: Sequence[SourceConfig], root: str, fingerprint: Optional[str]) -> None:
    """Refuse shard sets whose manifest records VQ indices from a different tokenizer."""
    if fingerprint is None:
        return
    seen = set()
    for src in sources:
        for url in expand_shards(src.shards, root):
            d = os.path.dirname(url)
            if d in seen or not os.path.exists(os.path.join(d, "manifest.json")):
                continue
            seen.add(d)
            vq = read_manifest(d).get("vq")
            if vq and vq.get("fingerprint") != fingerprint:
                raise ValueError(
                    f"data source {src.name!r}: {d}/manifest.json has VQ indices from tokenizer "
                    f"{vq.get('fingerprint')}, the model's VQVAE is {fingerprint}; re-run "
                    "`python -m experiments.pretokenize` with this VQVAE or set data.use_pretokenized=false"
                )


class VargptDataModule(L.LightningDataModule):
    def __init__(self, cfg: DataConfig, collator: Callable[[List[Any]], Any],
                 eval_collator: Optional[Callable[[List[Any]], Any]] = None):
        super().__init__()
        validate_data_config(cfg)
        self.cfg = cfg
        self.collator = collator
        # Evaluation should not drop prompts: pass a collator with prompt_dropout=0 here.
        self.eval_collator = eval_collator or collator
        self.root = cfg.root
        # Training batches already consumed (set when a run resumes from a checkpoint): the
        # training stream replays and drops them, see BatchedStream.
        self.skip_train_batches = 0
        # Every rank reads every validation / test sample (set under sharded training, where each
        # forward gathers weights with all ranks: ranks with different numbers of batches would wait
        # on each other forever). Split by rank otherwise.
        self.eval_on_every_rank = False

    def setup(self, stage: Optional[str] = None) -> None:
        fp = getattr(self.collator, "vq_fingerprint", None) if self.cfg.use_pretokenized else None
        if not self.cfg.use_pretokenized:
            for c in (self.collator, self.eval_collator):
                if hasattr(c, "vq_fingerprint"):
                    c.vq_fingerprint = None  # ignore stored indices: the model encodes on the fly
        for group in (self.cfg.sources, self.cfg.val_sources, self.cfg.test_sources):
            check_vq_fingerprints(group, self.root, fp)

    def _loader(self, ds: Any, batch_size: Optional[int], collate: Callable) -> DataLoader:
        nw = self.cfg.num_workers
        return DataLoader(
            ds,
            batch_size=batch_size,
            num_workers=nw,
            collate_fn=collate,
            pin_memory=self.cfg.pin_memory,
            persistent_workers=self.cfg.persistent_workers and nw > 0,
            prefetch_factor=self.cfg.prefetch_factor if nw > 0 else None,
        )

    def train_dataset(self) -> ShardStream:
        c = self.cfg
        if c.replicate_across_ranks:  # every rank reads what rank 0 of a one-process run reads
            self.collator.rank = 0
            return ShardStream(c.sources, "train", c.seed, self.root, c.shuffle_buffer, c.resampled, rank=0, world_size=1)
        return ShardStream(c.sources, "train", c.seed, self.root, c.shuffle_buffer, c.resampled)

    def eval_dataset(self, sources: Sequence[SourceConfig]) -> ShardStream:
        if self.eval_on_every_rank:
            return ShardStream(sources, "eval", self.cfg.seed, self.root, 0, False, rank=0, world_size=1)
        return ShardStream(sources, "eval", self.cfg.seed, self.root, 0, False)

    def train_dataloader(self) -> DataLoader:
        if not self.cfg.sources:
            raise ValueError("data.sources is empty: list the training shard sources in the stage YAML")
        ds = BatchedStream(self.train_dataset(), self.cfg.batch_size, self.collator, self.skip_train_batches)
        if self.trainer is not None:
            ds.set_epoch(self.trainer.current_epoch)
        return self._loader(ds, None, pass_batches)

    def val_dataloader(self) -> Any:
        if not self.cfg.val_sources:
            return []
        return self._loader(self.eval_dataset(self.cfg.val_sources), self.cfg.val_batch_size or self.cfg.batch_size,
                            self.eval_collator)

    def test_dataloader(self) -> Any:
        if not self.cfg.test_sources:
            return []
        return self._loader(self.eval_dataset(self.cfg.test_sources), self.cfg.val_batch_size or self.cfg.batch_size,
                            self.eval_collator)
