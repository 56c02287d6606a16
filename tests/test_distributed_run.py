"""DDP with two CPU processes (gloo) through `python -m experiments.run`: ranks draw different
samples, one export, the in-loop evaluation runs once (rank 0) without deadlock, and a run
preempted under DDP resumes. The launcher's own subprocess launch (no pytest relaunch)."""
from __future__ import annotations

import os
import signal
import socket

import mlflow

from tests.test_long_runs import REPO, finish, overrides, start, wait_for, world  # noqa: F401 (fixture)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_cpu_ranks_sample_apart_export_once_and_resume(world, tmp_path):  # noqa: F811
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "ddp"
    os.environ["MASTER_PORT"] = str(_free_port())
    args = [str(REPO / "experiments/tiny/stage2.yaml"), *overrides(
        world, out, uri, "init_from=", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp",
        "trainer.num_threads=1", "data.num_workers=1", "trainer.log_sample_keys=true", "trainer.max_steps=150",
        "trainer.val_every_n_steps=50", "trainer.limit_val_batches=1", "checkpoint.every_n_minutes=0",
        "checkpoint.every_n_steps=10",
        "data.val_sources=[{name: v, shards: 'val/vqa-*.tar', task: understanding}]",
        "eval.vqa_shards=val/vqa-*.tar", "eval.num_vqa=4", "eval.gen_shards=", "eval.batch_size=4")]
    p = start(args)
    wait_for(out / "checkpoints" / "step-00000010.json", p)
    os.kill(p.pid, signal.SIGTERM)  # rank 0 only: the ranks agree to stop together
    log = finish(p, 180)
    assert p.returncode == 128 + signal.SIGTERM, log
    r0 = [ln.split()[1:] for ln in (out / "sample_keys.txt").read_text().splitlines()]
    r1 = [ln.split()[1:] for ln in (out / "sample_keys.rank1.txt").read_text().splitlines()]
    assert r0 and r1 and r0[:5] != r1[:5]  # independent streams per rank (resampled mode)
    assert not (out / "model.safetensors").exists()

    log = finish(start(args + ["--resume"]), 240)
    assert "weights:" in log and "resuming from" in log, log
    exports = sorted(p.name for p in out.glob("*.safetensors"))
    assert exports == ["model.safetensors"]  # one export, written once
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("vargpt-stage2").experiment_id])
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/vqa_accuracy")]
    assert steps == sorted(set(steps)) and len(steps) == 3  # at 50, 100, 150: once each, rank 0 only
    rows = [a.path for a in client.list_artifacts(run.info.run_id, "eval") if "vqa_rows" in a.path]
    assert len(rows) == 3  # one evaluation per validation (not one per rank, none at the preemption)
