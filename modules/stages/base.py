"""What every stage's LightningModule shares: optimiser, schedule, step-rate logging, the run
counters a checkpoint carries, and the guard against non-finite losses.

Stage modules stay thin: they say which parameters train and how the loss is mixed; the model
itself is a plain nn.Module (``self.net``).

Checkpoints hold the trainable parameters only: frozen ones are rebuilt from the config
(``model.load`` / ``init_from``) on resume and checked against the hash stored with the
checkpoint, so a stage-3 checkpoint of the 7B model is not a copy of the frozen LLM.
"""
from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import lightning as L
import torch

from datamodules.paths import run_dir
from modules.optim import build_optimizer, build_scheduler, param_counts

# Run counters carried by checkpoints: training batches consumed (the data stream position),
# bad samples met (totals), non-finite losses skipped.
COUNTERS = ("batches_seen", "num_unreadable", "num_dropped", "num_clipped", "nonfinite_skipped")


class NonFiniteLossError(RuntimeError):
    """The loss went NaN / inf (trainer.on_nonfinite: stop, or too many skips in a row)."""


class ResumeMismatchError(RuntimeError):
    """A checkpoint that does not belong to this model (frozen weights or keys differ)."""


class StageModule(L.LightningModule):
    """Base for stage LightningModules. Subclasses set ``self.net`` and implement
    ``trainable_parameters()`` (names) and ``training_step``."""

    def __init__(self, cfg: Any):
        super().__init__()
        self.cfg = cfg  # typed ExperimentConfig (not saved as hparams: MLflow gets it flattened)
        self._t_last: float | None = None
        self._window = [0, 0]  # samples, tokens since the last logged throughput
        self.counters: Dict[str, int] = {k: 0 for k in COUNTERS}
        self._nonfinite_run = 0  # non-finite losses in a row (skip mode)
        self.strict_loading = False  # checkpoints hold the trainable parameters only (checked below)

    # -- trainable set --------------------------------------------------------------------
    def trainable_prefixes(self) -> Tuple[str, ...]:
        """Parameter-name prefixes (relative to ``self.net``) that train in this stage."""
        raise NotImplementedError

    def apply_trainable_set(self) -> None:
        """Freeze everything, then unfreeze exactly the declared prefixes; frozen submodules
        go to eval mode so dropout/drop-path are off in them."""
        prefixes = self.trainable_prefixes()
        matched = set()
        for name, p in self.net.named_parameters():
            hit = [pre for pre in prefixes if name == pre or name.startswith(pre + ".")]
            p.requires_grad_(bool(hit))
            matched.update(hit)
        missing = [p for p in prefixes if p not in matched]
        if missing:
            raise ValueError(f"{type(self).__name__}: trainable prefixes match no parameter: {missing}")

    def trainable_parameter_names(self) -> List[str]:
        return [n for n, p in self.net.named_parameters() if p.requires_grad]

    def exports(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """What the run hands on, file name -> state dict, written by ``modules.checkpoint.write_export``
        (``model.safetensors``: the full ``self.net``, what ``init_from`` and evaluation read)."""
        return {"model.safetensors": self.net.state_dict()}

    def param_counts(self) -> Dict[str, int]:
        total, trainable = param_counts(self.net)
        return {"params_total": total, "params_trainable": trainable}

    # -- optimisation ---------------------------------------------------------------------
    def configure_optimizers(self):
        o = self.cfg.optim
        opt = build_optimizer(self.net, o.lr, o.weight_decay, o.betas, o.eps)
        sched = build_scheduler(opt, self.cfg.trainer.max_steps, o.warmup_steps, o.warmup_ratio,
                                o.min_lr_ratio, o.schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def logging_step(self) -> bool:
        """Whether this training step's logs are written (Lightning's own rule; global_step is
        not yet incremented inside training_step). Each self.log costs ~0.3 ms of CPU, so steps
        that would be dropped anyway skip them."""
        t = self._trainer
        if t is None:
            return True
        n = t.log_every_n_steps
        return bool(t.should_stop or n <= 0 or (t.global_step + 1) % n == 0)

    def log_throughput(self, n_samples: int, n_tokens: int = 0) -> None:
        """samples/s and tokens/s over the window since the last logged step (counts every
        step, logs on logging steps)."""
        now = time.perf_counter()
        if self._t_last is None:  # the first step includes start-up: start the window after it
            self._t_last, self._window = now, [0, 0]
            return
        self._window[0] += n_samples
        self._window[1] += n_tokens
        if self.logging_step():
            dt = max(now - self._t_last, 1e-9)
            self.log("train/samples_per_s", self._window[0] / dt, on_step=True, on_epoch=False)
            if self._window[1]:
                self.log("train/tokens_per_s", self._window[1] / dt, on_step=True, on_epoch=False)
            self._t_last, self._window = now, [0, 0]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.counters["batches_seen"] += 1
        if getattr(self.cfg.trainer, "log_sample_keys", False) and isinstance(batch, dict) and "key" in batch:
            with open(self.sample_keys_path(), "a") as f:
                f.write(f"{self.counters['batches_seen'] - 1} {' '.join(batch['key'])}\n")
        if self.trainer.optimizers and self.logging_step():
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)

    def sample_keys_path(self) -> Path:
        rank = self.trainer.global_rank if self._trainer is not None else 0
        return run_dir(self.cfg) / (f"sample_keys.rank{rank}.txt" if rank else "sample_keys.txt")

    # -- bad samples and non-finite losses -------------------------------------------------
    def count_bad_samples(self, batch: Dict[str, Any]) -> None:
        """Add the batch's bad-sample counts to the run totals (logged as totals by log_counters)."""
        for k in ("num_unreadable", "num_dropped", "num_clipped"):
            if batch.get(k):
                self.counters[k] += int(batch[k])

    def log_counters(self) -> None:
        for k in ("num_unreadable", "num_dropped", "num_clipped", "nonfinite_skipped"):
            if self.counters[k]:
                self.log(f"train/{k}", float(self.counters[k]), on_step=True, on_epoch=False, reduce_fx="sum")

    def on_train_end(self) -> None:
        if self.logger is not None and self.trainer.is_global_zero:
            self.logger.log_metrics({f"train/{k}_total": float(v) for k, v in self.counters.items()
                                     if k != "batches_seen"}, step=self.global_step)

    def finite_or_skip(self, loss: torch.Tensor, parts: Dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
        """``loss`` if it is finite; otherwise stop with the step and the part that went
        non-finite (``trainer.on_nonfinite: stop``), or return None so Lightning skips the update
        (``skip``; every rank skips together, and a run of too many stops)."""
        bad = not bool(torch.isfinite(loss.detach()).all())
        if self._trainer is not None:
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            self._nonfinite_run = 0
            return loss
        which = [k for k, v in parts.items() if not bool(torch.isfinite(v.detach()).all())] or ["loss"]
        step = self.global_step + 1
        values = ", ".join(f"{k}={float(parts[k].detach().float().mean()) if k in parts else math.nan}" for k in which)
        mode, limit = self.cfg.trainer.on_nonfinite, self.cfg.trainer.max_nonfinite_in_a_row
        if mode == "stop":
            raise NonFiniteLossError(f"non-finite loss at step {step} ({values}); trainer.on_nonfinite=stop: "
                                     f"nothing is exported, the last good checkpoint is kept")
        self._nonfinite_run += 1
        self.counters["nonfinite_skipped"] += 1
        if self._nonfinite_run >= limit:
            raise NonFiniteLossError(f"non-finite loss at {limit} steps in a row (last: step {step}, {values}); "
                                     f"stopped (trainer.max_nonfinite_in_a_row={limit}); nothing is exported")
        return None

    # -- checkpoints -----------------------------------------------------------------------
    def frozen_hash(self) -> str:
        """sha256 over the frozen parameters (names, shapes, bytes): what a checkpoint stores
        instead of the frozen weights themselves."""
        h = hashlib.sha256()
        for name, p in self.net.named_parameters():
            if not p.requires_grad:
                t = p.detach().contiguous().cpu()
                h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

    def configure_model(self) -> None:
        """Under ``trainer.strategy: fsdp`` shard ``self.net`` over the ranks' mesh
        (modules/sharded.py); a no-op for every other strategy. Lightning calls it after ``setup``
        and before the optimizer is built, so the optimizer holds the sharded parameters."""
        from modules.sharded import is_sharded, shard_model  # lazy: the layer classes of every family

        if self._trainer is None or not is_sharded(self.trainer) or getattr(self, "shard_info", None):
            return
        s = self.trainer.strategy
        self.shard_info = shard_model(self.net, s.device_mesh["data_parallel"], s.fsdp, s.precision_name)
        dm = self.trainer.datamodule  # its loaders are built after this hook
        if dm is not None and hasattr(dm, "eval_on_every_rank"):
            dm.eval_on_every_rank = True  # same validation batches on every rank: see VargptDataModule

    def frozen_keys(self) -> set:
        """The state-dict keys a training checkpoint leaves out: the frozen parameters (kept as a hash)."""
        return {f"net.{n}" for n, p in self.net.named_parameters() if not p.requires_grad}

    def setup(self, stage: str) -> None:
        # before the strategy wraps (and under FSDP shards) the model: the hash sees whole parameters
        if getattr(self, "_frozen_sha256", None) is None:
            self._frozen_sha256 = self.frozen_hash()

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        frozen = self.frozen_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}
        if getattr(self, "_frozen_sha256", None) is None:
            self._frozen_sha256 = self.frozen_hash()
        checkpoint["vargpt"] = {"frozen_sha256": self._frozen_sha256, "counters": dict(self.counters)}

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        mine = checkpoint.get("vargpt")
        if mine is None:
            raise ResumeMismatchError("checkpoint has no run state (not written by experiments.run)")
        if mine["frozen_sha256"] != (getattr(self, "_frozen_sha256", None) or self.frozen_hash()):
            raise ResumeMismatchError("the frozen weights differ from the ones the checkpoint was trained with "
                                      "(model.load / init_from changed?); start a new run instead of resuming")
        want = {f"net.{n}" for n, p in self.net.named_parameters() if p.requires_grad}
        missing = sorted(want - set(checkpoint["state_dict"]))
        unknown = sorted(set(checkpoint["state_dict"]) - set(self.state_dict()))
        if missing or unknown:
            raise ResumeMismatchError(f"checkpoint does not fit this stage: missing trainable {missing[:5]}, "
                                      f"unknown {unknown[:5]}")
        self.counters.update({k: int(v) for k, v in mine["counters"].items() if k in self.counters})
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is not None and hasattr(dm, "skip_train_batches"):
            dm.skip_train_batches = self.counters["batches_seen"]  # the stream replays to this position
        if getattr(self.cfg.trainer, "log_sample_keys", False) and self.sample_keys_path().is_file():
            # keys of batches after the checkpoint were consumed by the interrupted run only
            keep = [ln for ln in self.sample_keys_path().read_text().splitlines()
                    if ln and int(ln.split(" ", 1)[0]) < self.counters["batches_seen"]]
            self.sample_keys_path().write_text("".join(ln + "\n" for ln in keep))
