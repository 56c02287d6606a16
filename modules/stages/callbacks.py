"""Lightning callbacks the stages share: in-loop evaluation and keep-best weights.

  EvalCallback  after every validation: the ``eval:`` protocol (VQA accuracy with its blind
                baselines, FID / IS / attribute accuracy, prompt use) through the same
                ``modules.evaluation.Evaluator`` that ``experiments.evaluate`` uses; metrics as
                ``val/<name>``, a sample grid and a VQA table as MLflow artifacts.
  KeepBest      remember the net's weights at the best value of a validation metric and put
                them back when training ends (a late collapse never reaches the export).
  ThreadsFromFile  trainer.threads_file: take up a thread count a scheduler writes into a file
                (`make pipeline` gives stage 2 the baseline's core when the baseline ends).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import lightning as L
import torch
from torchvision.utils import make_grid

from modules.evaluation import Evaluator, report_metrics

# In-loop metrics: the report's scalars under these names (sample counts and the prompt-use
# losses themselves stay in the standalone report).
_LOOP_KEYS = ("vqa_accuracy", "vqa_prior_baseline", "vqa_blind_baseline", "fid", "inception_score",
              "gen_num_unreadable")
_LOOP_PREFIXES = ("vqa_", "gen_attr", "gen_prompt")
_LOOP_EXCLUDE = ("vqa_n",)


def loop_metrics(report: Dict[str, Any]) -> Dict[str, float]:
    flat = report_metrics(report, "")
    return {f"val/{k}": v for k, v in flat.items()
            if k not in _LOOP_EXCLUDE and (k in _LOOP_KEYS or k.startswith(_LOOP_PREFIXES))}


class EvalCallback(L.Callback):
    """Runs the stage's ``eval:`` protocol on rank 0 whenever validation runs (never during the
    sanity check); the net is evaluated in eval mode and its train/eval state put back after."""

    def __init__(self, evaluator: Evaluator, adapt: Optional[Callable[[Any], Any]] = None):
        # adapt: the stage's net -> the evaluator's model interface (evaluation.EvalModel), e.g.
        # eval_v11.V11EvalModel for a v1.1 net; None: the net has the calls itself (a v1 VARGPT)
        self.evaluator, self.adapt = evaluator, adapt

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tasks = self.evaluator.tasks()
        # trainer.should_stop: a preempted run (SIGTERM/SIGUSR1) stops now; Lightning still runs a
        # last validation, but its grace period is not spent on sampling images
        if trainer.sanity_checking or not tasks or not trainer.is_global_zero or trainer.should_stop:
            return
        net = pl_module.net
        step = pl_module.global_step
        was_training = net.training
        net.eval()
        try:
            r = self.evaluator.run(self.adapt(net) if self.adapt is not None else net, tasks)
        finally:
            pl_module.train(was_training)  # the stage keeps its frozen parts in eval mode
        for k, v in loop_metrics(r).items():
            pl_module.log(k, v, on_step=False, on_epoch=True, rank_zero_only=True)
        logger = _mlflow(pl_module)
        if logger is None:
            return
        if "vqa_rows" in r:
            logger.experiment.log_dict(logger.run_id, r["vqa_rows"], f"eval/vqa_rows_step{step:06d}.json")
        if "gen_images" in r:
            _log_grid(logger, f"eval/samples_step{step:06d}.png", r["gen_images"][: self.evaluator.cfg.grid_images],
                      r["gen_prompts"])


def _mlflow(pl_module: L.LightningModule) -> Optional[Any]:
    lg = pl_module.logger
    return lg if lg is not None and hasattr(lg, "run_id") and hasattr(lg, "experiment") else None


def _log_grid(logger: Any, name: str, images: torch.Tensor, prompts: Sequence[str]) -> None:
    if len(images) == 0:
        return
    grid = make_grid(images, nrow=min(8, len(images)), padding=2, pad_value=1.0)
    arr = (grid.permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype("uint8")
    logger.experiment.log_image(logger.run_id, arr, artifact_file=name)
    logger.experiment.log_text(logger.run_id, "\n".join(f"{i}: {p}" for i, p in enumerate(prompts[: len(images)])),
                               name.replace(".png", "_prompts.txt"))


class KeepBest(L.Callback):
    """Keep ``pl_module.net``'s weights at the best ``monitor`` value seen after a validation
    (``mode`` max or min) and restore them at the end of fit, before the export."""

    def __init__(self, monitor: str, mode: str = "max"):
        if mode not in ("max", "min"):
            raise ValueError(f"KeepBest mode must be max or min, got {mode!r}")
        self.monitor, self.mode = monitor, mode
        self.best: Optional[float] = None
        self.state: Optional[Dict[str, torch.Tensor]] = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or value is None:
            return
        value = float(value)
        if self.best is None or (value > self.best if self.mode == "max" else value < self.best):
            self.best = value
            self.state = {k: v.detach().clone() for k, v in pl_module.net.state_dict().items()}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.state is not None:
            pl_module.net.load_state_dict(self.state)


class ThreadsFromFile(L.Callback):
    """Every ``every`` steps, read a thread count from ``path`` and apply it (torch.set_num_threads)
    when it differs from the current one. A missing file changes nothing; text that is not an
    integer >= 1 is reported once and ignored. The count is logged as ``trainer/num_threads``."""

    def __init__(self, path: str | Path, every: int = 10):
        self.path, self.every = Path(path), max(1, every)
        self._seen: Optional[str] = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step % self.every:
            return
        try:
            text = self.path.read_text().strip()
        except FileNotFoundError:
            return
        if text == self._seen:
            return
        self._seen = text
        try:
            n = int(text)
            if n < 1:
                raise ValueError
        except ValueError:
            print(f"[run] trainer.threads_file {self.path}: expected a thread count (an integer >= 1), got "
                  f"{text[:40]!r}; keeping {torch.get_num_threads()} threads")
            return
        if n != torch.get_num_threads():
            torch.set_num_threads(n)
            print(f"[run] step {trainer.global_step}: {n} threads (from {self.path})")
            if trainer.logger is not None:
                trainer.logger.log_metrics({"trainer/num_threads": float(n)}, step=trainer.global_step)
