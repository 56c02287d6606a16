"""One way a benchmark writes its results: ``<name>.json`` ({"meta", "results"}) and the table
``<name>.md`` beside it under ``benchmarks/results/`` (docs/benchmarks.md is generated from both)."""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Dict, List, Sequence


def time_stats(seconds: Sequence[float], digits: int = 4) -> Dict[str, Any]:
    """Min (the headline: least disturbed by a shared machine), median and count of timed runs."""
    return {"min_s": round(min(seconds), digits), "median_s": round(statistics.median(seconds), digits),
            "n": len(seconds)}


def write_results(out: Path, name: str, meta: Dict[str, Any], rows: List[Dict[str, Any]], markdown: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1) + "\n")
    (out / f"{name}.md").write_text(markdown)
    print(markdown)
