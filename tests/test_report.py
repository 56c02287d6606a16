"""Result pages generated from runs (experiments.report): the committed pages equal their
rendering, a sweep launched here publishes a page with its table and figure, and the README's
scoreboard block is read from the committed results file, never typed."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from experiments import report, sweep
from experiments.config import REPO_ROOT

DEBUG = REPO_ROOT / "experiments" / "debug.yaml"


def test_committed_pages_equal_their_rendering():
    """`python -m experiments.report --check` on the repository: every ablation page, the
    benchmarks page and the README's generated blocks are what their results files render to."""
    changed = report.render(check=True)
    assert not changed, ("pages differ from their results (run `python -m experiments.report` and commit): "
                         + ", ".join(str(p.relative_to(REPO_ROOT)) for p in changed))


def test_every_sweep_has_a_page_with_a_finding():
    for y in sorted((REPO_ROOT / "experiments" / "ablations").glob("*.yaml")):
        page = y.with_suffix(".md")
        assert page.is_file(), f"{y.name} has no page {page.name}: run `python -m experiments.report`"
        m = report.FINDING_RE.search(page.read_text())
        assert m, f"{page.name}: no finding block"
        words = len(m.group(0).split())
        assert words <= 150, f"{page.name}: the finding has {words} words (at most ~120)"


def test_readme_block_follows_the_scoreboard_file(tmp_path):
    """Change a figure in (a copy of) the scoreboard file: the rendered README changes with it,
    and --check reports the committed README as different."""
    sb_path = REPO_ROOT / "experiments" / "world" / "scoreboard.json"
    if not sb_path.is_file():
        pytest.fail("experiments/world/scoreboard.json is missing: publish one with "
                    "`python -m experiments.report publish scoreboard --runs-root <fresh clone>`")
    sb = json.loads(sb_path.read_text())
    text = (REPO_ROOT / "README.md").read_text()
    assert report.render_readme(text, sb) == text  # the committed README is its own rendering
    shown = f"{sb['report']['vqa_accuracy']:.4f}"
    assert shown in text
    sb["report"]["vqa_accuracy"] = 0.1234
    other = report.render_readme(text, sb)
    assert "**0.1234**" in other and other != text
    # a README without the markers is refused with the fix
    with pytest.raises(report.ReportError, match="scoreboard.*marker"):
        report.render_readme("# no blocks here\n", sb)


def test_interval_is_the_binomial_normal_approximation():
    assert report.interval(0.5, 400) == "[0.451, 0.549]"  # 1.96 * sqrt(0.25 / 400) = 0.049
    assert report.interval(1.0, 10) == "[1.000, 1.000]"
    assert report.interval(None, 10) == "n/a"


def test_tiny_sweep_publishes_a_page_with_table_and_figure(tmp_path, capsys):
    """Launch a two-variant sweep of the debug stage, publish it from MLflow, render its page."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    abl = tmp_path / "ablations"
    abl.mkdir()
    y = abl / "tiny_lr.yaml"
    y.write_text(textwrap.dedent(f"""\
        name: tiny_lr
        description: debug stage - two learning rates
        base: {DEBUG}
        metric: val/loss
        mode: min
        metrics: [train/loss]
        overrides:
          trainer.max_steps: 6
          trainer.val_every_n_steps: 2
          trainer.log_every_n_steps: 1
          trainer.save_checkpoint: false
          logging.tracking_uri: {store}
          logging.artifact_root: {tmp_path / 'art'}
        grid:
          optim.lr: [1.0e-3, 3.0e-2]
        """))
    # a hand-written finding the regeneration must keep
    (abl / "tiny_lr.md").write_text("old text\n<!-- finding: hand-written -->\n**Finding.** kept.\n<!-- /finding -->\n")
    assert sweep.main([str(y), "--out-dir", str(tmp_path / "out"), "--no-compare"]) == 0
    out = report.publish_sweep("tiny_lr", tracking_uri=store, root=abl)
    data = json.loads(out.read_text())
    assert data["shown"] == ["val/loss", "train/loss"] and len(data["rows"]) == 2
    assert all(r["status"] == "FINISHED" and r["seconds"] > 0 for r in data["rows"])
    assert data["provenance"]["commits"] and data["provenance"]["cpu_models"]
    csv_head = (abl / "results" / "tiny_lr.csv").read_text().splitlines()[0]
    assert "val/loss best" in csv_head and "train/loss" in csv_head
    fig = abl / "figures" / "tiny_lr.png"
    assert fig.is_file() and fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and fig.stat().st_size > 5000
    page = report.render_ablation(y, abl)
    assert "**Finding.** kept." in page and "old text" not in page
    assert "| rank | variant | status | `optim.lr` | val/loss best | val/loss final | train/loss | minutes |" in page
    rows = [l for l in page.splitlines() if l.startswith("| 1 |") or l.startswith("| 2 |")]
    assert len(rows) == 2 and "![tiny_lr" in page and "(figures/tiny_lr.png)" in page
    # ranked by val/loss best: row 1 holds the smaller value
    best = [float(l.split("|")[5]) for l in rows]
    assert best == sorted(best)


def test_benchmarks_page_names_each_results_file_and_its_provenance(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    (res / "a.json").write_text(json.dumps({"machine": {"git_sha": "abc1234", "cpu_model": "Some CPU",
                                                        "date_utc": "2026-01-01T00:00:00Z"}, "command": "python -m x"}))
    (res / "a.md").write_text("| x |\n|---|\n| 1 |\n")
    (res / "b.json").write_text(json.dumps({"cpu_seconds": 3.0}))
    page = report.render_benchmarks(res)
    assert "## a" in page and "commit `abc1234`, Some CPU, date 2026-01-01" in page and "| 1 |" in page
    assert "`python -m x`" in page
    assert "## b" in page and "commit not recorded, CPU (model name not recorded)" in page and "b.md` is missing" in page
    (res / "c.json").write_text("{broken")
    with pytest.raises(report.ReportError, match="c.json: cannot read it as JSON"):
        report.render_benchmarks(res)


def test_stamp_appends_and_refuses_a_broken_file(tmp_path):
    path = tmp_path / "t.json"
    import time

    report.stamp("stage1", time.time() - 5, path)
    report.stamp("pipeline", time.time() - 7, path)
    recs = json.loads(path.read_text())
    assert [r["target"] for r in recs] == ["stage1", "pipeline"] and 4.5 < recs[0]["seconds"] < 60
    assert recs[0]["cpu_model"] and "commit" in recs[0]
    path.write_text("{")
    with pytest.raises(SystemExit, match="not JSON"):
        report.stamp("x", time.time(), path)
