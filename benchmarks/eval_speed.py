"""The world pipeline's evaluation step, an earlier commit against this tree, alternating.

    python -m benchmarks.eval_speed --before COMMIT [--runs runs/world] [--reps 3]

Runs ``python -m experiments.pipeline --runs RUNS`` (the evaluation step of ``make pipeline``:
VQA on the test and held-out splits, the understanding-only baseline, stage-3 generation with
FID / IS / attribute accuracy / prompt gain and the real-vs-real floor) once with the code of
COMMIT (exported with ``git archive`` into a temporary directory; ``runs/`` is linked into it so
both read the same exports, data and caches) and once with this working tree, alternately,
``--reps`` times. Both log to a throw-away MLflow store (the same logging cost, the dashboard
untouched). Times: wall seconds and the child processes' CPU seconds (user + system), minimum
over repetitions; the reports' metrics are compared key by key.
Writes benchmarks/results/eval_speed.{json,md} with the machine, load and git commit.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from benchmarks.step_timing import machine_info
from datamodules.paths import REPO_ROOT
from experiments.tracking import git_info

RESULTS = Path(__file__).resolve().parent / "results"
# (label, path into runs/pipeline/report.json)
METRICS = (("VQA test", ("vqa_accuracy",)), ("VQA held-out", ("stage2", "vqa_accuracy_heldout")),
           ("blind", ("stage2", "vqa_blind_baseline")), ("und-only VQA", ("understanding_only", "vqa_accuracy")),
           ("stage-3 VQA", ("stage3", "vqa_accuracy")), ("attribute acc.", ("gen_attribute_accuracy",)),
           ("FID", ("fid",)), ("IS", ("inception_score",)), ("prompt gain", ("stage3", "gen_prompt_gain")),
           ("floor FID", ("real_vs_real", "fid")))


def _get(rep: Dict[str, Any], path) -> Optional[float]:
    for k in path:
        rep = rep.get(k) if isinstance(rep, dict) else None
    return float(rep) if isinstance(rep, (int, float)) else None


def export_commit(commit: str, dest: Path) -> str:
    """The tracked files of ``commit`` under ``dest`` (plus a link to this tree's runs/); its full sha."""
    sha = subprocess.run(["git", "rev-parse", commit], cwd=REPO_ROOT, check=True, capture_output=True,
                         text=True).stdout.strip()
    dest.mkdir(parents=True)
    archive = subprocess.Popen(["git", "archive", sha], cwd=REPO_ROOT, stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        raise SystemExit(f"eval_speed: git archive {commit} failed")
    (dest / "runs").symlink_to(REPO_ROOT / "runs")
    return sha


def timed_pipeline(tree: Path, runs: Path, out: Path, env: Dict[str, str]) -> Dict[str, float]:
    """Wall and child CPU seconds of one pipeline evaluation with the code under ``tree``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "experiments.pipeline", "--runs", str(runs), "--out", str(out)],
                          cwd=tree, env=dict(env, PYTHONPATH=str(tree)), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"eval_speed: the pipeline under {tree} failed:\n{proc.stderr[-3000:]}")
    return {"wall": wall, "cpu": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.eval_speed", description=__doc__.split("\n")[0])
    ap.add_argument("--before", required=True, help="the commit to compare against (e.g. the one before a speed-up)")
    ap.add_argument("--runs", default=str(REPO_ROOT / "runs" / "world"),
                    help="directory with stage2, stage2_und_only and stage3 exports (made by `make pipeline`)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    runs = Path(args.runs).resolve()
    if not (runs / "stage3" / "model.safetensors").is_file():
        raise SystemExit(f"eval_speed: no stage-3 export under {runs}; run `make pipeline` first or pass --runs DIR")
    times: Dict[str, List[Dict[str, float]]] = {"before": [], "now": []}
    reports: Dict[str, Dict[str, Any]] = {}
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="eval_speed_") as tmp:
        tmp_p = Path(tmp)
        sha = export_commit(args.before, tmp_p / "before")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_p / 'mlflow.db'}", HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg")
        trees = {"before": tmp_p / "before", "now": REPO_ROOT}
        for _ in range(args.reps):
            for mode, tree in trees.items():
                out = tmp_p / mode / "report.json"
                times[mode].append(timed_pipeline(tree, runs, out, env))
                reports[mode] = json.loads(out.read_text())
    best = {m: {k: min(t[k] for t in ts) for k in ("wall", "cpu")} for m, ts in times.items()}
    ratio = {k: best["before"][k] / best["now"][k] for k in ("wall", "cpu")}
    metrics = {label: {m: _get(reports[m], path) for m in reports} for label, path in METRICS}
    res = {"before": sha, "runs": str(runs), "reps": args.reps, "seconds": times, "best_seconds": best,
           "speedup": ratio, "metrics": metrics, "load_avg_start_end": [load0, os.getloadavg()[0]],
           "machine": machine_info(), "git": git_info()}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval_speed.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
    md = [f"# World pipeline evaluation: `{sha[:10]}` against `{res['git']['git_commit'][:10]}`"
          f"{' (dirty)' if res['git'].get('git_dirty') == 'true' else ''}", "",
          f"`python -m benchmarks.eval_speed --before {args.before} --runs {args.runs}`; {args.reps} alternating "
          f"repetitions, best of each; load {load0:.1f} -> {res['load_avg_start_end'][1]:.1f}; "
          f"{res['machine'].get('cpus', '?')} cores.", "",
          "| code | wall s | CPU s |", "|---|---|---|",
          *[f"| {m} | {best[m]['wall']:.1f} | {best[m]['cpu']:.1f} |" for m in times],
          f"| **speed-up** | **{ratio['wall']:.2f}x** | **{ratio['cpu']:.2f}x** |", "",
          "| metric | before | now |", "|---|---|---|",
          *[f"| {label} | {fmt(v.get('before'))} | {fmt(v.get('now'))} |" for label, v in metrics.items()], ""]
    (out_dir / "eval_speed.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
