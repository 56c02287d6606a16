"""Launch one experiment: ``python -m experiments.run EXPERIMENT.yaml [key=value ...] [--dry-run]``.

Loads and validates the config (see experiments/config.py for the merge order), builds the
stage's LightningModule and DataModule, logs to MLflow and fits. At the end the stage's exports
(``module.exports()``: ``model.safetensors``, the full ``module.net``) are written to
``<output_dir>/`` with the resolved ``config.yaml`` and an ``export.json`` of hashes beside them
(``modules.checkpoint.write_export``): what ``init_from:``, evaluation and inference read.
"""
from __future__ import annotations

import os

# OpenMP threads that spin-wait for each other make steps 1.7-80x slower whenever another process
# shares the cores (measured: benchmarks/train_step.py notes, docs/benchmarks.md), so passive
# waiting is the default here. On cores a job has to itself spinning is faster (2-thread world
# stages 13-31 %, same weights): the Makefile's single-job targets set OMP_WAIT_POLICY=ACTIVE.
# Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from experiments import tracking
from experiments.config import ConfigError, LoadedConfig, compile_decision, load_config, output_dir, resolve_path
from experiments.machine import cpu_model, keep_freed_memory
from experiments.run_guard import (Preempted, RunError, RunLock, check_writable, find_resume, init_hash, is_rank_zero,
                                  set_aside_export)
from modules.checkpoint import StateDictMismatchError, WeightsIntegrityError, write_export
from modules.stages import build_stage
from modules.stages.callbacks import ThreadsFromFile


def build_strategy(cfg: Any) -> Any:
    """``trainer.strategy`` with its typed section: ``fsdp`` shards every parameter over the ranks
    (modules/sharded.py: FSDP2 applied by the stage's configure_model, the named layer groups as
    units, the activation-checkpointed ones recomputed, bf16 compute over fp32 master weights under
    bf16-mixed), on CPU and GPU ranks alike; other names go to Lightning as is."""
    t = cfg.trainer
    if t.strategy == "fsdp":
        from modules.sharded import ShardedStrategy  # lazy: Lightning, every model family's layers

        return ShardedStrategy(t.fsdp, t.precision, world_size=t.devices * t.num_nodes)
    if t.strategy == "deepspeed_stage_3":
        from lightning.pytorch.strategies import DeepSpeedStrategy

        return DeepSpeedStrategy(stage=3, offload_optimizer=t.deepspeed.offload_optimizer,
                                 offload_parameters=t.deepspeed.offload_parameters)
    return t.strategy


def build_trainer(cfg: Any, logger: Any, callbacks: Sequence[Any] = ()):
    import lightning as L

    t = cfg.trainer
    kw = dict(
        max_steps=t.max_steps,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=build_strategy(cfg),
        precision=t.precision,
        accumulate_grad_batches=t.accumulate_grad_batches,
        log_every_n_steps=t.log_every_n_steps,
        gradient_clip_val=cfg.optim.grad_clip or None,
        deterministic=t.deterministic,
        enable_progress_bar=t.enable_progress_bar,
        enable_checkpointing=False,  # we export safetensors ourselves (weights_only-safe)
        enable_model_summary=False,
        logger=logger if logger is not None else False,
        callbacks=list(callbacks),
        num_sanity_val_steps=0,
        default_root_dir=str(output_dir(cfg)),
        use_distributed_sampler=False,  # our streams split by node/worker themselves
    )
    if t.val_every_n_steps > 0:
        kw.update(val_check_interval=t.val_every_n_steps, check_val_every_n_epoch=None)
        if t.limit_val_batches > 0:
            kw["limit_val_batches"] = t.limit_val_batches
    else:
        kw["limit_val_batches"] = 0
    return L.Trainer(**kw)


def export_weights(module: Any, loaded: LoadedConfig, out: Path, extra: Optional[dict] = None,
                   files: Optional[dict] = None) -> Path:
    """The stage's exports (or ``files``, gathered) + config.yaml + export.json, each atomic."""
    return write_export(out, files if files is not None else module.exports(), loaded.to_yaml(),
                        metadata={"config_hash": loaded.hash, "stage": loaded.cfg.stage, "config_source": loaded.source,
                                  "seed": loaded.cfg.seed, **(extra or {})})


def provenance(trainer: Any, seconds: float) -> Dict[str, Any]:
    """What made an export, for whoever reads it later (``experiments.bases pack`` copies it into
    assets/world/MANIFEST.json): commit, CPU, steps, wall time and the last logged metrics."""
    metrics = {k: round(float(v), 6) for k, v in sorted(trainer.callback_metrics.items())
               if k.startswith(("val/", "train/loss")) and getattr(v, "numel", lambda: 1)() == 1}
    return {"git": tracking.git_info(), "cpu_model": cpu_model(), "steps": int(trainer.global_step),
            "fit_seconds": round(seconds, 1), "final_metrics": metrics}


def sharded_exports(trainer: Any, module: Any) -> Optional[dict]:
    """Under sharding (fsdp) / DeepSpeed the parameters are spread over the ranks: gather the full
    state dict (a collective on every rank) for the export; None when nothing is sharded."""
    from modules.sharded import full_state_dict, is_sharded  # lazy: Lightning and the layer classes, only once a run has trained

    if is_sharded(trainer):
        full = full_state_dict(module.net)
        return {"model.safetensors": full} if trainer.is_global_zero else None
    if "deepspeed" not in type(trainer.strategy).__name__.lower():
        return None
    full = trainer.strategy.lightning_module_state_dict()
    return {"model.safetensors": {k[len("net."):]: v for k, v in full.items() if k.startswith("net.")}} \
        if trainer.is_global_zero else None


def fit(loaded: LoadedConfig, resume: Optional[str] = None) -> Path | None:
    """Train one experiment; ``resume``: "latest" or a checkpoint path (``--resume [PATH]``)."""
    import warnings

    import lightning as L
    import torch

    # Known-harmless Lightning notices that would otherwise print on every run: our stage
    # modules override transfer_batch_to_device on purpose (tensor-only moves), and Lightning's
    # own pytree use trips a torch deprecation; mid-epoch resume is exact through our streams.
    warnings.filterwarnings("ignore", message=".*overridden `transfer_batch_to_device`.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
    warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*")
    cfg = loaded.cfg
    out = output_dir(cfg)
    ckpt_dir = resolve_path(cfg.checkpoint.dir) if cfg.checkpoint.dir else out / "checkpoints"
    zero = is_rank_zero()
    lock = None
    if zero:
        check_writable(out)
        lock = RunLock(out).acquire()
    try:
        return _fit(loaded, resume, out, ckpt_dir, zero, lock, L, torch)
    finally:
        if lock is not None:
            lock.release()


def _fit(loaded: LoadedConfig, resume: Optional[str], out: Path, ckpt_dir: Path, zero: bool, lock: Any,
         L: Any, torch: Any) -> Path | None:
    from modules.stages.base import NonFiniteLossError, ResumeMismatchError  # lazy: Lightning; not for dry runs
    from modules.stages.resume import TrainingCheckpoint  # lazy: Lightning; not for dry runs

    cfg = loaded.cfg
    ckpt, info = find_resume(resume, ckpt_dir, loaded) if resume else (None, {})
    run_id = info.get("mlflow_run_id") or None
    if zero:
        if cfg.logging.enabled:
            tracking.init_store(tracking.tracking_uri(cfg))
            stale = (lock.previous or {}).get("mlflow_run_id")
            if stale and stale != run_id:  # a run here whose process died without finishing
                tracking.mark_failed_if_running(tracking.tracking_uri(cfg), stale, "its process ended (killed?)")
        aside = set_aside_export(out)
        if aside is not None:
            print(f"[run] previous export moved to {aside}")
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        (ckpt_dir / "config.yaml").write_text(loaded.to_yaml())
    if cfg.trainer.num_threads > 0:
        torch.set_num_threads(cfg.trainer.num_threads)
    if cfg.trainer.keep_freed_memory and not keep_freed_memory():
        print("[run] trainer.keep_freed_memory: not a glibc process; the allocator is left as it is")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module, datamodule = build_stage(cfg)
    compile_it, why = compile_decision(cfg)
    if compile_it:
        n = module.net.compile_blocks()
        print(f"[run] torch.compile: {n} blocks ({why}); the first step compiles them")
    elif cfg.trainer.compile != "never" and zero:
        print(f"[run] eager ({why})")
    logger = tracking.make_logger(loaded, run_id=run_id) if cfg.logging.enabled else None
    # what this run started from: recorded in the export, so a changed input is never taken as current
    start_from = {"init_from": str(resolve_path(cfg.init_from)) if cfg.init_from else "",
                  "init_from_sha256": init_hash(cfg.init_from)}
    meta = {"config_hash": loaded.hash, "stage": cfg.stage, "mlflow_run_id": "", **start_from}
    if logger is not None and zero:
        meta["mlflow_run_id"] = logger.run_id
        lock.record(mlflow_run_id=logger.run_id)
    c = cfg.checkpoint
    saver = TrainingCheckpoint(ckpt_dir, c.every_n_steps, c.every_n_minutes, c.keep_last, c.at_end, meta)
    extra = [ThreadsFromFile(resolve_path(cfg.trainer.threads_file))] if cfg.trainer.threads_file else []
    if cfg.trainer.fsdp.report:
        from modules.sharded import ShardingReport  # lazy: Lightning, only for runs that report

        extra.append(ShardingReport(out))
    trainer = build_trainer(cfg, logger, [saver, *extra])
    if logger is not None and trainer.is_global_zero:
        if ckpt is None:
            names = module.trainable_parameter_names() if hasattr(module, "trainable_parameter_names") else None
            counts = module.param_counts() if hasattr(module, "param_counts") else {}
            tracking.log_run_start(logger, loaded, counts, names)
        else:
            tracking.mark_resumed(logger, str(ckpt), int(info.get("step", 0)))
    if ckpt is not None:
        print(f"[run] resuming from {ckpt} (step {info.get('step')})")
    t0 = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None, weights_only=True)
    except (NonFiniteLossError, ResumeMismatchError) as e:
        raise RunError(str(e)) from None
    elapsed = time.perf_counter() - t0
    if saver.signum is not None:
        if logger is not None and trainer.is_global_zero:
            tracking.mark_preempted(logger, signal.Signals(saver.signum).name, trainer.global_step)
        raise Preempted(saver.signum, trainer.global_step, saver.last_path)
    path = None
    if cfg.trainer.save_checkpoint:
        files = sharded_exports(trainer, module)  # a collective under FSDP / ZeRO-3: every rank
        if trainer.is_global_zero:
            path = export_weights(module, loaded, out, {**start_from, **provenance(trainer, elapsed)}, files)
            print(f"[run] weights: {path}")
    if logger is not None and trainer.is_global_zero:
        logger.log_metrics({"time/fit_seconds": elapsed}, step=trainer.global_step)
        if path is not None:
            tracking.log_file(logger, path.parent / "config.yaml", "export")
        print(f"[run] mlflow: experiment={tracking.experiment_name(cfg)} run_id={logger.run_id} "
              f"uri={tracking.tracking_uri(cfg)}")
    print(f"[run] {cfg.name}: {trainer.global_step} steps in {elapsed:.1f}s")
    return path


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.run", description=__doc__.split("\n")[0])
    p.add_argument("experiment", help="experiment YAML, e.g. experiments/world/stage1.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-4 trainer.max_steps=10")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                   help="continue from the latest valid checkpoint under the run's output dir, or from PATH")
    return p.parse_intermixed_args(argv)


# Expected failures: one clear line and a non-zero exit, no traceback (unexpected ones keep theirs).
EXPECTED = (RunError, FileNotFoundError, StateDictMismatchError, WeightsIntegrityError)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        loaded = load_config(args.experiment, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(f"# {loaded.source}  config_hash={loaded.hash}")
        print(loaded.to_yaml(), end="")
        return 0
    try:
        fit(loaded, args.resume)
    except Preempted as p:
        print(f"[run] {p}. Resume with: python -m experiments.run {args.experiment} "
              f"{' '.join(args.overrides)} --resume".replace("  ", " "), file=sys.stderr, flush=True)
        return 128 + p.signum
    except EXPECTED as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
