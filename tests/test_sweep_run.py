"""The sweep launcher end to end on the debug stage (a few steps per variant), in a temporary
MLflow store: a four-variant sweep with one variant that crashes in its process, two at a time;
a relaunch that reruns only the failed variant; the comparison attached to the parent run.
Then, with stand-in children that cost no imports: Ctrl-C and SIGTERM marking running variants
KILLED, an evaluate sweep, and compare on a plain experiment. The launcher runs in the test process (its
imports are paid already); every variant runs in its own process as in real use."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from experiments import compare, sweep, sweep_launcher, sweep_schema, tracking
from experiments.config import REPO_ROOT

DEBUG = REPO_ROOT / "experiments" / "debug.yaml"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite MLflow store for this module's tests (sweeps keep apart by name): creating a
    store's tables costs 3-9 s on this machine, so it is paid once."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _sweep_file(tmp_path: Path, tracking_uri: str, name: str, body: str) -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(textwrap.dedent(f"""\
        name: {name}
        base: {DEBUG}
        metric: val/loss
        mode: min
        overrides:
          trainer.max_steps: 4
          trainer.val_every_n_steps: 2
          trainer.log_every_n_steps: 1
          trainer.save_checkpoint: false
          logging.tracking_uri: {tracking_uri}
          logging.artifact_root: {tmp_path / 'art'}
        """) + textwrap.dedent(body))
    return p


def _children(client, name):
    exp = client.get_experiment_by_name(f"sweep-{name}")
    return tracking.find_runs(client, [exp.experiment_id], {tracking.SWEEP_ID: name, tracking.SWEEP_ROLE: "child"})


def test_micro_sweep_failure_rerun_parallel_and_compare(tmp_path, store, capsys):
    tracking_uri = store
    path = _sweep_file(tmp_path, tracking_uri, "micro", """\
        variants:
          - {name: lr_low, overrides: {optim.lr: 0.003}}
          - {name: lr_high, overrides: {optim: {lr: 0.03}}}
          - {name: linear, overrides: {model.und_projector.name: linear}}
          # Valid config, but the projector refuses depth 0 when the child builds it: a crash
          # inside the variant's process, not a config error.
          - {name: broken, overrides: {model.und_projector.depth: 0}}
        """)
    out_dir = tmp_path / "out"
    t0 = time.perf_counter()
    # The launcher in this process (its imports are paid already); the variants in their own.
    rc = sweep.main([str(path), "--max-parallel", "2", "--out-dir", str(out_dir)])
    t_first = time.perf_counter() - t0
    first = capsys.readouterr()
    assert rc == 1, first.out + first.err  # exit status = number of failed variants
    lines = first.out.splitlines()
    # Two at a time: the second variant started before any variant ended.
    i_start2 = next(i for i, l in enumerate(lines) if l.startswith("[sweep] start 2/4"))
    i_end1 = next(i for i, l in enumerate(lines) if l.startswith(("[sweep] FINISHED", "[sweep] FAILED")))
    assert i_start2 < i_end1, first.out

    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    runs = _children(client, "micro")
    by_variant = {r.data.tags[tracking.SWEEP_VARIANT]: r for r in runs}
    assert sorted(by_variant) == ["broken", "linear", "lr_high", "lr_low"] and len(runs) == 4
    assert {v: r.info.status for v, r in by_variant.items()} == {
        "lr_low": "FINISHED", "lr_high": "FINISHED", "linear": "FINISHED", "broken": "FAILED"}
    (parent,) = tracking.find_runs(client, [runs[0].info.experiment_id],
                                   {tracking.SWEEP_ID: "micro", tracking.SWEEP_ROLE: "parent"})
    assert parent.info.status == "FAILED"
    for r in runs:  # nested under the parent in the UI, tagged with what they change
        assert r.data.tags[tracking.PARENT_RUN_ID] == parent.info.run_id
    assert by_variant["lr_high"].data.tags[tracking.SWEEP_OVERRIDES] == '{"optim.lr": 0.03}'
    assert by_variant["lr_high"].data.params["optim.lr"] == "0.03"
    # Both variants of the first pair ran at the same time, each with its share of the cores.
    a, b = by_variant["lr_low"].data.tags, by_variant["lr_high"].data.tags
    assert float(b["sweep_proc_start"]) < float(a["sweep_proc_end"]) and \
        float(a["sweep_proc_start"]) < float(b["sweep_proc_end"])
    assert by_variant["lr_low"].data.params["trainer.num_threads"] == str(sweep_launcher.thread_budget(2))
    # The crash: FAILED with its traceback and the process log as artifacts.
    broken = by_variant["broken"].info.run_id
    arts = {a.path for a in client.list_artifacts(broken)} | {a.path for a in client.list_artifacts(broken, "sweep")}
    assert {"traceback.txt", "sweep/broken.log"} <= arts
    tb = Path(client.download_artifacts(broken, "traceback.txt", str(tmp_path / "dl"))).read_text()
    assert tb.startswith("Traceback (most recent call last):") and "projector depth must be >= 1" in tb
    assert (out_dir / "broken.log").is_file() and "Traceback" in (out_dir / "broken.log").read_text()
    # The launcher compared at the end: report attached to the parent run.
    parent_arts = {a.path for a in client.list_artifacts(parent.info.run_id, "compare")}
    assert {"compare/table.md", "compare/table.csv", "compare/curves_val_loss.png",
            "compare/metric_vs_optim.lr.png"} <= parent_arts, parent_arts

    # Relaunch: the three finished variants are skipped (same config hash), the failed one reruns.
    t0 = time.perf_counter()
    rc = sweep.main([str(path), "--out-dir", str(out_dir), "--no-compare"])
    t_second = time.perf_counter() - t0
    second = capsys.readouterr()
    assert rc == 1, second.out + second.err
    assert second.out.count("[sweep] skip ") == 3 and "start 1/1 broken" in second.out
    runs2 = _children(client, "micro")
    assert len(runs2) == 5
    new = [r for r in runs2 if r.info.run_id not in {r.info.run_id for r in runs}]
    assert [(r.data.tags[tracking.SWEEP_VARIANT], r.info.status) for r in new] == [("broken", "FAILED")]

    # The comparison, as `python -m experiments.compare micro` does it.
    cmp_dir = tmp_path / "cmp"
    assert compare.main(["micro", "--tracking-uri", tracking_uri, "--out-dir", str(cmp_dir)]) == 0
    rows = list(csv.DictReader((cmp_dir / "table.csv").open()))
    assert [r["variant"] for r in rows][-1] == "broken" and len(rows) == 4
    finished = [float(r["val/loss best"]) for r in rows[:3]]
    assert finished == sorted(finished) and all(r["status"] == "FINISHED" for r in rows[:3])
    assert {"optim.lr", "model.und_projector.name", "model.und_projector.depth"} <= set(rows[0])
    pngs = sorted(p.name for p in cmp_dir.glob("*.png"))
    assert "metric_vs_optim.lr.png" in pngs and "metric_vs_model.und_projector.name.png" in pngs
    assert "curves_val_loss.png" in pngs and "curves_train_loss.png" in pngs
    assert all((cmp_dir / p).stat().st_size > 5000 for p in pngs)
    with capsys.disabled():
        print(f"\n[timing] first launch (4 variants, 2 at a time) {t_first:.1f}s, relaunch {t_second:.1f}s")


def test_relaunch_resumes_an_interrupted_variant_into_its_own_run(tmp_path, store, capsys):
    """A variant killed mid-run (its run KILLED, its last checkpoint at step 2 of 4): the relaunched
    sweep passes --resume, the child continues the same MLflow run, and the launcher finds it
    there (the new launch's attempt tag goes on the resumed run) and records it FINISHED."""
    import mlflow

    path = _sweep_file(tmp_path, store, "resumable", """\
        variants:
          - {name: only, overrides: {checkpoint.every_n_steps: 2}}
        """)
    out_dir = tmp_path / "out"
    assert sweep.main([str(path), "--out-dir", str(out_dir), "--no-compare"]) == 0
    capsys.readouterr()
    client = mlflow.MlflowClient(store)
    (run,) = _children(client, "resumable")
    ckpts = out_dir / "only" / "checkpoints"
    for f in ckpts.glob("step-00000004.*"):  # the process died after step 2's checkpoint
        f.unlink()
    client.set_terminated(run.info.run_id, "KILLED")
    assert sweep.main([str(path), "--out-dir", str(out_dir), "--no-compare"]) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert "FINISHED only" in out, out
    (after,) = _children(client, "resumable")  # no second run: the same one, continued
    assert after.info.run_id == run.info.run_id and after.info.status == "FINISHED"
    assert after.data.tags[tracking.SWEEP_ATTEMPT] != run.data.tags[tracking.SWEEP_ATTEMPT]
    assert "step 2" in after.data.tags["vargpt.resumed_from"]
    assert "resuming from" in (out_dir / "only.log").read_text()
    # validation every 2 steps (logged at Lightning's 0-based steps 1 and 3): the resumed process
    # ran steps 3-4 again (the faked death came after them) and logged step 3's again, into this run
    hist = client.get_metric_history(run.info.run_id, "val/loss")
    assert sorted({m.step for m in hist}) == [1, 3] and len(hist) == 3


# A stand-in variant: no imports, reports the dispositions it started with and every stop signal
# it gets; a stubborn one ignores them (the launcher must escalate to SIGKILL).
_CHILD = textwrap.dedent("""\
    import signal, sys, time
    ignored = [s.name for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) == signal.SIG_IGN]
    def on_signal(signum, frame):
        print("GOT " + signal.Signals(signum).name, flush=True)
        if not STUBBORN:
            sys.exit(1)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    print("READY; ignored at start: %s" % ignored, flush=True)
    while True:
        time.sleep(120)
    """)


def _stop_a_running_sweep(tmp_path, store, monkeypatch, capsys, name: str, signum: int):
    """Launch a three-variant sweep two at a time in this process with stand-in children, send
    ``signum`` to this process once both children are up, and return (exit status, stdout,
    child pids, the children's log lines by variant). This process ignores SIGINT and SIGTERM
    meanwhile, as a job started by a scheduler may: the launcher must install its own handlers.
    Variant optim.lr=0.2 is stubborn; the stop sequences get short graces."""
    import threading

    path = _sweep_file(tmp_path, store, name, """\
        grid:
          optim.lr: [0.1, 0.2, 0.3]
        """)
    out_dir = tmp_path / "o"
    pids = []
    real_popen = subprocess.Popen

    def fake_argv(s, v, out_dir, threads):
        return [sys.executable, "-c", f"STUBBORN = {v.name == 'optim.lr=0.2'}\n" + _CHILD]

    def spy_popen(argv, *a, **k):  # (git_info's subprocess.run goes through Popen too)
        p = real_popen(argv, *a, **k)
        if "STUBBORN" in " ".join(map(str, argv)):
            pids.append(p.pid)
        return p

    def lines(log: Path):  # the child's own output (the "$ python ..." lines that quote the script start otherwise)
        return [l for l in log.read_text().splitlines() if l.startswith(("READY", "GOT "))] if log.is_file() else []

    monkeypatch.setattr(sweep_launcher, "child_argv", fake_argv)
    monkeypatch.setattr(sweep_launcher.subprocess, "Popen", spy_popen)
    monkeypatch.setitem(sweep_launcher.STOP_SEQUENCE, signal.SIGINT,
                        ((signal.SIGINT, 2.0), (signal.SIGTERM, 2.0), (signal.SIGKILL, 10.0)))
    monkeypatch.setitem(sweep_launcher.STOP_SEQUENCE, signal.SIGTERM, ((signal.SIGTERM, 2.0), (signal.SIGKILL, 10.0)))
    finished = threading.Event()

    def signal_when_running():
        deadline = time.time() + 60
        while time.time() < deadline and not finished.is_set():
            if sum(any(l.startswith("READY") for l in lines(f)) for f in out_dir.glob("*.log")) >= 2:
                break
            time.sleep(0.05)
        os.kill(os.getpid(), signum)
        # Watchdog: if the launcher missed the signal, end its children so the test fails fast.
        deadline = time.time() + 90
        while not finished.wait(0.5):
            if time.time() > deadline:
                for pid in list(pids):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass

    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    timer = threading.Thread(target=signal_when_running, daemon=True)
    try:
        timer.start()
        rc = sweep.main([str(path), "--max-parallel", "2", "--out-dir", str(out_dir), "--no-compare"])
    finally:
        finished.set()
        timer.join(5)
        for s, h in previous.items():
            signal.signal(s, h)
    out = capsys.readouterr().out
    logs = {v: lines(out_dir / f"{v}.log") for v in ("optim.lr=0.1", "optim.lr=0.2", "optim.lr=0.3")}
    return rc, out, pids, logs


def _check_killed(store, name, out, pids):
    """The running variants were reaped and are KILLED (with their logs), the parent too."""
    assert len(pids) == 2, out  # the third variant never started
    for pid in pids:  # the children are gone (reaped by the launcher)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    import mlflow

    client = mlflow.MlflowClient(store)
    runs = _children(client, name)
    assert sorted((r.data.tags[tracking.SWEEP_VARIANT], r.info.status) for r in runs) == \
        [("optim.lr=0.1", "KILLED"), ("optim.lr=0.2", "KILLED")], out
    assert all(r.data.tags[tracking.PARENT_RUN_ID] for r in runs)
    (parent,) = tracking.find_runs(client, [runs[0].info.experiment_id],
                                   {tracking.SWEEP_ID: name, tracking.SWEEP_ROLE: "parent"})
    assert parent.info.status == "KILLED"
    log_art = {a.path for a in client.list_artifacts(runs[0].info.run_id, "sweep")}
    assert log_art == {f"sweep/{runs[0].data.tags[tracking.SWEEP_VARIANT]}.log"}


def test_ctrl_c_stops_children_and_marks_them_killed(tmp_path, store, monkeypatch, capsys):
    """The launcher's side of Ctrl-C, with stand-in children: the running ones get SIGINT by
    process group (then SIGTERM, SIGKILL if they ignore it), are marked KILLED, the parent too,
    and the exit is 130; also when the launcher's process started with SIGINT ignored."""
    rc, out, pids, logs = _stop_a_running_sweep(tmp_path, store, monkeypatch, capsys, "stopfast", signal.SIGINT)
    assert rc == 130, out
    _check_killed(store, "stopfast", out, pids)
    # Children start with default dispositions (not the launcher's inherited ignore).
    assert logs["optim.lr=0.1"] == ["READY; ignored at start: []", "GOT SIGINT"], logs
    assert logs["optim.lr=0.2"] == ["READY; ignored at start: []", "GOT SIGINT", "GOT SIGTERM"], logs
    assert logs["optim.lr=0.3"] == []


def test_sigterm_forwards_sigterm_then_kills(tmp_path, store, monkeypatch, capsys):
    """SIGTERM to the launcher (a scheduler's stop): the children get SIGTERM, SIGKILL after the
    grace period, are marked KILLED, and the exit is 143."""
    rc, out, pids, logs = _stop_a_running_sweep(tmp_path, store, monkeypatch, capsys, "stopterm", signal.SIGTERM)
    assert rc == 143, out
    _check_killed(store, "stopterm", out, pids)
    assert logs["optim.lr=0.1"] == ["READY; ignored at start: []", "GOT SIGTERM"], logs
    assert logs["optim.lr=0.2"] == ["READY; ignored at start: []", "GOT SIGTERM"], logs  # then SIGKILL


@pytest.mark.slow
def test_ctrl_c_marks_the_running_variant_killed(tmp_path, tracking_uri):
    """The same through the real command line and a real training child (Lightning's own
    graceful shutdown runs first)."""
    path = _sweep_file(tmp_path, tracking_uri, "stop", """\
        grid:
          trainer.max_steps: [1000000, 3]
        """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "experiments.sweep", str(path), "--out-dir", str(tmp_path / "o")],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    log = tmp_path / "o" / "trainer.max_steps=1000000.log"
    try:
        deadline = time.time() + 120
        # Wait until the long variant is training (Lightning has created its MLflow run).
        while not (log.is_file() and _training(log)):
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else ""
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, out
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    runs = _children(client, "stop")
    assert [(r.data.tags[tracking.SWEEP_VARIANT], r.info.status) for r in runs] == \
        [("trainer.max_steps=1000000", "KILLED")], out  # the second variant never started
    (parent,) = tracking.find_runs(client, [runs[0].info.experiment_id], {tracking.SWEEP_ROLE: "parent"})
    assert parent.info.status == "KILLED"


def _training(log: Path) -> bool:
    # Lightning prints the accelerator lines after the run's logger exists and fit has begun;
    # give it a moment more so the first steps run.
    if "TPU available" not in log.read_text():
        return False
    time.sleep(2.0)
    return True


def test_compare_any_experiment(tmp_path, store):
    """compare on a plain MLflow experiment (no sweep): params that differ are the columns,
    the report goes to a `compare` run in that experiment."""
    import mlflow

    client = mlflow.MlflowClient(store)
    exp_id = client.create_experiment("plain", artifact_location=(tmp_path / "art").as_uri())
    for i, (lr, depth, acc) in enumerate([(0.1, 1, [0.5, 0.7]), (0.01, 1, [0.6, 0.9]), (0.01, 2, [0.8, 0.6])]):
        run = client.create_run(exp_id, run_name=f"r{i}")
        # name, logging.*, checkpoint.*, trainer.num_threads differ without being a choice the
        # runs compare (the config hash leaves them out), so they are no columns
        for k, v in {"optim.lr": lr, "model.depth": depth, "seed": 0, "name": f"r{i}", "logging.experiment": "plain",
                     "checkpoint.every_n_steps": 100 * (i + 1), "trainer.num_threads": i + 1}.items():
            client.log_param(run.info.run_id, k, v)
        for step, a in enumerate(acc):
            client.log_metric(run.info.run_id, "val/acc", a, step=step)
            client.log_metric(run.info.run_id, "train/loss", 1.0 - a, step=step)
            client.log_metric(run.info.run_id, "system/cpu_utilization_percentage", 50.0 + step, step=step)
        client.set_terminated(run.info.run_id)
    report = compare.compare("plain", tracking_uri=store, out_dir=tmp_path / "c", quiet=True)
    # MLflow's system monitor is bookkeeping: last among the metrics, no curve, and not among the
    # shown ones (table.md); table.csv keeps it as one final column
    assert report.metrics[-1] == "system/cpu_utilization_percentage"
    assert report.shown == ["train/loss", "val/acc"]
    header = (tmp_path / "c" / "table.md").read_text().splitlines()[2]
    assert "system/" not in header and "| time |" in header
    csv_header = (tmp_path / "c" / "table.csv").read_text().splitlines()[0].split(",")
    assert "system/cpu_utilization_percentage" in csv_header and "system/cpu_utilization_percentage best" not in csv_header
    assert report.kind == "experiment" and report.metric == "train/loss" and report.mode == "min"
    assert report.keys == ["model.depth", "optim.lr"]  # not seed (same everywhere), not name/logging/checkpoint/threads
    # best train/loss: r1 0.1, r2 0.2, r0 0.3
    assert [r.name for r in report.rows] == ["r1", "r2", "r0"]
    report = compare.compare("plain", tracking_uri=store, out_dir=tmp_path / "c", metric="val/acc", rank="final",
                             quiet=True)
    assert report.mode == "max" and [r.name for r in report.rows] == ["r1", "r0", "r2"]  # final 0.9, 0.7, 0.6
    md = (tmp_path / "c" / "table.md").read_text()
    assert "| 1 | r1 | FINISHED | 1 | 0.01 |" in md
    assert {p.name for p in (tmp_path / "c").glob("*.png")} == {
        "metric_vs_model.depth.png", "metric_vs_optim.lr.png", "curves_val_acc.png", "curves_train_loss.png",
        "curves.png"}
    data = json.loads((tmp_path / "c" / "report.json").read_text())
    assert data["shown"] == ["val/acc", "train/loss"] and [r["name"] for r in data["rows"]] == ["r1", "r0", "r2"]
    assert data["rows"][0]["history"]["val/acc"] == [[0, 0.6], [1, 0.9]]
    # a declared short list wins over the defaults; metrics no run logged are left out
    declared = compare.compare("plain", tracking_uri=store, out_dir=tmp_path / "d", metric="val/acc", quiet=True,
                               metrics=["nope/x"], log=False)
    assert declared.shown == ["val/acc", "train/loss"]  # nothing declared beyond the ranking one: the fallback
    assert compare.shown_metrics("val/a", ["val/a", "val/b", "val/c"], ["val/c", "val/z"], []) == ["val/a", "val/c"]
    assert compare.shown_metrics("val/loss", ["val/loss", "train/loss", "val/x", "lr"], [], ["debug"]) == \
        ["val/loss", "train/loss"]
    (cmp_run,) = tracking.find_runs(client, [exp_id], {tracking.SWEEP_ROLE: "compare"})
    assert cmp_run.info.run_id == report.logged_to and cmp_run.info.run_name == "compare"
    assert "compare/table.csv" in {a.path for a in client.list_artifacts(cmp_run.info.run_id, "compare")}
    # The compare run itself is not a row the next time.
    assert len(compare.compare("plain", tracking_uri=store, out_dir=tmp_path / "c", quiet=True).rows) == 3
    with pytest.raises(compare.CompareError, match="no sweep or MLflow experiment named 'nope'.*plain"):
        compare.compare("nope", tracking_uri=store, quiet=True)


def test_evaluate_sweep_logs_each_report_as_a_child_run(tmp_path, store, monkeypatch, capsys):
    """command: evaluate (e.g. a cfg sweep on one checkpoint): the launcher turns each variant's
    JSON report into its child run. The evaluation itself is stood in for by a tiny script."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.yaml").write_text("name: x\n")
    path = _sweep_file(tmp_path, store, "evalcfg", f"""\
        command: evaluate
        checkpoint: {ckpt}
        args: [--tasks, generation]
        grid:
          eval.cfg: [1.0, 3.0]
        """)
    path.write_text(path.read_text().replace("metric: val/loss", "metric: eval/fid"))
    seen = []

    def fake_argv(s, v, out_dir, threads):
        real = sweep_launcher.child_argv.__wrapped__(s, v, out_dir, threads)
        seen.append(real)
        g = v.loaded.cfg.eval.cfg
        report = {"fid": 10.0 - g, "inception_score": g, "vqa_per_type": {"color": 0.5}, "protocol": {"cfg": g}}
        out = sweep_schema.eval_report_path(out_dir, v)
        code = (f"import json, pathlib; p = pathlib.Path({str(out)!r}); p.parent.mkdir(parents=True, exist_ok=True); "
                f"p.write_text(json.dumps({report!r}))")
        return [sys.executable, "-c", code]

    fake_argv.__wrapped__ = sweep_launcher.child_argv  # type: ignore[attr-defined]
    monkeypatch.setattr(sweep_launcher, "child_argv", fake_argv)
    rc = sweep.main([str(path), "--out-dir", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert seen[0][1:4] == ["-m", "experiments.evaluate", str(ckpt)] and "eval.cfg=1.0" in seen[0]
    assert seen[0][-3:] == ["--no-mlflow", "--tasks", "generation"]
    import mlflow

    client = mlflow.MlflowClient(store)
    runs = _children(client, "evalcfg")
    assert sorted((r.data.tags[tracking.SWEEP_VARIANT], r.info.status) for r in runs) == \
        [("eval.cfg=1.0", "FINISHED"), ("eval.cfg=3.0", "FINISHED")]
    r3 = next(r for r in runs if r.data.tags[tracking.SWEEP_VARIANT] == "eval.cfg=3.0")
    assert r3.data.metrics["eval/fid"] == 7.0 and r3.data.metrics["eval/vqa_color"] == 0.5
    assert r3.data.params["eval.cfg"] == "3.0" and "eval.json" in {a.path for a in client.list_artifacts(r3.info.run_id)}
    rows = list(csv.DictReader((tmp_path / "o" / "compare" / "table.csv").open()))
    assert [r["variant"] for r in rows] == ["eval.cfg=3.0", "eval.cfg=1.0"]  # lower FID first
    # Relaunch: both finished, nothing runs.
    assert sweep.main([str(path), "--out-dir", str(tmp_path / "o"), "--no-compare"]) == 0
    assert capsys.readouterr().out.count("[sweep] skip ") == 2
