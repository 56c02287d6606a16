"""Training-step speed with the LLM run on length-sorted row groups (model.llm_length_groups).

    python -m benchmarks.length_groups                     # world stage 2 / und-only / stage 3, groups 1-3 (~6 min)
    python -m benchmarks.length_groups --groups 1 2 --reps 2 --steps 6   # shorter
    python -m benchmarks.length_groups --quick             # smoke run

The rows of a batch are right-padded to the longest; with N groups the LLM runs on each group of
length-sorted rows cut to its own longest row (modules/vargpt.py, VARGPT.llm_states). Losses and
gradients are the one-call ones (tests/test_vargpt.py); this measures what it saves. Per stage (the
world YAML, random weights: a step costs the same whatever the weights), in one process:
  batches    --distinct batches from the stage's own DataModule (world shards under data.root, or
             generated stand-ins), cached, so loading is never timed;
  positions  the LLM positions computed per row with each group count (the padded length with 1);
  steps      benchmarks.step_timing.time_plain (training_step, backward, clip, AdamW step), all group
             counts alternating within each of --reps repetitions, so a change in the machine's speed
             falls on every count alike; per count the lower envelope over the repetitions (per
             cached batch its fastest step), on the wall clock and this process's CPU clock;
  speed-up   step time with 1 group / step time with N, both from this run.
--threads 1 by default: `make pipeline` trains stage 2 and the baseline on one thread each.
Writes benchmarks/results/length_groups.json and length_groups.md.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Sequence

import torch

from benchmarks.step_timing import CLOCKS, REPO_ROOT, lower_envelope, machine_info, time_plain
from benchmarks.train_step import BENCH_OVERRIDES, stand_in_overrides
from experiments.config import load_config
from modules.stages import build_stage

RESULTS = Path(__file__).resolve().parent / "results"
YAMLS = {"stage2_und_only": "experiments/world/stage2_und_only.yaml", "stage2": "experiments/world/stage2.yaml",
         "stage3": "experiments/world/stage3.yaml"}


def bench_stage(name: str, yaml: str, groups: Sequence[int], distinct: int, steps: int, warmup: int, reps: int,
                work: Path) -> Dict[str, Any]:
    extra, notes = stand_in_overrides(REPO_ROOT / yaml, BENCH_OVERRIDES, work)
    cfg = load_config(REPO_ROOT / yaml, [*BENCH_OVERRIDES, *extra]).cfg
    torch.manual_seed(0)
    module, dm = build_stage(cfg)
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    batches = [next(it) for _ in range(distinct)]
    net = module.net
    padded = sum(b["attention_mask"].numel() for b in batches)
    rows = sum(b["attention_mask"].shape[0] for b in batches)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    positions = {}
    for k in groups:
        net.cfg = replace(net.cfg, llm_length_groups=k)
        n = 0
        for b in batches:
            g = net._length_groups(b["attention_mask"])
            n += b["attention_mask"].numel() if g is None else sum(len(r) * m for r, m in g)
        positions[k] = n / rows
    times: Dict[int, List[Dict[str, List[float]]]] = {k: [] for k in groups}
    for _ in range(reps):
        for k in groups:
            net.cfg = replace(net.cfg, llm_length_groups=k)
            times[k].append(time_plain(module, batches, steps, warmup, cfg.optim.grad_clip))
    step = {clock: {k: lower_envelope([r[clock] for r in times[k]], warmup, distinct) for k in groups}
            for clock in CLOCKS}
    return {"stage": name, "yaml": yaml, "stand_ins": notes, "rows": rows,
            "real_positions_per_row": real / rows, "padded_positions_per_row": padded / rows,
            "llm_positions_per_row": positions, "step_s": step,
            "speedup_vs_1": {clock: {k: step[clock][min(groups)] / step[clock][k] for k in groups} for clock in CLOCKS}}


def table(rows: Sequence[Dict[str, Any]]) -> str:
    out = ["| stage | groups | LLM positions / row (real) | step s (wall) | step s (CPU) | speed-up vs 1 (wall) |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        for k, pos in r["llm_positions_per_row"].items():
            out.append(f"| {r['stage']} | {k} | {pos:.1f} ({r['real_positions_per_row']:.1f}) | "
                       f"{r['step_s']['wall'][k]:.3f} | {r['step_s']['cpu'][k]:.3f} | "
                       f"{r['speedup_vs_1']['wall'][k]:.2f}x |")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.length_groups", description=__doc__.split("\n")[0])
    ap.add_argument("--stages", nargs="+", default=list(YAMLS), choices=list(YAMLS))
    ap.add_argument("--groups", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--distinct", type=int, default=10, help="cached batches per stage")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per repetition and group count")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 repetition of 3 steps on 3 batches")
    ap.add_argument("--out", default=str(RESULTS / "length_groups"))
    args = ap.parse_args(argv)
    if args.quick:
        args.distinct, args.steps, args.warmup, args.reps = 3, 3, 1, 1
    if min(args.groups) < 1:
        ap.error(f"--groups must be >= 1, got {args.groups}")
    threads0 = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            rows = [bench_stage(s, YAMLS[s], sorted(set(args.groups)), args.distinct, args.steps, args.warmup,
                                args.reps, Path(tmp)) for s in args.stages]
    finally:
        torch.set_num_threads(threads0)  # a caller in the same process (a test) keeps its own
    res = {"machine": machine_info(), "threads": args.threads, "distinct": args.distinct, "steps": args.steps,
           "warmup": args.warmup, "reps": args.reps, "quick": args.quick, "results": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    md = table(rows)
    out.with_suffix(".md").write_text(
        f"# model.llm_length_groups: training steps\n\n`python -m benchmarks.length_groups` at "
        f"{res['machine']['git_sha']}, {res['machine']['date_utc']}, {res['machine']['processor']} x "
        f"{res['machine']['cpus']} CPUs, {args.threads} thread(s), {args.reps} alternating repetitions of "
        f"{args.steps} steps over {args.distinct} cached batches, lower envelope.\n\n{md}\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
