"""Result pages generated from runs: ``python -m experiments.report [render|publish|stamp] ...``.

Every figure a reader sees in README.md, ``docs/benchmarks.md`` and ``experiments/ablations/*.md``
is read here from an artifact, never typed:

    render                      (the default) regenerate every page from the committed results:
                                  experiments/ablations/<name>.md   <- experiments/ablations/results/<name>.json
                                  docs/benchmarks.md                <- benchmarks/results/*.json (+ their tables)
                                  README.md scoreboard block        <- experiments/world/scoreboard.json
                                --check: write nothing, exit 1 when a page differs from its rendering
    publish sweep NAME          read a sweep's (or any MLflow experiment's) runs from MLflow and
                                write experiments/ablations/results/<NAME>.json + its figure, then render
    publish scoreboard          copy runs/pipeline/report.json with its provenance (commit, CPU
                                model, the timed make targets, seeds) to experiments/world/scoreboard.json
    publish timings             add `make test`'s time from runs/timings.json (a fresh clone's CI run)
    stamp TARGET START          record how long a make target took (the Makefile calls it last)

Hand-written text in a page survives regeneration only inside its ``<!-- finding ... -->`` block.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from experiments.config import REPO_ROOT

TIMINGS = "runs/timings.json"  # make targets' wall times, written by `stamp`


def cpu_model() -> str:
    """The CPU's marketing name (lscpu "Model name"), the fact that makes two timings comparable."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.strip().startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> List[str]:
    """The matrix-unit flags that change timings most between machines of this kind."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((l.split(":", 1)[1].split() for l in text.splitlines() if l.startswith("flags")), [])
    return [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]


def machine_info() -> Dict[str, Any]:
    import torch  # lazy: `stamp` runs at the end of every make target and must stay light

    return {"cpu_model": cpu_model(), "cpu_flags": cpu_flags(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(),
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def git_commit(root: Path = REPO_ROOT) -> Dict[str, Any]:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return {"commit": sha, "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}


def stamp(target: str, start: float, path: Path) -> Dict[str, Any]:
    """Append one timed make target to ``path`` (a JSON list, newest last)."""
    rec = {"target": target, "seconds": round(time.time() - start, 1), **git_commit(),
           "cpu_model": cpu_model(), "cpu_flags": cpu_flags(), "cpus": os.cpu_count(),
           "loadavg": list(os.getloadavg()),
           "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        old = json.loads(path.read_text()) if path.is_file() else []
    except json.JSONDecodeError as e:
        raise SystemExit(f"report stamp: {path} is not JSON ({e}); move it away and rerun") from e
    path.write_text(json.dumps(old + [rec], indent=1) + "\n")
    print(f"[timing] make {target}: {rec['seconds']:.0f} s on {rec['cpu_model']} ({path})")
    return rec


# ----------------------------------------------------------------------------------------
# the committed results and where their pages go
# ----------------------------------------------------------------------------------------

ABLATIONS = REPO_ROOT / "experiments" / "ablations"
ABLATION_RESULTS = ABLATIONS / "results"  # <name>.json (+ .csv, every metric) per published sweep
ABLATION_FIGURES = ABLATIONS / "figures"  # <name>.png: the shown metrics' curves
BENCH_RESULTS = REPO_ROOT / "benchmarks" / "results"
BENCH_PAGE = REPO_ROOT / "docs" / "benchmarks.md"
SCOREBOARD = REPO_ROOT / "experiments" / "world" / "scoreboard.json"
README = REPO_ROOT / "README.md"
FINDING_RE = re.compile(r"<!-- finding.*?-->.*?<!-- /finding -->", re.S)
FINDING_EMPTY = ("<!-- finding: hand-written; `python -m experiments.report` keeps this block -->\n"
                 "**Finding.** Not written yet.\n<!-- /finding -->")
GENERATED = "<!-- generated by `python -m experiments.report` from {src}: edit the finding block only -->"
BLOCKS = {  # README blocks: marker name -> renderer of the scoreboard file
    "scoreboard": lambda sb: render_scoreboard(sb),
    "timings": lambda sb: render_timings(sb),
}


class ReportError(ValueError):
    """A results file or page that cannot be used; the message names it and the fix."""


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ReportError(f"{_rel(path)}: cannot read it as JSON ({e}); restore it with git or republish it") from e


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def _minutes(seconds: Optional[float]) -> str:
    if seconds is None:
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s:02d} s"


# ----------------------------------------------------------------------------------------
# ablation pages
# ----------------------------------------------------------------------------------------


def publish_sweep(name: str, tracking_uri: Optional[str] = None, root: Path = ABLATIONS) -> Path:
    """Read a sweep's runs from MLflow (the ``experiments.compare`` report) and write its results
    file, its CSV (every metric) and its figure under ``root``; returns the JSON's path."""
    import shutil
    import tempfile

    from experiments import compare, tracking  # lazy: MLflow and matplotlib only when publishing

    with tempfile.TemporaryDirectory() as tmp:
        rep = compare.compare(name, tracking_uri=tracking_uri, out_dir=Path(tmp), log=False, quiet=True)
        data = compare.to_json(rep)
        client = tracking.get_client(tracking_uri)
        tags = [client.get_run(r.run_id).data.tags for r in rep.rows]
        commits = sorted({t.get("git_commit", "unknown")[:7] for t in tags})
        dirty = sorted({t.get("git_dirty", "unknown") for t in tags})
        cpus = sorted({t["cpu_model"] for t in tags if t.get("cpu_model")})
        data["provenance"] = {
            "commits": commits, "dirty": dirty,
            # runs made before the suite tagged them with their CPU were published on this machine
            "cpu_models": cpus or [f"{cpu_model()} (the publishing machine; the runs did not record theirs)"],
            "published_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "tracking_uri": tracking_uri or tracking.default_tracking_uri(),
            "command": f"python -m experiments.report publish sweep {name}",
        }
        (root / "results").mkdir(parents=True, exist_ok=True)
        (root / "figures").mkdir(parents=True, exist_ok=True)
        out = root / "results" / f"{name}.json"
        out.write_text(json.dumps(data, indent=1, default=str) + "\n")
        shutil.copyfile(Path(tmp) / "table.csv", root / "results" / f"{name}.csv")
        fig = Path(tmp) / "curves.png"
        if fig.is_file():
            shutil.copyfile(fig, root / "figures" / f"{name}.png")
    print(f"[report] published {rep.kind} {name}: {len(rep.rows)} runs -> {_rel(out)}")
    return out


def _sweep_meta(yaml_path: Path) -> Dict[str, Any]:
    from experiments.sweep_schema import read_sweep  # lazy: OmegaConf only when rendering pages

    cfg = read_sweep(yaml_path)
    return {"name": cfg.name, "description": cfg.description, "base": cfg.base, "metric": cfg.metric,
            "mode": cfg.mode, "command": cfg.command}


def results_table(data: Dict[str, Any]) -> str:
    """The comparison's short table (rank, variant, swept keys, the shown metrics, minutes)."""
    metric, shown = data["metric"], data.get("shown") or [data["metric"]]
    head = ["rank", "variant", "status"] + [f"`{k}`" for k in data["keys"]]
    cols: List[tuple] = []
    for m in shown:
        many = any(len(r.get("history", {}).get(m, [])) > 1 for r in data["rows"])
        if m == metric and many:
            cols += [(f"{m} best", "best", m), (f"{m} final", "final", m)]
        else:
            cols.append((m, "final", m))
    head += [c[0] for c in cols] + ["minutes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for i, r in enumerate(data["rows"]):
        ranked = metric in r.get("best", {})
        cells = [str(i + 1) if ranked else "", r["name"], r["status"]]
        cells += [_fmt(r["values"].get(k, "")) for k in data["keys"]]
        cells += [_fmt(r.get(kind, {}).get(m)) for _, kind, m in cols]
        cells.append("" if r.get("seconds") is None else f"{r['seconds'] / 60:.1f}")
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def render_ablation(yaml_path: Path, root: Path = ABLATIONS) -> str:
    name = yaml_path.stem
    meta = _sweep_meta(yaml_path)
    page = root / f"{name}.md"
    old = page.read_text() if page.is_file() else ""
    found = FINDING_RE.search(old)
    finding = found.group(0) if found else FINDING_EMPTY
    res = root / "results" / f"{name}.json"
    out = [f"# Ablation `{meta['name']}`", "",
           GENERATED.format(src=f"`results/{name}.json`" if res.is_file() else "the sweep file"), ""]
    if meta["description"]:
        out += [meta["description"].strip(), ""]
    out += [f"Sweep file [`{name}.yaml`]({name}.yaml) (base `{meta['base']}`), ranked by `{meta['metric']}` "
            f"({meta['mode']}). Run it: `make sweep SWEEP=experiments/ablations/{name}.yaml`, then "
            f"`python -m experiments.report publish sweep {meta['name']}`.", "", finding, "", "## Runs", ""]
    if not res.is_file():
        out += ["No runs published yet. The finding's figures come from runs of the commit it names, read "
                "by hand before results were published as files; run and publish the sweep with the "
                "commands above and this section shows its table and figure.", ""]
        return "\n".join(out)
    data = _load_json(res)
    prov = data.get("provenance", {})
    secs = [r["seconds"] for r in data["rows"] if r.get("seconds") is not None]
    out += [f"{len(data['rows'])} runs at commit {', '.join(f'`{c}`' for c in prov.get('commits', []))} "
            f"(dirty: {', '.join(prov.get('dirty', []))}) on {'; '.join(prov.get('cpu_models', []))}; "
            f"{sum(secs) / 60:.1f} min of runs in all; published {prov.get('published_utc', '?')} "
            f"(`{prov.get('command', '')}`). Every metric the runs logged, best and final: "
            f"[`results/{name}.csv`](results/{name}.csv).", "", results_table(data), ""]
    if (root / "figures" / f"{name}.png").is_file():
        out += [f"![{name}: the shown metrics against the step, one line per variant](figures/{name}.png)", ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------
# the benchmarks page
# ----------------------------------------------------------------------------------------

_PROV_KEYS = {"commit": ("git_sha", "commit", "git_commit"), "cpu": ("cpu_model", "cpu"),
              "date": ("date_utc", "date"), "command": ("command",), "threads": ("threads", "torch_threads"),
              "torch": ("torch",)}


def _find(d: Any, keys: tuple, depth: int = 0) -> Optional[Any]:
    """The first scalar under any of ``keys`` in a results file (breadth first, 3 levels)."""
    if not isinstance(d, dict) or depth > 3:
        return None
    for k in keys:
        # provenance is text (a CPU name, a commit, a date); a number under "cpu" is a CPU time
        if k in d and isinstance(d[k], str) or (k in ("threads", "torch_threads") and isinstance(d.get(k), int)):
            return d[k]
    for k, v in d.items():
        if k not in ("rows", "results", "timeline", "configs", "runs", "stages") and isinstance(v, dict):
            got = _find(v, keys, depth + 1)
            if got is not None:
                return got
    return None


def render_benchmarks(results: Path = BENCH_RESULTS) -> str:
    """docs/benchmarks.md: per results file its provenance (read from the JSON; what it does not
    record is said) and the table the same run wrote beside it (<name>.md)."""
    out = ["# Benchmarks", "", GENERATED.format(src="`benchmarks/results/*.json`").replace(
        ": edit the finding block only", ""), "",
           "Each section is one results file of `benchmarks/results/`: the machine and commit it was "
           "measured on, as the file records them, and the table the same run wrote. Timings from "
           "different machines are not comparable; compare rows of one file only.", ""]
    for js in sorted(results.glob("*.json")):
        d = _load_json(js)
        prov = {k: _find(d, keys) for k, keys in _PROV_KEYS.items()}
        cpu = prov["cpu"]
        if not cpu or cpu in ("x86_64", "i386", "aarch64"):
            cpu = f"{cpu or 'CPU'} (model name not recorded)"
        commit = f"`{str(prov['commit'])[:7]}`" if prov["commit"] else "not recorded"
        out += [f"## {js.stem}", "",
                f"- file: [`benchmarks/results/{js.name}`](../benchmarks/results/{js.name})",
                f"- commit {commit}, {cpu}, date {prov['date'] or 'not recorded'}"
                + (f", torch {prov['torch']}" if prov["torch"] else "")
                + (f", {prov['threads']} threads" if prov["threads"] else ""),
                f"- command: `{prov['command']}`" if prov["command"] else "- command: not recorded in the file",
                ""]
        md = js.with_suffix(".md")
        if md.is_file():
            out += [md.read_text().strip(), ""]
        else:
            out += [f"(no table: `{md.name}` is missing; rerun the benchmark)", ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------
# the scoreboard
# ----------------------------------------------------------------------------------------


def interval(p: Optional[float], n: Optional[int]) -> str:
    """95% interval of a mean of n scores in [0, 1]: p +- 1.96 sqrt(p(1-p)/n). For 0/1 scores it is
    the normal approximation of the binomial; for scores between (an image's mean over its
    attributes) p(1-p) bounds their variance from above, so the interval is conservative."""
    if p is None or not n:
        return "n/a"
    h = 1.96 * (p * (1 - p) / n) ** 0.5
    return f"[{max(0.0, p - h):.3f}, {min(1.0, p + h):.3f}]"


def render_scoreboard(sb: Dict[str, Any]) -> str:
    rep, prov = sb["report"], sb["provenance"]
    s2, s3 = rep.get("stage2", {}), rep.get("stage3", {})
    n_q, n_g = s2.get("n"), s3.get("gen_n")
    floor = (rep.get("real_vs_real") or {}).get("fid")
    ceil = (rep.get("vqvae_reconstruction") or {})
    und = (rep.get("understanding_only") or {}).get("vqa_accuracy")
    best_of = rep.get("gen_best_of")
    one = rep.get("gen_attribute_accuracy_one_draw") if best_of else rep.get("gen_attribute_accuracy")
    fid_one = rep.get("fid_one_draw") if best_of else rep.get("fid")
    rows = [("VQA accuracy, test split (after stage 2)", f"**{rep['vqa_accuracy']:.4f}**",
             interval(rep["vqa_accuracy"], n_q), n_q),
            ("understanding-only baseline (stage 2 without generation data)", _fmt(und),
             interval(und, n_q), n_q if und is not None else None),
            ("VQA, held-out attribute combinations", _fmt(s2.get("vqa_accuracy_heldout")),
             interval(s2.get("vqa_accuracy_heldout"), n_q), n_q),
            ("blind baseline (same model, no image)", _fmt(s2.get("vqa_blind_baseline")),
             interval(s2.get("vqa_blind_baseline"), n_q), n_q),
            ("attribute accuracy of generated images, **one draw** (mean over requested attributes)",
             f"**{one:.3f}**" if one is not None else "", interval(one, n_g), n_g)]
    if best_of:
        rows.append((f"attribute accuracy, best of {best_of} (test-time compute: {best_of} draws + "
                     f"{best_of} judgements by the model per prompt; compare with the one-draw row)",
                     _fmt(rep.get("gen_attribute_accuracy")), interval(rep.get("gen_attribute_accuracy"), n_g), n_g))
    by_obj = s3.get("gen_attr_by_objects") or {}
    if by_obj:
        rows.append(("attribute accuracy by objects in the prompt (" + " / ".join(sorted(by_obj)) + ")"
                     + (f", best of {best_of}" if best_of else ""),
                     " / ".join(_fmt(by_obj[k], 3) for k in sorted(by_obj)), "n/a", n_g))
    if fid_one is not None:
        rows.append(("FID, one draw (world classifier features; lower is better)"
                     + (f" / its ratio to the real-vs-real floor {floor:.1f}" if floor else ""),
                     f"{fid_one:.1f}" + (f" = {fid_one / floor:.2f}x" if floor else ""), "n/a (one run)", n_g))
    if ceil.get("gen_attribute_accuracy") is not None or ceil.get("attribute_accuracy") is not None:
        c = ceil.get("gen_attribute_accuracy", ceil.get("attribute_accuracy"))
        rows.append(("tokenizer ceiling: attribute accuracy of VQVAE reconstructions of the targets",
                     _fmt(c, 3), interval(c, n_g), n_g))
    if s3.get("gen_prompt_gain") is not None:
        rows.append(("prompt gain (nats/token the prompt is worth to the image loss)", _fmt(s3["gen_prompt_gain"], 4),
                     "n/a", None))
    t = prov.get("timings", {})
    lines = ["| measure | figure | 95% interval | n |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {'' if d is None else d} |" for a, b, c, d in rows]
    head = (f"World scoreboard of commit `{prov['commit']}`{' (dirty work tree)' if prov.get('dirty') else ''}, "
            f"published {prov['published_utc'][:10]} from `runs/pipeline/report.json` of a fresh clone, "
            f"{prov['cpu_model']} ({', '.join(prov.get('cpu_flags', [])) or 'flags not recorded'}), "
            f"{prov.get('cpus', '?')} cores; `make stage1` {_minutes((t.get('stage1') or {}).get('seconds'))}, "
            f"then `make pipeline` {_minutes((t.get('pipeline') or {}).get('seconds'))} "
            f"(load average {_fmt((t.get('pipeline') or {}).get('loadavg', [None])[0], 2) or '?'} at its end). "
            f"Intervals: +-1.96 sqrt(p(1-p)/n) over questions or prompts (conservative for attribute "
            f"accuracy, an image's mean over its attributes); two figures whose intervals overlap are not "
            f"separated. Seeds: training {prov.get('train_seeds', {})}, evaluation {prov.get('eval_seed', '?')}.")
    return head + "\n\n" + "\n".join(lines)


def render_timings(sb: Dict[str, Any]) -> str:
    t, prov = sb["provenance"].get("timings", {}), sb["provenance"]
    parts = []
    for target in ("stage1", "pipeline", "test"):
        rec = t.get(target)
        if rec:
            parts.append(f"`make {target}` **{_minutes(rec['seconds'])}**")
    where = f"on a fresh clone of `{prov['commit']}`, {prov['cpu_model']}, 2 cores"
    return ("Measured " + where + ": " + ", ".join(parts) + " (`experiments/world/scoreboard.json`; "
            "other CPUs differ by up to 2x).") if parts else "Not timed yet."


def publish_timings(runs_root: Path, out: Path = SCOREBOARD, targets: Sequence[str] = ("test",)) -> Path:
    """Add the newest timed ``targets`` of ``<runs_root>/runs/timings.json`` (e.g. `make test` in a
    fresh clone, as CI runs it) to the published scoreboard file."""
    tpath = runs_root / "runs" / "timings.json"
    if not tpath.is_file():
        raise ReportError(f"{tpath} not found: run the make targets ({', '.join(targets)}) in {runs_root} first")
    if not out.is_file():
        raise ReportError(f"{_rel(out)} not found: publish the scoreboard first (publish scoreboard)")
    sb = _load_json(out)
    found = {rec["target"]: rec for rec in _load_json(tpath) if rec["target"] in targets}
    if not found:
        raise ReportError(f"{tpath} has no record of {', '.join(targets)}")
    sb["provenance"].setdefault("timings", {}).update(found)
    out.write_text(json.dumps(sb, indent=1, default=str) + "\n")
    print(f"[report] timings of {', '.join(sorted(found))} -> {_rel(out)}")
    return out


def publish_scoreboard(runs_root: Path, out: Path = SCOREBOARD) -> Path:
    """Copy ``<runs_root>/runs/pipeline/report.json`` with its provenance into ``out``."""
    runs = runs_root / "runs"
    rep_path = runs / "pipeline" / "report.json"
    if not rep_path.is_file():
        raise ReportError(f"{rep_path} not found: run `make stage1 && make pipeline` in {runs_root} first")
    rep = _load_json(rep_path)
    timings: Dict[str, Any] = {}
    tpath = runs / "timings.json"
    if tpath.is_file():
        for rec in _load_json(tpath):  # the newest record of each target wins
            timings[rec["target"]] = rec
    seeds: Dict[str, Any] = {}
    for stage in ("stage1", "stage2", "stage2_und_only", "stage3"):
        cfg = runs / "world" / stage / "config.yaml"
        if cfg.is_file():
            m = re.search(r"^seed:\s*(\S+)", cfg.read_text(), re.M)
            seeds[stage] = m.group(1) if m else "?"
    git = rep.get("git", {})
    prov = {"commit": str(git.get("git_commit", "unknown"))[:7], "dirty": git.get("git_dirty") == "true",
            **{k: v for k, v in machine_info().items() if k != "date_utc"},
            "published_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "timings": timings, "train_seeds": seeds, "eval_seed": (rep.get("protocol") or {}).get("seed"),
            "source": str(rep_path), "command": "python -m experiments.report publish scoreboard"}
    out.write_text(json.dumps({"provenance": prov, "report": rep}, indent=1, default=str) + "\n")
    print(f"[report] scoreboard of {prov['commit']} -> {_rel(out)}")
    return out


def replace_block(text: str, name: str, body: str, where: str = "README.md") -> str:
    pat = re.compile(rf"(<!-- {name}:[^\n]*-->\n).*?(<!-- /{name} -->)", re.S)
    if not pat.search(text):
        raise ReportError(f"{where}: no `<!-- {name}: ... -->` ... `<!-- /{name} -->` block to fill; "
                          "put the two marker lines where the generated text belongs")
    return pat.sub(lambda m: m.group(1) + body.rstrip("\n") + "\n" + m.group(2), text, count=1)


def finding_summary(page_text: str) -> str:
    """The finding's first sentence (its verdict), for the README's index of ablations."""
    m = FINDING_RE.search(page_text)
    if not m:
        return "(no finding)"
    body = re.sub(r"<!--.*?-->", "", m.group(0), flags=re.S).replace("**Finding.**", "").strip()
    body = " ".join(body.split())
    first = re.split(r"(?<=[.!?])\s+(?=[A-Z0-9`*(])", body, maxsplit=1)[0]
    return first if len(first) <= 260 else first[:257].rsplit(" ", 1)[0] + " ..."


def render_ablation_index(abl: Path = ABLATIONS) -> str:
    lines = ["| ablation | what it varies | finding (first sentence; the page has the rest) |", "|---|---|---|"]
    for y in sorted(abl.glob("*.yaml")):
        meta = _sweep_meta(y)
        page = abl / f"{y.stem}.md"
        summary = finding_summary(page.read_text()) if page.is_file() else "(no page)"
        desc = meta["description"].split(" - ", 1)[-1] if meta["description"] else ""
        lines.append(f"| [{y.stem}](experiments/ablations/{y.stem}.md) | {desc.replace('|', '/')} | "
                     f"{summary.replace('|', '/')} |")
    return "\n".join(lines)


def render_readme(text: str, sb: Optional[Dict[str, Any]], abl: Path = ABLATIONS) -> str:
    if sb is not None:
        for name, fn in BLOCKS.items():
            text = replace_block(text, name, fn(sb))
    return replace_block(text, "ablations", render_ablation_index(abl))


# ----------------------------------------------------------------------------------------
# render everything
# ----------------------------------------------------------------------------------------


def pages(root: Path = REPO_ROOT) -> Dict[Path, str]:
    """{page path: its rendering} for every generated page under ``root``."""
    abl = root / "experiments" / "ablations"
    out: Dict[Path, str] = {}
    for y in sorted(abl.glob("*.yaml")):
        out[abl / f"{y.stem}.md"] = render_ablation(y, abl)
    out[root / "docs" / "benchmarks.md"] = render_benchmarks(root / "benchmarks" / "results")
    sb_path = root / "experiments" / "world" / "scoreboard.json"
    readme = root / "README.md"
    if readme.is_file():
        out[readme] = render_readme(readme.read_text(), _load_json(sb_path) if sb_path.is_file() else None, abl)
    return out


def render(root: Path = REPO_ROOT, check: bool = False) -> List[Path]:
    """Write every page (or, ``check``, list those whose file differs from the rendering)."""
    changed = []
    for path, text in pages(root).items():
        text = text.rstrip("\n") + "\n"
        if not path.is_file() or path.read_text() != text:
            changed.append(path)
            if not check:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    return changed


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.report", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    st = sub.add_parser("stamp", help="record how long a make target took")
    st.add_argument("target")
    st.add_argument("start", type=float, help="the target's start, seconds since the epoch")
    st.add_argument("--out", default=str(REPO_ROOT / TIMINGS))
    rd = sub.add_parser("render", help="regenerate every page from the committed results (the default)")
    rd.add_argument("--check", action="store_true", help="write nothing; exit 1 when a page differs")
    pb = sub.add_parser("publish", help="copy results from MLflow / a pipeline run into the repository")
    pb.add_argument("what", choices=("sweep", "scoreboard", "timings"))
    pb.add_argument("name", nargs="?", default="", help="sweep: the sweep (or MLflow experiment) name")
    pb.add_argument("--tracking-uri", default=None, help="sweep: MLflow store (default runs/mlflow.db)")
    pb.add_argument("--runs-root", default=str(REPO_ROOT),
                    help="scoreboard / timings: the checkout whose runs/ holds pipeline/report.json and "
                         "timings.json (a fresh clone)")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "stamp":
            stamp(args.target, args.start, Path(args.out))
            return 0
        if args.cmd == "publish":
            if args.what == "sweep":
                if not args.name:
                    ap.error("publish sweep needs the sweep's name")
                publish_sweep(args.name, args.tracking_uri)
            elif args.what == "scoreboard":
                publish_scoreboard(Path(args.runs_root))
            else:
                publish_timings(Path(args.runs_root))
        check = args.cmd == "render" and args.check
        changed = render(check=check)
    except ReportError as e:
        print(f"report: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # experiments.compare.CompareError: no such sweep / no runs
        print(f"report: {e}", file=sys.stderr)
        return 2
    for p in changed:
        print(f"[report] {'differs' if check else 'wrote'}: {_rel(p)}")
    if check and changed:
        print("report: pages differ from their results; run `python -m experiments.report` and commit",
              file=sys.stderr)
        return 1
    if not changed:
        print("[report] every page is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
