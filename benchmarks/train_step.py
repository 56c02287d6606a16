"""Training-step speed of the VARGPT stages, and what Lightning adds on top of a plain loop.

    python -m benchmarks.train_step                           # default + larger, stages 1-3 (~5 min idle 2 cores)
    python -m benchmarks.train_step --configs default         # the embedded default only
    python -m benchmarks.train_step --stage1 a.yaml --stage2 b.yaml --stage3 c.yaml   # other experiments
    python -m benchmarks.train_step --quick                   # smoke run (few steps)

Which experiments: experiments/world/stage{1,2,3}.yaml (the embedded default) where they exist,
else the tiny preset experiments/tiny/stage{1,2,3}.yaml. "larger" is the same YAML with
LARGER_OVERRIDES (wider/deeper LLM and VAR, still CPU-sized). Weights are random (`model.load`
and `init_from` are cleared): a step costs the same whatever the weights. A missing tokenizer
directory or missing shards are replaced by a stand-in tokenizer / freshly generated world shards
in a temp dir (the row's `stand_ins` says which).

Per (config, stage), in a fresh subprocess (so peak RSS is that configuration's):
  batches    --distinct batches are drawn from the stage's own DataModule once and cached in
             memory; every timed loop cycles through the same cached batches, so data loading is
             never timed.
  FLOPs      counted (torch.utils.flop_counter.FlopCounterMode) over one forward + backward of
             `module.net` per cached batch: matmuls, convolutions and attention, nothing else.
             Cross-check: the analytic 2 x (LLM matmul parameters) x (padded tokens) against the
             counted forward.
  plain      the module's `training_step` in a plain loop (no Trainer attached, so `self.log` is
             a no-op): zero_grad, backward, clip_grad_norm_ (optim.grad_clip), optimizer step,
             scheduler step; optimizer + scheduler from `module.configure_optimizers()`.
  lightning  the same module, batches and optimizer under `experiments.run.build_trainer` (no
             logger, no progress bar, no checkpointing, no validation), fed a DataLoader over the
             in-memory batch list. With --mlflow also with an MLFlowLogger on a throwaway sqlite
             store (log_every_n_steps from the experiment).
  step time  time between consecutive step starts (so all per-step hook/logging work counts),
             after --warmup steps, on two clocks: wall, and this process's CPU time (with one
             thread the work done; it barely moves while other jobs hold the cores). --reps
             alternating repetitions; per method the lower envelope: per cached batch its fastest
             occurrence, averaged over the batches (other jobs only ever add time).
             overhead = lightning / plain - 1 on that. The MLflow variant compares best rep means
             instead, so that logging every n steps is included.
  peak       fp32 torch.mm of --peak-n square matrices on the same threads, best 0.25 s window
             over ~1.5 s, in the same process, per wall second and per CPU second; achieved
             FLOP/s = counted FLOPs per step / Lightning step time, on the same clock.
  threads    --threads 1 by default. On a 2-core machine shared with other jobs, 2 OpenMP threads
             spin-wait for each other: a 50 ms tiny step took 0.3-4 s (OMP_WAIT_POLICY=PASSIVE
             fixes that). Pass --threads 2 (or 0 = trainer.num_threads) on an idle machine.
Writes benchmarks/results/train_step.json and train_step.md and prints the table. The measuring
pieces (FLOP counting, matmul peak, RSS, plain-loop and Lightning step timing, lower envelope)
are in benchmarks/step_timing.py; this file picks the experiments, runs them and reports.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from benchmarks.step_timing import (CLOCKS, REPO_ROOT, llm_matmul_params, machine_info, matmul_peak, peak_rss_mb,
                                    rss_mb, step_estimates, time_lightning, time_plain, train_flops)
from datamodules.world import TASKS, generate_split
from experiments.config import load_config, resolve_path
from modules.components.text_tokenizer import train_world_tokenizer
from modules.stages import build_stage

RESULTS = Path(__file__).resolve().parent / "results"
STAGES = ("stage1", "stage2", "stage3")
WORLD = {s: REPO_ROOT / f"experiments/world/{s}.yaml" for s in STAGES}
TINY = {s: REPO_ROOT / f"experiments/tiny/{s}.yaml" for s in STAGES}
# "larger": a CPU-sized step up from either preset: LLM 256 wide x 6 layers, VAR 256 wide x 4 blocks.
LARGER_OVERRIDES = [
    "model.llm.hidden_size=256", "model.llm.num_layers=6", "model.llm.num_heads=8", "model.llm.num_kv_heads=8",
    "model.llm.intermediate_size=768", "model.var.depth=4", "model.var.embed_dim=256", "model.var.num_heads=8",
]
# Always applied: timing needs no trained weights, no output, no validation, and CPU.
BENCH_OVERRIDES = ["model.load=[]", "init_from=''", "trainer.val_every_n_steps=0", "trainer.enable_progress_bar=false",
                   "trainer.accelerator=cpu", "trainer.devices=1", "data.num_workers=0", "trainer.precision=32-true"]


# ------------------------------------------------------------------------------------------
# configurations
# ------------------------------------------------------------------------------------------


def default_yamls() -> Tuple[str, Dict[str, Path]]:
    """("world", experiments/world/*) when all three exist, else ("tiny", experiments/tiny/*)."""
    if all(p.is_file() for p in WORLD.values()):
        return "world", dict(WORLD)
    return "tiny", dict(TINY)


def stand_in_overrides(yaml_path: Path, overrides: Sequence[str], work: Path) -> Tuple[List[str], List[str]]:
    """Overrides that replace a missing tokenizer / missing shards by temp-dir stand-ins."""
    cfg = load_config(yaml_path, list(overrides)).cfg
    extra, notes = [], []
    root = resolve_path(cfg.data.root) if cfg.data.root else REPO_ROOT
    missing = [s for s in cfg.data.sources if not glob.glob(str(root / s.shards))]
    if missing:
        tasks = {}
        for s in cfg.data.sources:
            task = Path(s.shards).name.split("-")[0]
            if task not in TASKS:
                raise ValueError(f"{yaml_path}: data.sources '{s.name}' shards {s.shards!r} are missing under "
                                 f"{root} and do not name a world task; generate them first")
            tasks[task] = 48
        size = max(32, int(cfg.model.vision.image_size))
        root = work / f"world{size}-{'-'.join(sorted(tasks))}"
        if not (root / "train").is_dir():
            generate_split(str(root / "train"), "train", tasks, seed=0, size=size, shard_size=16)
        extra.append(f"data.root={root}")
        notes.append(f"shards under {cfg.data.root} missing, generated world shards ({size} px)")
    tok = cfg.model.tokenizer
    if tok.name == "world" and not (resolve_path(tok.path) / "tokenizer.json").is_file():
        vocab = cfg.model.llm.vocab_size or 1024
        d = work / f"tokenizer{vocab}"
        if not (d / "tokenizer.json").is_file():
            _train_stand_in_tokenizer(cfg.data.sources, str(root), d, vocab)
        extra.append(f"model.tokenizer.path={d}")
        notes.append(f"tokenizer {tok.path} missing, trained a {vocab}-token world tokenizer on the shards")
    return extra, notes


def _train_stand_in_tokenizer(sources: Sequence[Any], root: str, out: Path, vocab: int) -> None:
    """The world tokenizer as `make bases` trains it (templated conversations), on <= 4000 records."""
    from modules.stages.bases.data import read_world  # lazy: pulls in Lightning; only for a missing tokenizer
    from modules.stages.bases.llm import tokenizer_corpus  # lazy: pulls in Lightning; only for a missing tokenizer

    records = read_world(list(sources), root, limit=4000, images=False)["records"]
    train_world_tokenizer(tokenizer_corpus(records), out, vocab_size=vocab)


# ------------------------------------------------------------------------------------------
# one (config, stage)
# ------------------------------------------------------------------------------------------


def draw_batches(dm: Any, n: int) -> List[Dict[str, Any]]:
    """The first `n` training batches of the stage's DataModule `dm`."""
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    return [next(it) for _ in range(n)]


def run_one(yaml_path: str, overrides: Sequence[str], stage: str, config_name: str, steps: int = 12,
            warmup: int = 3, reps: int = 2, distinct: int = 4, threads: int = 0, mlflow: bool = False,
            peak_n: int = 1024, peak_seconds: float = 1.5) -> Dict[str, Any]:
    """Every measurement for one (config, stage); returns the table row."""
    import lightning as L

    # transformers etc. are imported here, before rss_imports is read: they count there, not in the model
    from modules.vargpt import VARGPT  # lazy: transformers is for the measuring subprocess, not the driver

    t_start = time.perf_counter()
    rss_imports = rss_mb()  # python + torch + lightning + transformers, before the model exists
    loaded = load_config(yaml_path, list(BENCH_OVERRIDES) + list(overrides))
    cfg = loaded.cfg
    nthreads = threads or cfg.trainer.num_threads or min(os.cpu_count() or 1, 2)
    torch.set_num_threads(nthreads)
    L.seed_everything(cfg.seed, verbose=False)
    warnings.filterwarnings("ignore", message=".*self.log.*")  # Trainer-less training_step in the plain loop
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    module, dm = build_stage(cfg)
    net = getattr(module, "net", None)
    if not isinstance(net, VARGPT):
        raise ValueError(f"{yaml_path}: stage {cfg.stage!r} is not a VARGPT stage (its net: {type(net).__name__})")
    batches = draw_batches(dm, distinct)
    rss_built = rss_mb()

    # what a step processes
    B = [int(b["input_ids"].shape[0]) for b in batches]
    T_pad = [int(b["input_ids"].numel()) for b in batches]
    T_real = [int(b["attention_mask"].sum()) for b in batches]
    n_gen = [int((b["input_ids"] == net.gen_pad_id).sum()) // net.L for b in batches]

    module.train()
    fl = [train_flops(net, b) for b in batches]
    fwd, tot = statistics.mean(f for f, _ in fl), statistics.mean(t for _, t in fl)
    analytic_fwd = statistics.mean(2.0 * llm_matmul_params(net) * t for t in T_pad)

    peak = matmul_peak(peak_n, peak_seconds)

    # alternate plain / lightning (/ lightning+mlflow) reps
    times: Dict[str, List[Dict[str, List[float]]]] = {"plain": [], "lightning": []}
    if mlflow:
        times["lightning_mlflow"] = []
    with tempfile.TemporaryDirectory(prefix="bench_train_step_") as work:
        for r in range(reps):
            times["plain"].append(time_plain(module, batches, steps, warmup, cfg.optim.grad_clip))
            times["lightning"].append(time_lightning(module, cfg, batches, steps, warmup, None, work))
            if mlflow:
                logger = _mlflow_logger(work, f"{config_name}-{stage}-{r}")
                times["lightning_mlflow"].append(time_lightning(module, cfg, batches, steps, warmup, logger, work))
    # Per method and clock: the lower envelope (robust to other jobs on a shared machine), the best
    # rep mean (includes periodic work such as logging every n steps) and the time outside the model.
    est = step_estimates(times, warmup, distinct)
    outside = {clock: est[clock]["outside_median"] for clock in CLOCKS}
    env, best = est["wall"]["envelope"], est["wall"]["best_mean"]
    cpu_env, cpu_best = est["cpu"]["envelope"], est["cpu"]["best_mean"]
    total = sum(p.numel() for p in net.parameters())
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    step_s = env["lightning"]  # what a training run pays per step (data loading aside)
    mlf = "lightning_mlflow" in best
    row = {
        "config": config_name, "stage": stage, "yaml": _rel(yaml_path), "overrides": list(overrides),
        "threads": nthreads, "params_total": total, "params_trainable": trainable,
        "batch_size": statistics.mean(B), "tokens_per_batch": statistics.mean(T_real),
        "padded_tokens_per_batch": statistics.mean(T_pad), "gen_targets_per_batch": statistics.mean(n_gen),
        "flops_fwd": fwd, "flops_step": tot, "flops_fwd_analytic_llm": analytic_fwd,
        "analytic_llm_over_counted_fwd": analytic_fwd / fwd if fwd else None,
        # wall-clock lower envelope; every estimate in step_s_estimates
        "step_s_plain": env["plain"], "step_s_lightning": env["lightning"],
        "step_s_lightning_mlflow": env.get("lightning_mlflow"),
        "step_s_estimates": est,
        "lightning_overhead": env["lightning"] / env["plain"] - 1.0,
        "lightning_overhead_cpu": cpu_env["lightning"] / cpu_env["plain"] - 1.0,
        "lightning_overhead_best_mean": best["lightning"] / best["plain"] - 1.0,
        "lightning_added_s": {c: outside[c]["lightning"] - outside[c]["plain"] for c in outside},
        "lightning_overhead_outside": {c: (outside[c]["lightning"] - outside[c]["plain"]) / est[c]["envelope"]["plain"]
                                       for c in outside},
        # periodic logging is what MLflow adds: compare best means, which include it
        "lightning_mlflow_overhead": (best["lightning_mlflow"] / best["plain"] - 1.0) if mlf else None,
        "lightning_mlflow_overhead_cpu": (cpu_best["lightning_mlflow"] / cpu_best["plain"] - 1.0) if mlf else None,
        "lightning_mlflow_added_cpu_s": (est["cpu"]["outside_mean"]["lightning_mlflow"]
                                         - est["cpu"]["outside_mean"]["plain"]) if mlf else None,
        "log_every_n_steps": cfg.trainer.log_every_n_steps,
        "samples_per_s": statistics.mean(B) / step_s, "tokens_per_s": statistics.mean(T_real) / step_s,
        "flops_per_s": tot / step_s, "matmul_peak_flops_per_s": peak["wall"], "peak_fraction": tot / step_s / peak["wall"],
        # the same on the CPU clock: FLOPs per CPU-second of a step over the peak's FLOPs per CPU-second
        "flops_per_cpu_s": tot / cpu_env["lightning"], "matmul_peak_flops_per_cpu_s": peak["cpu"],
        "peak_fraction_cpu": (tot / cpu_env["lightning"]) / peak["cpu"],
        "rss_imports_mb": rss_imports, "rss_after_build_mb": rss_built, "peak_rss_mb": peak_rss_mb(),
        "steps_timed": steps, "warmup": warmup, "reps": reps, "distinct_batches": distinct,
        "step_s_all": {k: [{c: [round(x, 5) for x in v[c]] for c in v} for v in vs] for k, vs in times.items()},
        "wall_s": time.perf_counter() - t_start,
    }
    return row


def _mlflow_logger(work: str, run_name: str):
    from lightning.pytorch.loggers import MLFlowLogger

    logger = MLFlowLogger(experiment_name="bench-train-step", run_name=run_name,
                          tracking_uri=f"sqlite:///{work}/mlflow.db", artifact_location=Path(work, "art").as_uri())
    _ = logger.experiment, logger.run_id  # store + run created now, not inside a timed step
    return logger


def _rel(p: str | Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(p)


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------


def _si(x: float) -> str:
    for unit, f in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= f:
            return f"{x / f:.3g}{unit}"
    return f"{x:.3g}"


def to_markdown(result: Dict[str, Any]) -> str:
    rows = result["rows"]
    mlf = any(r.get("step_s_lightning_mlflow") for r in rows)
    head = ["config", "stage", "params trainable / total", "batch", "tokens/batch", "step ms (plain)",
            "step ms (Lightning)", "Lightning overhead: step ratio wall / CPU",
            "Lightning overhead: added work outside the model CPU (wall)"]
    if mlf:
        head.append("overhead +MLflow: step ratio wall / CPU; added CPU work (mean)")
    head += ["samples/s", "tokens/s", "FLOP/step (counted)", "FLOP/s", "% of matmul peak wall / CPU", "peak RSS MB (imports)"]
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["config"], r["stage"], f"{_si(r['params_trainable'])} / {_si(r['params_total'])}",
                 f"{r['batch_size']:.3g}", f"{r['tokens_per_batch']:.0f} ({r['padded_tokens_per_batch']:.0f} padded)",
                 f"{1e3 * r['step_s_plain']:.1f}", f"{1e3 * r['step_s_lightning']:.1f}",
                 f"{100 * r['lightning_overhead']:+.1f}% / {100 * r['lightning_overhead_cpu']:+.1f}%",
                 f"{100 * r['lightning_overhead_outside']['cpu']:+.1f}% = {1e3 * r['lightning_added_s']['cpu']:+.1f} ms "
                 f"({100 * r['lightning_overhead_outside']['wall']:+.1f}%)"]
        if mlf:
            o, oc, add = (r.get(k) for k in ("lightning_mlflow_overhead", "lightning_mlflow_overhead_cpu",
                                             "lightning_mlflow_added_cpu_s"))
            cells.append("" if o is None else
                         f"{100 * o:+.1f}% / {100 * oc:+.1f}%; added {1e3 * add:+.1f} ms = "
                         f"{100 * add / r['step_s_estimates']['cpu']['envelope']['plain']:+.1f}% (log every {r['log_every_n_steps']})")
        cells += [f"{r['samples_per_s']:.1f}", f"{r['tokens_per_s']:.0f}", _si(r["flops_step"]),
                  _si(r["flops_per_s"]),
                  f"{100 * r['peak_fraction']:.1f}% / {100 * r['peak_fraction_cpu']:.1f}%",
                  f"{r['peak_rss_mb']:.0f} ({r['rss_imports_mb']:.0f})"]
        md.append("| " + " | ".join(cells) + " |")
    m = result["machine"]
    peaks = [r["matmul_peak_flops_per_s"] for r in rows]
    cpeaks = [r["matmul_peak_flops_per_cpu_s"] for r in rows]
    md += ["", f"Machine: {m['cpus']} CPUs ({m['processor']}), torch {m['torch']}, {rows[0]['threads'] if rows else '?'} "
               f"torch threads, load {m['loadavg_1m']} (1 min) at the start, {m['date_utc']}, git {m['git_sha']}. "
               f"fp32 matmul peak ({result['settings']['peak_n']}^2 torch.mm, measured in each row's process): "
               f"{_si(min(peaks)) if peaks else '?'}-{_si(max(peaks)) if peaks else '?'}FLOP/s per wall second, "
               f"{_si(min(cpeaks)) if cpeaks else '?'}-{_si(max(cpeaks)) if cpeaks else '?'}FLOP/s per CPU second.",
           f"Step ms = lower envelope: per cached batch the fastest of its occurrences over "
           f"{result['settings']['reps']} alternating reps x {result['settings']['steps']} timed steps (after "
           f"{result['settings']['warmup']} warm-up), averaged over the {result['settings']['distinct']} cached batches "
           f"(data loading never timed; other jobs on a shared machine only add time). Lightning overhead = "
           f"Lightning / plain - 1 on those (no logger, no progress bar), on the wall clock and on the process CPU clock "
           f"(the CPU clock barely moves while other jobs hold the cores). Added work outside the model = median over "
           f"all timed steps of (step - forward of module.net - backward - clip+optimizer update), Lightning minus "
           f"plain, over the plain step: the least load-sensitive of the three; +MLflow: the same with an MLflow "
           f"logger on a sqlite store, step ratio on best rep means and added work on the mean (both include the "
           f"logging every n steps). samples/s, "
           f"tokens/s (non-padding), FLOP/s use the Lightning step; % of peak on the CPU clock = (FLOPs per CPU-second "
           f"of a step) / (matmul FLOPs per CPU-second). FLOPs counted with FlopCounterMode over "
           f"fwd+bwd of module.net (matmul/conv/attention). Random weights. Configs: "
           + "; ".join(f"{k} = {', '.join(v['yamls'])}" + (f" + {' '.join(v['overrides'])}" if v["overrides"] else "")
                       for k, v in result["configs"].items()) + "."]
    notes = sorted({n for r in rows for n in r.get("stand_ins", [])})
    if notes:
        md.append("Stand-ins: " + "; ".join(notes) + ".")
    return "\n".join(md) + "\n"


# ------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------


def _config_name(preset: str, config: str) -> str:
    return preset if config == "default" else f"{preset}-{config}"


def _child(spec: Dict[str, Any]) -> Dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.train_step", "--one", json.dumps(spec)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    p = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{spec['config']}/{spec['stage']} failed (rc {p.returncode}):\n{p.stderr[-4000:]}")
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("ROW ")][-1]
    return json.loads(line[4:])


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="auto",
                    help="comma list of: auto (world if experiments/world/stage{1,2,3}.yaml exist, else tiny), world, tiny")
    ap.add_argument("--stage1", help="experiment YAML for stage 1 (replaces the preset's)")
    ap.add_argument("--stage2")
    ap.add_argument("--stage3")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--configs", default="default,larger", help="comma list of: default, larger")
    ap.add_argument("--override", action="append", default=[], help="key=value for every config (repeatable)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per rep and method")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--distinct", type=int, default=4, help="cached batches cycled through")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0: the experiment's trainer.num_threads). Default 1: on a shared machine "
                         "OpenMP's spin-waiting threads make 2-thread steps 10-50x slower (see the docstring)")
    ap.add_argument("--mlflow", action=argparse.BooleanOptionalAction, default=True,
                    help="also time Lightning with an MLflow logger (throwaway sqlite store; default config only)")
    ap.add_argument("--peak-n", type=int, default=1024)
    ap.add_argument("--peak-seconds", type=float, default=1.5)
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 steps, 1 rep, no MLflow")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: one configuration as JSON, in this process
    args = ap.parse_args(argv)

    if args.one:
        spec = json.loads(args.one)
        row = run_one(spec["yaml"], spec["overrides"], spec["stage"], spec["config"], **spec["kw"])
        row["stand_ins"] = spec.get("stand_ins", [])
        print("ROW " + json.dumps(row), flush=True)
        return 0

    if args.quick:
        args.steps, args.warmup, args.reps, args.mlflow, args.peak_seconds = 3, 1, 1, False, 0.5
    presets: List[Tuple[str, Dict[str, Path]]] = []
    for name in [p for p in args.presets.split(",") if p]:
        if name == "auto":
            presets.append(default_yamls())
        elif name in ("world", "tiny"):
            if name == "world" and not all(p.is_file() for p in WORLD.values()):
                ap.error(f"--presets world: {', '.join(_rel(p) for p in WORLD.values() if not p.is_file())} missing")
            presets.append((name, dict(WORLD if name == "world" else TINY)))
        else:
            ap.error(f"--presets: unknown {name!r}; valid: auto, world, tiny")
    custom = {s: Path(getattr(args, s)) for s in STAGES if getattr(args, s)}
    if custom:
        presets = [("custom", {**presets[0][1], **custom})]
    stages = [s for s in args.stages.split(",") if s]
    configs = {"default": list(args.override), "larger": list(args.override) + LARGER_OVERRIDES}
    chosen = [c for c in args.configs.split(",") if c]
    for c in chosen:
        if c not in configs:
            ap.error(f"--configs: unknown {c!r}; valid: {', '.join(configs)}")
    kw = dict(steps=args.steps, warmup=args.warmup, reps=args.reps, distinct=args.distinct, threads=args.threads,
              mlflow=args.mlflow, peak_n=args.peak_n, peak_seconds=args.peak_seconds)
    machine = machine_info()
    rows = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_train_step_") as work:
        for preset, yamls in presets:
            for c in chosen:
                for s in stages:
                    extra, notes = stand_in_overrides(yamls[s], BENCH_OVERRIDES + configs[c], Path(work))
                    # MLflow's cost per logged step does not grow with the model: time it on the default only
                    kw_c = dict(kw, mlflow=kw["mlflow"] and c == "default")
                    spec = {"yaml": str(yamls[s]), "overrides": configs[c] + extra, "stage": s, "kw": kw_c,
                            "config": _config_name(preset, c), "stand_ins": notes}
                    row = _child(spec)
                    rows.append(row)
                    print(f"{row['config']:>14} {s}: plain {1e3 * row['step_s_plain']:.1f} ms, Lightning "
                          f"{1e3 * row['step_s_lightning']:.1f} ms, overhead wall {100 * row['lightning_overhead']:+.1f}%"
                          f" / CPU {100 * row['lightning_overhead_cpu']:+.1f}% / added outside the model "
                          f"{100 * row['lightning_overhead_outside']['cpu']:+.1f}%, {100 * row['peak_fraction_cpu']:.1f}% "
                          f"of peak (CPU clock), RSS {row['peak_rss_mb']:.0f} MB [{row['wall_s']:.0f} s]", flush=True)
    result = {"benchmark": "train_step", "machine": machine, "total_s": round(time.perf_counter() - t0, 1),
              "command": "python -m benchmarks.train_step " + " ".join(argv if argv is not None else sys.argv[1:]),
              "settings": {k: v for k, v in kw.items()},
              "configs": {_config_name(preset, c): {"yamls": [_rel(yamls[s]) for s in stages], "overrides": configs[c]}
                          for preset, yamls in presets for c in chosen},
              "rows": rows}
    md = to_markdown(result)
    print()
    print(md, end="")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_step.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "train_step.md").write_text(md)
    print(f"wrote {out / 'train_step.json'} and {out / 'train_step.md'} ({result['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
