"""What the MLflow dashboard reads: experiments open as model training (not on the GenAI overview),
training runs carry system metrics beside their own, benchmark results are one run per checkpoint
with a metric per task."""
from __future__ import annotations

import json

from experiments import tracking
from experiments.config import REPO_ROOT, load_config


def test_experiments_carry_the_training_kind_tag(tmp_path, tracking_uri):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    new = tracking.ensure_experiment(client, "vargpt-new", tmp_path / "art")
    assert client.get_experiment(new).tags[tracking.EXPERIMENT_KIND_TAG] == tracking.TRAINING_KIND
    old = client.create_experiment("vargpt-old")  # made before the tag existed
    assert tracking.EXPERIMENT_KIND_TAG not in client.get_experiment(old).tags
    assert tracking.ensure_experiment(client, "vargpt-old", tmp_path / "art") == old
    assert client.get_experiment(old).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_training_run_logs_system_metrics(tmp_path, tracking_uri, monkeypatch):
    from experiments.run import fit

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    loaded = load_config(REPO_ROOT / "experiments/debug.yaml", [
        f"logging.tracking_uri={tracking_uri}", f"logging.artifact_root={tmp_path / 'art'}",
        f"output_dir={tmp_path / 'out'}", "trainer.max_steps=20", "trainer.val_every_n_steps=0",
        "trainer.enable_progress_bar=false"])
    fit(loaded)
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("vargpt-debug")
    assert exp.tags[tracking.EXPERIMENT_KIND_TAG] == tracking.TRAINING_KIND
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    assert "train/loss" in m
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(m), sorted(m)


def test_system_metrics_can_be_turned_off(tmp_path, tracking_uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    assert not tracking.system_metrics_enabled()
    loaded = load_config(REPO_ROOT / "experiments/debug.yaml", [f"logging.tracking_uri={tracking_uri}",
                                                                 f"logging.artifact_root={tmp_path / 'art'}"])
    assert type(tracking.make_logger(loaded)).__name__ == "MLFlowLogger"
    monkeypatch.delenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING")
    assert tracking.system_metrics_enabled()


def test_benchmark_results_are_one_run_per_checkpoint(tmp_path, tracking_uri):
    """experiments.eval_benchmarks: one run per checkpoint in vargpt-benchmarks, a metric per task,
    and a later evaluation of the same checkpoint adds to that run (lmms-eval itself not needed)."""
    import mlflow

    from experiments import eval_benchmarks as eb

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.yaml").write_text("name: world-stage2\nstage: stage2\n")
    (ckpt / "export.json").write_text(json.dumps({"files": {"model.safetensors": {"sha256": "ab" * 32}}}))
    results = {"results": {"vqav2_val": {"alias": "vqav2_val", "exact_match,none": 0.5,
                                         "exact_match_stderr,none": 0.1},
                           "mme": {"mme_perception_score,none": 1400.0, "mme_cognition_score,none": 300.0}},
               "n-samples": {"vqav2_val": {"original": 10, "effective": 10}}}
    tasks = eb.summarize(results)
    assert tasks["vqav2_val"]["value"] == 50.0 and tasks["mme"]["value"] == 1400.0
    assert tasks["vqav2_val"]["metrics"] == {"exact_match": 0.5}
    table = eb.paper_table("world-stage2", tasks)
    assert table.splitlines()[0].startswith("| checkpoint | MMBench | SEED | MMMU | POPE | MME-P | VQAv2 |")
    assert "| world-stage2 | - | - | - | - | 1400.0 | 50.0 |" in table
    files = [tmp_path / "r.json"]
    files[0].write_text("{}")
    summary = {"checkpoint": str(ckpt), "checkpoint_id": eb.checkpoint_id(ckpt), "name": eb.checkpoint_name(ckpt),
               "stage": "stage2", "tasks": tasks, "limit": 0, "batch_size": 1, "model_args": "",
               "lmms_eval_version": "0.7.3", "stamp": "t1"}
    assert summary["checkpoint_id"] == "ab" * 32 and summary["name"] == "world-stage2"
    rid = eb.log_mlflow(ckpt, summary, files, tracking_uri)
    more = dict(summary, tasks=eb.summarize({"results": {"vargpt_world_vqa": {"exact_match,none": 0.75}}}), stamp="t2")
    assert eb.log_mlflow(ckpt, more, files, tracking_uri) == rid
    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(eb.EXPERIMENT)
    assert exp.tags[tracking.EXPERIMENT_KIND_TAG] == tracking.TRAINING_KIND
    (run,) = client.search_runs([exp.experiment_id])
    m = run.data.metrics
    assert m["bench/vqav2_val"] == 50.0 and m["bench/mme"] == 1400.0 and m["bench/vargpt_world_vqa"] == 75.0
    assert m["bench/mme/mme_cognition_score"] == 300.0
    assert run.data.tags["tasks"] == "mme,vargpt_world_vqa,vqav2_val" and run.info.run_name == "world-stage2"
