"""Preference pairs (prompt, chosen image, rejected image) in the shard format, for the DPO stage.

A pair is a generation record (FORMAT.md) whose one ``<image_gen>`` target is the chosen image,
plus a ``rejected`` field naming the member of the rejected image:

    {key}.json      {"id", "task": "dpo", "source", "messages": [user prompt (may hold <image>s),
                     assistant "<image_gen>"], "images": [..inputs, "img{k}.png" (chosen)],
                     "rejected": ["rej0.png"]}
    {key}.img{i}.*  the input images and the chosen image (as any record)
    {key}.rej0.*    the rejected image

The reader (``datamodules.stream.decode_sample``) adds the decoded rejected images as
``sample["rejected"]``; a source reads pairs with ``task: dpo``. ``PairCollator`` wraps the model's
collator: the batch is the chosen samples' batch plus ``rejected_images`` (N, 3, R, R) in the
order of ``gen_images``.

    python -m datamodules.pairs --shards "runs/data/world/train/gen-*.tar" --out runs/data/world_pairs

makes pairs from generation shards: each sample's target is chosen, the next sample's target
(another instruction's image) rejected: a stand-in for model-ranked pairs, enough to train and
test the stage.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from datamodules.schema import (RecordError, ShardSample, ShardWriter, image_exts, image_kinds, iter_tar,
                                validate_record, write_manifest)
from datamodules.stream import expand_shards

PAIR_TASK = "dpo"
REJECTED_FIELD = "rejected"


def validate_pair(record: Dict[str, Any]) -> None:
    """A pair record: a valid record with exactly one generation target, the last image, and
    one rejected member. Raises RecordError naming what is wrong."""
    validate_record(record)
    kinds = image_kinds(record)
    if kinds.count("gen") != 1 or kinds[-1] != "gen":
        raise RecordError(f"a pair has exactly one <image_gen> target, after its input images; got {kinds}")
    rej = record.get(REJECTED_FIELD)
    if not isinstance(rej, list) or len(rej) != 1 or not isinstance(rej[0], str):
        raise RecordError(f"a pair needs `{REJECTED_FIELD}`: [member name of the rejected image], got {rej!r}")


def pair_sample(key: str, messages: List[Dict[str, str]], inputs: Sequence[Tuple[str, bytes]],
                chosen: Tuple[str, bytes], rejected: Tuple[str, bytes], source: str = "pairs",
                extra: Optional[Dict[str, Any]] = None) -> ShardSample:
    """One pair for ShardWriter: ``inputs`` / ``chosen`` / ``rejected`` are (format, bytes), e.g. ("png", b"...")."""
    files = {f"img{i}.{fmt}": data for i, (fmt, data) in enumerate(inputs)}
    files[f"img{len(inputs)}.{chosen[0]}"] = chosen[1]
    files[f"rej0.{rejected[0]}"] = rejected[1]
    record = {"id": key, "task": PAIR_TASK, "source": source, "messages": messages,
              "images": [f"img{i}.{fmt}" for i, (fmt, _) in enumerate(list(inputs) + [chosen])],
              REJECTED_FIELD: [f"rej0.{rejected[0]}"], **(extra or {})}
    validate_pair(record)
    return ShardSample(key, record, files)


def write_pairs(out_dir: str, samples: Iterable[ShardSample], source: str, shard_size: int = 1000,
                extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Write ``dpo-*.tar`` + manifest.json under ``out_dir``; returns the manifest."""
    os.makedirs(out_dir, exist_ok=True)
    w = ShardWriter(out_dir, PAIR_TASK, shard_size)
    for s in samples:
        w.write(s)
    return write_manifest(out_dir, w.close(), source, extra=extra)


def pairs_from_generation(shards: Sequence[str], offset: int = 1) -> List[ShardSample]:
    """Pairs from generation records: sample i's target chosen, sample (i + offset)'s rejected."""
    raws = [r for path in shards for r in iter_tar(path)]
    recs = [json.loads(r["json"]) for r in raws]
    keep = [i for i, rec in enumerate(recs) if image_kinds(rec)[-1:] == ["gen"] and image_kinds(rec).count("gen") == 1]
    if len(keep) < 2:
        raise ValueError(f"{len(keep)} generation records with one target in {list(shards)}: need at least 2 to pair")
    out = []
    for j, i in enumerate(keep):
        other = keep[(j + offset) % len(keep)]
        raw, rec = raws[i], recs[i]
        exts = image_exts(raw, len(rec["images"]))
        inputs = [(e.split(".", 1)[1], raw[e]) for e in exts[:-1]]
        chosen = (exts[-1].split(".", 1)[1], raw[exts[-1]])
        o_ext = image_exts(raws[other], len(recs[other]["images"]))[-1]
        rejected = (o_ext.split(".", 1)[1], raws[other][o_ext])
        out.append(pair_sample(f"{raw['__key__']}-dpo", rec["messages"], inputs, chosen, rejected,
                               source=f"pairs:{rec.get('source', '')}",
                               extra={"rejected_from": recs[other]["id"]}))
    return out


class PairCollator:
    """The model's collator on the chosen samples + ``rejected_images`` aligned with ``gen_images``.
    Every sample must be a pair (one target, a rejected image): a batch row without one is refused
    by key, since a DPO step has nothing to compare for it."""

    def __init__(self, base: Callable[[List[Dict[str, Any]]], Dict[str, Any]], gen_transform: Optional[Callable] = None):
        self.base = base
        self.gen_transform = gen_transform or base.gen_transform  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> Any:  # rank, vq_fingerprint, ...: the wrapped collator's
        if name in ("base", "gen_transform"):
            raise AttributeError(name)
        return getattr(self.base, name)

    def __call__(self, samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        for s in samples:
            try:
                validate_pair(s["record"])
            except RecordError as e:
                raise ValueError(f"sample {s.get('key')!r} (source {s.get('source', '')!r}) is not a preference pair: "
                                 f"{e}; a task: dpo source holds pairs (datamodules/pairs.py)") from None
            if len(s.get("rejected") or []) != 1:
                raise ValueError(f"sample {s.get('key')!r}: its rejected image was not read (a reader that keeps "
                                 f"`rejected` members: datamodules.stream.decode_sample)")
        batch = self.base(samples)
        by_key = {s["key"]: s["rejected"][0] for s in samples}
        rows = batch["gen_sample_idx"].tolist()
        if rows != list(range(len(batch["key"]))):
            raise ValueError(f"a pair batch needs one generation target per row, got rows {rows} for {batch['key']}")
        batch["rejected_images"] = torch.stack([self.gen_transform(by_key[batch["key"][b]]) for b in rows]) \
            if rows else torch.zeros(0)
        return batch


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m datamodules.pairs", description=__doc__.split("\n")[0])
    p.add_argument("--shards", required=True, help="generation shards (glob / braces), e.g. 'train/gen-*.tar'")
    p.add_argument("--out", required=True, help="output shard directory (dpo-*.tar + manifest.json)")
    p.add_argument("--offset", type=int, default=1, help="the rejected image is the target of sample i + offset")
    p.add_argument("--shard-size", type=int, default=1000)
    a = p.parse_args(argv)
    paths = expand_shards(a.shards)
    if not paths:
        print(f"error: --shards {a.shards!r} matches no file", flush=True)
        return 1
    m = write_pairs(a.out, pairs_from_generation(paths, a.offset), source=f"pairs:{a.shards}", shard_size=a.shard_size,
                    extra={"converter": {"pairs_from": a.shards, "offset": a.offset}})
    print(f"[pairs] {m['num_samples']} pairs -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
