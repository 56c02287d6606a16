"""What keeps a run's output directory consistent: one run at a time, writable before training
starts, a previous export set aside (never mistaken for the new one), resume from a checkpoint
that belongs to this config.

  RunLock            an flock on <output_dir>/.run.lock (released by the kernel when the process
                     dies, so a killed run never blocks the next); it records pid, host, start
                     time and the MLflow run id, so the next run can mark a run whose process is
                     gone as failed
  check_writable     fails before anything is built, naming the path
  set_aside_export   moves a previous export into <output_dir>/previous_export/
  find_resume        the checkpoint --resume means, verified, with its config-hash check
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import OmegaConf

from experiments.config import LoadedConfig, flatten, resolve_path
from modules.checkpoint import EXPORT_MANIFEST, checkpoint_info, latest_valid_checkpoint, sha256_file


class RunError(Exception):
    """An expected failure: the launcher prints the message (no traceback) and exits 1."""


class Preempted(Exception):
    """Training stopped on a signal after writing a checkpoint (exit status 128 + signal)."""

    def __init__(self, signum: int, step: int, checkpoint: Optional[Path]):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"{signal.Signals(signum).name} received: stopped after step {step}"
                         + (f", checkpoint {checkpoint}" if checkpoint else ", no checkpoint could be written"))


def is_rank_zero() -> bool:
    """Rank 0 of a (possibly distributed) launch, from the environment the launchers set."""
    for key in ("RANK", "SLURM_PROCID"):
        if key in os.environ:
            return int(os.environ[key]) == 0
    return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


def check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise RunError(f"output directory {out} is not writable ({e.strerror or e}); fix its permissions "
                       f"or set output_dir=<a writable path>") from None


class RunLock:
    NAME = ".run.lock"

    def __init__(self, out: Path):
        self.path = out / self.NAME
        self.previous: Dict[str, Any] = {}
        self._f = None

    def acquire(self) -> "RunLock":
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            info = _json(f.read())
            f.close()
            raise RunError(f"{self.path.parent} is in use by another run (pid {info.get('pid', '?')} on "
                           f"{info.get('host', '?')}, started {info.get('started', '?')}); wait for it to "
                           f"finish, or give this run its own output_dir=...") from None
        f.seek(0)
        self.previous = _json(f.read())  # what the last run here left (its process is gone)
        self._f = f
        self.record()
        return self

    def record(self, **extra: Any) -> None:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                **extra}
        self._f.seek(0)
        self._f.truncate()
        self._f.write(json.dumps(info))
        self._f.flush()

    def release(self) -> None:
        if self._f is not None:
            fcntl.flock(self._f, fcntl.LOCK_UN)
            self._f.close()
            self._f = None


def _json(text: str) -> Dict[str, Any]:
    try:
        return json.loads(text) if text.strip() else {}
    except ValueError:
        return {}


def set_aside_export(out: Path) -> Optional[Path]:
    """Move a previous export (its safetensors, config.yaml, export.json) into previous_export/,
    so until this run exports, nothing in ``out`` looks like a current result."""
    files = [p for p in out.glob("*.safetensors")] + [p for p in (out / "config.yaml", out / EXPORT_MANIFEST) if p.exists()]
    if not files:
        return None
    dest = out / "previous_export"
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir()
    for p in files:
        p.replace(dest / p.name)
    return dest


def init_hash(init_from: str) -> str:
    """sha256 of the export a run starts from (``init_from``), from its export.json when it has
    one (written with it), else hashed now; "" without init_from."""
    if not init_from:
        return ""
    p = resolve_path(init_from)
    f = p / "model.safetensors" if p.is_dir() else p
    try:
        return str(json.loads((f.parent / EXPORT_MANIFEST).read_text())["files"][f.name]["sha256"])
    except (OSError, ValueError, KeyError):
        return sha256_file(f) if f.is_file() else ""


def stale_inputs(out: Path) -> List[str]:
    """Why the export in ``out`` is stale: the export it was trained from (its recorded
    ``init_from_sha256``) has changed since. Empty when current or unknown."""
    try:
        meta = json.loads((out / EXPORT_MANIFEST).read_text())["metadata"]
    except (OSError, ValueError, KeyError):
        return []
    want, src = meta.get("init_from_sha256", ""), meta.get("init_from", "")
    if want and src and init_hash(src) != want:
        return [f"{out} was trained from {src} (sha256 {want[:12]}), which has changed since "
                f"(now {init_hash(src)[:12] or 'missing'}): rerun it"]
    return []


def config_diff(saved_yaml: Path, loaded: LoadedConfig) -> List[str]:
    """Keys whose values differ between a run's saved config and this one."""
    try:
        old = flatten(OmegaConf.load(saved_yaml))
    except (OSError, ValueError):
        return [f"(the checkpoint's config {saved_yaml} could not be read)"]
    new = flatten(loaded.yaml_cfg)
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}" for k in keys if old.get(k) != new.get(k)]


def find_resume(arg: str, ckpt_dir: Path, loaded: LoadedConfig) -> Tuple[Path, Dict[str, Any]]:
    """``--resume`` (latest) or ``--resume PATH`` (a checkpoint file or a directory of them) ->
    (checkpoint, its sidecar). Refuses a checkpoint of another config, listing what differs."""
    where = ckpt_dir if arg == "latest" else Path(arg)
    # a directory of checkpoints, or one sharded checkpoint (itself a directory, step-N.ckpt)
    path = latest_valid_checkpoint(where, warn=lambda m: print(f"[run] warning: {m}", flush=True)) \
        if where.is_dir() and where.suffix != ".ckpt" else where
    if path is None or not path.exists():
        raise RunError(f"--resume: no valid checkpoint in {where}; start the run without --resume")
    info = checkpoint_info(path)
    if info is None:
        raise RunError(f"--resume: {path} does not match its sidecar {path.with_suffix('.json').name} "
                       f"(incomplete write?); pass an earlier checkpoint or the directory")
    if info.get("config_hash") != loaded.hash:
        diff = config_diff(path.parent / "config.yaml", loaded)
        raise RunError(f"--resume: {path} was written with config {info.get('config_hash')}, this config is "
                       f"{loaded.hash}; differing keys:\n  " + "\n  ".join(diff or ["(unknown)"]) +
                       "\nresume with the same config, or start a new run (another output_dir)")
    return path, info
