"""The GPU check's sharded phase: one stage of the recipe trained the way `experiments.run` trains
it (trainer.strategy: fsdp, modules/sharded.py), on every device it is given.

    python -m benchmarks.gpu_check_sharded --accelerator cuda --devices 8 --size real --stage stage3 --out DIR
    python -m benchmarks.gpu_check_sharded --accelerator cpu --devices 2 --size world --stage stage3 --out DIR

benchmarks/gpu_check.py starts it as a subprocess (Lightning starts the other ranks by running this
command again, so it must be a command of its own). What runs, per rank: the recipe's stage config
with the recipe's training path: sharded over all ranks, bf16-mixed (bf16 compute, fp32 master
weights and AdamW state, fp32 gradient reduction), the LLM layers and VAR blocks recomputed in
backward; the model built with random weights (real) or the world weights, directly on the rank's
device; the stage's LightningModule fitted by `experiments.run.build_trainer` for --steps steps on
one hand-made batch (benchmarks.gpu_check_parts.make_batch), a sharded checkpoint written at the
end (TrainingCheckpoint: a directory, one file per rank), the trainable shards then perturbed, and
a new Trainer resumed from the directory for one more step: the restored shards must equal the
saved ones bit for bit. Each rank writes <out>/<stage>.rank<r>.json (step times, losses, peak
memory, checkpoint) and the sharding report <out>/<stage>/sharding.rank<r>.json.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see benchmarks/gpu_check.py

import argparse
import json
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader

from benchmarks import gpu_check_parts as P
from experiments.run import build_trainer
from modules.sharded import ShardingReport
from modules.stages.resume import TrainingCheckpoint
from modules.stages.vargpt_stages import STAGE_CLASSES

# The recipe's training path on top of its stage config (experiments/real/model.yaml: fsdp,
# bf16-mixed, the LLM layers and VAR blocks recomputed), said here too so the world recipe (no
# sharding of its own) runs it the same way.
# the LLM called once per step: under sharding every rank must make the same calls (the world
# recipe splits its batches into 2 length groups).
SHARDED = ["trainer.strategy=fsdp", "trainer.precision=bf16-mixed", "trainer.fsdp.state_dict_type=sharded",
           "trainer.fsdp.activation_checkpointing=[llm_decoder_layer,var_block]", "model.llm_length_groups=1"]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class _Steps(L.Callback):
    """Seconds per step (device synchronised) and the losses."""

    def __init__(self, device: torch.device):
        self.device, self.t0 = device, 0.0
        self.step_s: List[float] = []
        self.losses: List[float] = []

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        P.sync(self.device)
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        P.sync(self.device)
        self.step_s.append(time.perf_counter() - self.t0)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss.detach()))


class _Restored(L.Callback):
    """At the resumed fit's start: the step and whether the trainable shards are the saved ones."""

    def __init__(self, saved: Dict[str, torch.Tensor]):
        self.saved, self.step, self.equal = saved, -1, False

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.step = int(trainer.global_step)
        now = {n: _local(p).detach().cpu() for n, p in pl_module.net.named_parameters() if p.requires_grad}
        self.equal = now.keys() == self.saved.keys() and all(torch.equal(now[n], t) for n, t in self.saved.items())


def run(args: argparse.Namespace) -> Dict[str, Any]:
    rank = int(os.environ.get("LOCAL_RANK", 0))  # Lightning sets it in the ranks it starts
    device = torch.device("cuda", rank) if args.accelerator == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    work = args.out / f"work_{args.stage}" / f"rank{rank}"
    work.mkdir(parents=True, exist_ok=True)
    over = [*SHARDED, f"trainer.devices={args.devices}", "trainer.num_nodes=1",
            f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}", f"trainer.max_steps={args.steps}",
            "trainer.val_every_n_steps=0", "trainer.enable_progress_bar=false", "trainer.num_threads=0",
            f"output_dir={args.out / args.stage}", "trainer.fsdp.report=true"]
    cfg = P.stage_configs(args.size, bf16=False, extra=over)[args.stage]
    torch.manual_seed(0)
    t = time.perf_counter()
    net = P.build_model(cfg, args.size, device, work)
    build_s = time.perf_counter() - t
    module = STAGE_CLASSES[args.stage](cfg, net=net)
    sizes = P.SIZES[args.size]
    n = args.batch or sizes["batch"]
    n_gen = n if args.stage == "stage3" else min(sizes["stage2_gen"], n)
    batch = P.make_batch(net, cfg, P.make_samples(net, n - n_gen, n_gen, sizes, seed=rank))
    steps = _Steps(device)
    saver = TrainingCheckpoint(work.parent / "ckpt", at_end=True, keep_last=1)
    trainer = build_trainer(cfg, None, [saver, steps, ShardingReport(args.out / args.stage)])
    P.reset_peak(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train_dataloaders=DataLoader([batch] * args.steps, batch_size=None, collate_fn=P._identity))
    out: Dict[str, Any] = {"rank": rank, "world_size": trainer.world_size, "device": str(device),
                           "strategy": type(trainer.strategy).__name__, "precision": trainer.precision,
                           "build_s": build_s, "step_s": steps.step_s, "losses": steps.losses,
                           "batch": P.batch_stats(net, batch), **{f"fit_{k}": v for k, v in P.peak_memory_gb(device).items()}}
    path = saver.last_path
    if path is None or trainer.global_step != args.steps:
        raise RuntimeError(f"the sharded fit ended at step {trainer.global_step} without a checkpoint")
    files = sorted(p.name for p in path.iterdir()) if path.is_dir() else [path.name]
    out["checkpoint"] = {"dir": path.is_dir(), "files": files,
                         "size_gb": sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e9}
    saved = {n: _local(p).detach().cpu().clone() for n, p in net.named_parameters() if p.requires_grad}
    module.trainer = None
    with torch.no_grad():  # so the comparison at resume can only pass if the directory was read back
        for p in net.parameters():
            if p.requires_grad:
                _local(p).add_(1.0)
    probe = _Restored(saved)
    trainer = build_trainer(replace(cfg, trainer=replace(cfg.trainer, max_steps=args.steps + 1)), None,
                            [TrainingCheckpoint(work.parent / "ckpt2", at_end=False), probe])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train_dataloaders=DataLoader([batch] * (args.steps + 1), batch_size=None,
                                                         collate_fn=P._identity), ckpt_path=str(path), weights_only=True)
    out["checkpoint"].update(resumed_at_step=probe.step, shards_equal=probe.equal, continued_to_step=int(trainer.global_step))
    return out


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check_sharded", description=__doc__.split("\n")[0])
    p.add_argument("--accelerator", choices=("cuda", "cpu"), required=True)
    p.add_argument("--devices", type=int, required=True)
    p.add_argument("--size", choices=("real", "world"), required=True)
    p.add_argument("--stage", choices=P.STAGES, required=True)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch", type=int, default=0, help="samples per rank and step (0: the size's default, 8)")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    out = run(args)
    (args.out / f"{args.stage}.rank{out['rank']}.json").write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
