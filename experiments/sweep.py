"""Ablation sweeps: ``python -m experiments.sweep SWEEP.yaml [--dry-run] [--max-parallel N] [--only NAME]``.

The command line over three modules:

    experiments/sweep_schema.py     the sweep file: schema, grid x variants, validation of every variant
    experiments/sweep_launcher.py   one process per variant, N at a time; Ctrl-C / SIGTERM handling
    experiments/sweep_tracking.py   MLflow: the sweep's parent run, one child run per variant launch

Every variant is loaded and validated before anything runs: a bad key in variant 7 stops the
launch before variant 1 starts. Each variant runs as its own process, as an MLflow child run
nested under one parent run for the sweep; output goes to ``runs/sweeps/<name>/<variant>.log``.
Relaunching skips variants that finished before. At the end ``experiments.compare`` runs and
attaches its table and plots to the parent run. Exit status: the number of failed variants (0
when all finished, capped at 255), 2 for a bad sweep file, 130 after Ctrl-C and 143 after
SIGTERM (running variants are stopped and marked KILLED).
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from experiments.config import ConfigError, _rel
from experiments.sweep_launcher import Launcher, child_argv, thread_budget
from experiments.sweep_schema import SWEEPS_DIR, Sweep, Variant, load_sweep, read_sweep, select


def print_plan(sweep: Sweep, variants: Sequence[Variant], out_dir: Path, max_parallel: int) -> None:
    c = sweep.cfg
    print(f"# sweep {c.name}: base {_rel(sweep.base)}, {len(variants)} variant(s), rank by {c.metric} ({c.mode}), "
          f"MLflow experiment '{sweep.experiment}', {max_parallel} at a time")
    if c.command == "evaluate":
        ready = (sweep.checkpoint / "config.yaml").is_file()
        print(f"# evaluates checkpoint {sweep.checkpoint}" + ("" if ready else " (not trained yet)"))
    threads = thread_budget(max_parallel)
    for v in variants:
        print(f"- {v.name}  config_hash={v.config_hash}")
        print("    python " + shlex.join(child_argv(sweep, v, out_dir, threads)[1:]))


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.sweep", description=__doc__.split("\n")[0])
    p.add_argument("sweep", help="sweep YAML, e.g. experiments/ablations/debug_lr.yaml")
    p.add_argument("--dry-run", action="store_true", help="validate every variant, print the plan, run nothing")
    p.add_argument("--max-parallel", type=int, default=None,
                   help="variants at once, each its own process with cores//N threads (default: the file's, 1)")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help="run only this variant (exact name or shell pattern); repeatable")
    p.add_argument("--rerun", action="store_true", help="run variants even if they finished before")
    p.add_argument("--no-compare", action="store_true", help="skip the comparison report at the end")
    p.add_argument("--out-dir", default=None, help="logs and report (default runs/sweeps/<name>)")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        cfg = read_sweep(args.sweep)
        out_dir = Path(args.out_dir).resolve() if args.out_dir else SWEEPS_DIR / cfg.name
        sweep = load_sweep(args.sweep, out_dir)
        variants = select(sweep.variants, args.only)
        max_parallel = args.max_parallel or cfg.max_parallel
        if max_parallel < 1:
            raise ConfigError(f"--max-parallel must be >= 1, got {max_parallel}")
        if args.dry_run:
            print_plan(sweep, variants, out_dir, max_parallel)
            return 0
        if cfg.command == "evaluate" and not (sweep.checkpoint / "config.yaml").is_file():
            raise ConfigError(f"{_rel(sweep.path)}: checkpoint {sweep.checkpoint} has no config.yaml: train it first "
                              f"(python -m experiments.run {_rel(sweep.base)}) or set `checkpoint:`")
        launcher = Launcher(sweep, out_dir, max_parallel, rerun=args.rerun, compare=not args.no_compare)
    except ConfigError as e:
        print(f"sweep config error: {e}", file=sys.stderr)
        return 2
    return launcher.run(variants)


if __name__ == "__main__":
    sys.exit(main())
