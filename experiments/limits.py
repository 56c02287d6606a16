"""What limits the one-draw attribute accuracy: ``experiments/world/limits.json``, its figure and
``docs/limits.md``.

    publish_limits   read a fresh clone's MLflow store (runs/mlflow.db) and pipeline report: the
                     one-draw generation attribute accuracy on the validation prompts against the
                     cumulative training steps of stages 1 -> 2 -> 3, the image loss / token accuracy
                     curves, the test figure with its interval, the tokenizer's ceiling (VQVAE
                     reconstructions), the same-prompt floor (re-rendered real images) and the
                     figures by objects in the prompt; per preset (default, v1), each with the run id,
                     commit and CPU the runs recorded -> the results file + a PNG
    render_limits    the page from the results file; the hand-written reading survives regeneration
                     in its ``<!-- finding ... -->`` block

``experiments.report`` calls both (``publish limits`` and ``render``); nothing on the page is typed.
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from experiments.config import REPO_ROOT
from experiments.machine import cpu_model
from experiments.scoreboard import PRESET_TITLES, ReportError, _ci, _g, _load_json, _rel, one_draw_target

LIMITS = REPO_ROOT / "experiments" / "world" / "limits.json"
LIMITS_PAGE = REPO_ROOT / "docs" / "limits.md"
STAGES = ("stage1", "stage2", "stage3")  # the generation path trains through these, one init from the last
VAL_CURVES = ("val/gen_attr_mean", "val/gen_attr_all", "val/gen_attr_objects1_mean", "val/gen_attr_objects2_mean",
              "val/gen_attr_objects3_mean", "val/acc_img", "val/loss_img")
TRAIN_CURVES = ("train/acc_img", "train/loss_img")  # logged every 10 steps: the figure smooths them
NOT_RECORDED = "not recorded"


# ----------------------------------------------------------------------------------------
# publish: MLflow store + pipeline report -> results file
# ----------------------------------------------------------------------------------------


def _newest_run(client: Any, exp_ids: List[str], name: str, store: Path) -> Any:
    runs = client.search_runs(exp_ids, filter_string=f"attributes.run_name = '{name}'",
                              order_by=["attributes.start_time DESC"], max_results=5)
    runs = [r for r in runs if r.info.status == "FINISHED"] or runs
    if not runs:
        raise ReportError(f"{store}: no MLflow run named `{name}`; run the pipeline in that clone "
                          "(`make stage1 && make pipeline`, PRESET=v1 for v1) or point --runs-root at one that did")
    return runs[0]


def _cpu(tags: Dict[str, str], commit: str, timings: List[Dict[str, Any]], target: str) -> tuple:
    """The CPU a run recorded: its own tag, else the clone's timed make target of the same commit
    (runs/timings.json), else "not recorded" (never the publishing machine's)."""
    if tags.get("cpu_model"):
        return tags["cpu_model"], "run tag"
    for rec in reversed(timings):
        if rec.get("target") == target and rec.get("commit") == commit[:7] and rec.get("cpu_model"):
            make = target.replace("-", " PRESET=")
            return rec["cpu_model"], f"from runs/timings.json, `make {make}` of the same commit"
    return NOT_RECORDED, ""


def _history(client: Any, run_id: str, key: str) -> List[List[float]]:
    pts = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
    return [[int(s), round(float(v), 5)] for s, v in pts]


def _sources(runs_root: Path, preset: str) -> tuple:
    """The clone's MLflow store and pipeline report for ``preset``; a clear error when missing."""
    tag = "" if preset == "default" else f"-{preset}"
    runs = Path(runs_root) / "runs"
    db, rep_path = runs / "mlflow.db", runs / f"pipeline{tag}" / "report.json"
    for p in (db, rep_path):
        if not p.is_file():
            raise ReportError(f"{p} not found: run `make stage1{' PRESET=' + preset if tag else ''} && "
                              f"make pipeline{' PRESET=' + preset if tag else ''}` in {runs_root} first")
    return db, rep_path


def read_preset(runs_root: Path, preset: str) -> Dict[str, Any]:
    """One preset's curves and test figures from ``<runs_root>/runs``: the MLflow store is read
    from a copy, so the clone's runs are left as they were."""
    from experiments import tracking  # lazy: MLflow only when publishing

    tag = "" if preset == "default" else f"-{preset}"
    runs = Path(runs_root) / "runs"
    db, rep_path = _sources(runs_root, preset)
    rep = _load_json(rep_path)
    timings = _load_json(runs / "timings.json") if (runs / "timings.json").is_file() else []
    out: Dict[str, Any] = {"source": {"store": str(db), "report": str(rep_path)}, "stages": []}
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "mlflow.db"
        shutil.copyfile(db, copy)
        client = tracking.get_client(f"sqlite:///{copy}")
        exp_ids = [e.experiment_id for e in client.search_experiments()]
        offset = 0
        for stage in STAGES:
            run = _newest_run(client, exp_ids, f"world{tag}-{stage}", db)
            tags, params = run.data.tags, run.data.params
            commit = tags.get("git_commit", "")
            cpu, cpu_src = _cpu(tags, commit, timings, f"{'stage1' if stage == 'stage1' else 'pipeline'}{tag}")
            steps = int(params.get("trainer.max_steps") or 0) or 1 + max(
                (s for s, _ in _history(client, run.info.run_id, "train/loss")), default=-1)
            curves = {k: _history(client, run.info.run_id, k) for k in VAL_CURVES + TRAIN_CURVES}
            out["stages"].append({
                "stage": stage, "run_name": run.info.run_name, "run_id": run.info.run_id,
                "commit": commit[:7] or NOT_RECORDED, "dirty": tags.get("git_dirty", NOT_RECORDED),
                "cpu_model": cpu, "cpu_source": cpu_src, "steps": steps, "offset": offset,
                "params_total": int(float(params["params/total"])) if "params/total" in params else None,
                "params_trainable": int(float(params["params/trainable"])) if "params/trainable" in params else None,
                "val_prompts": int(params["eval.num_gen"]) if "eval.num_gen" in params else None,
                "val_best_of": int(params["eval.best_of"]) if "eval.best_of" in params else None,
                "curves": {k: v for k, v in curves.items() if v}})
            offset += steps
        ev = _newest_run(client, exp_ids, f"eval-world{tag}-stage3", db)
        metrics = ev.data.metrics
    one = _g(rep, "stage3", "gen_one_draw") or {}
    logged = metrics.get("eval/gen_attribute_accuracy_one_draw")
    if logged is not None and one.get("mean") is not None and abs(logged - one["mean"]) > 1e-6:
        raise ReportError(f"{rep_path}: one-draw accuracy {one['mean']:.4f} differs from the newest "
                          f"`eval-world{tag}-stage3` run ({ev.info.run_id}: {logged:.4f}); the report is not "
                          "that evaluation's: rerun `make pipeline` in the clone")
    rc, rr = rep.get("vqvae_reconstruction") or {}, rep.get("real_vs_real") or {}
    ecommit = ev.data.tags.get("git_commit", "")
    ecpu, ecpu_src = _cpu(ev.data.tags, ecommit, timings, f"pipeline{tag}")
    by = {}
    for n in sorted(set(one.get("by_objects") or {}) | set(rc.get("attribute_accuracy_by_objects") or {})):
        by[n] = {"prompts": _g(one, "by_objects", n, "prompts"),
                 "one_draw_mean": _g(one, "by_objects", n, "mean"), "one_draw_all": _g(one, "by_objects", n, "all"),
                 "ceiling": _g(rc, "attribute_accuracy_by_objects", n), "floor": _g(rr, "attribute_accuracy_by_objects", n)}
    out["test"] = {
        "run_name": ev.info.run_name, "run_id": ev.info.run_id, "commit": ecommit[:7] or NOT_RECORDED,
        "cpu_model": ecpu, "cpu_source": ecpu_src, "prompts": _g(rep, "stage3", "gen_n"),
        "one_draw": one.get("mean", rep.get("gen_attribute_accuracy_one_draw")), "one_draw_ci95": one.get("mean_ci95"),
        "one_draw_seeds_range95": _g(rep, "stage3", "gen_draw_seeds", "attribute_accuracy", "range95"),
        "one_draw_all": one.get("all"), "one_draw_all_ci95": one.get("all_ci95"), "target": one_draw_target(rep),
        "ceiling": rc.get("attribute_accuracy"), "ceiling_ci95": rc.get("attribute_accuracy_ci95"),
        "ceiling_all": rc.get("attr_all"), "floor": rr.get("attribute_accuracy"),
        "floor_ci95": rr.get("attribute_accuracy_ci95"), "floor_shards": rr.get("shards"), "by_objects": by}
    return out


def publish_limits(runs_root: Path, v1_root: Optional[Path] = None, out: Path = LIMITS) -> Path:
    """Write the results file (and its figure beside it, ``limits.png``) from the default preset's
    runs in ``runs_root`` and, given ``v1_root``, the v1 preset's."""
    _sources(Path(runs_root), "default")
    if v1_root is not None:
        _sources(Path(v1_root), "v1")  # both clones checked before either store is read
    data: Dict[str, Any] = {"presets": {"default": read_preset(Path(runs_root), "default")}}
    if v1_root is not None:
        data["presets"]["v1"] = read_preset(Path(v1_root), "v1")
    data["provenance"] = {
        "published_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "publishing_cpu": cpu_model(),
        "command": "python -m experiments.report publish limits --runs-root CLONE"
                   + (" --v1-root V1CLONE" if v1_root is not None else "")}
    out.parent.mkdir(parents=True, exist_ok=True)
    # one [step, value] pair a line: the curves stay readable in a diff without a line per number
    text = re.sub(r"\[\s+(-?[0-9.e+-]+),\s+(-?[0-9.e+-]+)\s+\]", r"[\1, \2]", json.dumps(data, indent=1))
    out.write_text(text + "\n")
    plot_limits(data, out.with_suffix(".png"))
    print(f"[report] limits of {', '.join(data['presets'])} -> {_rel(out)} + {out.with_suffix('.png').name}")
    return out


# ----------------------------------------------------------------------------------------
# the figure
# ----------------------------------------------------------------------------------------


def _cum(stage: Dict[str, Any], key: str) -> tuple:
    pts = stage["curves"].get(key, [])
    return [stage["offset"] + s + 1 for s, _ in pts], [v for _, v in pts]


def plot_limits(data: Dict[str, Any], path: Path) -> Path:
    import matplotlib  # lazy: only when publishing

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    colours = {"default": "tab:blue", "v1": "tab:orange"}
    ax, ax2, ax3 = axes
    for p, d in data["presets"].items():
        c, title, t = colours.get(p, "tab:grey"), PRESET_TITLES.get(p, p).replace("`", ""), d["test"]
        xs, ys = [], []
        for st in d["stages"]:
            x, y = _cum(st, "val/gen_attr_mean")
            xs += x
            ys += y
            ax.axvline(st["offset"] + st["steps"], color="grey", lw=0.6, ls=":")
            x, y = _cum(st, "train/acc_img")
            k = 10  # a running mean over 10 logs (100 steps): the raw log is one batch
            sm = [sum(y[max(0, i - k + 1):i + 1]) / len(y[max(0, i - k + 1):i + 1]) for i in range(len(y))]
            first_stage = st["stage"] == STAGES[0]  # one legend entry per preset
            ax2.plot(x, sm, color=c, lw=0.8, alpha=0.6, label=f"{title}: train (mean of 100 steps)" if first_stage else None)
            x, y = _cum(st, "val/acc_img")
            ax2.plot(x, y, "o-", color=c, ms=4, label=f"{title}: validation" if first_stage else None)
        ax.plot(xs, ys, "o-", color=c, ms=4, label=f"{title}: validation, one draw")
        end = d["stages"][-1]["offset"] + d["stages"][-1]["steps"]
        if t.get("one_draw") is not None:
            ci = t.get("one_draw_ci95") or [t["one_draw"], t["one_draw"]]
            err = [[max(0.0, t["one_draw"] - ci[0])], [max(0.0, ci[1] - t["one_draw"])]]
            ax.errorbar([end], [t["one_draw"]], yerr=err, fmt="s",
                        color=c, capsize=4, label=f"{title}: test, one draw (95% interval)")
    first = next(iter(data["presets"].values()))["test"]
    for v, ls, lab in ((first.get("ceiling"), "--", "ceiling: VQVAE reconstructions"),
                       (first.get("target"), "-.", "the world's minimum, one draw")):
        if v is not None:
            ax.axhline(v, color="black", ls=ls, lw=1, label=f"{lab} ({v:.3f})")
    ax.set(xlabel="cumulative training steps (stage 1 | 2 | 3)", ylabel="attribute accuracy (mean over attributes)",
           ylim=(0, 1), title="generation attribute accuracy against steps")
    ax.legend(fontsize=7, loc="upper left")
    ax2.set(xlabel="cumulative training steps (stage 1 | 2 | 3)", ylabel="image-token accuracy (teacher forced)",
            title="image-token accuracy against steps")
    ax2.legend(fontsize=7)
    ns = sorted({n for d in data["presets"].values() for n in d["test"]["by_objects"]})
    w = 0.8 / (len(data["presets"]) + 2)
    for i, (p, d) in enumerate(data["presets"].items()):
        by = d["test"]["by_objects"]
        ax3.bar([j + i * w for j in range(len(ns))], [_g(by, n, "one_draw_mean") or 0 for n in ns], w,
                color=colours.get(p, "tab:grey"), label=f"{PRESET_TITLES.get(p, p).replace('`', '')}: one draw")
    k = len(data["presets"])
    for i, (key, c, lab) in enumerate((("ceiling", "lightgrey", "ceiling: VQVAE reconstructions"),
                                       ("floor", "dimgrey", "real images (same prompts)"))):
        ax3.bar([j + (k + i) * w for j in range(len(ns))], [_g(first, "by_objects", n, key) or 0 for n in ns], w,
                color=c, label=lab)
    ax3.set_xticks([j + w * (k + 1) / 2 for j in range(len(ns))], [f"{n} object{'s' if n != '1' else ''}" for n in ns])
    ax3.set(ylim=(0, 1.05), ylabel="attribute accuracy, test prompts", title="by objects in the prompt")
    ax3.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------
# the page
# ----------------------------------------------------------------------------------------


def _f(v: Any, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _at(curve: List[List[float]], step: int) -> Optional[float]:
    return next((v for s, v in curve if s == step), None)


def limits_rows(d: Dict[str, Any]) -> Dict[str, List[str]]:
    """One preset's tables as markdown lines: the test summary, the validation curve, by objects,
    the runs."""
    t = d["test"]
    gap = None if t.get("ceiling") is None or t.get("one_draw") is None else t["ceiling"] - t["one_draw"]
    summary = ["| measure | value |", "|---|---|",
               f"| attribute accuracy, one draw, {t.get('prompts') or '?'} test prompts | **{_f(t.get('one_draw'))}** "
               f"{_ci(t.get('one_draw_ci95'))}" + (f"; over draw seeds {_ci(t['one_draw_seeds_range95'])}"
                                                  if t.get("one_draw_seeds_range95") else "") + " |",
               f"| the world's one-draw minimum | {_f(t.get('target'), 2)} |",
               f"| ceiling: VQVAE reconstructions of the test images (the tokenizer) | {_f(t.get('ceiling'))} "
               f"{_ci(t.get('ceiling_ci95'))} |",
               f"| one draw as a share of the ceiling; distance under it | "
               + ("n/a" if gap is None else f"{t['one_draw'] / t['ceiling']:.2f}; {gap:.3f}") + " |",
               f"| floor: real images for the same prompts, re-rendered ({t.get('floor_shards') or '?'}) | "
               f"{_f(t.get('floor'))} {_ci(t.get('floor_ci95'))} |"]
    curve = ["| stage | step in stage | cumulative steps | attribute accuracy, mean | every attribute right | "
             "1 / 2 / 3 objects, mean | image-token accuracy | image loss |", "|---|---|---|---|---|---|---|---|"]
    for st in d["stages"]:
        cv = st["curves"]
        for s, v in cv.get("val/gen_attr_mean", []):
            objs = " / ".join(_f(_at(cv.get(f"val/gen_attr_objects{n}_mean", []), s), 2) for n in (1, 2, 3))
            curve.append(f"| {st['stage']} | {s + 1} | {st['offset'] + s + 1} | {_f(v)} | "
                         f"{_f(_at(cv.get('val/gen_attr_all', []), s))} | {objs} | "
                         f"{_f(_at(cv.get('val/acc_img', []), s))} | {_f(_at(cv.get('val/loss_img', []), s), 2)} |")
    by = ["| objects in the prompt | test prompts | one draw, mean | one draw, every attribute right | "
          "ceiling (VQVAE reconstructions) | floor (real, same prompts) |", "|---|---|---|---|---|---|"]
    for n, b in t["by_objects"].items():
        by.append(f"| {n} | {int(b['prompts']) if b.get('prompts') is not None else '?'} | {_f(b.get('one_draw_mean'))} | "
                  f"{_f(b.get('one_draw_all'))} | {_f(b.get('ceiling'))} | {_f(b.get('floor'))} |")
    runs = ["| stage | run | run id | commit | CPU | steps | parameters (trainable) |", "|---|---|---|---|---|---|---|"]
    for st in d["stages"]:
        par = (f"{st['params_total']:,} ({st['params_trainable']:,})" if st.get("params_total") is not None
               and st.get("params_trainable") is not None else NOT_RECORDED)
        runs.append(f"| {st['stage']} | `{st['run_name']}` | `{st['run_id']}` | `{st['commit']}` | {st['cpu_model']}"
                    f"{', ' + st['cpu_source'] if st.get('cpu_source') not in ('', 'run tag', None) else ''} | "
                    f"{st['steps']} | {par} |")
    runs.append(f"| test evaluation | `{t['run_name']}` | `{t['run_id']}` | `{t['commit']}` | {t['cpu_model']}"
                f"{', ' + t['cpu_source'] if t.get('cpu_source') not in ('', 'run tag', None) else ''} | | |")
    return {"summary": summary, "curve": curve, "by_objects": by, "runs": runs}


def render_limits(path: Path = LIMITS, page: Path = LIMITS_PAGE, finding_re: Any = None, empty: str = "") -> str:
    """docs/limits.md from the results file; the hand-written reading (``finding_re``'s block in
    the current page, else ``empty``) is kept."""
    old = page.read_text() if page.is_file() else ""
    found = finding_re.search(old) if finding_re is not None else None
    reading = found.group(0) if found else empty
    rel = _rel(path)
    out = ["# What limits one-draw generation", "",
           f"<!-- generated by `python -m experiments.report` from {rel}: edit the finding block only -->", "",
           "The world asks for a one-draw attribute accuracy of at least the minimum below; where the 95% "
           "interval's lower bound is under it, this page shows what the runs say about why: the accuracy "
           "against training steps across stages 1 -> 2 -> 3, the tokenizer's ceiling (the same classifier on "
           "VQVAE reconstructions of the test images: no generator of these tokens scores above it), the "
           "same-prompt floor, and the figures by objects in the prompt. The scoreboard: "
           "[README](../README.md#how-good-the-world-scoreboard); each metric: [evaluation.md](evaluation.md).", "",
           reading, ""]
    if not path.is_file():
        out += ["Not published yet: run `make stage1 && make pipeline` in a fresh clone, then "
                "`python -m experiments.report publish limits --runs-root CLONE`.", ""]
        return "\n".join(out)
    data = _load_json(path)
    prov = data.get("provenance", {})
    fig = path.with_suffix(".png")
    out += [f"Published {prov.get('published_utc', '?')} (`{prov.get('command', '?')}`). Validation figures are "
            "one draw per prompt on the validation split, as each stage's run logged them; the test figures are "
            "the scoreboard's (`make pipeline`'s evaluation of the stage-3 export). Cumulative steps count stage 1, then stage 2 "
            "(initialised from stage 1's export), then stage 3 (from stage 2's).", ""]
    if fig.is_file():
        out += [f"![one-draw attribute accuracy against cumulative steps with the ceiling and the minimum; "
                f"image-token accuracy against steps; by objects in the prompt]({Path('..') / _rel(fig)})", ""]
    order = [q for q in ("default", "v1") if q in data["presets"]]
    for p in order + [q for q in data["presets"] if q not in order]:
        d = data["presets"][p]
        rows = limits_rows(d)
        vp = sorted({st.get("val_prompts") for st in d["stages"] if st.get("val_prompts")})
        out += [f"## {PRESET_TITLES.get(p, p)}", "", *rows["summary"], "",
                f"Against steps ({', '.join(str(v) for v in vp) or '?'} validation prompts per point, one draw; "
                "image-token accuracy and loss teacher forced on the validation images; n/a: the stage did not log it):",
                "", *rows["curve"], "", "By objects in the prompt (test prompts):", "", *rows["by_objects"], "",
                "Runs (read from the clone's MLflow store; a CPU not tagged on the run is taken from the clone's "
                "timed make target of the same commit, else not recorded):", "", *rows["runs"], ""]
    return "\n".join(out)
