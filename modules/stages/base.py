"""What every stage's LightningModule shares: optimiser, schedule, step-rate logging.

Stage modules stay thin: they say which parameters train and how the loss is mixed; the model
itself is a plain nn.Module (``self.net``).
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Tuple

import lightning as L
import torch

from modules.optim import build_optimizer, build_scheduler, param_counts


class StageModule(L.LightningModule):
    """Base for stage LightningModules. Subclasses set ``self.net`` and implement
    ``trainable_parameters()`` (names) and ``training_step``."""

    def __init__(self, cfg: Any):
        super().__init__()
        self.cfg = cfg  # typed ExperimentConfig (not saved as hparams: MLflow gets it flattened)
        self._t_last: float | None = None
        self._window = [0, 0]  # samples, tokens since the last logged throughput

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
        if self.trainer.optimizers and self.logging_step():
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
