"""The launcher end to end: a tiny run logs every required field to MLflow, and the MLflow
server (what `make mlflow-ui` starts) serves it over its REST API on 127.0.0.1."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from experiments import tracking
from experiments.config import REPO_ROOT, load_config
from tests.conftest import free_port


def _run(args, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120, **kw)


def test_cli_dry_run_applies_override_and_rejects_typos():
    ok = _run(["experiments/debug.yaml", "--dry-run", "optim.lr=0.001"])
    assert ok.returncode == 0, ok.stderr
    assert "lr: 0.001" in ok.stdout and "config_hash=" in ok.stdout
    bad = _run(["experiments/debug.yaml", "--dry-run", "optim.lrr=1"])
    assert bad.returncode != 0
    assert "optim.lrr" in bad.stderr and "command line" in bad.stderr
    comp = _run(["experiments/debug.yaml", "--dry-run", "model.und_projector.name=transformer"])
    assert comp.returncode != 0 and "valid choices: linear, mlp" in comp.stderr


def test_default_store_is_sqlite_under_runs(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(REPO_ROOT / "experiments/debug.yaml").cfg
    assert tracking.tracking_uri(cfg) == f"sqlite:///{REPO_ROOT / 'runs' / 'mlflow.db'}"
    assert tracking.artifact_root(cfg) == REPO_ROOT / "runs" / "mlartifacts"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/elsewhere.db")
    assert tracking.tracking_uri(cfg) == "sqlite:////tmp/elsewhere.db"
    cfg.logging.tracking_uri = "sqlite:////tmp/key.db"  # the config key beats the env var
    assert tracking.tracking_uri(cfg) == "sqlite:////tmp/key.db"


def _get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (loopback only)
        return r.status, r.read().decode()


def test_two_runs_creating_one_experiment_both_get_it(tmp_path, tracking_uri):
    # make pipeline starts stage 1 and the understanding-only run together: both may find no
    # experiment and try to create it; the loser must take the winner's id, not crash
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    first = tracking.ensure_experiment(client, "vargpt-race", tmp_path / "art")

    class Late(mlflow.MlflowClient):  # saw "no experiment" just before the other process made it
        def get_experiment_by_name(self, name):
            self._seen = getattr(self, "_seen", 0) + 1
            return None if self._seen == 1 else super().get_experiment_by_name(name)

    assert tracking.ensure_experiment(Late(tracking_uri), "vargpt-race", tmp_path / "art") == first


def test_init_store_creates_the_tables_once(tmp_path):
    uri = f"sqlite:///{tmp_path / 'new.db'}"
    tracking.init_store(uri)
    assert (tmp_path / "new.db").is_file()
    tracking.init_store(uri)  # idempotent


def test_tiny_run_logs_everything_and_server_serves_it(tmp_path, tracking_uri):
    from experiments.run import fit

    out = tmp_path / "out"
    loaded = load_config(REPO_ROOT / "experiments/debug.yaml", [
        f"logging.tracking_uri={tracking_uri}", f"logging.artifact_root={tmp_path / 'art'}",
        f"output_dir={out}", "trainer.max_steps=20", "trainer.val_every_n_steps=10", "trainer.enable_progress_bar=false",
    ])
    weights = fit(loaded)
    assert weights == out / "model.safetensors" and weights.is_file() and (out / "config.yaml").is_file()

    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("vargpt-debug")
    (run,) = client.search_runs([exp.experiment_id])
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    assert run.info.status == "FINISHED"
    assert len(tags["git_commit"]) in (40, 7) or tags["git_commit"] == "unknown"
    assert tags["git_dirty"] in ("true", "false", "unknown")
    assert tags["config_hash"] == loaded.hash and tags["stage"] == "debug"
    assert params["optim.lr"] == "0.01" and params["trainer.max_steps"] == "20"
    assert int(params["params/total"]) == int(params["params/trainable"]) > 0
    assert {"train/loss", "train/lr", "val/loss"} <= set(metrics)
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert losses[-1] < losses[0]
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "trainable_parameters.txt"} <= arts
    assert run.info.artifact_uri.startswith((tmp_path / "art").as_uri())

    # The dashboard: mlflow server on a free loopback port, queried through REST, stopped.
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", tracking_uri,
         "--default-artifact-root", str(tmp_path / "art")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.time() + 90
        while True:
            try:
                if _get(f"http://127.0.0.1:{port}/health")[0] == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"mlflow server did not become healthy (rc={proc.poll()})")
            time.sleep(0.5)
        status, body = _get(f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/get?run_id={run.info.run_id}")
        got = json.loads(body)["run"]
        assert status == 200 and got["info"]["run_id"] == run.info.run_id
        assert {t["key"]: t["value"] for t in got["data"]["tags"]}["config_hash"] == loaded.hash
        assert any(m["key"] == "train/loss" for m in got["data"]["metrics"])
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
