"""The world scoreboard as a committed results file, and the wall times of the make targets.

    publish_scoreboard   runs/pipeline[-PRESET]/report.json of a fresh clone + its provenance
                         (commit, CPU, timed make targets, seeds) -> experiments/world/scoreboard.json
    publish_timings      `make test`'s time (runs/timings.json of a fresh clone) -> the same file
    render_scoreboard    the README's scoreboard block: VARGPT v1 beside the suite default, every
                         figure with its 95% interval, the one-draw headline, best of N apart
    stamp                one make target's wall time -> runs/timings.json (the Makefile calls it)

``experiments.report`` renders the README from it; nothing here is typed into a page by hand.
"""
from __future__ import annotations

import json
import os
import platform
import re
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from experiments.config import REPO_ROOT
from experiments.machine import cpu_flags, cpu_model, git_info

SCOREBOARD = REPO_ROOT / "experiments" / "world" / "scoreboard.json"

TIMINGS = "runs/timings.json"  # make targets' wall times, written by `stamp`


def machine_info() -> Dict[str, Any]:
    import torch  # lazy: `stamp` runs at the end of every make target and must stay light

    return {"cpu_model": cpu_model(), "cpu_flags": cpu_flags(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(),
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def stamp(target: str, start: float, path: Path) -> Dict[str, Any]:
    """Append one timed make target to ``path`` (a JSON list, newest last)."""
    git = git_info()
    rec = {"target": target, "seconds": round(time.time() - start, 1), "commit": git["git_commit"][:7],
           "dirty": git["git_dirty"] == "true",
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


def _mmss(seconds: float) -> str:
    """A run's wall time as m:ss (h:mm:ss from an hour on)."""
    m, sec = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def _minutes(seconds: Optional[float]) -> str:
    if seconds is None:
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s:02d} s"


# ----------------------------------------------------------------------------------------
# the scoreboard
# ----------------------------------------------------------------------------------------


# Scoreboard columns, left to right. A column is a preset's pipeline from one fresh clone; when
# that clone rebuilt its bases first (`make clean-bases bases`), the column keeps that time too.
PRESETS = ("v1", "default", "v11")
PRESET_TITLES = {"v1": "VARGPT v1 (`PRESET=v1`)", "default": "suite default", "v11": "VARGPT-v1.1 (`make v11-world`)"}
# A column made by other make targets than `make stage1` + `make pipeline` (with PRESET=...):
# the v1.1 column is one target (its stages and experiments/pipeline_v11.py).
COLUMN_TARGETS = {"v11": {"v11-world": "make v11-world"}}


def column_targets(preset: str) -> Dict[str, str]:
    """{make target as runs/timings.json names it: its command}, in run order, for one column."""
    if preset in COLUMN_TARGETS:
        return COLUMN_TARGETS[preset]
    tag, arg = ("", "") if preset == "default" else (f"-{preset}", f" PRESET={preset}")
    return {f"stage1{tag}": f"make stage1{arg}", f"pipeline{tag}": f"make pipeline{arg}"}


def _ci(v: Any) -> str:
    return f"[{v[0]:.3f}, {v[1]:.3f}]" if isinstance(v, (list, tuple)) and len(v) == 2 else ""


def _cell(value: Optional[float], ci: Any = None, digits: int = 4, bold: bool = False) -> str:
    if value is None:
        return "n/a"
    txt = f"{value:.{digits}f}".rstrip("0").rstrip(".") if digits else f"{value}"
    txt = f"**{txt}**" if bold else txt
    return f"{txt} {_ci(ci)}".strip()


def _g(d: Optional[Dict[str, Any]], *path: str) -> Any:
    for k in path:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def one_draw_target(rep: Dict[str, Any]) -> Optional[float]:
    """The world's one-draw minimum, read from the report's targets (never typed here)."""
    for k in rep.get("targets_met") or {}:
        m = re.fullmatch(r"gen_attribute_accuracy_one_draw>=([0-9.]+)(_minimum)?", k)
        if m:
            return float(m.group(1))
    return None


def limits_note(sb: Dict[str, Any], cols: Sequence[str], page: str = "docs/limits.md") -> str:
    """A pointer to the limits page for every column whose one-draw interval starts under the
    world's minimum (done-when: the page shows what limits it)."""
    under = []
    for p in cols:
        rep = sb["presets"][p]["report"]
        ci, target = _g(rep, "stage3", "gen_one_draw", "mean_ci95"), one_draw_target(rep)
        if isinstance(ci, (list, tuple)) and target is not None and ci[0] < target:
            under.append((PRESET_TITLES.get(p, p), ci[0], target))
    if not under:
        return ""
    return ("- One-draw attribute accuracy under the world's minimum (interval's lower bound): "
            + "; ".join(f"{t} {lo:.3f} < {tg:.2f}" for t, lo, tg in under)
            + f". What limits it (accuracy against cumulative steps, the tokenizer's ceiling, by objects in the "
              f"prompt): [{page}]({page}).")


def scoreboard_rows(rep: Dict[str, Any]) -> List[tuple]:
    """(measure, cell) for one preset's report, in the scoreboard's order. Every figure carries
    its 95% interval: VQA a bootstrap over questions (the evaluator's), attribute accuracy a bootstrap over prompts, and a
    one-draw figure also the range its draw seed alone spans (the K draws of best of K)."""
    s2, s3 = rep.get("stage2", {}), rep.get("stage3", {})
    best_of = rep.get("gen_best_of")
    one = s3.get("gen_one_draw") or {}
    seeds = s3.get("gen_draw_seeds") or {}
    rr = rep.get("real_vs_real") or {}
    rc = rep.get("vqvae_reconstruction") or rep.get("bsq_reconstruction") or {}  # v1's tokenizer / v1.1's
    floor = rr.get("fid")
    rows = [
        ("VQA accuracy, test split", _cell(rep.get("vqa_accuracy"), s2.get("vqa_accuracy_ci95"), bold=True)),
        ("understanding-only baseline (stage 2 without generation data)",
         _cell(_g(rep, "understanding_only", "vqa_accuracy"), _g(rep, "understanding_only", "vqa_accuracy_ci95"))),
        ("VQA, held-out attribute combinations", _cell(s2.get("vqa_accuracy_heldout"), s2.get("vqa_accuracy_heldout_ci95"))),
        ("blind baseline (the same model, no image)", _cell(s2.get("vqa_blind_baseline"), s2.get("vqa_blind_baseline_ci95"))),
    ]
    if one:
        seed_rng = _g(seeds, "attribute_accuracy", "range95")
        rows += [
            ("**attribute accuracy, one draw** (mean over requested attributes)",
             _cell(one.get("mean"), one.get("mean_ci95"), 3, bold=True)
             + (f"; over {len(seeds['attribute_accuracy']['values'])} draw seeds {_ci(seed_rng)}" if seed_rng else "")),
            ("images with every requested attribute right, one draw", _cell(one.get("all"), one.get("all_ci95"), 3)),
            ("one draw by objects in the prompt: mean / all right (1, 2, 3 objects)",
             "; ".join(f"{n}: {_g(one, 'by_objects', n, 'mean'):.2f} / {_g(one, 'by_objects', n, 'all'):.2f}"
                       for n in sorted(one.get("by_objects") or {}))),
        ]
    elif rep.get("gen_attribute_accuracy") is not None:  # a one-draw report (best of 1)
        rows.append(("**attribute accuracy, one draw** (mean over requested attributes)",
                     _cell(rep["gen_attribute_accuracy"], s3.get("gen_attr_mean_ci95"), 3, bold=True)))
        rows.append(("images with every requested attribute right, one draw",
                     _cell(s3.get("gen_attr_all"), s3.get("gen_attr_all_ci95"), 3)))
        by = s3.get("gen_attr_by_objects") or {}
        if by:
            rows.append(("one draw by objects in the prompt: mean / all right (1, 2, 3 objects)",
                         "; ".join(f"{n}: {by[n]['mean']:.2f} / {by[n]['all']:.2f}" for n in sorted(by))))
    if best_of:
        rows += [(f"best of {best_of}: test-time compute ({best_of} draws + {best_of} judgements by the model per "
                  f"prompt), mean / every attribute right", _cell(rep.get("gen_attribute_accuracy"), s3.get("gen_attr_mean_ci95"), 3)
                  + " / " + _cell(s3.get("gen_attr_all"), s3.get("gen_attr_all_ci95"), 3))]
    fid1 = rep.get("fid_one_draw") if best_of else rep.get("fid")
    fid_rng = _g(seeds, "fid", "range95")
    if fid1 is not None:
        rows.append(("FID, one draw (world classifier features; lower is better)",
                     f"{fid1:.1f}" + (f" = {fid1 / floor:.2f}x the floor" if floor else "")
                     + (f"; over draw seeds [{fid_rng[0]:.1f}, {fid_rng[1]:.1f}]" if fid_rng else "")))
    if floor:
        rows.append(("floor: real images for the same prompts (re-rendered) vs the targets: FID / attribute accuracy"
                     if rr.get("shards") == "same-prompts" else "floor: real images of other prompts vs the targets: FID",
                     f"{floor:.1f}" + (f" / {_cell(rr.get('attribute_accuracy'), rr.get('attribute_accuracy_ci95'), 3)}"
                                       if rr.get("attribute_accuracy") is not None else "")))
    if rc.get("attribute_accuracy") is not None:
        rows.append(("ceiling: the tokenizer's reconstructions of those images (v1: VQVAE, v1.1: BSQ): attribute "
                     "accuracy / every attribute right",
                     _cell(rc["attribute_accuracy"], rc.get("attribute_accuracy_ci95"), 3)
                     + (f" / {_cell(rc.get('attr_all'), rc.get('attr_all_ci95'), 3)}" if rc.get("attr_all") is not None else "")))
    if s3.get("gen_prompt_gain") is not None:
        rows.append(("prompt gain (nats per image token the prompt is worth; no interval: one teacher-forced pass)",
                     f"{s3['gen_prompt_gain']:.3f}"))
    gs = rep.get("gen_stage") or {}
    if gs.get("gen_attribute_accuracy") is not None:  # v1.1: generation before its editing stage
        rows.append(("v1.1: attribute accuracy, one draw, after its generation stage (before editing)",
                     _cell(gs["gen_attribute_accuracy"], gs.get("gen_attr_mean_ci95"), 3)))
    ed, refs = rep.get("edit") or {}, rep.get("edit_references") or {}
    if ed.get("edit_accuracy") is not None:
        rows += [("**editing: edit accuracy** (the edited facts hold; test edits)",
                  _cell(ed["edit_accuracy"], ed.get("edit_accuracy_ci95"), 3, bold=True)),
                 ("editing: preservation (the facts that should not change still hold)",
                  _cell(ed.get("edit_preservation"), ed.get("edit_preservation_ci95"), 3)),
                 ("editing: success (edit and preservation both)", _cell(ed.get("edit_success"), ed.get("edit_success_ci95"), 3)),
                 ("editing: by operation, edit accuracy",
                  "; ".join(f"{op} {v['edit']:.2f}" for op, v in sorted((ed.get("edit_by_op") or {}).items())))]
        for name, what in (("targets", "rendered targets (the scorer's ceiling)"),
                           ("copy", "the source handed back unedited")):
            r = refs.get(name)
            if r:
                rows.append((f"editing reference, {what}: edit / preservation",
                             _cell(r["edit"], r.get("edit_ci95"), 3) + " / " + _cell(r["preservation"],
                                                                                   r.get("preservation_ci95"), 3)))
    return rows


def _seeds(seeds: Dict[str, Any]) -> str:
    vals = set(seeds.values())
    if len(vals) == 1:
        return f"{vals.pop()} in every stage"
    return ", ".join(f"{k} {v}" for k, v in seeds.items()) or "?"


def render_scoreboard(sb: Dict[str, Any]) -> str:
    cols = [p for p in PRESETS if p in sb.get("presets", {})]
    if not cols:
        return "Not published yet."
    per = {p: dict(scoreboard_rows(sb["presets"][p]["report"])) for p in cols}
    measures: List[str] = []
    for p in cols:
        measures += [m for m, _ in scoreboard_rows(sb["presets"][p]["report"]) if m not in measures]
    lines = ["| measure (95% interval) | " + " | ".join(PRESET_TITLES.get(p, p) for p in cols) + " |",
             "|---|" + "---|" * len(cols)]
    lines += [f"| {m} | " + " | ".join(per[p].get(m, "n/a") for p in cols) + " |" for m in measures]
    notes = []
    for p in cols:
        pv = sb["presets"][p]["provenance"]
        t = pv.get("timings", {})
        targets = column_targets(pv.get("preset", p))
        trained = sorted({r.get("commit", "?") for k, r in t.items() if k in targets or k == "bases"})
        when = " + ".join(f"`{cmd}` {_minutes(_g(t, k, 'seconds'))}" for k, cmd in targets.items())
        if "bases" in t:
            when = f"`make clean-bases bases` {_minutes(t['bases']['seconds'])}, then " + when
        load = _g(t, list(targets)[-1], "loadavg")
        notes.append(f"- {PRESET_TITLES.get(p, p)}: {when} in a fresh clone (trained at "
                     f"{', '.join(f'`{c}`' for c in trained) or 'unknown'}, evaluated at `{pv['commit']}`"
                     f"{' with a dirty tree' if pv.get('dirty') else ''}), {pv['cpu_model']} "
                     f"({', '.join(pv.get('cpu_flags', []))}), {pv.get('cpus', '?')} cores"
                     + (f", 15-minute load average {load[-1]:.1f} at the end (other jobs shared the cores)"
                        if load and load[-1] > 2.5 else "")
                     + f"; {sb['presets'][p]['report'].get('stage2', {}).get('n', '?')} test questions, "
                     f"{sb['presets'][p]['report'].get('stage3', {}).get('gen_n', '?')} test prompts, "
                     + (f"{_g(sb['presets'][p]['report'], 'edit', 'edit_n')} test edits, "
                        if _g(sb['presets'][p]['report'], 'edit', 'edit_n') else "")
                     + f"training seed {_seeds(pv.get('train_seeds', {}))}, evaluation seed {pv.get('eval_seed', '?')}"
                     + "." + (f" {pv['note']}" if pv.get("note") else ""))
    note = limits_note(sb, cols)
    return "\n".join(lines) + "\n\n" + "\n".join(notes + ([note] if note else []))


def render_timings(sb: Dict[str, Any]) -> str:
    d = (sb.get("presets") or {}).get("default")
    if not d:
        return "Not timed yet."
    t, pv = d["provenance"].get("timings", {}), d["provenance"]
    parts = [f"`make {k}` **{_minutes(t[k]['seconds'])}**" for k in ("stage1", "pipeline") if k in t]
    test = (sb.get("timings") or {}).get("test")
    text = (f"Measured in fresh clones on a 2-core {pv['cpu_model']} ({', '.join(pv.get('cpu_flags', []))}): "
            + ", then ".join(parts))
    if test:
        busy = (test.get("loadavg") or [0])[-1] > 2.5
        # its commit is in the scoreboard file: the README names at most three (one per column)
        text += (f"; `make test` **{_minutes(test['seconds'])}** (as CI runs it"
                 + (", other jobs sharing the cores" if busy else "") + ")")
    load = _g(t, "pipeline", "loadavg")
    if load and load[-1] > 2.5:
        text += (f". Other jobs shared the cores during the pipeline (15-minute load average {load[-1]:.1f} at its end), "
                 "so these are upper bounds")
    b = t.get("bases")
    if b:  # that clone trained its own bases first: the recipe from scratch
        bload = (b.get("loadavg") or [0])[-1]
        text += (f". The same clone first rebuilt its bases: `make clean-bases bases` **{_minutes(b['seconds'])}** "
                 f"(`{b.get('commit', '?')}`" + (f", 15-minute load average {bload:.1f} at its end" if bload > 2.5 else "")
                 + ("; the scoreboard's note on that column says under what load" if pv.get("note") else "") + ")")
    return text + ". Other CPUs differ by up to 2x (`experiments/world/scoreboard.json` has the record)."


def publish_timings(runs_root: Path, out: Path = SCOREBOARD, targets: Sequence[str] = ("test",)) -> Path:
    """Add the newest timed ``targets`` of ``<runs_root>/runs/timings.json`` (e.g. `make test` in a
    fresh clone, as CI runs it) to the published scoreboard file."""
    tpath = runs_root / "runs" / "timings.json"
    if not tpath.is_file():
        raise ReportError(f"{tpath} not found: run the make targets ({', '.join(targets)}) in {runs_root} first")
    sb = _load_json(out) if out.is_file() else {"presets": {}}
    found = {rec["target"]: rec for rec in _load_json(tpath) if rec["target"] in targets}
    if not found:
        raise ReportError(f"{tpath} has no record of {', '.join(targets)}")
    sb.setdefault("timings", {}).update(found)
    out.write_text(json.dumps(sb, indent=1, default=str) + "\n")
    print(f"[report] timings of {', '.join(sorted(found))} -> {_rel(out)}")
    return out


def publish_scoreboard(runs_root: Path, preset: str = "default", out: Path = SCOREBOARD,
                       column: Optional[str] = None, note: str = "") -> Path:
    """Copy ``<runs_root>/runs/pipeline[-PRESET]/report.json`` with its provenance (commit, CPU,
    the timed make targets, seeds) into ``out`` as the column ``column`` (default: the preset's).
    A `make bases` record in that clone (it rebuilt its bases first) is kept with the column's
    times. Columns no longer in PRESETS are dropped from ``out``. ``note``: what the timings cannot say (e.g. other jobs on the machine),
    shown with the column's times."""
    column = column or preset
    tag = "" if preset == "default" else f"-{preset}"
    runs = runs_root / "runs"
    rep_path = runs / f"pipeline{tag}" / "report.json"
    if not rep_path.is_file():
        how = " && ".join(column_targets(preset).values())
        raise ReportError(f"{rep_path} not found: run `{how}` in {runs_root} first")
    if column not in PRESETS:
        raise ReportError(f"scoreboard column {column!r} unknown; columns: {', '.join(PRESETS)}")
    rep = _load_json(rep_path)
    timings: Dict[str, Any] = {}
    tpath = runs / "timings.json"
    if tpath.is_file():
        for rec in _load_json(tpath):  # the newest record of each target wins
            if rec["target"] in column_targets(preset) or rec["target"] == "bases":
                timings[rec["target"]] = rec
    seeds: Dict[str, Any] = {}
    wdir = runs / f"world{tag}"
    for stage in ("stage1", "stage2", "stage2_und_only", "stage3", "gen", "edit"):
        cfg = wdir / stage / "config.yaml"
        if cfg.is_file():
            m = re.search(r"^seed:\s*(\S+)", cfg.read_text(), re.M)
            seeds[stage] = m.group(1) if m else "?"
    git = rep.get("git", {})
    prov = {"commit": str(git.get("git_commit", "unknown"))[:7], "dirty": git.get("git_dirty") == "true",
            **{k: v for k, v in machine_info().items() if k != "date_utc"},
            "published_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "timings": timings, "train_seeds": seeds, "eval_seed": (rep.get("protocol") or {}).get("seed"),
            "source": str(rep_path), "preset": preset, **({"note": note} if note else {}),
            "command": f"python -m experiments.report publish scoreboard --preset {preset}"
                       + (f" --column {column}" if column != preset else "")}
    sb = _load_json(out) if out.is_file() else {}
    for gone in [c for c in sb.get("presets", {}) if c not in PRESETS]:
        print(f"[report] scoreboard column {gone!r} is no longer one of {', '.join(PRESETS)}: dropped")
        del sb["presets"][gone]
    sb.setdefault("presets", {})[column] = {"provenance": prov, "report": rep}
    out.write_text(json.dumps(sb, indent=1, default=str) + "\n")
    print(f"[report] scoreboard {column} of {prov['commit']} -> {_rel(out)}")
    return out
