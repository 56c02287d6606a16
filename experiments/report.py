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
from typing import Any, Dict, List, Optional

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


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.report", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    st = sub.add_parser("stamp", help="record how long a make target took")
    st.add_argument("target")
    st.add_argument("start", type=float, help="the target's start, seconds since the epoch")
    st.add_argument("--out", default=str(REPO_ROOT / TIMINGS))
    args = ap.parse_args(argv)
    if args.cmd == "stamp":
        stamp(args.target, args.start, Path(args.out))
        return 0
    ap.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
