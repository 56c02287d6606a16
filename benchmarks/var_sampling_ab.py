"""What each CPU sampling change of issue #41 buys on its own: the suite's bf16 fast path with each
change switched off and on, alternating in one process.

    python -m benchmarks.var_sampling_ab [--depths 8,16] [--rounds 4]

Variants (same random weights, batch, seed and settings as benchmarks.var_official; 1 thread,
process CPU seconds per call, decode included):
  all        : the suite default (fused bf16 linears + one-pass q scaling + addcmul AdaLN, per-image decode)
  no_fused   : the VAR blocks through plain autocast linears (fused_linear off: also the q / AdaLN passes)
  no_decode  : the batch decoded in one call (DECODE_PER_IMAGE_BYTES out of reach)
  neither    : both off (the code before these changes)
Writes benchmarks/results/var_sampling_ab.json and .md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from benchmarks.results_file import time_stats, write_results
from benchmarks.var_official import LABELS, SEED, SETTINGS
from benchmarks.var_sampling import build_models
from experiments.machine import cpu_flags, cpu_model, git_info
from modules.components import fused_linear, vqvae

VARIANTS = {"all": (True, True), "no_fused": (False, True), "no_decode": (True, False), "neither": (False, False)}


@contextmanager
def variant(fused: bool, per_image: bool):
    supported, threshold = fused_linear.supported, vqvae.DECODE_PER_IMAGE_BYTES
    if not fused:
        fused_linear.supported = lambda: False
    if not per_image:
        vqvae.DECODE_PER_IMAGE_BYTES = 1 << 62
    try:
        yield
    finally:
        fused_linear.supported, vqvae.DECODE_PER_IMAGE_BYTES = supported, threshold


def run_depth(depth: int, rounds: int) -> Dict[str, Any]:
    vq, var = build_models(depth, 256, torch.device("cpu"))
    labels = torch.tensor(LABELS)

    def call():
        var.sample(len(LABELS), labels, generator=torch.Generator().manual_seed(SEED), parity=False, dtype="bf16", **SETTINGS)

    times: Dict[str, List[float]] = {v: [] for v in VARIANTS}
    for v, flags in VARIANTS.items():  # warm-up
        with variant(*flags):
            call()
    order = list(VARIANTS)
    for r in range(rounds):
        for v in order[r % len(order):] + order[:r % len(order)]:
            with variant(*VARIANTS[v]):
                t0 = time.process_time()
                call()
                times[v].append(time.process_time() - t0)
    row: Dict[str, Any] = {"depth": depth, "C": var.C}
    for v, ts in times.items():
        row[v] = dict(time_stats(ts, 3), all_s=[round(t, 3) for t in ts])
    for v in ("no_fused", "no_decode", "neither"):
        row[f"gain_vs_{v}"] = round(row[v]["min_s"] / row["all"]["min_s"], 3)
    return row


def to_markdown(meta: Dict[str, Any], rows: List[Dict[str, Any]]) -> str:
    lines = [f"The suite's bf16 fast sampler (256 px, B 4, cfg 1.5, top-k 900, top-p 0.96, decode included) with "
             f"each CPU change of issue #41 off and on, alternating in one process; {meta['cpu_model']}, 1 thread, "
             f"torch {meta['torch']}; process CPU seconds per call, min (median) of {meta['rounds']} rounds. Load "
             f"average {meta['loadavg_start'][0]:.2f} at the start, {meta['loadavg_end'][0]:.2f} at the end. Commit "
             f"{meta['commit'][:10]}{' (+ uncommitted changes)' if meta['dirty'] == 'true' else ''}. `{meta['command']}`.",
             "", "| depth | all (default) s | fused linears off s | per-image decode off s | both off s "
             "| gain of fused linears | gain of per-image decode | gain of both |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = lambda v: f"{r[v]['min_s']:.3f} ({r[v]['median_s']:.3f})"  # noqa: E731
        lines.append(f"| {r['depth']} | {c('all')} | {c('no_fused')} | {c('no_decode')} | {c('neither')} "
                     f"| {r['gain_vs_no_fused']:.2f}x | {r['gain_vs_no_decode']:.2f}x | {r['gain_vs_neither']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.var_sampling_ab", description=__doc__.split("\n")[0])
    ap.add_argument("--depths", default="8,16")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    if not fused_linear.supported():
        raise SystemExit("no oneDNN bf16 on this CPU: the fused path never runs here, nothing to compare")
    torch.set_num_threads(1)
    repo = git_info()
    meta: Dict[str, Any] = {"command": "python -m benchmarks.var_sampling_ab " + " ".join(argv if argv is not None else sys.argv[1:]),
                            "commit": repo["git_commit"], "dirty": repo["git_dirty"], "cpu_model": cpu_model(),
                            "cpu_flags": cpu_flags(), "torch": torch.__version__, "rounds": args.rounds, "threads": 1,
                            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                            "loadavg_start": [round(x, 2) for x in os.getloadavg()]}
    rows = [run_depth(int(d), args.rounds) for d in args.depths.split(",")]
    meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    write_results(Path(args.out), "var_sampling_ab", meta, rows, to_markdown(meta, rows))
    print(to_markdown(meta, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
