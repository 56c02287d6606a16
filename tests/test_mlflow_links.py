"""The MLflow dashboard links the suite prints. MLflow 3.17's UI opens an experiment as GenAI
(overview, traces, judges) unless the URL carries workflowType=machine_learning or the browser's
sidebar toggle was set to Model training; it does not read the experiment's mlflow.experimentKind
tag for that (https://github.com/mlflow/mlflow/issues/24498). So every printed link must go straight
to a runs page and carry the parameter; these tests check the links' form, not a browser."""
from __future__ import annotations

import re
import subprocess
from urllib.parse import parse_qs, urlsplit

import pytest

from experiments import tracking
from experiments.config import REPO_ROOT, load_config

ML = {"workflowType": ["machine_learning"]}


def _route(url: str):
    """(origin, hash route path, hash query) of a UI link: the UI routes on the part after '#'."""
    parts = urlsplit(url)
    route = urlsplit(parts.fragment)
    return f"{parts.scheme}://{parts.netloc}", route.path, parse_qs(route.query)


@pytest.fixture(autouse=True)
def _no_port(monkeypatch):
    # The links follow $PORT as `make mlflow-ui` does; a PORT in the caller's shell must not leak in.
    monkeypatch.delenv("PORT", raising=False)


def test_run_link_is_the_runs_metric_charts_in_training_mode():
    url = tracking.ui_run_url("7", "0123abcd")
    assert url == "http://127.0.0.1:5000/#/experiments/7/runs/0123abcd/model-metrics?workflowType=machine_learning"
    origin, path, query = _route(url)
    # the UI's run route is /experiments/:experimentId/runs/:runUuid/<tab>; the short /runs/:runUuid
    # redirects without the query, so the experiment id must be in the link
    assert path == "/experiments/7/runs/0123abcd/model-metrics"
    assert query == ML
    overview = tracking.ui_run_url("7", "0123abcd", tab="")
    assert _route(overview)[1:] == ("/experiments/7/runs/0123abcd", ML)


def test_experiment_link_is_its_runs_with_charts_in_training_mode():
    origin, path, query = _route(tracking.ui_experiment_url("3"))
    assert origin == "http://127.0.0.1:5000"
    # an experiment's bare route redirects to the overview tab when the mode is GenAI: name the runs tab
    assert path == "/experiments/3/runs"
    assert query == {**ML, "compareRunsMode": ["CHART"]}
    assert _route(tracking.ui_experiments_url()) == ("http://127.0.0.1:5000", "/experiments", ML)


@pytest.mark.parametrize("port, origin", [("5123", "http://127.0.0.1:5123"), ("", "http://127.0.0.1:5000")])
def test_links_follow_the_port_make_mlflow_ui_serves_on(monkeypatch, port, origin):
    # the Makefile serves on ${PORT:-5000}: an empty PORT means 5000 there too
    monkeypatch.setenv("PORT", port)
    for url in (tracking.ui_run_url("1", "r"), tracking.ui_experiment_url("1"), tracking.ui_experiments_url()):
        assert _route(url)[0] == origin, url


def test_links_to_a_tracking_server_go_to_that_server(monkeypatch):
    # runs logged to a remote `mlflow server` are seen in that server's UI, not in a local one
    monkeypatch.setenv("PORT", "5123")
    url = tracking.ui_run_url("2", "r", "http://tracker.example:8080/")
    assert url.startswith("http://tracker.example:8080/#/experiments/2/runs/r/")
    assert tracking.ui_base_url("sqlite:////tmp/x.db") == "http://127.0.0.1:5123"


def test_ui_links_lists_the_suites_experiments(tmp_path, tracking_uri):
    import mlflow

    client = tracking.get_client(tracking_uri)
    ours = tracking.ensure_experiment(client, "vargpt-a", tmp_path / "art")
    mlflow.MlflowClient(tracking_uri).create_experiment("someone-elses")  # no kind tag: not listed
    assert tracking.ui_links(tracking_uri) == [
        "[mlflow-ui] experiments: http://127.0.0.1:5000/#/experiments?workflowType=machine_learning",
        f"[mlflow-ui] vargpt-a: {tracking.ui_experiment_url(ours)}",
        tracking.UI_TOGGLE_HINT,
    ]
    # a store that does not exist yet is not created by listing it (the server creates it)
    missing = tmp_path / "none" / "mlflow.db"
    assert tracking.ui_links(f"sqlite:///{missing}") == [
        "[mlflow-ui] experiments: http://127.0.0.1:5000/#/experiments?workflowType=machine_learning",
        tracking.UI_TOGGLE_HINT]
    assert not missing.exists()


def test_make_mlflow_ui_prints_the_links_for_the_store_it_serves(tmp_path):
    """Runs the links line of `make -n mlflow-ui` (CURDIR moved to a temporary store): what the
    target prints, on the port it serves."""
    db = tmp_path / "runs" / "mlflow.db"
    uri = f"sqlite:///{db}"
    exp_id = tracking.ensure_experiment(tracking.get_client(uri), "vargpt-b", tmp_path / "art")
    recipe = subprocess.run(["make", "-n", "mlflow-ui", f"CURDIR={tmp_path}"], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=60, check=True).stdout
    (links,) = [ln for ln in recipe.splitlines() if "experiments.tracking links" in ln]
    assert uri in links  # the same store as the server's --backend-store-uri
    assert f"--backend-store-uri {uri}" in recipe
    out = subprocess.run(["bash", "-c", links], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "PORT": "5124", "HOME": str(tmp_path)}).stdout
    assert f"[mlflow-ui] vargpt-b: http://127.0.0.1:5124/#/experiments/{exp_id}/runs?workflowType=machine_learning" \
           "&compareRunsMode=CHART" in out.splitlines(), out


def test_a_training_run_prints_its_link(tmp_path, tracking_uri, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")  # not what is tested; saves a thread
    monkeypatch.setenv("PORT", "5125")
    loaded = load_config(REPO_ROOT / "experiments/debug.yaml", [f"logging.tracking_uri={tracking_uri}",
                                                                 f"logging.artifact_root={tmp_path / 'art'}"])
    logger = tracking.make_logger(loaded)
    tracking.log_run_start(logger, loaded, {})
    exp_id = tracking.get_client(tracking_uri).get_experiment_by_name("vargpt-debug").experiment_id
    want = f"[run] MLflow: http://127.0.0.1:5125/#/experiments/{exp_id}/runs/{logger.run_id}/model-metrics" \
           "?workflowType=machine_learning"
    assert want in capsys.readouterr().out.splitlines()
    logger.finalize("success")
    # a resumed run (a new process, a new log) prints the same run's link again
    resumed = tracking.make_logger(loaded, run_id=logger.run_id)
    tracking.mark_resumed(resumed, "step-1.ckpt", 1)
    assert want in capsys.readouterr().out.splitlines()
    resumed.finalize("success")


def test_eval_benchmarks_prints_the_runs_page(tmp_path, tracking_uri, monkeypatch, capsys):
    from experiments import eval_benchmarks as eb

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)  # where eval_benchmarks logs by default
    client = tracking.get_client(tracking_uri)
    exp_id = tracking.ensure_experiment(client, eb.EXPERIMENT, tmp_path / "art")
    rid = client.create_run(exp_id).info.run_id
    # lmms-eval itself is not needed: only the summary line is under test
    monkeypatch.setattr(eb, "run", lambda *a, **k: {"name": "ck", "tasks": {}, "seconds": 1,
                                                    "results_file": "r.json", "mlflow_run_id": rid})
    assert eb.main([str(tmp_path)]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    url = re.search(r"http://\S+", line).group(0)
    assert _route(url) == ("http://127.0.0.1:5000", f"/experiments/{exp_id}/runs/{rid}", ML)
