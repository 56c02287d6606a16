"""Shard streams: reading, decoding, weighted mixing, node/worker splitting (no Lightning here).

Training (mode="train"): every source is an infinite resampled stream (shards drawn with
replacement, a sample shuffle buffer), and sources are mixed by weight, sample by sample. Each
(rank, worker) draws from its own RNG seeded by (seed, rank, worker, epoch), so a run is
reproducible for a fixed world size and worker count. resampled=False gives one shuffled pass
over each source's shards per epoch instead (shards split over ranks x workers).

Evaluation (mode="eval"): one finite pass in config order with no shuffling. Shards are dealt
round-robin to the ranks x workers consumers when there are at least as many shards as
consumers; otherwise every consumer reads all shards and keeps sample j when j % consumers is
its index. Either way every sample is seen exactly once per pass.

Unreadable samples (bad JSON, missing or corrupt image, broken tar member) are logged with key
and shard, counted, and reported to the collator through the next good sample's `n_unreadable`
(batch["num_unreadable"]); they are never dropped silently.
"""
from __future__ import annotations

import glob
import io
import json
import logging
import os
import random
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset

from datamodules.config import SourceConfig
from datamodules.schema import EDIT_TASK, image_kinds, validate_edit_record, validate_record

log = logging.getLogger(__name__)


def expand_shards(pattern: str, root: str = "") -> List[str]:
    """Brace + glob expansion of a shard pattern ("::" joins several); sorted, de-duplicated."""
    import braceexpand  # a webdataset dependency

    out: List[str] = []
    for part in pattern.split("::"):
        for p in braceexpand.braceexpand(part):
            p = os.path.expanduser(p)
            if root and not os.path.isabs(p):
                p = os.path.join(root, p)
            hits = sorted(glob.glob(p)) if any(c in p for c in "*?[") else ([p] if os.path.exists(p) else [])
            out.extend(h for h in hits if h not in out)
    return out


def decode_sample(raw: Dict[str, Any], source: str = "", task: str = "") -> Dict[str, Any]:
    """Raw tar sample (ext -> bytes) -> decoded sample for the Collator. Raises on bad data."""
    if "json" not in raw:
        raise ValueError("no .json record")
    rec = json.loads(raw["json"])
    validate_record(rec)
    if task == EDIT_TASK:  # an edit source: every record must be an editing sample
        validate_edit_record(rec)
    images = []
    for ext in rec["images"]:
        if ext not in raw:
            raise ValueError(f"record lists {ext} but the shard has no such member")
        im = Image.open(io.BytesIO(raw[ext]))
        im.load()
        images.append(im)
    vq: List[Optional[np.ndarray]] = [None] * len(images)
    vq_meta = rec.get("vq") or {}
    for i, kind in enumerate(image_kinds(rec)):
        name = f"img{i}.vq.npy"
        if kind == "gen" and name in raw:
            vq[i] = np.load(io.BytesIO(raw[name]), allow_pickle=False)
    # a preference pair (datamodules/pairs.py): the rejected image of each <image_gen> target
    rejected = [_member_image(raw, m) for m in rec.get("rejected") or []]
    return {
        "key": raw["__key__"],
        "url": raw.get("__url__", ""),
        "source": source,
        "task": task or rec.get("task", ""),
        "record": rec,
        "images": images,
        "vq": vq,
        "vq_fingerprint": vq_meta.get("fingerprint"),
        "n_unreadable": 0,
        **({"rejected": rejected} if rejected else {}),
    }


def _member_image(raw: Dict[str, Any], ext: str) -> Any:
    if ext not in raw:
        raise ValueError(f"record lists {ext} but the shard has no such member")
    im = Image.open(io.BytesIO(raw[ext]))
    im.load()
    return im


_COUNTS: Dict[str, Dict[str, int]] = {}


def _expected_count(url: str) -> Optional[int]:
    """How many samples the shard set's manifest.json says ``url`` holds (None if unknown)."""
    d = os.path.dirname(url)
    if d not in _COUNTS:
        try:
            with open(os.path.join(d, "manifest.json"), encoding="utf-8") as f:
                m = json.load(f)
            _COUNTS[d] = {os.path.basename(str(e.get("name") or e.get("file") or e.get("url") or "")): int(e["count"])
                          for e in m.get("shards", []) if "count" in e}
        except (OSError, ValueError, KeyError, TypeError):
            _COUNTS[d] = {}
    return _COUNTS[d].get(os.path.basename(url))


def _dist_info() -> Tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class _Source:
    def __init__(self, cfg: SourceConfig, root: str):
        self.cfg = cfg
        self.urls = expand_shards(cfg.shards, root)
        if not self.urls:
            where = f" (root {root})" if root else f" (cwd {os.getcwd()})"
            raise FileNotFoundError(f"data source {cfg.name!r}: shard pattern {cfg.shards!r} matches no files{where}")


class ShardStream(IterableDataset):
    def __init__(
        self,
        sources: Sequence[SourceConfig],
        mode: str = "train",
        seed: int = 0,
        root: str = "",
        shuffle_buffer: int = 1000,
        resampled: bool = True,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        decode: bool = True,
    ):
        if mode not in ("train", "eval"):
            raise ValueError(f"mode {mode!r}; valid: train, eval")
        if not sources:
            raise ValueError("ShardStream needs at least one source")
        self.sources = [_Source(s, root) for s in sources]
        self.mode, self.seed, self.shuffle_buffer, self.resampled = mode, seed, shuffle_buffer, resampled
        self.rank, self.world_size, self.decode = rank, world_size, decode
        self.epoch = 0
        self.n_unreadable = 0  # in this process; workers report through the samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    # ------------------------------------------------------------------ plumbing

    def _consumer(self) -> Tuple[int, int, int, int]:
        rank, world = _dist_info()
        rank = self.rank if self.rank is not None else rank
        world = self.world_size if self.world_size is not None else world
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank, world, wid, nw

    def _read(self, url: str, src: _Source) -> Iterator[Dict[str, Any]]:
        """Raw samples (ext -> bytes) of one shard; tar-level errors are logged and counted. A
        truncated shard counts every sample it lost (its manifest says how many it holds)."""
        from webdataset.tariterators import tarfile_samples

        errors = [0]

        def handler(exn: Exception) -> bool:
            errors[0] += 1
            self._bad(f"{url}: {exn!r}")
            return True

        n = 0
        for raw in tarfile_samples([{"url": url}], handler=handler):
            raw["__src__"] = src
            n += 1
            yield raw
        if errors[0]:
            lost = (_expected_count(url) or 0) - n - errors[0]
            if lost > 0:
                for _ in range(lost):
                    self.n_unreadable += 1
                    self._pending += 1
                log.warning("shard %s is damaged: %d of its %d samples could not be read (counted as unreadable)",
                            url, lost + errors[0], lost + errors[0] + n)

    def _decoded(self, raws: Iterator[Dict[str, Any]]) -> Iterator[Dict[str, Any]]:
        """Decode after the shuffle buffer (the buffer holds bytes, not decoded images)."""
        run = 0  # consecutive failures: an all-bad source must not spin forever
        for raw in raws:
            src = raw.pop("__src__")
            if not self.decode:
                raw["__source__"] = src.cfg.name
                yield raw
                continue
            try:
                s = decode_sample(raw, src.cfg.name, src.cfg.task)
            except Exception as e:  # noqa: BLE001 - any decode failure is reported the same way
                self._bad(f"sample {raw.get('__key__')} in {raw.get('__url__')}: {e!r}")
                run += 1
                if run >= 1000:
                    raise RuntimeError(f"data source {src.cfg.name!r}: 1000 unreadable samples in a row "
                                       f"(last in {raw.get('__url__')}); see the warnings above") from e
                continue
            run = 0
            s["n_unreadable"], self._pending = self._pending, 0
            yield s

    def _bad(self, what: str) -> None:
        self.n_unreadable += 1
        self._pending += 1
        log.warning("unreadable sample skipped (%d so far in this worker): %s", self.n_unreadable, what)

    def _shuffled(self, it: Iterator[Dict[str, Any]], rng: random.Random) -> Iterator[Dict[str, Any]]:
        if self.shuffle_buffer <= 1:
            yield from it
            return
        buf: List[Dict[str, Any]] = []
        for s in it:
            if len(buf) < self.shuffle_buffer:
                buf.append(s)
                if len(buf) < min(self.shuffle_buffer, 64):  # start yielding early
                    continue
            j = rng.randrange(len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            yield buf.pop()
        rng.shuffle(buf)
        yield from buf

    def _resampled(self, src: _Source, rng: random.Random) -> Iterator[Dict[str, Any]]:
        while True:
            got = False
            for _ in range(max(4, 2 * len(src.urls))):
                for s in self._read(rng.choice(src.urls), src):
                    got = True
                    yield s
            if not got:
                raise RuntimeError(f"data source {src.cfg.name!r}: no readable sample in {len(src.urls)} shard(s)")

    def _one_pass(self, src: _Source, rng: random.Random, me: int, consumers: int) -> Iterator[Dict[str, Any]]:
        urls = list(src.urls)
        random.Random(f"{self.seed}/{self.epoch}/{src.cfg.name}").shuffle(urls)  # same on every consumer
        for url in urls[me::consumers]:
            yield from self._read(url, src)

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        self._pending = 0
        rank, world, wid, nw = self._consumer()
        consumers, me = world * nw, rank * nw + wid
        if self.mode == "eval":
            yield from self._eval_pass(me, consumers)
            return
        rng = random.Random(f"{self.seed}/{rank}/{wid}/{self.epoch}")
        if self.resampled:
            iters = [self._decoded(self._shuffled(self._resampled(s, rng), rng)) for s in self.sources]
        else:
            iters = [self._decoded(self._shuffled(self._one_pass(s, rng, me, consumers), rng)) for s in self.sources]
        weights = [s.cfg.weight for s in self.sources]
        live = list(range(len(iters)))
        while live:
            i = rng.choices(live, weights=[weights[k] for k in live])[0]
            try:
                yield next(iters[i])
            except StopIteration:
                live.remove(i)  # finite mode: an exhausted source leaves the mix

    def _eval_pass(self, me: int, consumers: int) -> Iterator[Dict[str, Any]]:
        shards = [(src, url) for src in self.sources for url in src.urls]
        if len(shards) >= consumers:
            for src, url in shards[me::consumers]:
                yield from self._decoded(self._read(url, src))
            return
        j = carry = 0
        for src, url in shards:
            # decoding every sample on every consumer keeps the bad-sample count exact
            for s in self._decoded(self._read(url, src)):
                carry += s["n_unreadable"]
                if j % consumers == me:
                    # every consumer sees every bad sample here: only consumer 0 reports them
                    s["n_unreadable"], carry = (carry if me == 0 else 0), 0
                    yield s
                j += 1


class BatchedStream(IterableDataset):
    """Collated batches of a training ShardStream, built inside each loader worker.

    Equivalent to ``DataLoader(stream, batch_size, collate_fn=collate)`` (a worker takes
    ``batch_size`` samples from its stream, then collates them), with one addition: exact resume.
    The streams and the collator's RNG are deterministic per (seed, rank, worker), and the
    DataLoader takes batches from its workers in turn, so after ``skip_batches`` batches worker w
    had delivered every batch index i < skip_batches with i % num_workers == w. On resume each
    worker rebuilds (reads, collates) and drops exactly those batches, so the next batch, the
    collator's prompt-dropout draws included, is the one the interrupted run would have seen.
    Replaying costs data-loading time only (the loader runs ~18x faster than a world step).
    Exact while no worker's stream ends before the skip point (always in resampled mode).
    """

    def __init__(self, stream: ShardStream, batch_size: int, collate: Any, skip_batches: int = 0):
        self.stream, self.batch_size, self.collate, self.skip_batches = stream, batch_size, collate, skip_batches

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        skip = len(range(wid, self.skip_batches, nw))  # this worker's share of the consumed batches
        if skip:
            log.info("resuming: worker %d replays %d batches (%d in all)", wid, skip, self.skip_batches)
        it = iter(self.stream)
        done = 0
        while True:
            samples = [s for _, s in zip(range(self.batch_size), it)]
            if not samples:
                return
            batch = self.collate(samples)
            done += 1
            if done > skip:
                yield batch
            if len(samples) < self.batch_size:
                return


def pass_batches(batch: Any) -> Any:
    """The DataLoader's collate_fn for BatchedStream: batches arrive collated (picklable for workers)."""
    return batch
