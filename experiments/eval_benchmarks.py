"""A checkpoint on the paper's benchmarks through lmms-eval, as one command, with one MLflow run.

    python -m experiments.eval_benchmarks runs/world/stage2 --tasks vargpt_world_vqa
    python -m experiments.eval_benchmarks /ckpt/vargpt-7b --batch-size 8 \
        --launcher "accelerate launch --num_processes 8"        # the paper's understanding set
    make eval-benchmarks CKPT=... [TASKS=...] [BENCH_ARGS="--limit 100"]

Runs ``lmms-eval --model vargpt_suite --model_args ckpt=CKPT`` (experiments/lmms_eval_model.py)
with the suite's own tasks on the include path (experiments/lmms_tasks: the world's VQA test
split), writes lmms-eval's results and per-sample logs under ``--out`` (default
runs/lmms_eval/<checkpoint>), then ``benchmarks.json`` (one primary number per task, all metrics,
the command, versions) and ``table.md`` (the paper's columns), and logs one MLflow run per
checkpoint in experiment ``vargpt-benchmarks``: metric ``bench/<task>`` (the number the paper
reports for that benchmark), ``bench/<task>/<metric>`` (every metric lmms-eval gave), the
results as artifacts. Evaluating the same checkpoint again (other tasks, say) adds to its run.

The datasets are lmms-eval's (Hugging Face hub ids); offline, they must already be in the
Hugging Face datasets cache: ``--prefetch`` (with network) puts them there (docs/evaluation.md,
lmms-eval). lmms-eval exits 0 even when
a task fails; this command fails when the results file is missing.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from experiments import tracking
from experiments.config import REPO_ROOT

EXPERIMENT = "vargpt-benchmarks"
TASK_DIR = "experiments/lmms_tasks"
# The paper's understanding set (VARGPT, arXiv 2501.12327, Tables 1 and 2) as lmms-eval tasks, in
# the paper's column order, with the metric each column reports (x100 where lmms-eval gives 0..1).
PAPER_COLUMNS = [
    ("MMBench", "mmbench_en_dev", "gpt_eval_score", 1.0),
    ("SEED", "seedbench", "seed_image", 100.0),
    ("MMMU", "mmmu_val", "mmmu_acc", 100.0),
    ("POPE", "pope", "pope_f1_score", 100.0),
    ("MME-P", "mme", "mme_perception_score", 1.0),
    ("VQAv2", "vqav2_val", "exact_match", 100.0),
    ("GQA", "gqa", "exact_match", 100.0),
    ("TextVQA", "textvqa_val", "exact_match", 100.0),
    ("VizWiz", "vizwiz_vqa_val", "exact_match", 100.0),
    ("SciQA-img", "scienceqa_img", "exact_match", 100.0),
]
PAPER_TASKS = [t for _, t, _, _ in PAPER_COLUMNS]
PRIMARY = {t: (m, s) for _, t, m, s in PAPER_COLUMNS} | {"vargpt_world_vqa": ("exact_match", 100.0)}


def task_metrics(task_result: Dict[str, Any]) -> Dict[str, float]:
    """lmms-eval's ``results[task]`` as {metric: value}: numeric entries of filter ``none`` (or the
    first filter), standard errors left out."""
    out: Dict[str, float] = {}
    for key, value in task_result.items():
        if "," not in key or "_stderr" in key or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        metric, _filter = key.split(",", 1)
        out.setdefault(metric, float(value))
    return out


def primary(task: str, metrics: Dict[str, float]) -> Optional[tuple]:
    """(metric name, value as the paper reports it) for a task: the paper's metric, else the
    first one lmms-eval gave."""
    if task in PRIMARY and PRIMARY[task][0] in metrics:
        m, scale = PRIMARY[task]
        return m, metrics[m] * scale
    if metrics:
        m = next(iter(metrics))
        return m, metrics[m]
    return None


def summarize(results: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    tasks: Dict[str, Dict[str, Any]] = {}
    for task, res in results.get("results", {}).items():
        metrics = task_metrics(res)
        p = primary(task, metrics)
        tasks[task] = {"metrics": metrics, "primary_metric": p[0] if p else None, "value": p[1] if p else None,
                       "n": (results.get("n-samples", {}).get(task) or {}).get("effective")}
    return tasks


def paper_table(name: str, tasks: Dict[str, Dict[str, Any]]) -> str:
    """The paper's columns (and any other task after them), one row for this checkpoint."""
    cols = [(label, t) for label, t, _, _ in PAPER_COLUMNS]
    cols += [(t, t) for t in tasks if t not in PAPER_TASKS]
    head = "| checkpoint | " + " | ".join(c for c, _ in cols) + " |"
    sep = "|---" * (len(cols) + 1) + "|"
    cells = [f"{tasks[t]['value']:.1f}" if t in tasks and tasks[t]["value"] is not None else "-" for _, t in cols]
    return "\n".join([head, sep, f"| {name} | " + " | ".join(cells) + " |"]) + "\n"


def checkpoint_id(ckpt: Path) -> str:
    """What identifies a checkpoint across evaluations: the weights' sha256 from its export.json
    when it has one, else its resolved path."""
    manifest = ckpt / "export.json"
    if manifest.is_file():
        files = json.loads(manifest.read_text()).get("files") or {}
        digest = files.get("model.safetensors")
        digest = digest.get("sha256") if isinstance(digest, dict) else digest
        if digest:
            return str(digest)
    return hashlib.sha256(str(ckpt.resolve()).encode()).hexdigest()


def checkpoint_name(ckpt: Path) -> str:
    cfg = ckpt / "config.yaml"
    if cfg.is_file():
        for line in cfg.read_text().splitlines():
            if line.startswith("name:"):
                return line.split(":", 1)[1].strip().strip("'\"") or ckpt.name
    return ckpt.name


def lmms_eval_command(ckpt: Path, tasks: List[str], out: Path, batch_size: int, limit: int,
                      model_args: str, launcher: str) -> List[str]:
    head = shlex.split(launcher) + ["-m", "lmms_eval"] if launcher else [sys.executable, "-m", "lmms_eval"]
    margs = f"ckpt={ckpt.resolve()}" + (f",{model_args}" if model_args else "")
    cmd = head + ["--model", "vargpt_suite", "--model_args", margs, "--tasks", ",".join(tasks),
                  "--include_path", str(REPO_ROOT / TASK_DIR), "--batch_size", str(batch_size),
                  "--output_path", str(out), "--log_samples"]
    return cmd + (["--limit", str(limit)] if limit else [])


def log_mlflow(ckpt: Path, summary: Dict[str, Any], files: List[Path], uri: Optional[str] = None) -> str:
    """Metrics into the checkpoint's run of experiment vargpt-benchmarks (created on first use)."""
    from mlflow.entities import Metric, Param

    client = tracking.get_client(uri)
    exp_id = tracking.ensure_experiment(client, EXPERIMENT, REPO_ROOT / "runs" / "mlartifacts")
    tags = {"checkpoint_id": summary["checkpoint_id"]}
    found = tracking.find_runs(client, [exp_id], tags)
    if found:
        rid = found[-1].info.run_id
    else:
        run = client.create_run(exp_id, run_name=summary["name"], tags={
            **tags, **tracking.git_info(), "checkpoint": summary["checkpoint"], "stage": summary.get("stage", ""),
            tracking.RUN_KIND_TAG: "benchmarks"})
        rid = run.info.run_id
    now = int(time.time() * 1000)
    metrics = []
    for task, t in summary["tasks"].items():
        if t["value"] is not None:
            metrics.append(Metric(f"bench/{task}", float(t["value"]), now, 0))
        metrics += [Metric(f"bench/{task}/{m}", float(v), now, 0) for m, v in t["metrics"].items()]
    params = [Param(f"lmms_eval.{task}.protocol", json.dumps({"limit": summary["limit"], "batch_size": summary["batch_size"],
                                                              "model_args": summary["model_args"]})[:500])
              for task in summary["tasks"]]
    existing = set(client.get_run(rid).data.params)
    client.log_batch(rid, metrics=metrics, params=[p for p in params if p.key not in existing])
    client.set_tag(rid, "lmms_eval_version", summary["lmms_eval_version"])
    client.set_tag(rid, "tasks", ",".join(sorted(set(client.get_run(rid).data.tags.get("tasks", "").split(",")) - {""}
                                                  | set(summary["tasks"]))))
    for f in files:
        client.log_artifact(rid, str(f), f"lmms_eval/{summary['stamp']}")
    client.set_terminated(rid, "FINISHED")
    return rid


def run(ckpt: Path, tasks: List[str], out: Optional[Path] = None, batch_size: int = 1, limit: int = 0,
        model_args: str = "", launcher: str = "", mlflow: bool = True, tracking_uri: Optional[str] = None) -> Dict[str, Any]:
    ckpt = ckpt.resolve()
    out = (out or REPO_ROOT / "runs" / "lmms_eval" / checkpoint_name(ckpt)).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cmd = lmms_eval_command(ckpt, tasks, out, batch_size, limit, model_args, launcher)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    print("[eval-benchmarks] " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    before = set(out.rglob("*_results.json"))
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, cwd=REPO_ROOT, env=env).returncode
    seconds = round(time.perf_counter() - t0, 1)
    new = sorted(set(out.rglob("*_results.json")) - before, key=lambda p: p.stat().st_mtime)
    if rc != 0 or not new:
        raise SystemExit(f"eval-benchmarks: lmms-eval wrote no results (exit {rc}); its log above says why")
    results_file = new[-1]
    results = json.loads(results_file.read_text())
    stamp = results_file.name[: -len("_results.json")]
    samples = sorted(results_file.parent.glob(f"{stamp}_samples_*.jsonl"))
    summary = {
        "checkpoint": str(ckpt), "checkpoint_id": checkpoint_id(ckpt), "name": checkpoint_name(ckpt),
        "stage": _stage(ckpt), "tasks": summarize(results), "limit": limit, "batch_size": batch_size,
        "model_args": model_args, "lmms_eval_version": _lmms_eval_version(),
        "results_file": str(results_file), "samples_files": [str(s) for s in samples], "stamp": stamp,
        "command": cmd, "seconds": seconds,
    }
    (out / "benchmarks.json").write_text(json.dumps(summary, indent=2))
    (out / "table.md").write_text(paper_table(summary["name"], summary["tasks"]))
    if mlflow:
        summary["mlflow_run_id"] = log_mlflow(ckpt, summary, [results_file, *samples, out / "benchmarks.json",
                                                              out / "table.md"], tracking_uri)
        (out / "benchmarks.json").write_text(json.dumps(summary, indent=2))
    return summary


def _lmms_eval_version() -> str:
    """The installed harness (the results file's own "lmms_eval_version" is the git state of the
    working directory, i.e. of this repository)."""
    from importlib import metadata

    try:
        return metadata.version("lmms_eval")
    except metadata.PackageNotFoundError:
        return "unknown"


def _stage(ckpt: Path) -> str:
    cfg = ckpt / "config.yaml"
    if cfg.is_file():
        for line in cfg.read_text().splitlines():
            if line.startswith("stage:"):
                return line.split(":", 1)[1].strip()
    return ""


def prefetch(tasks: List[str]) -> None:
    """Build each task as lmms-eval does (which downloads its dataset into the Hugging Face
    datasets cache, $HF_HOME): run once with network, then copy $HF_HOME to machines without."""
    code = ("import sys\nfrom lmms_eval.tasks import TaskManager, get_task_dict\n"
            "d = get_task_dict(sys.argv[2].split(','), TaskManager(include_path=sys.argv[1]))\n"
            "print('[eval-benchmarks] datasets ready for', ', '.join(sorted(map(str, d))))\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    subprocess.run([sys.executable, "-c", code, str(REPO_ROOT / TASK_DIR), ",".join(tasks)], cwd=REPO_ROOT,
                   env=env, check=True)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.eval_benchmarks", description=__doc__.split("\n")[0])
    ap.add_argument("ckpt", nargs="?", default="", help="checkpoint directory (what experiments.infer loads)")
    ap.add_argument("--tasks", default=",".join(PAPER_TASKS), help="lmms-eval task names (default: the paper's set)")
    ap.add_argument("--out", default="", help="output folder (default runs/lmms_eval/<checkpoint name>)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--limit", type=int, default=0, help="first N documents per task (0 = all)")
    ap.add_argument("--model-args", default="", help="more vargpt_suite model_args, e.g. dtype=bfloat16")
    ap.add_argument("--launcher", default="", help='e.g. "accelerate launch --num_processes 8" (several GPUs)')
    ap.add_argument("--no-mlflow", action="store_true")
    ap.add_argument("--prefetch", action="store_true",
                    help="only download the tasks' datasets into the Hugging Face cache (needs network)")
    args = ap.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.prefetch:
        prefetch(tasks)
        return 0
    if not args.ckpt:
        ap.error("give a checkpoint directory (or --prefetch)")
    s = run(Path(args.ckpt), tasks, Path(args.out) if args.out else None, args.batch_size, args.limit,
            args.model_args, args.launcher, not args.no_mlflow)
    print(paper_table(s["name"], s["tasks"]), end="")
    print(f"[eval-benchmarks] {len(s['tasks'])} task(s) in {s['seconds']} s; results: {s['results_file']}"
          + (f"; MLflow run {s['mlflow_run_id']} in {EXPERIMENT}: {tracking.ui_run_link(s['mlflow_run_id'])} "
             "(served by `make mlflow-ui`)" if "mlflow_run_id" in s else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
