"""Training checkpoints and preemption: what makes a long run survive.

``TrainingCheckpoint`` (a Lightning callback) writes a checkpoint every ``every_n_steps`` steps
and/or ``every_n_minutes``, at the end of fit, and when the process is asked to stop (SIGTERM,
or SIGUSR1, which SLURM sends before a requeue): the current step finishes, the checkpoint is
written, training stops, and the launcher exits non-zero saying how to resume.

What a checkpoint holds (Lightning's checkpoint plus what it lacks):
  Lightning   trainable parameters (the stage filters out frozen ones, keeping their hash:
              StageModule.on_save_checkpoint), optimizer and LR-schedule state, global step,
              loop progress
  this file   every RNG of the process (python, numpy, torch, CUDA), the MLflow run id, the
              config hash; the stage's counters (training batches consumed = the data stream
              position, bad-sample totals) travel with the stage
Loader workers need no saved RNG: their streams and collators are seeded from (seed, rank,
worker) and replay to the saved position (datamodules.stream.BatchedStream).

Files are written by Lightning to a temporary name, then moved into place with a sidecar of
hashes (modules.checkpoint.finalize_checkpoint); a failed write (a full disk) leaves the
previous checkpoint usable and is reported, and training goes on.
"""
from __future__ import annotations

import errno
import logging
import random
import signal
import time
from pathlib import Path
from typing import Any, Dict, Optional

import lightning as L
import numpy as np
import torch

from modules.checkpoint import checkpoint_name, finalize_checkpoint, prune_checkpoints, remove_checkpoint

log = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def collect_rng() -> Dict[str, Any]:
    """The process's RNG states in a form torch.load(weights_only=True) accepts."""
    mt, keys, pos, has_gauss, gauss = np.random.get_state()
    out: Dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state(),
                           "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                                     "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(state: Dict[str, Any]) -> None:
    random.setstate(tuple(state["python"][:1]) + (tuple(state["python"][1]),) + tuple(state["python"][2:]))
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class TrainingCheckpoint(L.Callback):
    def __init__(self, ckpt_dir: Path, every_n_steps: int = 0, every_n_minutes: float = 0.0, keep_last: int = 2,
                 at_end: bool = True, meta: Optional[Dict[str, Any]] = None):
        self.dir = Path(ckpt_dir)
        self.every_n_steps, self.every_s, self.keep_last, self.at_end = every_n_steps, every_n_minutes * 60, keep_last, at_end
        self.meta: Dict[str, Any] = dict(meta or {})  # config_hash, mlflow_run_id, stage: into every sidecar
        self.signum: Optional[int] = None  # set by the stop-signal handler
        self.saved_step = -1
        self.last_path: Optional[Path] = None
        self._t_last = time.monotonic()
        self._restored_rng: Optional[Dict[str, Any]] = None
        self._old_handlers: Dict[int, Any] = {}

    # ------------------------------------------------------------------ state in the checkpoint
    def state_dict(self) -> Dict[str, Any]:
        return {"rng": collect_rng(), "meta": {k: str(v) for k, v in self.meta.items()}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._restored_rng = state.get("rng")

    # ------------------------------------------------------------------ signals
    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signum = signum  # acted on at the next step boundary (on_train_batch_end / on_validation_end)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After Lightning installed its own SIGTERM handler (which would exit 0 mid-validation):
        # ours only notes the signal, so the step in progress finishes and a checkpoint is written.
        for s in STOP_SIGNALS:
            try:
                self._old_handlers[s] = signal.signal(s, self._on_signal)
            except ValueError:  # not the main thread (some launchers): keep Lightning's handling
                pass
        if self._restored_rng is not None:
            restore_rng(self._restored_rng)
            self._restored_rng = None
        self._t_last = time.monotonic()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for s, h in self._old_handlers.items():
            signal.signal(s, h)
        self._old_handlers.clear()

    # ------------------------------------------------------------------ when to save
    def _stop_requested(self, trainer: L.Trainer) -> bool:
        # every rank must agree (a checkpoint write is collective under FSDP)
        return bool(trainer.strategy.reduce_boolean_decision(self.signum is not None, all=False))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self._stop_requested(trainer):
            self._stop(trainer, step)
            return
        due = (self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0) or \
              (self.every_s > 0 and time.monotonic() - self._t_last >= self.every_s)
        if self.every_s > 0:  # the clocks differ per rank: agree (a collective every rank makes every step)
            due = trainer.strategy.reduce_boolean_decision(due, all=False)
        if due and step != self.saved_step:
            self.save(trainer, step)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and self._stop_requested(trainer):
            self._stop(trainer, trainer.global_step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_end and self.signum is None and trainer.global_step != self.saved_step:
            self.save(trainer, trainer.global_step)

    def _stop(self, trainer: L.Trainer, step: int) -> None:
        if step != self.saved_step:
            self.save(trainer, step)
        trainer.should_stop = True
        if self.signum is None:  # another rank got the signal
            self.signum = int(signal.SIGTERM)

    # ------------------------------------------------------------------ writing
    def save(self, trainer: L.Trainer, step: int) -> Optional[Path]:
        """Write ``step-N.ckpt`` atomically; on failure keep the previous one and say so."""
        final = self.dir / checkpoint_name(step)
        tmp = final.with_suffix(".ckpt.tmp")
        try:
            if trainer.is_global_zero:
                self.dir.mkdir(parents=True, exist_ok=True)
            # every rank (collective under FSDP); rank 0 writes. weights_only=False said outright:
            # a resume checkpoint needs the optimiser, schedulers, loops and callbacks too.
            trainer.save_checkpoint(str(tmp), weights_only=False)
            if trainer.is_global_zero:
                finalize_checkpoint(tmp, final, {**self.meta, "step": step, "time": time.time()})
                prune_checkpoints(self.dir, self.keep_last)
        except OSError as e:
            if trainer.is_global_zero:
                remove_checkpoint(tmp)
            kind = "the disk is full" if e.errno == errno.ENOSPC else str(e)
            prev = f"the previous checkpoint {self.last_path} is still usable" if self.last_path else \
                "no earlier checkpoint of this run exists"
            log.error("checkpoint at step %d could not be written (%s): %s; training goes on", step, kind, prev)
            print(f"[run] checkpoint at step {step} could not be written ({kind}); {prev}", flush=True)
            trainer.strategy.barrier("checkpoint")
            return None
        # every rank goes on once the checkpoint is in place under its final name (a sharded one is
        # a directory that rank 0 renames after every rank wrote into it)
        trainer.strategy.barrier("checkpoint")
        self.saved_step, self.last_path, self._t_last = step, final, time.monotonic()
        if trainer.is_global_zero:
            print(f"[run] checkpoint: {final}", flush=True)
        return final
