"""Result pages generated from runs (experiments.report): the committed pages equal their
rendering, a sweep launched here publishes a page with its table and figure, and the README's
scoreboard block is read from the committed results file, never typed."""
from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path

import pytest

from experiments import report, scoreboard, sweep
from experiments.config import REPO_ROOT

DEBUG = REPO_ROOT / "experiments" / "debug.yaml"


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory):
    """An empty MLflow SQLite store, made once per module: creating one runs MLflow's schema
    migrations (seconds); each test copies it and pays only for opening it."""
    from experiments import tracking

    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    tracking.init_store(f"sqlite:///{db}")
    return db


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
    rep = sb["presets"]["default"]["report"]
    assert f"**{rep['vqa_accuracy']:.4f}".rstrip("0") in text
    rep["vqa_accuracy"] = 0.1234
    other = report.render_readme(text, sb)
    assert "**0.1234**" in other and other != text
    # a README without the markers is refused with the fix
    with pytest.raises(report.ReportError, match="scoreboard.*marker"):
        report.render_readme("# no blocks here\n", sb)


FAKE = {
    "git": {"git_commit": "a" * 40, "git_dirty": "false"}, "vqa_accuracy": 0.8875, "gen_best_of": 16,
    "gen_attribute_accuracy": 0.591, "fid_one_draw": 349.9, "fid": 299.0,
    "stage2": {"n": 400, "vqa_accuracy": 0.8875, "vqa_accuracy_ci95": [0.857, 0.918], "vqa_accuracy_heldout": 0.7175},
    "understanding_only": {"vqa_accuracy": 0.885, "vqa_accuracy_ci95": [0.854, 0.916]},
    "stage3": {"gen_n": 200, "gen_attr_mean_ci95": [0.55, 0.63], "gen_attr_all": 0.4, "gen_attr_all_ci95": [0.33, 0.47],
               "gen_one_draw": {"mean": 0.404, "mean_ci95": [0.37, 0.44], "all": 0.26, "all_ci95": [0.2, 0.32],
                                "by_objects": {"1": {"mean": 0.9, "all": 0.8}, "2": {"mean": 0.4, "all": 0.2}}},
               "gen_draw_seeds": {"attribute_accuracy": {"values": [0.404, 0.38], "range95": [0.35, 0.43]},
                                  "fid": {"values": [349.9, 360.0], "range95": [330.0, 380.0]}},
               "gen_prompt_gain": 1.586},
    "real_vs_real": {"fid": 120.0, "shards": "same-prompts", "attribute_accuracy": 0.95, "attribute_accuracy_ci95": [0.93, 0.97]},
    "vqvae_reconstruction": {"attribute_accuracy": 0.739, "attribute_accuracy_ci95": [0.7, 0.77], "attr_all": 0.6,
                             "attr_all_ci95": [0.53, 0.67]},
}


def test_scoreboard_rows_show_one_draw_headline_best_of_apart_and_intervals():
    rows = dict(scoreboard.scoreboard_rows(FAKE))
    head = next(k for k in rows if k.startswith("**attribute accuracy, one draw**"))
    assert rows[head] == "**0.404** [0.370, 0.440]; over 2 draw seeds [0.350, 0.430]"
    best = next(k for k in rows if k.startswith("best of 16"))
    assert "16 draws + 16 judgements" in best and rows[best] == "0.591 [0.550, 0.630] / 0.4 [0.330, 0.470]"
    assert rows["images with every requested attribute right, one draw"] == "0.26 [0.200, 0.320]"
    fid = next(v for k, v in rows.items() if k.startswith("FID, one draw"))
    assert fid == "349.9 = 2.92x the floor; over draw seeds [330.0, 380.0]"
    assert any(k.startswith("floor: real images for the same prompts") for k in rows)
    assert rows["VQA accuracy, test split"] == "**0.8875** [0.857, 0.918]"
    table = scoreboard.render_scoreboard({"presets": {"default": {"report": FAKE, "provenance": {
        "commit": "aaaaaaa", "cpu_model": "Some CPU", "cpu_flags": ["avx2"], "cpus": 2, "timings": {}}}}})
    assert "| measure (95% interval) | suite default |" in table and "VARGPT v1" not in table.splitlines()[0]
def test_tiny_sweep_publishes_a_page_with_table_and_figure(tmp_path, capsys, empty_store):
    """Launch a two-variant sweep of the debug stage, publish it from MLflow, render its page."""
    import shutil

    shutil.copyfile(empty_store, tmp_path / "mlflow.db")
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
    assert "| rank | variant | status | `optim.lr` | val/loss best | val/loss final | train/loss | time |" in page
    rows = [l for l in page.splitlines() if l.startswith("| 1 |") or l.startswith("| 2 |")]
    assert len(rows) == 2 and "![tiny_lr" in page and "(figures/tiny_lr.png)" in page
    # ranked by val/loss best: row 1 holds the smaller value
    best = [float(l.split("|")[5]) for l in rows]
    assert best == sorted(best)
    assert "## Test protocol" not in page
    # a variant evaluated on the test protocol brings those figures (and only that variant)
    first = data["rows"][0]["name"]
    (tmp_path / "out" / first).mkdir(parents=True, exist_ok=True)
    (tmp_path / "out" / first / "eval.json").write_text(json.dumps({
        "gen_n": 200, "protocol": {"best_of": 1, "gen_shards": "test/gen-*.tar"}, "gen_attr_mean": 0.3376,
        "gen_attr_mean_ci95": [0.2753, 0.4022], "gen_attr_all": 0.27, "gen_attr_all_ci95": [0.21, 0.335],
        "gen_attr_by_objects": {"1": {"mean": 0.6}, "2": {"mean": 0.3}, "3": {"mean": 0.2}},
        "fid": 478.6, "real_vs_real": {"fid": 207.1}, "gen_prompt_gain": 1.2, "seconds": 90.0}))
    data = json.loads(report.publish_sweep("tiny_lr", tracking_uri=store, root=abl, sweep_dir=tmp_path / "out").read_text())
    assert list(data["test_eval"]) == [first] and data["test_eval"][first]["fid_floor"] == 207.1
    page = report.render_ablation(y, abl)
    assert "## Test protocol" in page and "200 test prompts (`test/gen-*.tar`)" in page
    assert f"| {first} | 1 | 0.338 [0.275, 0.402] | 0.270 [0.210, 0.335] | 0.600 / 0.300 / 0.200 | 478.6 (207.1) |" in page


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

    scoreboard.stamp("stage1", time.time() - 5, path)
    scoreboard.stamp("pipeline", time.time() - 7, path)
    recs = json.loads(path.read_text())
    assert [r["target"] for r in recs] == ["stage1", "pipeline"] and 4.5 < recs[0]["seconds"] < 60
    assert recs[0]["cpu_model"] and "commit" in recs[0]
    path.write_text("{")
    with pytest.raises(SystemExit, match="not JSON"):
        scoreboard.stamp("x", time.time(), path)


def test_publish_puts_each_preset_in_its_column(tmp_path):
    """publish scoreboard copies a fresh clone's report with its provenance, one column per preset;
    publish timings adds `make test`; the README blocks render both columns and the times."""
    import time

    clone = tmp_path / "clone"
    for preset, tag in (("default", ""), ("v1", "-v1")):
        (clone / "runs" / f"pipeline{tag}").mkdir(parents=True)
        rep = json.loads(json.dumps(FAKE))
        rep["vqa_accuracy"] = 0.8875 if preset == "default" else 0.7
        (clone / "runs" / f"pipeline{tag}" / "report.json").write_text(json.dumps(rep))
        (clone / "runs" / f"world{tag}" / "stage1").mkdir(parents=True)
        (clone / "runs" / f"world{tag}" / "stage1" / "config.yaml").write_text("seed: 7\n")
        scoreboard.stamp(f"stage1{tag}", time.time() - 300, clone / "runs" / "timings.json")
        scoreboard.stamp(f"pipeline{tag}", time.time() - 1500, clone / "runs" / "timings.json")
    scoreboard.stamp("test", time.time() - 400, clone / "runs" / "timings.json")
    out = tmp_path / "scoreboard.json"
    with pytest.raises(report.ReportError, match="make stage1 PRESET=v9 && make pipeline PRESET=v9"):
        scoreboard.publish_scoreboard(clone, "v9", out)
    scoreboard.publish_scoreboard(clone, "default", out)
    scoreboard.publish_scoreboard(clone, "v1", out)
    scoreboard.publish_timings(clone, out)
    sb = json.loads(out.read_text())
    assert set(sb["presets"]) == {"default", "v1"} and sb["timings"]["test"]["seconds"] >= 400
    d = sb["presets"]["default"]["provenance"]
    assert d["train_seeds"] == {"stage1": "7"} and set(d["timings"]) == {"stage1", "pipeline"} and d["cpu_model"]
    table = scoreboard.render_scoreboard(sb)
    assert table.splitlines()[0] == "| measure (95% interval) | VARGPT v1 (`PRESET=v1`) | suite default |"
    assert "| VQA accuracy, test split | **0.7** [0.857, 0.918] | **0.8875** [0.857, 0.918] |" in table
    times = scoreboard.render_timings(sb)
    assert "`make stage1` **5 min 00 s**" in times and "`make pipeline` **25 min 00 s**" in times
    assert "`make test` **6 min 40 s**" in times
    # a clone that rebuilt its bases first keeps that time with its column; unknown columns are refused
    with pytest.raises(report.ReportError, match="column 'x' unknown"):
        scoreboard.publish_scoreboard(clone, "default", out, column="x")
    scoreboard.stamp("bases", time.time() - 3600, clone / "runs" / "timings.json")
    stale = json.loads(out.read_text())
    stale["presets"]["default-rebuilt"] = stale["presets"]["default"]  # a column this version no longer has
    out.write_text(json.dumps(stale))
    scoreboard.publish_scoreboard(clone, "default", out, note="The bases ran beside other jobs.")
    sb = json.loads(out.read_text())
    assert set(sb["presets"]) == {"default", "v1"}
    assert set(sb["presets"]["default"]["provenance"]["timings"]) == {"bases", "stage1", "pipeline"}
    table = scoreboard.render_scoreboard(sb)
    assert "`make clean-bases bases` 60 min 00 s, then `make stage1` 5 min 00 s" in table
    times = scoreboard.render_timings(sb)
    assert ("first rebuilt its bases: `make clean-bases bases` **60 min 00 s** (" in times
            and "the scoreboard's note on that column says under what load" in times)
    assert "evaluation seed None. The bases ran beside other jobs." in scoreboard.render_scoreboard(sb)


def _fake_clone(root, store, one_draw=0.3, tag=""):
    """A clone's runs/: a tiny MLflow store made with mlflow's API (three stages with validation
    curves, two evaluations, the newer one matching the report) and the pipeline report."""
    import shutil

    import mlflow
    from mlflow.entities import Metric, Param

    runs = root / "runs"
    runs.mkdir(parents=True)
    shutil.copyfile(store, runs / "mlflow.db")
    client = mlflow.MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    exp = client.create_experiment("vargpt-stages")
    now = int(time.time() * 1000)
    for stage, steps, vals in (("stage1", 20, [0.05, 0.1]), ("stage2", 30, [0.1, 0.12, 0.08]),
                               ("stage3", 20, [0.2, 0.25])):
        tags = {"git_commit": "b" * 40, "git_dirty": "false", **({"cpu_model": "Fake CPU"} if stage == "stage1" else {})}
        rid = client.create_run(exp, run_name=f"world{tag}-{stage}", tags=tags).info.run_id
        params = [Param(k, str(v)) for k, v in (("trainer.max_steps", steps), ("eval.num_gen", 8), ("eval.best_of", 1),
                                                ("params/total", 1000), ("params/trainable", 100))]
        every, metrics = steps // len(vals), []
        for i, v in enumerate(vals):
            s = (i + 1) * every - 1
            metrics += [Metric("val/gen_attr_mean", v, now, s), Metric("val/gen_attr_objects1_mean", 2 * v, now, s)]
            if stage != "stage2":
                metrics.append(Metric("val/acc_img", 0.3 + v, now, s))
        metrics += [Metric("train/acc_img", 0.25, now, s) for s in range(9, steps, 10)]
        client.log_batch(rid, metrics=metrics, params=params)
        client.set_terminated(rid)
    for v in (0.9, one_draw):  # an older evaluation, then the report's
        rid = client.create_run(exp, run_name=f"eval-world{tag}-stage3", tags={"git_commit": "c" * 40},
                                start_time=now + (1 if v == one_draw else 0)).info.run_id
        client.log_metric(rid, "eval/gen_attribute_accuracy_one_draw", v)
        client.set_terminated(rid)
    rep = json.loads(json.dumps(FAKE))
    rep["targets_met"] = {"gen_attribute_accuracy_one_draw>=0.50_minimum": False}
    rep["stage3"]["gen_one_draw"].update(mean=0.3, mean_ci95=[0.25, 0.36])
    rep["stage3"]["gen_one_draw"]["by_objects"]["1"]["prompts"] = 4.0
    rep["vqvae_reconstruction"]["attribute_accuracy_by_objects"] = {"1": 0.95, "2": 0.7}
    rep["real_vs_real"]["attribute_accuracy_by_objects"] = {"1": 1.0, "2": 0.9}
    (runs / f"pipeline{tag}").mkdir()
    (runs / f"pipeline{tag}" / "report.json").write_text(json.dumps(rep))
    (runs / "timings.json").write_text(json.dumps([{"target": f"pipeline{tag}", "commit": "bbbbbbb",
                                                    "cpu_model": "Timed CPU"}]))
    return root


def test_publish_limits_from_a_fake_store(tmp_path, empty_store):
    """publish limits reads the curves against cumulative steps, the newest evaluation, the ceiling,
    the floor and the by-object figures with run ids, commits and CPUs; the page renders them and
    keeps its reading; a report that is not the newest evaluation's is refused."""
    from experiments import limits

    clone = _fake_clone(tmp_path / "clone", empty_store)
    out = tmp_path / "world" / "limits.json"
    db_before = (clone / "runs" / "mlflow.db").read_bytes()
    limits.publish_limits(clone, out=out)
    assert (clone / "runs" / "mlflow.db").read_bytes() == db_before  # the clone's store is read from a copy
    d = json.loads(out.read_text())["presets"]["default"]
    st = {s["stage"]: s for s in d["stages"]}
    assert [st[s]["offset"] for s in ("stage1", "stage2", "stage3")] == [0, 20, 50]
    assert st["stage2"]["curves"]["val/gen_attr_mean"] == [[9, 0.1], [19, 0.12], [29, 0.08]]
    assert "val/acc_img" not in st["stage2"]["curves"] and len(st["stage3"]["curves"]["train/acc_img"]) == 2
    # CPU: the run's tag, else the timed make target of the same commit; commit from the run
    assert st["stage1"]["cpu_model"] == "Fake CPU" and st["stage3"]["cpu_model"] == "Timed CPU"
    assert st["stage1"]["commit"] == "bbbbbbb" and st["stage1"]["val_prompts"] == 8
    t = d["test"]
    assert t["commit"] == "ccccccc" and t["cpu_model"] == "not recorded" and t["one_draw"] == 0.3
    assert t["target"] == 0.5 and t["ceiling"] == 0.739 and t["floor"] == 0.95
    assert t["by_objects"]["2"] == {"prompts": None, "one_draw_mean": 0.4, "one_draw_all": 0.2, "ceiling": 0.7,
                                    "floor": 0.9}
    fig = out.with_suffix(".png")
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and fig.stat().st_size > 10000
    page = tmp_path / "limits.md"
    page.write_text("old\n<!-- finding: hand-written -->\n**Reading.** kept.\n<!-- /finding -->\n")
    text = limits.render_limits(out, page, report.FINDING_RE)
    assert "**Reading.** kept." in text and "old\n" not in text
    assert "| attribute accuracy, one draw, 200 test prompts | **0.300** [0.250, 0.360]" in text
    assert "| one draw as a share of the ceiling; distance under it | 0.41; 0.439 |" in text
    assert "| stage2 | 20 | 40 | 0.120 | n/a | 0.24 / n/a / n/a | n/a | n/a |" in text
    assert "| stage3 | 20 | 70 | 0.250 | n/a | 0.50 / n/a / n/a | 0.550 | n/a |" in text
    assert "| 2 | ? | 0.400 | 0.200 | 0.700 | 0.900 |" in text
    assert "| stage1 | `world-stage1` |" in text and "Timed CPU, from runs/timings.json, `make pipeline` of" in text
    assert "Not published yet" in limits.render_limits(tmp_path / "none.json", page, report.FINDING_RE)
    # the scoreboard block points at the page while the interval starts under the minimum
    rep = json.loads((clone / "runs" / "pipeline" / "report.json").read_text())
    sb = {"presets": {"default": {"report": rep, "provenance": {"commit": "c", "cpu_model": "x", "timings": {}}}}}
    assert "suite default 0.250 < 0.50" in scoreboard.render_scoreboard(sb) and "(docs/limits.md)" in scoreboard.render_scoreboard(sb)
    rep["stage3"]["gen_one_draw"]["mean_ci95"] = [0.55, 0.6]
    assert "docs/limits.md" not in scoreboard.render_scoreboard(sb)
    # a report from another evaluation than the store's newest is refused, naming both
    (clone / "runs" / "pipeline" / "report.json").write_text(json.dumps(
        {**rep, "stage3": {**rep["stage3"], "gen_one_draw": {**rep["stage3"]["gen_one_draw"], "mean": 0.9}}}))
    with pytest.raises(report.ReportError, match="0.9000 differs from the newest `eval-world-stage3`"):
        limits.publish_limits(clone, out=out)
    with pytest.raises(report.ReportError, match="make stage1 PRESET=v1 && make pipeline PRESET=v1"):
        limits.publish_limits(clone, v1_root=tmp_path / "nowhere", out=out)


def test_readme_speed_block_follows_the_comparison_files(tmp_path):
    """The README's speed rows are read from the two side-by-side results files: a changed figure
    in a file changes the README, and the target verdicts follow the figures."""
    src = REPO_ROOT / "benchmarks" / "results"
    for name in ("var_sampling_vs_official.json", "train_step_vs_official.json"):
        (tmp_path / name).write_text((src / name).read_text())
    block = report.render_speed(tmp_path)
    d = json.loads((tmp_path / "train_step_vs_official.json").read_text())
    big = [r for r in d["results"] if r["size"] == "large"]
    assert all(f"**{r['ratio_min']:.2f}x**" in block for r in big)
    assert all(f"| {r['suite_eager']['min_s']:.3f} | **{r['ratio_eager_min']:.2f}x** |" in block for r in big)  # eager rows
    for ratio, verdict in ((1.4, "for the training step **not met**"), (1.6, "for the training step met")):
        for r in big:  # every larger-size row at the ratio: the training-step verdict follows
            r["official"]["min_s"], r["ratio_min"] = r["suite"]["min_s"] * ratio, ratio
        (tmp_path / "train_step_vs_official.json").write_text(json.dumps(d))
        block2 = report.render_speed(tmp_path)
        assert verdict in block2 and f"**{ratio:.2f}x**" in block2
    (tmp_path / "train_step_vs_official.json").unlink()
    assert report.render_speed(tmp_path).startswith("(no results")
