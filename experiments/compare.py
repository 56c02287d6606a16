"""Compare runs: ``python -m experiments.compare SWEEP_NAME_OR_MLFLOW_EXPERIMENT [--metric M] [--mode min|max]``.

For a sweep (``experiments.sweep``) the rows are its variants (latest attempt of each) and the
columns the keys the sweep varies; for any other MLflow experiment the rows are its runs and the
columns the params that differ between them. Each metric gets its final and best value; rows
are ranked by the sweep's metric (``--metric``/``--mode`` to choose another).

A comparison is about a few metrics: the ranking one and the short list the sweep declares
(``metrics:`` in the sweep file, ``--metrics`` here; by default those of the runs' stage,
``DEFAULT_METRICS``). The printed table, ``table.md`` and the figures show those; ``table.csv``
keeps every metric the runs logged (best and final), MLflow's system monitor included.

Written to ``runs/sweeps/<name>/compare/`` and attached to the sweep's parent run (for a plain
experiment: to a run named ``compare`` in it) under the artifact folder ``compare/``:

    table.md, table.csv                the table (also printed as markdown); the CSV has every metric
    metric_vs_<key>.png                the shown metrics (final: solid, best: dashed) against one swept key
    curves_<metric>.png                that metric's training curves, one line per run
    curves.png                         the shown metrics' curves, one panel each (the ablation page's figure)
    report.json                        the table's data (rows, keys, shown metrics, histories of the
                                       shown metrics, run lengths): what ``experiments.report`` publishes
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from experiments import tracking
from experiments.config import hash_excluded
from experiments.scoreboard import _mmss
from experiments.sweep_schema import SWEEPS_DIR, read_sweep

# Bookkeeping metrics: their "best" means nothing (final value only) and they sort last. MLflow's
# system monitor (system/cpu_..., system/disk_...) logs 8 of them per run: a best/final pair each
# doubled the table's width for figures no ablation is about.
_SYSTEM = "system/"
_AUX = ("lr", "_per_s", "time/", "epoch", _SYSTEM)
# What a comparison shows when the sweep declares nothing, by the runs' stage (tag ``stage``; an
# evaluate sweep: "evaluate"). The ranking metric always comes first.
DEFAULT_METRICS: Dict[str, List[str]] = {
    "debug": ["val/loss", "train/loss"],
    "llava_align": ["val/loss", "train/loss"],
    "llava_sft": ["val/vqa_accuracy", "val/loss"],
    "stage1": ["val/loss_img", "val/gen_prompt_gain", "train/loss_img"],
    "stage2": ["val/vqa_accuracy", "val/loss", "val/loss_img"],
    "stage3": ["val/gen_attribute_accuracy", "val/loss_img", "val/fid", "val/gen_prompt_gain"],
    "evaluate": ["eval/gen_attribute_accuracy", "eval/fid", "eval/inception_score", "eval/vqa_accuracy"],
}
MAX_SHOWN = 5  # a stage without defaults shows its first few non-bookkeeping metrics
_MIN_WORDS = ("loss", "err", "fid", "ppl", "perplexity", "nll", "bpd", "seconds", "time", "mse", "mae")


class CompareError(ValueError):
    """Nothing to compare: the message says what was looked for and what exists."""


def is_aux(key: str) -> bool:
    return any(key.endswith(a) if not a.endswith("/") else key.startswith(a) for a in _AUX)


def metric_mode(key: str) -> str:
    """Whether lower is better for a metric, from its name (losses, errors, FID, times: min)."""
    k = key.lower()
    return "min" if any(w in k for w in _MIN_WORDS) else "max"


@dataclass
class Row:
    name: str
    run_id: str
    status: str
    values: Dict[str, Any]  # swept key -> value
    history: Dict[str, List[Tuple[int, float]]] = field(default_factory=dict)  # metric -> [(step, value)]
    seconds: Optional[float] = None  # the run's wall time (start to end), None while it runs
    final: Dict[str, float] = field(default_factory=dict)
    best: Dict[str, float] = field(default_factory=dict)


@dataclass
class Report:
    target: str
    kind: str  # sweep | experiment
    experiment: str
    metric: str
    mode: str
    rank: str  # best | final
    keys: List[str]
    metrics: List[str]  # every metric logged: the ranking one, the rest, bookkeeping last
    rows: List[Row]  # ranked
    out_dir: Path
    files: List[Path] = field(default_factory=list)
    logged_to: str = ""  # run id the files were attached to
    shown: List[str] = field(default_factory=list)  # the ranking metric + the declared few

    def columns(self, full: bool = False) -> List[Tuple[str, str, str]]:
        """[(header, kind, metric-or-key)] in table order: the shown metrics, or (``full``) all.

        The ranking metric gets its best and final value; in the short table the other shown
        metrics their final value only, in the full one every curve-like metric both."""
        cols = [("rank", "rank", ""), ("variant" if self.kind == "sweep" else "run", "name", ""),
                ("status", "status", "")]
        cols += [(k, "key", k) for k in self.keys]
        for m in (self.metrics if full else (self.shown or self.metrics)):
            many = any(len(r.history.get(m, ())) > 1 for r in self.rows)
            if many and (m == self.metric or (full and not is_aux(m))):
                pair = [(f"{m} best", "best", m), (f"{m} final", "final", m)]
                cols += pair if (m != self.metric or self.rank == "best") else pair[::-1]
            else:
                cols.append((m, "final", m))
        cols.append(("time", "minutes", ""))
        return cols


# ----------------------------------------------------------------------------------------
# collecting
# ----------------------------------------------------------------------------------------


def _parse_json(text: str) -> Dict[str, Any]:
    try:
        d = json.loads(text)
        return d if isinstance(d, dict) else {}
    except (TypeError, ValueError):
        return {}


def find_target(client: Any, name: str):
    """(kind, experiment, runs, parent run or None, sweep tags) for a sweep id or experiment name."""
    ids = tracking.all_experiment_ids(client)
    role = tracking.SWEEP_ROLE
    parents = tracking.find_runs(client, ids, {tracking.SWEEP_ID: name, role: "parent"}) if ids else []
    if parents:
        parent = parents[0]
        exp = client.get_experiment(parent.info.experiment_id)
        children = tracking.find_runs(client, [exp.experiment_id], {tracking.SWEEP_ID: name, role: "child"})
        latest: Dict[str, Any] = {}  # oldest first, so the last attempt of a variant wins
        for r in children:
            latest[r.data.tags.get(tracking.SWEEP_VARIANT, r.info.run_name)] = r
        return "sweep", exp, list(latest.values()), parent
    exp = client.get_experiment_by_name(name)
    if exp is None:
        all_parents = tracking.find_runs(client, ids, {role: "parent"}) if ids else []
        sweeps = sorted({r.data.tags.get(tracking.SWEEP_ID, "") for r in all_parents})
        names = sorted(e.name for e in client.search_experiments())
        raise CompareError(f"no sweep or MLflow experiment named '{name}'; sweeps: {', '.join(sweeps) or 'none'}; "
                           f"experiments: {', '.join(names) or 'none'}")
    from mlflow.entities import ViewType

    runs = []
    token = None
    while True:
        page = client.search_runs([exp.experiment_id], "", ViewType.ACTIVE_ONLY, max_results=1000,
                                  order_by=["attributes.start_time ASC"], page_token=token)
        runs += [r for r in page if r.data.tags.get(role) not in ("parent", "compare")]
        token = page.token
        if not token:
            break
    return "experiment", exp, runs, None


def _history(client: Any, run: Any) -> Dict[str, List[Tuple[int, float]]]:
    out: Dict[str, List[Tuple[int, float]]] = {}
    for key in sorted(run.data.metrics):
        if key == "epoch":
            continue
        hist = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: (m.step, m.timestamp))
        pts = [(m.step, m.value) for m in hist if m.value is not None and not math.isnan(m.value)]
        if pts:
            out[key] = pts
    return out


def _swept_keys_from_params(runs: Sequence[Any]) -> List[str]:
    keys = sorted({k for r in runs for k in r.data.params})
    out = []
    for k in keys:
        # params that differ without being an experimental choice: what the config hash leaves
        # out (run name, logging, checkpointing, thread counts) and the params/ bookkeeping
        if hash_excluded(k) or k.startswith("params/"):
            continue
        if len({r.data.params.get(k) for r in runs}) > 1:
            out.append(k)
    return out


def shown_metrics(metric: str, all_metrics: Sequence[str], declared: Sequence[str], stages: Sequence[str]) -> List[str]:
    """The ranking metric, then the declared ones (else the stage's defaults, else the first few
    non-bookkeeping metrics), each only where some run logged it."""
    wanted = list(declared)
    if not wanted:
        for st in stages:
            wanted += [m for m in DEFAULT_METRICS.get(st, []) if m not in wanted]
    if not wanted or not any(m in all_metrics for m in wanted if m != metric):
        wanted = [m for m in all_metrics if not is_aux(m)][:MAX_SHOWN]
    return [metric] + [m for m in wanted if m in all_metrics and m != metric]


def collect(client: Any, name: str, metric: Optional[str] = None, mode: Optional[str] = None,
            rank: str = "best", out_dir: Optional[Path] = None, metrics: Optional[Sequence[str]] = None):
    """Everything a report needs, ranked; returns (Report, parent run or None, experiment)."""
    kind, exp, runs, parent = find_target(client, name)
    if not runs:
        raise CompareError(f"'{name}' ({kind}, experiment '{exp.name}') has no runs to compare yet")
    if kind == "sweep":
        keys: List[str] = []
        for r in runs:
            for k in _parse_json(r.data.tags.get(tracking.SWEEP_OVERRIDES, "")):
                if k not in keys:
                    keys.append(k)
        metric = metric or parent.data.tags.get("sweep_metric") or "val/loss"
        mode = mode or parent.data.tags.get("sweep_mode") or metric_mode(metric)
        declared = list(metrics) if metrics else json.loads(parent.data.tags.get("sweep_metrics") or "[]")
        stages = ["evaluate"] if parent.data.tags.get("sweep_command") == "evaluate" else []
    else:
        keys = _swept_keys_from_params(runs)
        declared, stages = list(metrics or []), []
    stages += sorted({r.data.tags.get("stage", "") for r in runs} - {""})
    rows: List[Row] = []
    seen_names: Dict[str, int] = {}
    for r in runs:
        label = r.data.tags.get(tracking.SWEEP_VARIANT) if kind == "sweep" else None
        label = label or r.info.run_name or r.info.run_id[:8]
        seen_names[label] = seen_names.get(label, 0) + 1
        if seen_names[label] > 1:
            label = f"{label} ({r.info.run_id[:8]})"
        over = _parse_json(r.data.tags.get(tracking.SWEEP_OVERRIDES, ""))
        values = {k: over[k] if k in over else r.data.params.get(k, "") for k in keys}
        secs = (r.info.end_time - r.info.start_time) / 1000.0 if r.info.end_time and r.info.start_time else None
        rows.append(Row(label, r.info.run_id, r.info.status, values, _history(client, r), seconds=secs))
    all_metrics = sorted({m for row in rows for m in row.history})
    if kind == "experiment":
        # default: val/loss, else the first metric that is not bookkeeping (not system/cpu_...)
        plain = [m for m in all_metrics if not is_aux(m)] or all_metrics
        metric = metric or ("val/loss" if "val/loss" in all_metrics else (plain[0] if plain else ""))
        mode = mode or metric_mode(metric)
    assert metric is not None and mode is not None
    if mode not in ("min", "max"):
        raise CompareError(f"--mode must be min or max, got {mode!r}")
    rest = [m for m in all_metrics if m != metric]
    metrics_all = ([metric] if metric in all_metrics else []) + [m for m in rest if not is_aux(m)] + \
        [m for m in rest if is_aux(m)]
    for row in rows:
        for m, pts in row.history.items():
            vals = [v for _, v in pts]
            row.final[m] = vals[-1]
            row.best[m] = (min if (mode if m == metric else metric_mode(m)) == "min" else max)(vals)
    source = {"best": lambda r: r.best, "final": lambda r: r.final}[rank]
    sign = 1.0 if mode == "min" else -1.0
    ranked = sorted((r for r in rows if metric in source(r)), key=lambda r: sign * source(r)[metric])
    ranked += sorted((r for r in rows if metric not in source(r)), key=lambda r: r.name)
    out_dir = out_dir or SWEEPS_DIR / _safe(name) / "compare"
    shown = shown_metrics(metric, all_metrics, declared, stages)
    return Report(name, kind, exp.name, metric, mode, rank, keys, metrics_all, ranked, out_dir, shown=shown), parent, exp


# ----------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=,+-]+", "_", s).strip("_") or "x"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def _cells(report: Report, row: Row, i: int, raw: bool = False, full: bool = False) -> List[Any]:
    out: List[Any] = []
    for _, kind, ref in report.columns(full):
        if kind == "minutes":
            out.append("" if row.seconds is None else (round(row.seconds, 1) if raw else _mmss(row.seconds)))
        elif kind == "rank":
            out.append(i + 1 if ref == "" and (report.metric in row.best) else "")
        elif kind == "name":
            out.append(row.name)
        elif kind == "status":
            out.append(row.status)
        elif kind == "key":
            v = row.values.get(ref, "")
            out.append(json.dumps(v) if raw and isinstance(v, (list, dict)) else (v if raw else _fmt(v)))
        else:
            v = (row.best if kind == "best" else row.final).get(ref)
            out.append("" if v is None else (v if raw else _fmt(v)))
    return out


def to_markdown(report: Report) -> str:
    header = [c[0] for c in report.columns()]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for i, row in enumerate(report.rows):
        cells = [str(c).replace("|", "\\|") for c in _cells(report, row, i)]
        lines.append("| " + " | ".join(cells) + " |")
    title = (f"**{report.kind} `{report.target}`** (MLflow experiment `{report.experiment}`): ranked by "
             f"`{report.metric}` ({report.rank}, {report.mode})")
    return title + "\n\n" + "\n".join(lines) + "\n"


def write_csv(report: Report, path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([c[0] for c in report.columns(full=True)] + ["run_id"])
        for i, row in enumerate(report.rows):
            w.writerow(_cells(report, row, i, raw=True, full=True) + [row.run_id])


def _numeric(values: Sequence[Any]) -> Optional[List[float]]:
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        return None
    return out if all(math.isfinite(v) for v in out) and not any(isinstance(v, bool) for v in values) else None


def plot_metric_vs_keys(report: Report, plt: Any) -> List[Path]:
    """One figure per swept key: a panel per metric, one line per setting of the other keys."""
    files = []
    rows = [r for r in report.rows if r.final]
    if not rows:
        return files
    # Only keys that vary among the runs with metrics (a key only a crashed variant set says nothing).
    varying = [k for k in report.keys if len({_fmt(r.values.get(k, "")) for r in rows}) > 1]
    for key in varying:
        others = [k for k in varying if k != key]
        xs_raw = [r.values.get(key, "") for r in rows]
        num = _numeric(xs_raw)
        cats: List[str] = []
        if num is None:
            for v in xs_raw:
                if _fmt(v) not in cats:
                    cats.append(_fmt(v))
        n = len(report.shown)
        ncols = min(3, n)
        nrows = math.ceil(n / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.4 * nrows), squeeze=False)
        groups: Dict[str, List[Row]] = {}
        for r in rows:
            groups.setdefault(", ".join(f"{k}={_fmt(r.values.get(k, ''))}" for k in others), []).append(r)
        for ax, m in zip(axes.flat, report.shown):
            for gi, (glabel, grows) in enumerate(groups.items()):
                color = f"C{gi % 10}"
                pts = []
                for r in grows:
                    if m not in r.final:
                        continue
                    v = r.values.get(key, "")
                    x = float(v) if num is not None else cats.index(_fmt(v))
                    pts.append((x, r.final[m], r.best[m]))
                pts.sort()
                if not pts:
                    continue
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, label=glabel or "final")
                if not is_aux(m) and any(p[1] != p[2] for p in pts):
                    ax.plot([p[0] for p in pts], [p[2] for p in pts], "x--", color=color, alpha=0.7)
            ax.set_title(m + (" (ranking)" if m == report.metric else ""), fontsize=9)
            ax.set_xlabel(key, fontsize=8)
            ax.tick_params(labelsize=7)
            if num is not None:
                pos = [x for x in num if x > 0]
                if len(pos) == len(num) and max(pos) / min(pos) >= 100:
                    ax.set_xscale("log")
            else:
                ax.set_xticks(range(len(cats)), cats, rotation=20, ha="right")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        handles, labels = axes.flat[0].get_legend_handles_labels()
        if len(groups) > 1 and handles:
            fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=7,
                       bbox_to_anchor=(0.5, 0.0))
        fig.suptitle(f"{report.target}: metrics vs {key} (solid: final, dashed: best)", fontsize=10)
        fig.tight_layout(rect=(0, 0.06 if len(groups) > 1 else 0, 1, 0.95))
        path = report.out_dir / f"metric_vs_{_safe(key)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files


def plot_curves(report: Report, plt: Any) -> List[Path]:
    """Training curves overlaid: one figure per metric with more than one logged point."""
    files = []
    for m in report.shown:
        rows = [r for r in report.rows if len(r.history.get(m, ())) > 1]
        if not rows or m.startswith(_SYSTEM):  # the MLflow UI draws the system monitor's own charts
            continue
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        for i, r in enumerate(rows):
            pts = r.history[m]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=f"C{i % 10}",
                    ls="-" if r.status == "FINISHED" else ":", label=r.name, lw=1.3,
                    marker="o" if len(pts) <= 25 else None, ms=3)
        ax.set_xlabel("step")
        ax.set_ylabel(m)
        vals = [p[1] for r in rows for p in r.history[m]]
        if min(vals) > 0 and max(vals) / min(vals) >= 100:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=1 if len(rows) <= 8 else 2, loc="best")
        ax.set_title(f"{report.target}: {m}", fontsize=10)
        fig.tight_layout()
        path = report.out_dir / f"curves_{_safe(m)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files


def plot_panels(report: Report, plt: Any) -> List[Path]:
    """One figure, a panel per shown metric with curves (one line per run): the page's figure."""
    ms = [m for m in report.shown if any(len(r.history.get(m, ())) > 1 for r in report.rows)]
    if not ms:
        return []
    ncols = min(2, len(ms))
    nrows = math.ceil(len(ms) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.4 * nrows), squeeze=False)
    for ax, m in zip(axes.flat, ms):
        for i, r in enumerate(report.rows):
            pts = r.history.get(m, [])
            if len(pts) > 1:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color=f"C{i % 10}", lw=1.2,
                        ls="-" if r.status == "FINISHED" else ":", marker="o" if len(pts) <= 25 else None,
                        ms=2.5, label=r.name)
        ax.set_title(m + (" (ranking)" if m == report.metric else ""), fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(ms):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, max(1, len(labels))), fontsize=7,
               bbox_to_anchor=(0.5, 0.0))
    rows_legend = math.ceil(len(labels) / 4)
    fig.tight_layout(rect=(0, min(0.3, 0.045 * rows_legend / nrows + 0.03), 1, 1))
    path = report.out_dir / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def to_json(report: Report) -> Dict[str, Any]:
    """The comparison's data (what a results page is rendered from): ranking, swept keys, every
    run's swept values, best/final of every metric, curves of the shown metrics, run lengths."""
    return {
        "target": report.target, "kind": report.kind, "experiment": report.experiment,
        "metric": report.metric, "mode": report.mode, "rank": report.rank, "keys": report.keys,
        "shown": report.shown,
        "rows": [{"name": r.name, "run_id": r.run_id, "status": r.status, "values": r.values,
                  "seconds": r.seconds, "final": r.final, "best": r.best,
                  "history": {m: r.history[m] for m in report.shown if m in r.history}} for r in report.rows],
    }


def write(report: Report) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = report.out_dir
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("*.png")) + [out / "table.md", out / "table.csv", out / "report.json"]:
        old.unlink(missing_ok=True)  # plots of keys/metrics no longer in the report
    (out / "table.md").write_text(to_markdown(report))
    write_csv(report, out / "table.csv")
    (out / "report.json").write_text(json.dumps(to_json(report), indent=1, default=str) + "\n")
    files = [out / "table.md", out / "table.csv", out / "report.json"]
    files += plot_metric_vs_keys(report, plt)
    files += plot_curves(report, plt)
    files += plot_panels(report, plt)
    report.files = files
    return files


def attach(client: Any, report: Report, parent: Any, exp: Any) -> str:
    """Log the report under ``compare/`` of the sweep's parent run (or of a ``compare`` run)."""
    if parent is not None:
        run_id = parent.info.run_id
        best = report.rows[0] if report.rows and report.metric in report.rows[0].best else None
        if best is not None:
            client.set_tag(run_id, "sweep_best_variant", best.name)
            client.set_tag(run_id, "sweep_best_run_id", best.run_id)
            client.log_metric(run_id, f"best/{report.metric}", best.best[report.metric])
    else:
        runs = tracking.find_runs(client, [exp.experiment_id], {tracking.SWEEP_ROLE: "compare"})
        if runs:
            run_id = runs[0].info.run_id
        else:
            run_id = client.create_run(exp.experiment_id, run_name="compare",
                                       tags={tracking.SWEEP_ROLE: "compare"}).info.run_id
            client.set_terminated(run_id, "FINISHED")
    client.log_artifacts(run_id, str(report.out_dir), "compare")
    report.logged_to = run_id
    return run_id


def compare(name: str, tracking_uri: Optional[str] = None, out_dir: Optional[Path] = None,
            metric: Optional[str] = None, mode: Optional[str] = None, rank: str = "best",
            log: bool = True, quiet: bool = False, metrics: Optional[Sequence[str]] = None) -> Report:
    """Build, write, print and (``log``) attach the comparison for a sweep or experiment."""
    if name.endswith((".yaml", ".yml")) and Path(name).is_file():
        name = read_sweep(name).name
    client = tracking.get_client(tracking_uri)
    report, parent, exp = collect(client, name, metric, mode, rank, out_dir, metrics)
    if report.metric not in report.metrics:
        print(f"[compare] warning: no run logged '{report.metric}' (rows are not ranked); metrics: "
              f"{', '.join(report.metrics) or 'none'}", file=sys.stderr)
    write(report)
    if log:
        attach(client, report, parent, exp)
    if not quiet:
        print(to_markdown(report))
        where = f"; attached to run {report.logged_to} under compare/" if report.logged_to else ""
        print(f"[compare] {len(report.files)} files in {report.out_dir}{where}")
    return report


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.compare", description=__doc__.split("\n")[0])
    p.add_argument("name", help="sweep name (or its YAML) or any MLflow experiment name")
    p.add_argument("--metric", default=None, help="rank by this metric (default: the sweep's, else val/loss)")
    p.add_argument("--mode", choices=("min", "max"), default=None, help="lower or higher is better")
    p.add_argument("--metrics", default=None,
                   help="comma-separated metrics to show beside the ranking one (default: the sweep's, else the stage's)")
    p.add_argument("--rank", choices=("best", "final"), default="best", help="rank by the best or final value")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default $MLFLOW_TRACKING_URI or runs/mlflow.db)")
    p.add_argument("--out-dir", default=None, help="where to write (default runs/sweeps/<name>/compare)")
    p.add_argument("--no-log", action="store_true", help="do not attach the report to MLflow")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        compare(args.name, args.tracking_uri, Path(args.out_dir).resolve() if args.out_dir else None,
                args.metric, args.mode, args.rank, log=not args.no_log,
                metrics=[m for m in args.metrics.split(",") if m] if args.metrics else None)
    except CompareError as e:
        print(f"compare: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
