"""Shard format (see FORMAT.md): one sample = one JSON record + its image files (+ VQ indices).

A tar member is `{key}.{ext}`; webdataset groups members by the key (the name up to the first
dot), so keys never contain dots or slashes (`sanitize_key`). Members of one sample:

  {key}.json            the record (UTF-8 JSON, see `validate_record`)
  {key}.img{i}.{fmt}    image i of the record's `images` list, original bytes (jpg/png/...)
  {key}.img{i}.vq.npy   optional: VQ indices of generation target i, all scales concatenated

Tar bytes are deterministic (sorted order, mtime 0, uid 0) so "same seed, same bytes" holds for
whole shards, not only for images.
"""
from __future__ import annotations

import io
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional

from datamodules.tokens import IMAGE_GEN_PLACEHOLDER, IMAGE_TOKEN

FORMAT_NAME = "vargpt-shards"
FORMAT_VERSION = 1
ROLES = ("system", "user", "assistant")
_PLACEHOLDER_RE = re.compile(re.escape(IMAGE_TOKEN) + "|" + re.escape(IMAGE_GEN_PLACEHOLDER))


class RecordError(ValueError):
    """A malformed record; the message names the problem, callers add id and file."""


def sanitize_key(key: str) -> str:
    """Webdataset splits the sample key at the first dot: keep keys to [A-Za-z0-9_-]."""
    return re.sub(r"[^A-Za-z0-9_\-]", "_", str(key))


def placeholders(messages: List[Dict[str, str]]) -> List[str]:
    """Image placeholders of a conversation in text order ('<image>' or '<image_gen>')."""
    out: List[str] = []
    for m in messages:
        out.extend(_PLACEHOLDER_RE.findall(m["content"]))
    return out


def image_kinds(record: Dict[str, Any]) -> List[str]:
    """'input' / 'gen' per entry of record['images'] (placeholder order)."""
    return ["gen" if p == IMAGE_GEN_PLACEHOLDER else "input" for p in placeholders(record["messages"])]


def validate_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise RecordError("`messages` must be a non-empty list")
    turns = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RecordError(f"message {j} must be {{'role': str, 'content': str}}, got {m!r:.120}")
        if m["role"] not in ROLES:
            raise RecordError(f"message {j} has role {m['role']!r}; valid: {', '.join(ROLES)}")
        if m["role"] == "system":
            if j != 0:
                raise RecordError(f"message {j}: a system message may only come first")
            continue
        turns.append(m["role"])
    if not turns or turns[0] != "user":
        raise RecordError("the conversation must start with a user message")
    for j in range(1, len(turns)):
        if turns[j] == turns[j - 1]:
            raise RecordError(f"roles must alternate user/assistant; turn {j} repeats {turns[j]!r}")
    for j, m in enumerate(messages):
        if m["role"] == "user" and IMAGE_GEN_PLACEHOLDER in m["content"]:
            raise RecordError(f"message {j}: {IMAGE_GEN_PLACEHOLDER} belongs in an assistant message")


def validate_record(record: Dict[str, Any], n_image_files: Optional[int] = None) -> None:
    """Check the fields every consumer relies on. Raises RecordError."""
    if not isinstance(record, dict):
        raise RecordError("record must be a JSON object")
    for k in ("id", "task", "source", "messages", "images"):
        if k not in record:
            raise RecordError(f"missing field {k!r}")
    validate_messages(record["messages"])
    n_ph = len(placeholders(record["messages"]))
    if not isinstance(record["images"], list):
        raise RecordError("`images` must be a list")
    if n_ph != len(record["images"]):
        raise RecordError(
            f"{n_ph} image placeholder(s) ({IMAGE_TOKEN}/{IMAGE_GEN_PLACEHOLDER}) in the text but "
            f"{len(record['images'])} image(s) listed"
        )
    if n_image_files is not None and n_image_files != len(record["images"]):
        raise RecordError(f"{len(record['images'])} images listed but {n_image_files} image files present")


EDIT_TASK = "edit"  # record task / shard prefix of an editing sample


def validate_edit_record(record: Dict[str, Any]) -> None:
    """An editing sample (task ``edit``): the source image(s) as ``<image>`` in a user turn, then
    exactly one ``<image_gen>`` (the edited image) in an assistant turn, listed in that order in
    ``images`` (the release's layout: source first, target last). Raises RecordError with the fix."""
    messages = record.get("messages") or []
    ph = placeholders(messages)
    if IMAGE_TOKEN not in ph:
        raise RecordError(f"an edit sample needs its source image: put {IMAGE_TOKEN} in the user turn and list "
                          f"the source image first in `images`")
    gen_turns = [j for j, m in enumerate(messages) if IMAGE_GEN_PLACEHOLDER in m.get("content", "")]
    if not gen_turns:
        raise RecordError(f"an edit sample needs a {IMAGE_GEN_PLACEHOLDER} turn: put {IMAGE_GEN_PLACEHOLDER} in the "
                          f"assistant turn and list the edited (target) image after the source in `images`")
    if ph.count(IMAGE_GEN_PLACEHOLDER) != 1:
        raise RecordError(f"an edit sample holds one {IMAGE_GEN_PLACEHOLDER} (one edited image), found "
                          f"{ph.count(IMAGE_GEN_PLACEHOLDER)}: split it into one sample per target")
    if ph.index(IMAGE_GEN_PLACEHOLDER) < ph.index(IMAGE_TOKEN):
        raise RecordError(f"the {IMAGE_GEN_PLACEHOLDER} target comes before the source {IMAGE_TOKEN}: the source "
                          f"image goes in the user turn, the target in the assistant turn after it")


def image_member(i: int, fmt: str) -> str:
    return f"img{i}.{fmt}"


def vq_member(i: int) -> str:
    return f"img{i}.vq.npy"


@dataclass
class ShardSample:
    """What a writer needs: the record (with `images` already naming the members) + files."""

    key: str
    record: Dict[str, Any]
    files: Dict[str, bytes] = field(default_factory=dict)  # member ext -> bytes


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Writes `{prefix}-{index:06d}.tar` files of at most `shard_size` samples each.

    The writer also keeps the per-shard counts for the manifest (`self.shards`).
    """

    def __init__(self, out_dir: str, prefix: str, shard_size: int = 1000, start_index: int = 0):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        if "-" in prefix or "/" in prefix:
            raise ValueError(f"shard prefix {prefix!r} may not contain '-' or '/'")
        self.out_dir, self.prefix, self.shard_size = out_dir, prefix, shard_size
        self.start_index = start_index  # number of the first file (parallel writers of one set)
        os.makedirs(out_dir, exist_ok=True)
        self.shards: List[Dict[str, Any]] = []
        self._tar: Optional[tarfile.TarFile] = None
        self._n_in_shard = 0
        self._keys: set = set()
        self.count = 0

    def _open_next(self) -> None:
        self.close_shard()
        name = f"{self.prefix}-{self.start_index + len(self.shards):06d}.tar"
        # format=USTAR/GNU with fixed metadata: byte-identical output for identical input.
        self._tar = tarfile.open(os.path.join(self.out_dir, name), "w", format=tarfile.GNU_FORMAT)
        self.shards.append({"name": name, "task": self.prefix, "count": 0})
        self._n_in_shard = 0

    def write(self, sample: ShardSample) -> None:
        key = sample.key
        if key != sanitize_key(key):
            raise ValueError(f"sample key {key!r} has characters other than [A-Za-z0-9_-]")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r} in shard set {self.prefix}")
        n_img_files = sum(1 for ext in sample.files if ext.startswith("img") and not ext.endswith(".vq.npy"))
        validate_record(sample.record, n_img_files)
        missing = [m for m in sample.record["images"] if m not in sample.files]
        if missing:
            raise RecordError(f"sample {key}: images {missing} listed but not given")
        self._keys.add(key)
        if self._tar is None or self._n_in_shard >= self.shard_size:
            self._open_next()
        body = json.dumps(sample.record, ensure_ascii=False, sort_keys=True).encode("utf-8")
        _add_member(self._tar, f"{key}.json", body)
        for ext in sorted(sample.files):
            _add_member(self._tar, f"{key}.{ext}", sample.files[ext])
        self._n_in_shard += 1
        self.shards[-1]["count"] += 1
        self.count += 1

    def close_shard(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def close(self) -> List[Dict[str, Any]]:
        self.close_shard()
        return self.shards


def write_manifest(
    out_dir: str,
    shards: List[Dict[str, Any]],
    source: str,
    skipped: Optional[List[Dict[str, Any]]] = None,
    vq: Optional[Dict[str, Any]] = None,
    extra: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """manifest.json of a shard set: counts, format version, VQ fingerprint when present."""
    skipped = skipped or []
    by_task: Dict[str, int] = {}
    for s in shards:
        by_task[s["task"]] = by_task.get(s["task"], 0) + s["count"]
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "source": source,
        "num_samples": sum(s["count"] for s in shards),
        "num_by_task": by_task,
        "num_skipped": len(skipped),
        "skipped": skipped,
        "shards": shards,
        "vq": vq,
    }
    if extra:
        manifest.update(extra)
    with open(os.path.join(out_dir, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, ensure_ascii=False, sort_keys=True)
        f.write("\n")
    return manifest


def read_manifest(shard_dir: str) -> Dict[str, Any]:
    path = os.path.join(shard_dir, "manifest.json")
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"{path}: not a {FORMAT_NAME} manifest (format={manifest.get('format')!r})")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {manifest['format_version']} is newer than this code "
            f"({FORMAT_VERSION}); update the project"
        )
    return manifest


def iter_tar(path: str) -> Iterator[Dict[str, Any]]:
    """Raw samples of one shard in stored order: {'__key__', '__url__', ext: bytes, ...}.

    Plain tarfile reading (no webdataset pipeline) for tools and tests.
    """
    current: Optional[Dict[str, Any]] = None
    with tarfile.open(path, "r") as tar:
        for info in tar:
            if not info.isreg():
                continue
            base = os.path.basename(info.name)
            key, _, ext = base.partition(".")
            data = tar.extractfile(info).read()
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key, "__url__": path}
            current[ext] = data
    if current is not None:
        yield current


def image_exts(raw: Dict[str, Any], n: int) -> List[str]:
    """Member extensions of images 0..n-1 of a raw sample (whatever their format)."""
    out = []
    for i in range(n):
        prefix = f"img{i}."
        match = [k for k in raw if k.startswith(prefix) and not k.endswith(".vq.npy") and k.count(".") == 1]
        if len(match) != 1:
            raise RecordError(f"image {i}: expected one member img{i}.<fmt>, found {match}")
        out.append(match[0])
    return out
