"""Per-rank bytes of parameters + optimizer state at 1 and 2 ranks under sharding (trainer.strategy:
fsdp), measured on the tiny stage-2 preset through `python -m experiments.run`:

    python -m benchmarks.sharded_memory            # writes benchmarks/results/sharded_memory.{json,md}

Three runs, each with the recipe's precision and recomputation (bf16-mixed: fp32 master weights,
activation checkpointing of the LLM layers and VAR blocks), 4 steps: one process without sharding,
the sharded strategy on 1 rank, and on 2 CPU ranks (gloo). Each run reports (trainer.fsdp.report,
modules/sharded.ShardingReport) the bytes its rank holds, read off the tensors after the last step:
parameters (the rank's shards, plus the VQVAE, kept whole on every rank) and AdamW state (two
moments + a step counter per trainable parameter). Sizes, not timings: the numbers do not depend on
the machine's load; the CPU model is recorded with them anyway.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
RUN = ["experiments/tiny/stage2.yaml", "init_from=", "logging.enabled=false", "trainer.accelerator=cpu",
       "trainer.num_threads=1", "data.num_workers=0", "checkpoint.every_n_minutes=0", "checkpoint.at_end=false",
       "eval.vqa_shards=", "eval.gen_shards=", "trainer.fsdp.report=true", "trainer.max_steps=4",
       "trainer.precision=bf16-mixed"]
SHARDED = ["trainer.strategy=fsdp", "trainer.fsdp.activation_checkpointing=[llm_decoder_layer,var_block]"]
CASES = {"one process, no sharding": ["trainer.devices=1"],
         "sharded, 1 rank": ["trainer.devices=1", *SHARDED],
         "sharded, 2 ranks": ["trainer.devices=2", *SHARDED]}


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "unknown")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_world(root: Path) -> List[str]:
    """The tiny generated world and tokenizer the tests use (tests/test_long_runs.py)."""
    sys.path.insert(0, str(REPO))
    from datamodules.world import generate_split  # lazy: only when a world has to be rendered
    from tests.tiny import tiny_tokenizer_dir  # lazy: the tests' tiny tokenizer, from the repo root on sys.path

    generate_split(str(root / "train"), "train", {"caption": 24, "vqa": 24, "gen": 24}, seed=0, size=32, shard_size=8)
    return [f"model.tokenizer.path={tiny_tokenizer_dir(root)}", f"data.root={root}"]


def run_case(args: List[str], out: Path, timeout: float) -> List[Dict[str, Any]]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "MASTER_PORT": str(_port())}
    cmd = [sys.executable, "-m", "experiments.run", *args, f"output_dir={out}"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return [json.loads(p.read_text()) for p in sorted(out.glob("sharding.rank*.json"))]


def measure(work: Path, timeout: float = 300) -> Dict[str, Any]:
    data = make_world(work / "world")
    cases: Dict[str, Any] = {}
    for name, extra in CASES.items():
        t0 = time.perf_counter()
        reps = run_case([*RUN, *data, *extra], work / name.replace(" ", "_").replace(",", ""), timeout)
        cases[name] = {"command": "python -m experiments.run " + " ".join([*RUN, *extra]),
                       "seconds": round(time.perf_counter() - t0, 1),
                       "ranks": [{"rank": r["rank"], **r["memory"]} for r in reps]}
    base = cases["one process, no sharding"]["ranks"][0]
    for c in cases.values():
        for r in c["ranks"]:
            r["sharded_ratio"] = round(r["sharded_bytes"] / base["sharded_bytes"], 4)
            r["total_ratio"] = round(r["total_bytes"] / base["total_bytes"], 4)
    return cases


def markdown(d: Dict[str, Any]) -> str:
    m = d["machine"]
    lines = ["# Sharded training: bytes per rank, 1 vs 2 ranks", "",
             f"Commit {m['git_sha']}, {m['date_utc']}; CPU {m['cpu_model']} ({m['cpus']} cores); torch {m['torch']}; "
             f"command `{d['command']}`.", "",
             "| run | rank | parameters B | optimizer state B | total B | VQVAE (kept whole) B | sharded part B | "
             "sharded part / one process | total / one process |", "|---|---|---|---|---|---|---|---|---|"]
    for name, c in d["cases"].items():
        for r in c["ranks"]:
            lines.append(f"| {name} | {r['rank']} | {r['param_bytes']} | {r['optimizer_bytes']} | {r['total_bytes']} | "
                         f"{r['kept_whole_bytes']} | {r['sharded_bytes']} | {r['sharded_ratio']:.3f} | {r['total_ratio']:.3f} |")
    lines += ["", "Runs:"] + [f"- {n}: `{c['command']}` ({c['seconds']} s)" for n, c in d["cases"].items()]
    lines += ["", d["notes"], ""]
    return "\n".join(lines)


NOTES = ("Bytes are the sizes of the tensors a rank holds after the last step (its parameter shards, the VQVAE "
         "whole, AdamW's exp_avg, exp_avg_sq and step per trainable parameter); activations and gathered "
         "parameters are transient and not counted. The sharded part halves at 2 ranks up to the odd row of "
         "odd-sized first dimensions and AdamW's per-parameter step scalar, which every rank keeps. The tiny "
         "preset's VQVAE is a large share of its bytes; in the real recipe it is about 1 % of the parameters (benchmarks/results/gpu_check_meta.md).")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sharded_memory", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--name", default="sharded_memory")
    a = p.parse_args(argv)
    import torch

    from benchmarks.step_timing import machine_info  # lazy: torch, after the arguments are read

    with tempfile.TemporaryDirectory(prefix="sharded_memory_") as tmp:
        cases = measure(Path(tmp))
    d = {"check": "sharded_memory", "command": "python -m benchmarks.sharded_memory",
         "machine": {**machine_info(), "cpu_model": cpu_model(), "torch": torch.__version__},
         "cases": cases, "notes": NOTES}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{a.name}.json").write_text(json.dumps(d, indent=1) + "\n")
    (a.out / f"{a.name}.md").write_text(markdown(d))
    print(markdown(d))
    return 0


if __name__ == "__main__":
    sys.exit(main())
