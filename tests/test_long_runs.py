"""Long runs survive: faults injected on purpose against the real launcher.

Each run is `python -m experiments.run` in its own process group (a subprocess with a timeout;
the group is killed afterwards, so no loader worker outlives a test), on the tiny preset and a
tiny generated world: SIGKILL then --resume (exact), SIGTERM (checkpoint, non-zero exit, resume),
NaN losses in both modes, bad samples in training and evaluation shards, an unwritable output
dir, a full disk while checkpointing, two runs on a new MLflow store, a busy output dir.
"""
from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path
from typing import List

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from datamodules.world import generate_split
from experiments.run import main as run_main
from experiments.run_guard import RunLock
from tests.tiny import tiny_tokenizer_dir

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 240


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("lr_world")
    generate_split(str(root / "train"), "train", {"caption": 24, "vqa": 24, "gen": 24}, seed=0, size=32, shard_size=8)
    generate_split(str(root / "val"), "val", {"gen": 8, "vqa": 8}, seed=0, size=32)
    return root, tiny_tokenizer_dir(root)


def overrides(world, out: Path, uri: str, *extra: str) -> List[str]:
    root, tok = world
    return [f"model.tokenizer.path={tok}", f"data.root={root}", f"output_dir={out}", f"logging.tracking_uri={uri}",
            f"logging.artifact_root={out.parent / 'art'}", *extra]


def start(args: List[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def defaults():  # the test may run with SIGINT/SIGTERM ignored (a scheduler): children must not
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_DFL)

    return subprocess.Popen([sys.executable, "-m", "experiments.run", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=defaults)


def finish(p: subprocess.Popen, timeout: float = TIMEOUT) -> str:
    try:
        out, _ = p.communicate(timeout=timeout)
    finally:
        kill_group(p)
    return out


def kill_group(p: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        pass


def wait_for(path: Path, p: subprocess.Popen, timeout: float = TIMEOUT) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if p.poll() is not None:
            raise AssertionError(f"the run ended before {path} appeared:\n{p.stdout.read()}")
        if time.monotonic() - t0 > timeout:
            kill_group(p)
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.1)


def runs_of(uri: str, experiment: str):
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, ([] if exp is None else client.search_runs([exp.experiment_id]))


STAGE2 = str(REPO / "experiments/tiny/stage2.yaml")
EXACT = ["init_from=", "data.num_workers=2", "trainer.deterministic=true", "trainer.log_sample_keys=true",
         "trainer.max_steps=60", "checkpoint.every_n_steps=4", "checkpoint.every_n_minutes=0", "checkpoint.keep_last=3",
         "eval.vqa_shards=", "eval.gen_shards="]


def keys_consumed(out: Path) -> Counter:
    return Counter(k for ln in (out / "sample_keys.txt").read_text().splitlines() for k in ln.split()[1:])


def test_sigkill_at_a_random_step_then_resume_is_exact(world, tmp_path):
    """Done when: the resumed weights equal an uninterrupted run's bitwise, the sample keys are
    the same multiset (none repeated, none skipped), and MLflow shows one run, FINISHED."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    assert "weights:" in finish(start([STAGE2, *overrides(world, ref_out, f"sqlite:///{tmp_path / 'ref.db'}", *EXACT)]))

    p = start([STAGE2, *overrides(world, out, uri, *EXACT)])
    kill_at = random.Random().choice([4, 8, 12, 16, 20, 24])  # well before the run's 60 steps end
    wait_for(out / "checkpoints" / f"step-{kill_at:08d}.json", p)
    kill_group(p)  # SIGKILL to the trainer and its two loader workers
    p.wait(30)
    _, runs = runs_of(uri, "vargpt-stage2")
    assert [r.info.status for r in runs] == ["RUNNING"]  # a killed process cannot end its run
    assert not (out / "model.safetensors").exists()

    log = finish(start([STAGE2, *overrides(world, out, uri, *EXACT), "--resume"]))
    assert "resuming from" in log and "weights:" in log, log
    a, b = load_file(str(ref_out / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert diff == [], f"killed at step {kill_at}: {len(diff)} tensors differ, e.g. {diff[:3]}"
    assert keys_consumed(out) == keys_consumed(ref_out)
    assert sum(keys_consumed(out).values()) == 60 * 4  # 60 steps x batch 4
    _, runs = runs_of(uri, "vargpt-stage2")
    assert [r.info.status for r in runs] == ["FINISHED"]  # the same run, continued
    assert "vargpt.resumed_from" in runs[0].data.tags


def test_sigterm_checkpoints_exits_nonzero_and_resumes(world, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "run"
    args = [STAGE2, *overrides(world, out, uri, "init_from=", "trainer.max_steps=200", "trainer.log_sample_keys=true",
                               "checkpoint.every_n_minutes=0", "eval.vqa_shards=", "eval.gen_shards=")]
    p = start(args)
    wait_for(out / "sample_keys.txt", p)
    os.kill(p.pid, signal.SIGTERM)
    log = finish(p, 120)
    assert p.returncode == 128 + signal.SIGTERM, log
    assert "--resume" in log and "checkpoint" in log
    ckpts = sorted((out / "checkpoints").glob("step-*.ckpt"))
    assert ckpts and not (out / "model.safetensors").exists()
    client, runs = runs_of(uri, "vargpt-stage2")
    assert runs[0].info.status == "KILLED" and runs[0].data.tags["vargpt.preempted"].startswith("SIGTERM")
    log = finish(start(args + ["--resume"]))
    assert "weights:" in log, log
    _, runs2 = runs_of(uri, "vargpt-stage2")
    assert [r.info.run_id for r in runs2] == [runs[0].info.run_id] and runs2[0].info.status == "FINISHED"
    assert runs2[0].data.metrics["train/loss"] > 0 and client.get_metric_history(runs[0].info.run_id, "train/loss")[-1].step >= 199


def test_resume_refuses_another_config(world, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "run"
    base = overrides(world, out, uri, "init_from=", "trainer.max_steps=2", "eval.vqa_shards=", "eval.gen_shards=")
    assert run_main([STAGE2, *base]) == 0
    rc = run_main([STAGE2, *base, "optim.lr=0.5", "--resume"])
    assert rc == 1


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_nonfinite_loss_exports_nothing_and_says_so(world, tmp_path, mode, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "nan"
    rc = run_main([str(REPO / "experiments/tiny/stage1.yaml"), *overrides(
        world, out, uri, "optim.lr=1e30", "optim.warmup_ratio=0", "trainer.max_steps=20", f"trainer.on_nonfinite={mode}",
        "trainer.max_nonfinite_in_a_row=3", "checkpoint.every_n_minutes=0", "eval.vqa_shards=", "eval.gen_shards=")])
    err = capsys.readouterr().err
    assert rc == 1 and "non-finite loss" in err and "nothing is exported" in err, err
    assert ("3 steps in a row" in err) == (mode == "skip")
    assert not (out / "model.safetensors").exists()
    _, runs = runs_of(uri, "vargpt-stage1")
    assert runs[0].info.status == "FAILED"


def _bad_shards(root: Path) -> None:
    """Next to the good val shards: a truncated shard, a corrupt image, a record missing a field."""
    good = sorted((root / "val").glob("gen-*.tar"))[0]
    with tarfile.open(good) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    bad = root / "bad"
    bad.mkdir(exist_ok=True)

    def write(name, items):
        with tarfile.open(bad / name, "w") as t:
            for m, data in items:
                info = tarfile.TarInfo(m.name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))

    keys = sorted({m.name.split(".")[0] for m, _ in members})
    corrupt = [(m, b"not a png" if m.name.startswith(keys[0]) and m.name.endswith(".png") else d) for m, d in members]
    missing = [(m, d.replace(b'"messages"', b'"massages"') if m.name.startswith(keys[1]) and m.name.endswith(".json") else d)
               for m, d in members]
    write("gen-000000.tar", corrupt)
    write("gen-000001.tar", missing)
    write("gen-000002.tar", members)
    raw = (bad / "gen-000002.tar").read_bytes()
    (bad / "gen-000002.tar").write_bytes(raw[: len(raw) // 2])  # truncated mid-shard
    import json

    counts = {"gen-000000.tar": len(keys), "gen-000001.tar": len(keys), "gen-000002.tar": len(keys)}
    (bad / "manifest.json").write_text(json.dumps({"format": "vargpt-shards", "format_version": 1, "shards": [
        {"name": k, "task": "gen", "count": v} for k, v in counts.items()]}))


def test_bad_evaluation_and_training_samples_are_counted_not_fatal(world, tmp_path, capsys):
    from modules.evaluation import read_records

    root, _ = world
    _bad_shards(root)
    samples, bad = read_records("bad/gen-*.tar", str(root))
    good_in_truncated = len(samples) - 2 * 8 + 2  # two whole shards of 8 with one bad sample each
    assert bad == 2 + (8 - good_in_truncated), (bad, len(samples))  # every lost sample counted
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "bad"
    rc = run_main([str(REPO / "experiments/tiny/stage1.yaml"), *overrides(
        world, out, uri, "trainer.max_steps=12", "checkpoint.every_n_minutes=0", "trainer.val_every_n_steps=12",
        "data.sources=[{name: gen, shards: 'bad/gen-*.tar', task: generation}]",
        "data.val_sources=[{name: val, shards: 'val/gen-*.tar', task: generation}]", "eval.vqa_shards=",
        "eval.gen_shards=bad/gen-*.tar", "eval.num_gen=64", "eval.prompt_gain_samples=4")])
    err = capsys.readouterr()
    assert rc == 0, err
    _, runs = runs_of(uri, "vargpt-stage1")
    m = runs[0].data.metrics
    assert m["val/gen_num_unreadable"] == bad  # evaluation: skipped and counted exactly
    assert m["train/num_unreadable_total"] >= 1  # training: counted, never silently dropped


def test_unwritable_output_dir_fails_before_training(world, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    t0 = time.monotonic()
    rc = run_main([STAGE2, *overrides(world, blocker / "out", f"sqlite:///{tmp_path / 'm.db'}")])
    err = capsys.readouterr().err
    assert rc == 1 and str(blocker / "out") in err and "not writable" in err
    assert time.monotonic() - t0 < 20  # nothing was built


def test_full_disk_while_checkpointing_keeps_the_previous_one(world, tmp_path, monkeypatch, capsys):
    import errno

    import lightning.fabric.plugins.io.torch_io as torch_io

    from modules.checkpoint import checkpoint_info

    real, calls = torch_io._atomic_save, []

    def flaky(checkpoint, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(checkpoint, path)

    monkeypatch.setattr(torch_io, "_atomic_save", flaky)
    out = tmp_path / "enospc"
    rc = run_main([STAGE2, *overrides(world, out, f"sqlite:///{tmp_path / 'm.db'}", "init_from=", "trainer.max_steps=6",
                                      "checkpoint.every_n_steps=2", "checkpoint.every_n_minutes=0",
                                      "checkpoint.at_end=false", "eval.vqa_shards=", "eval.gen_shards=")])
    printed = capsys.readouterr().out
    assert rc == 0 and "could not be written (the disk is full)" in printed
    assert "step-00000002.ckpt is still usable" in printed
    assert checkpoint_info(out / "checkpoints" / "step-00000002.ckpt") is not None
    assert not (out / "checkpoints" / "step-00000004.ckpt").exists()
    assert checkpoint_info(out / "checkpoints" / "step-00000006.ckpt") is not None  # training went on
    assert (out / "model.safetensors").exists()


def test_two_runs_on_a_new_store_both_finish(tmp_path):
    uri = f"sqlite:///{tmp_path / 'new.db'}"
    procs = [start([str(REPO / "experiments/debug.yaml"), f"output_dir={tmp_path / f'd{i}'}",
                    f"logging.tracking_uri={uri}", f"logging.artifact_root={tmp_path / 'art'}",
                    "trainer.max_steps=3"]) for i in range(2)]
    logs = [finish(p) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    _, runs = runs_of(uri, "vargpt-debug")
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]


def test_busy_output_dir_refuses_and_a_dead_run_is_marked_failed(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    out = tmp_path / "busy"
    out.mkdir()
    args = [str(REPO / "experiments/debug.yaml"), f"output_dir={out}", f"logging.tracking_uri={uri}",
            f"logging.artifact_root={tmp_path / 'art'}", "trainer.max_steps=2"]
    lock = RunLock(out).acquire()
    try:
        assert run_main(args) == 1
        assert "is in use by another run" in capsys.readouterr().err
        # what a killed run leaves: its lock record naming a run that stays RUNNING
        client = mlflow.MlflowClient(uri)
        exp = client.create_experiment("vargpt-debug", artifact_location=(tmp_path / "art").as_uri())
        dead = client.create_run(exp).info.run_id
        lock.record(mlflow_run_id=dead)
    finally:
        lock.release()
    assert run_main(args) == 0
    assert mlflow.MlflowClient(uri).get_run(dead).info.status == "FAILED"


def test_compiled_run_killed_then_resumed_is_exact(world, tmp_path):
    """trainer.compile=always (the blocks compiled, what long CPU runs do by default): a run killed
    after a checkpoint and resumed ends with an uninterrupted compiled run's weights, bit for bit
    (the resumed process compiles the same dynamic-shape graphs)."""
    exact = [a for a in EXACT if not a.startswith("trainer.max_steps")] + ["trainer.max_steps=12", "trainer.compile=always"]
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    log = finish(start([STAGE2, *overrides(world, ref_out, f"sqlite:///{tmp_path / 'ref.db'}", *exact)]))
    assert "torch.compile:" in log and "weights:" in log, log
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    p = start([STAGE2, *overrides(world, out, uri, *exact)])
    wait_for(out / "checkpoints" / "step-00000004.json", p)
    kill_group(p)
    p.wait(30)
    log = finish(start([STAGE2, *overrides(world, out, uri, *exact), "--resume"]))
    assert "resuming from" in log and "torch.compile:" in log and "weights:" in log, log
    a, b = load_file(str(ref_out / "model.safetensors")), load_file(str(out / "model.safetensors"))
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert a.keys() == b.keys() and diff == [], f"{len(diff)} tensors differ, e.g. {diff[:3]}"
