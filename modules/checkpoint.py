"""State on disk: safetensors only (no pickle), written atomically; strict loading with an
explicit allow-list.

The one owner of state out: ``write_export`` writes a run's export directory (the stage's files,
``config.yaml`` and ``export.json`` with their hashes, each file via a temporary name and a
rename, the manifest last), which ``init_from:``, evaluation and inference read. Loading never
silently ignores keys: anything missing or unexpected that the caller did not allow is an error
that lists the keys (modules/weights.py maps foreign layouts onto ours before that).
"""
from __future__ import annotations

import fnmatch
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence

import torch
import torch.nn as nn


class StateDictMismatchError(ValueError):
    """A checkpoint whose keys or shapes do not match the module (the message lists them all)."""



def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (weights fingerprints, manifests)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_state_dict(sd: Mapping[str, torch.Tensor], path: Path, metadata: Optional[Dict[str, str]] = None) -> None:
    """Write ``sd`` as safetensors atomically. Tensors that share storage (tied embeddings)
    are cloned so each key is stored: safetensors refuses aliased tensors."""
    seen: Dict[int, str] = {}
    out: Dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        t = v.detach()
        ptr = t.untyped_storage().data_ptr() if t.numel() else -1
        if ptr in seen and ptr != -1:
            t = t.clone()
        else:
            seen[ptr] = k
        out[k] = t.contiguous().cpu()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    _write_safetensors(out, tmp, {k: str(v) for k, v in (metadata or {}).items()})
    tmp.replace(path)


def _write_safetensors(tensors: Dict[str, torch.Tensor], path: Path, metadata: Dict[str, str]) -> None:
    """safetensors' save_file, then its header rewritten in place with the keys sorted: the library
    serialises the metadata from a hash map whose order changes from one process to the next, so
    the same weights and metadata gave files with different sha256 (two keys: a coin flip per
    file); sorted, the bytes are a function of the content (the shipped bases' hashes reproduce)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        text = json.dumps(header, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()
        if len(text) > n:  # cannot happen for the same content; keep the file as written
            return
        f.seek(8)
        f.write(text + b" " * (n - len(text)))  # the format pads the header with spaces


EXPORT_MANIFEST = "export.json"


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_export(out_dir: Path, files: Mapping[str, Mapping[str, torch.Tensor]], config_yaml: str,
                 metadata: Optional[Dict[str, Any]] = None) -> Path:
    """A run's export: every ``files`` entry (name -> state dict) as safetensors, the resolved
    ``config.yaml`` beside them and ``export.json`` ({file: {sha256, tensors}}, metadata) written
    last, so a directory with a manifest is complete. Returns the path of ``model.safetensors``
    (or the first file)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # export.json keeps the metadata's JSON values (numbers, the run's provenance dicts); the
    # safetensors header takes strings only, so non-strings go there as JSON text
    native = json.loads(json.dumps(dict(metadata or {}), default=str))
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in native.items()}
    manifest: Dict[str, object] = {"metadata": native, "files": {}}
    (out_dir / EXPORT_MANIFEST).unlink(missing_ok=True)  # incomplete until rewritten below
    for name, sd in files.items():
        save_state_dict(sd, out_dir / name, metadata=meta)
        manifest["files"][name] = {"sha256": sha256_file(out_dir / name), "tensors": len(sd)}  # type: ignore[index]
    _write_text_atomic(out_dir / "config.yaml", config_yaml)
    manifest["files"]["config.yaml"] = {"sha256": sha256_file(out_dir / "config.yaml")}  # type: ignore[index]
    _write_text_atomic(out_dir / EXPORT_MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return out_dir / ("model.safetensors" if "model.safetensors" in files else next(iter(files)))


class WeightsIntegrityError(RuntimeError):
    """A weights file whose sha256 differs from the MANIFEST.json beside it."""


MANIFEST = "MANIFEST.json"
_VERIFIED: Dict[tuple, str] = {}  # (path, size, mtime_ns) -> sha256 already checked in this process


def verify_manifest(path: Path) -> None:
    """When a MANIFEST.json beside ``path`` lists it (the shipped world bases), its sha256 must
    match: a truncated download, a bad merge or a hand edit would otherwise train from wrong
    weights without a word."""
    mf = path.parent / MANIFEST
    if not mf.is_file():
        return

    try:
        entries = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise WeightsIntegrityError(f"{mf}: not JSON ({e}); restore it with `git checkout -- {mf}`") from e
    want = next((e.get("sha256") for e in entries.values() if isinstance(e, dict) and e.get("file") == path.name), None)
    if want is None:
        return
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    got = _VERIFIED.get(key) or sha256_file(path)
    if got != want:
        raise WeightsIntegrityError(
            f"{path}: sha256 {got[:12]}... differs from {mf} ({want[:12]}...): the file is damaged or was "
            f"changed by hand. Restore the shipped one with `git checkout -- {path}`, or retrain and repack "
            f"every base with `make clean-bases bases` (which rewrites {MANIFEST})")
    _VERIFIED[key] = got


def read_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    """safetensors, or a torch pickle loaded with weights_only=True (official .pth files).
    A directory means every shard in it (HF layout: *.safetensors, else pytorch_model*.bin).
    A file listed in a MANIFEST.json beside it is checked against its sha256 first."""
    path = Path(path)
    if path.is_dir():
        shards = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
        if not shards:
            raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin weights in directory {path}")
        out: Dict[str, torch.Tensor] = {}
        for shard in shards:
            out.update(read_state_dict(shard))
        return out
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    verify_manifest(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):  # training checkpoints wrap the weights
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return obj


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) or key == p or key.startswith(p + ".") for p in patterns)


def load_strict(module: nn.Module, sd: Mapping[str, torch.Tensor], allow_missing: Sequence[str] = (),
                allow_unexpected: Sequence[str] = (), source: str = "state dict",
                hint: str = "load the matching checkpoint, or allow the keys explicitly "
                            "(e.g. init_allow_missing in the config)") -> Dict[str, list]:
    """Load ``sd`` into ``module``; missing/unexpected keys and shape mismatches are errors
    unless matched by the allow patterns (exact names, prefixes or fnmatch globs)."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shape = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    bad_missing = [k for k in missing if not _matches(k, allow_missing)]
    bad_unexpected = [k for k in unexpected if not _matches(k, allow_unexpected)]
    if bad_missing or bad_unexpected or shape:
        lines = [f"cannot load {source} strictly:"]
        if bad_missing:
            lines.append(f"  missing keys ({len(bad_missing)}): {', '.join(bad_missing[:20])}"
                         + (" ..." if len(bad_missing) > 20 else ""))
        if bad_unexpected:
            lines.append(f"  unexpected keys ({len(bad_unexpected)}): {', '.join(bad_unexpected[:20])}"
                         + (" ..." if len(bad_unexpected) > 20 else ""))
        if shape:
            lines.append(f"  shape mismatches ({len(shape)}): {'; '.join(shape[:10])}")
        lines.append(f"  fix: {hint}")
        raise StateDictMismatchError("\n".join(lines))
    module.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    return {"missing": missing, "unexpected": unexpected}


# ------------------------------------------------------------------------------ training checkpoints
# A training checkpoint is Lightning's checkpoint file (weights_only-loadable: tensors, numbers,
# strings) `step-NNNNNNNN.ckpt` plus a sidecar `step-NNNNNNNN.json` written after it: sha256, size,
# step, config hash, MLflow run id. A checkpoint without a sidecar, or whose bytes do not match
# it, is not used (a crash mid-write, a full disk): the one before it is.
CKPT_GLOB = "step-*.ckpt"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}.ckpt"


def sha256_path(path: Path) -> str:
    """sha256 of a checkpoint: of the file, or for a directory (a sharded checkpoint: one file per
    rank plus metadata) of its sorted (relative name, file sha256) list."""
    import hashlib

    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path).as_posix()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def size_of(path: Path) -> int:
    """Bytes of a checkpoint file, or of every file in a checkpoint directory."""
    path = Path(path)
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def remove_checkpoint(path: Path) -> None:
    import shutil

    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def finalize_checkpoint(tmp: Path, final: Path, meta: Dict[str, object]) -> Dict[str, object]:
    """Move a fully written checkpoint ``tmp`` (a file, or a sharded checkpoint's directory) into
    place and write its sidecar (both atomic)."""
    tmp, final = Path(tmp), Path(final)
    info = {**meta, "file": final.name, "bytes": size_of(tmp), "sha256": sha256_path(tmp)}
    if final.is_dir():  # a directory is not replaced by a rename: one left by a run killed after its rename
        remove_checkpoint(final)
    tmp.replace(final)
    _write_text_atomic(final.with_suffix(".json"), json.dumps(info, indent=1) + "\n")
    return info


def checkpoint_info(path: Path) -> Optional[Dict[str, object]]:
    """The sidecar of a checkpoint if the file is there and matches it, else None."""
    path = Path(path)
    side = path.with_suffix(".json")
    try:
        info = json.loads(side.read_text())
    except (OSError, ValueError):
        return None
    if not path.exists() or size_of(path) != info.get("bytes") or sha256_path(path) != info.get("sha256"):
        return None
    return info


def list_checkpoints(ckpt_dir: Path) -> list:
    """Checkpoint files of a run, oldest first (by step in the name)."""
    return sorted(Path(ckpt_dir).glob(CKPT_GLOB))


def latest_valid_checkpoint(ckpt_dir: Path, warn=print) -> Optional[Path]:
    """The newest checkpoint that verifies against its sidecar; each one that does not is
    reported through ``warn`` and skipped."""
    for path in reversed(list_checkpoints(ckpt_dir)):
        if checkpoint_info(path) is not None:
            return path
        warn(f"checkpoint {path} does not match its sidecar {path.with_suffix('.json').name} "
             f"(incomplete write?): skipped, trying the one before")
    return None


def prune_checkpoints(ckpt_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` verified checkpoints (and their sidecars); files
    that do not verify are deleted only when something newer verifies."""
    paths = list_checkpoints(ckpt_dir)
    good = [p for p in paths if p.with_suffix(".json").is_file()]
    for p in good[:-keep_last] if keep_last > 0 else []:
        remove_checkpoint(p)
        p.with_suffix(".json").unlink(missing_ok=True)
    for tmp in Path(ckpt_dir).glob("*.tmp"):
        remove_checkpoint(tmp)


# ------------------------------------------------------------------------------ sharded safetensors
# The Hugging Face layout of a large checkpoint: shards `model-0000i-of-0000n.safetensors` and
# `model.safetensors.index.json` ({"metadata": {"total_size": bytes}, "weight_map": {key: shard}}),
# or a single `model.safetensors`. Read shard by shard, tensor by tensor (never the whole
# checkpoint at once); written shard by shard, each via a temporary name, the index last.
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"


def safetensors_weight_map(d: Path) -> Dict[str, str]:
    """{key: shard file name} of a checkpoint directory (its index, else its single file)."""
    d = Path(d)
    if (d / SAFETENSORS_INDEX).is_file():
        return dict(json.loads((d / SAFETENSORS_INDEX).read_text())["weight_map"])
    if (d / SAFETENSORS_SINGLE).is_file():
        from safetensors import safe_open

        with safe_open(str(d / SAFETENSORS_SINGLE), framework="pt") as f:
            return {k: SAFETENSORS_SINGLE for k in f.keys()}
    raise FileNotFoundError(f"{d}: neither {SAFETENSORS_INDEX} nor {SAFETENSORS_SINGLE}")


def safetensors_shapes(d: Path) -> Dict[str, tuple]:
    """{key: shape} of a checkpoint directory from the safetensors headers (no tensor is read)."""
    from safetensors import safe_open

    d = Path(d)
    out: Dict[str, tuple] = {}
    for shard in sorted(set(safetensors_weight_map(d).values())):
        with safe_open(str(d / shard), framework="pt") as f:
            for k in f.keys():
                out[k] = tuple(f.get_slice(k).get_shape())
    return out


def read_safetensors_tensor(d: Path, key: str) -> torch.Tensor:
    """One tensor of a checkpoint directory (its shard is opened, nothing else read)."""
    from safetensors import safe_open

    shard = safetensors_weight_map(d)[key]
    with safe_open(str(Path(d) / shard), framework="pt") as f:
        return f.get_tensor(key)


def iter_safetensors_shards(d: Path):
    """Yield (shard name, [(key, tensor loader)]) per shard of a checkpoint directory; each
    loader reads one tensor. A shard whose keys differ from what the index lists for it, or a
    missing shard, is an error naming it."""
    from safetensors import safe_open

    d = Path(d)
    weight_map = safetensors_weight_map(d)
    for shard in sorted(set(weight_map.values())):
        path = d / shard
        if not path.is_file():
            raise FileNotFoundError(f"{path}: shard listed in {SAFETENSORS_INDEX} is missing")
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            listed = {k for k, s in weight_map.items() if s == shard}
            if set(keys) != listed:
                raise StateDictMismatchError(f"{path} holds {len(keys)} tensors, the index lists {len(listed)} "
                                             f"(first difference: {sorted(set(keys) ^ listed)[:3]})")
            yield shard, [(k, (lambda k=k: f.get_tensor(k))) for k in keys]


def save_sharded_safetensors(items: Iterable, out_dir: Path, max_shard_bytes: int = 5 * 2**30,
                             metadata: Optional[Dict[str, str]] = None, materialize=None) -> Path:
    """Write (key, tensor, dtype) triples as HF shards + index in ``out_dir``. Tensors are cast
    (and copied) shard by shard, so at most one shard's worth of copies exists at a time; ``items``
    may be a list of tensors that belong to a live model. ``materialize(key, tensor)`` (optional)
    gives the values of a tensor when its shard is written (e.g. for meta tensors). Returns the
    index path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    items = list(items)
    groups, cur, size = [], [], 0
    for key, t, dtype in items:
        n = t.numel() * torch.empty((), dtype=dtype).element_size()
        if cur and size + n > max_shard_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append((key, t, dtype))
        size += n
    groups.append(cur)
    total = 0
    weight_map: Dict[str, str] = {}
    (out_dir / SAFETENSORS_INDEX).unlink(missing_ok=True)  # incomplete until rewritten below
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {k: (materialize(k, t) if materialize is not None else t).detach().to("cpu", dtype).contiguous()
                 for k, t, dtype in group}
        seen: Dict[int, str] = {}
        for k, t in shard.items():  # safetensors refuses aliased tensors
            ptr = t.untyped_storage().data_ptr() if t.numel() else -1
            if ptr in seen and ptr != -1:
                shard[k] = t.clone()
            seen[ptr] = k
        tmp = out_dir / (name + ".tmp")
        _write_safetensors(shard, tmp, {"format": "pt", **(metadata or {})})
        tmp.replace(out_dir / name)
        total += sum(t.numel() * t.element_size() for t in shard.values())
        weight_map.update({k: name for k in shard})
        del shard
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    _write_text_atomic(out_dir / SAFETENSORS_INDEX, json.dumps(index, indent=2) + "\n")
    return out_dir / SAFETENSORS_INDEX


# ----------------------------------------------------------------------------------- streaming in
@contextmanager
def empty_parameters():
    """Build modules whose parameters live on the meta device (no memory, no init cost) while
    buffers are real (rotary tables, position ids, masks keep their values). Load every
    parameter afterwards (``stream_load`` assigns them); one left on meta is a missing key."""
    orig = nn.Module.register_parameter

    def register(self, name, param):
        orig(self, name, param)
        if param is not None and param.device.type != "meta":
            self._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = orig


def _assign(model: nn.Module, name: str, t: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    table = mod._parameters if attr in mod._parameters else mod._buffers
    old = table[attr]
    if old.device.type == "meta":
        t = t.to(old.dtype)
        table[attr] = nn.Parameter(t, requires_grad=old.requires_grad) if table is mod._parameters else t
    else:
        with torch.no_grad():
            old.copy_(t)
