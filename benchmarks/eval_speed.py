"""World evaluation, parity sampling against the default fast path, alternating in one process.

    python -m benchmarks.eval_speed runs/world/stage1 [--reps 3] [--num-gen 64] [--num-vqa 200]

Parity mode (``eval.parity=true``) draws exactly what the evaluation drew before the fast path
existed (the same images, the same metrics: checked against the code of the previous release in
the results notes); the default (``parity=false``) uses the fast sampler in the dtype measured best
for the VAR's width. Each repetition runs both on the same checkpoint and sample set; times are
process CPU seconds (robust to other jobs on a shared machine), minimum over repetitions.
Writes benchmarks/results/eval_speed.{json,md} with the machine, load and git commit.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from benchmarks.step_timing import machine_info
from experiments.infer import load_exported
from experiments.tracking import git_info
from modules.evaluation import Evaluator

RESULTS = Path(__file__).resolve().parent / "results"
KEYS = ("vqa_accuracy", "gen_attribute_accuracy", "fid", "inception_score", "gen_prompt_gain")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.eval_speed", description=__doc__.split("\n")[0])
    ap.add_argument("ckpt", help="an export directory (e.g. runs/world/stage1 after `make stage1`)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--num-gen", type=int, default=64)
    ap.add_argument("--num-vqa", type=int, default=200)
    ap.add_argument("--tasks", default="vqa,generation")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("overrides", nargs="*", help="eval.* / data.root overrides")
    args = ap.parse_intermixed_args(argv)
    torch.set_num_threads(args.threads)
    net, cfg = load_exported(args.ckpt, tuple(args.overrides))
    tasks = [t for t in args.tasks.split(",") if t]
    base = dataclasses.replace(cfg.eval, num_gen=args.num_gen, num_vqa=args.num_vqa)
    modes = {"parity (before)": dataclasses.replace(base, parity=True),
             "default (fast)": dataclasses.replace(base, parity=False)}
    evs = {m: Evaluator(e, cfg.model, cfg.data.root) for m, e in modes.items()}
    for ev in evs.values():  # read the sample sets (and real statistics) outside the timed runs
        for t in tasks:
            ev.samples(t)
    times: Dict[str, List[float]] = {m: [] for m in modes}
    reports: Dict[str, Dict[str, Any]] = {}
    load0 = os.getloadavg()[0]
    for _ in range(args.reps):
        for m, ev in evs.items():
            t0 = time.process_time()
            r = ev.run(net.eval(), tasks)
            times[m].append(time.process_time() - t0)
            reports[m] = {k: r[k] for k in KEYS if k in r}
    best = {m: min(v) for m, v in times.items()}
    ratio = best["parity (before)"] / best["default (fast)"]
    res = {"checkpoint": str(Path(args.ckpt).resolve()), "tasks": tasks, "num_gen": args.num_gen,
           "num_vqa": args.num_vqa, "threads": args.threads, "reps": args.reps, "cpu_seconds": times,
           "best_cpu_seconds": best, "speedup": ratio, "metrics": reports, "sampling": {
               m: {"parity": e.parity, "sampler": e.sampler, "sample_dtype": e.sample_dtype} for m, e in modes.items()},
           "load_avg_start_end": [load0, os.getloadavg()[0]], "machine": machine_info(), "git": git_info()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_speed.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    rows = [f"| {m} | {best[m]:.1f} | " + " | ".join(f"{reports[m].get(k, float('nan')):.4g}" for k in KEYS) + " |"
            for m in modes]
    md = [f"# World evaluation: parity vs default sampling ({', '.join(tasks)}; {args.num_vqa} questions, "
          f"{args.num_gen} prompts; {args.threads} thread; best of {args.reps}, process CPU seconds)", "",
          f"`python -m benchmarks.eval_speed {args.ckpt}` at commit {res['git']['git_commit'][:10]}; load "
          f"{load0:.1f} -> {res['load_avg_start_end'][1]:.1f}. Speedup of the default: **{ratio:.2f}x**.", "",
          "| mode | CPU s | " + " | ".join(KEYS) + " |", "|---|---|" + "---|" * len(KEYS), *rows, ""]
    (out / "eval_speed.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
