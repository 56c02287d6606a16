"""MLflow tracking: where runs go and what every run records.

Default store: ``sqlite:///<repo>/runs/mlflow.db`` with artifacts under ``<repo>/runs/mlartifacts``
(a file store needs MLFLOW_ALLOW_FILE_STORE in MLflow 3 and is slower to query). A config key
(``logging.tracking_uri``) or ``MLFLOW_TRACKING_URI`` overrides it.

Every run records: git commit + dirty flag, config hash, stage, config source, the resolved config
flattened into params and as ``config.yaml``, parameter counts, and metrics as ``split/name``.
mlflow is imported lazily: it costs seconds and most commands (dry runs, tests) never need it.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

from experiments.config import REPO_ROOT, LoadedConfig, flatten, resolve_path
from experiments.machine import cpu_model, git_info  # noqa: F401  (git_info: callers use tracking.git_info)
from modules.evaluation import report_metrics

SWEEP_ENV = "VARGPT_SWEEP_TAGS"  # JSON dict of extra tags set by the sweep launcher
# The experiment tag that says an experiment is model training (runs, charts), not GenAI (traces,
# judges). Every experiment the suite creates or reuses carries it (ensure_experiment); search
# filters and other tools read it, but the MLflow 3.17/3.18 UI does not: see UI_WORKFLOW below.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"
# What the MLflow UI (3.17, 3.18) opens an experiment as: the URL's `workflowType` query parameter,
# else the sidebar's GenAI | Model training toggle as last set in this browser (local storage),
# else GenAI, which lands on the GenAI overview. It ignores EXPERIMENT_KIND_TAG for this
# (https://github.com/mlflow/mlflow/issues/24498), and its own links between pages drop the
# parameter. So every dashboard link the suite prints goes straight to the page and carries it.
UI_WORKFLOW = "workflowType=machine_learning"
UI_HOST = "127.0.0.1"  # where `make mlflow-ui` serves (--host), on $PORT (default UI_PORT)
UI_PORT = "5000"
# The UI keeps the toggle per browser once it is clicked (local storage); from then on every page
# opens as model training, also those reached through the UI's own links. `make mlflow-ui` says so.
UI_TOGGLE_HINT = ("[mlflow-ui] a page shows GenAI (Overview, Traces, Judges)? click 'Model training' at the "
                  "top of the sidebar once: this browser keeps it")
RUN_KIND_TAG = "run_kind"  # benchmarks runs (experiments/eval_benchmarks.py) say so
# System metrics (CPU, memory, disk, network; GPU where pynvml finds one) beside the training
# metrics, as system/* in the run. On by default for training runs; MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING
# =false turns it off, MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL (seconds) sets the interval.
SYSTEM_METRICS_INTERVAL_S = 10.0


def default_tracking_uri() -> str:
    """Where runs go when no config says: ``$MLFLOW_TRACKING_URI``, else ``runs/mlflow.db``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    db = REPO_ROOT / "runs" / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def tracking_uri(cfg: Any) -> str:
    if cfg.logging.tracking_uri:
        return cfg.logging.tracking_uri
    return default_tracking_uri()


def artifact_root(cfg: Any) -> Path:
    return resolve_path(cfg.logging.artifact_root)


def experiment_name(cfg: Any) -> str:
    return cfg.logging.experiment or f"vargpt-{cfg.stage}"


# ----------------------------------------------------------------------------------------
# dashboard links (UI_WORKFLOW): printed by training runs, `make mlflow-ui`, eval_benchmarks
# ----------------------------------------------------------------------------------------
def ui_base_url(uri: Optional[str] = None) -> str:
    """The dashboard's address: the tracking server itself when ``uri`` is one (http[s]://...),
    else where `make mlflow-ui` serves, http://127.0.0.1:$PORT (5000 when PORT is unset or empty,
    as the Makefile's ${PORT:-5000})."""
    if uri and uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    return f"http://{UI_HOST}:{os.environ.get('PORT') or UI_PORT}"


def ui_experiments_url(uri: Optional[str] = None) -> str:
    """The experiment list as model training. Its links into an experiment drop the parameter, so
    in a browser whose toggle was never set they land on the GenAI overview (prefer ui_experiment_url)."""
    return f"{ui_base_url(uri)}/#/experiments?{UI_WORKFLOW}"


def ui_experiment_url(experiment_id: str, uri: Optional[str] = None) -> str:
    """An experiment's runs: the runs table beside their metric charts (compareRunsMode=CHART;
    the UI's default is the table alone)."""
    return f"{ui_base_url(uri)}/#/experiments/{experiment_id}/runs?{UI_WORKFLOW}&compareRunsMode=CHART"


def ui_run_url(experiment_id: str, run_id: str, uri: Optional[str] = None, tab: str = "model-metrics") -> str:
    """A run's page. The default tab, model-metrics, charts every metric over steps and refreshes
    while the run goes on (what a training log's reader wants); ``tab=""`` is the overview (status,
    params, the metrics' last values). The experiment id is needed: the UI's short route
    #/runs/<run_id> redirects to the run without the workflow parameter."""
    path = f"/#/experiments/{experiment_id}/runs/{run_id}" + (f"/{tab}" if tab else "")
    return f"{ui_base_url(uri)}{path}?{UI_WORKFLOW}"


def ui_run_link(run_id: str, uri: Optional[str] = None, tab: str = "") -> str:
    """ui_run_url for a run known by its id alone (its experiment read from the store)."""
    exp_id = get_client(uri).get_run(run_id).info.experiment_id
    return ui_run_url(exp_id, run_id, uri, tab)


def print_run_link(logger: Any, uri: Optional[str]) -> None:
    """The training log's line with the run's dashboard page (see ui_run_url)."""
    print(f"[run] MLflow: {ui_run_url(logger.experiment_id, logger.run_id, uri)}", flush=True)


def ui_links(uri: str) -> List[str]:
    """What `make mlflow-ui` prints: the experiment list, each of the suite's experiments (those with
    the kind tag) with its runs link, and how to keep a browser on model training (the UI's own links
    drop the parameter). A SQLite store that does not exist yet is not created (the server does)."""
    lines = [f"[mlflow-ui] experiments: {ui_experiments_url(uri)}"]
    db = Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None
    if db is None or db.is_file():
        found = get_client(uri).search_experiments(
            filter_string=f"tags.`{EXPERIMENT_KIND_TAG}` = '{TRAINING_KIND}'", order_by=["name ASC"])
        lines += [f"[mlflow-ui] {e.name}: {ui_experiment_url(e.experiment_id, uri)}" for e in found]
    return lines + [UI_TOGGLE_HINT]



def run_tags(loaded: LoadedConfig, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    cfg = loaded.cfg
    g = git_info()
    tags = {
        **g,
        "mlflow.source.git.commit": g["git_commit"],
        "config_hash": loaded.hash,
        "stage": cfg.stage,
        "config_source": loaded.source,
        "experiment_name": cfg.name,
        "cpu_model": cpu_model(),  # timings of runs on other CPUs are not comparable
        **cfg.logging.tags,
    }
    tags.update(sweep_env_tags())
    if extra:
        tags.update(extra)
    return tags


def make_logger(loaded: LoadedConfig, extra_tags: Optional[Dict[str, str]] = None, run_id: Optional[str] = None):
    """Lightning's MLFlowLogger pointed at our store, with the run tags set at creation; with
    ``run_id`` it continues that run (a resumed training run: same id, metrics at their steps)."""
    from lightning.pytorch.loggers import MLFlowLogger

    cfg = loaded.cfg
    name = experiment_name(cfg)
    root = artifact_root(cfg)
    init_store(tracking_uri(cfg))
    # Create the experiment here, race-safe: Lightning's logger would create it on first use, and
    # two runs starting together (make pipeline, sweeps) can both try (UNIQUE constraint failed).
    ensure_experiment(get_client(tracking_uri(cfg)), name, root)
    cls = _system_metrics_logger_class() if system_metrics_enabled() else MLFlowLogger
    if run_id:
        client = get_client(tracking_uri(cfg))
        client.update_run(run_id, status="RUNNING")
        # A relaunched sweep resumes its interrupted variant into the same run: the new launch's
        # tags (its attempt id above all) go on it, or the launcher could not find its child.
        from mlflow.entities import RunTag  # lazy: mlflow is loaded by now (get_client)

        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in sweep_env_tags().items()])
        return cls(experiment_name=name, tracking_uri=tracking_uri(cfg), run_id=run_id, log_model=False,
                   artifact_location=(root / name).as_uri())
    return cls(
        experiment_name=name,
        run_name=cfg.logging.run_name or cfg.name,
        tracking_uri=tracking_uri(cfg),
        tags=run_tags(loaded, extra_tags),
        artifact_location=(root / name).as_uri(),
        log_model=False,
    )


def system_metrics_enabled() -> bool:
    """On unless MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING says false / 0 / no / off."""
    v = os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING")
    return v is None or v.strip().lower() not in ("false", "0", "no", "off")


def start_system_metrics(run_id: str, uri: str, resume: bool = False):
    """MLflow's SystemMetricsMonitor on ``run_id``: a daemon thread that samples every
    SYSTEM_METRICS_INTERVAL_S (or $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL) and stops by itself
    when the run ends; ``resume`` continues the steps of a resumed run. None if it cannot start."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        mon = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S, tracking_uri=uri,
                                   resume_logging=resume)
        mon.start()
        return mon
    except Exception as e:  # noqa: BLE001 - metrics about the machine never stop a run
        import warnings

        warnings.warn(f"system metrics not logged: {e}")
        return None


def stop_system_metrics(mon: Any) -> None:
    """Stop the monitor and log one last sample: MLflow's monitor publishes only whole sampling
    intervals, so a run shorter than one interval would otherwise get no system metrics at all."""
    try:
        mon.finish()
        mon.collect_metrics()
        mon.publish_metrics(mon.aggregate_metrics())
        mon.mlflow_logger.flush()
    except Exception as e:  # noqa: BLE001
        import warnings

        warnings.warn(f"last system-metrics sample not logged: {e}")


def _system_metrics_logger_class():
    """Lightning's MLFlowLogger that starts MLflow's system-metrics monitor when its run is
    created (or resumed) and stops it, flushing the last samples, before the run is closed."""
    from lightning.pytorch.loggers import MLFlowLogger

    class MLFlowLoggerWithSystemMetrics(MLFlowLogger):
        _monitor: Any = None

        @property
        def experiment(self):
            resumed = self._run_id is not None and self._monitor is None
            client = super().experiment
            if self._monitor is None and self._run_id is not None:
                self._monitor = start_system_metrics(self._run_id, self._tracking_uri, resume=resumed) or False
            return client

        def finalize(self, status: str = "success") -> None:
            if self._monitor:
                stop_system_metrics(self._monitor)
                self._monitor = False
            super().finalize(status)

    return MLFlowLoggerWithSystemMetrics


def log_run_start(logger: Any, loaded: LoadedConfig, counts: Dict[str, int],
                  trainable_names: Optional[list] = None) -> None:
    """Resolved config as params + YAML artifact, parameter counts, trainable names; prints the
    run's dashboard link (print_run_link)."""
    params: Dict[str, Any] = {k: ("" if v is None else v) for k, v in flatten(loaded.yaml_cfg).items()}
    params.update({f"params/{k.replace('params_', '')}": v for k, v in counts.items()})
    logger.log_hyperparams(params)
    print_run_link(logger, tracking_uri(loaded.cfg))
    log_text(logger, "config.yaml", loaded.to_yaml())
    if trainable_names is not None:
        log_text(logger, "trainable_parameters.txt", "\n".join(trainable_names) + "\n")


def log_text(logger: Any, filename: str, text: str, artifact_path: Optional[str] = None) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / filename
        p.write_text(text)
        logger.experiment.log_artifact(logger.run_id, str(p), artifact_path)


def log_file(logger: Any, path: Path, artifact_path: Optional[str] = None) -> None:
    logger.experiment.log_artifact(logger.run_id, str(path), artifact_path)


# ----------------------------------------------------------------------------------------
# sweeps: parent/child runs (experiments/sweep_tracking.py, experiments/compare.py)
# ----------------------------------------------------------------------------------------
# Tag keys a sweep writes. Children carry all of them; the parent carries SWEEP_ID and
# SWEEP_ROLE="parent". `mlflow.parentRunId` is what makes the MLflow UI nest a child.
SWEEP_ID = "sweep_id"
SWEEP_ROLE = "sweep_role"  # parent | child | compare
SWEEP_VARIANT = "sweep_variant"
SWEEP_OVERRIDES = "sweep_overrides"  # JSON {dotted key: value}: what this variant changes
SWEEP_ATTEMPT = "sweep_attempt"  # one id per launch of one variant: finds the child's run
SWEEP_CONFIG_HASH = "sweep_config_hash"  # config hash without the launcher's thread budget
PARENT_RUN_ID = "mlflow.parentRunId"


_READY: set = set()  # stores this process has initialised


def get_client(uri: Optional[str] = None):
    """An MlflowClient for ``uri``; the first use per process creates the store's tables under a
    lock (``init_store``), so every entry point is safe to start beside another."""
    import mlflow

    uri = uri or default_tracking_uri()
    if uri not in _READY:
        _init_locked(uri)
        _READY.add(uri)
    return mlflow.MlflowClient(uri)


def init_store(uri: Optional[str] = None) -> None:
    """Create the store's tables now (a no-op when they exist); see ``_init_locked``."""
    get_client(uri)


def _init_locked(uri: str) -> None:
    """For a SQLite store, the first client creates and migrates the database under an exclusive
    file lock beside it: two runs started together on a new store would otherwise both migrate
    it ("duplicate column name")."""
    import fcntl

    import mlflow

    if not uri.startswith("sqlite:///"):
        mlflow.MlflowClient(uri).search_experiments(max_results=1)
        return
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            mlflow.MlflowClient(uri).search_experiments(max_results=1)
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def mark_failed_if_running(uri: str, run_id: str, why: str) -> None:
    """A run left RUNNING by a process that is gone (kill -9, a lost node) becomes FAILED."""
    from mlflow.exceptions import MlflowException

    client = get_client(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return
    if run.info.status == "RUNNING":
        client.set_tag(run_id, "vargpt.ended", why)
        client.set_terminated(run_id, "FAILED")
        print(f"[run] marked MLflow run {run_id} FAILED: {why}", flush=True)


def mark_resumed(logger: Any, checkpoint: str, step: int) -> None:
    """Tag a resumed run and print its dashboard link again (the resumed process's log is new)."""
    c = logger.experiment
    c.set_tag(logger.run_id, "vargpt.resumed_from", f"{checkpoint} (step {step})")
    c.set_tag(logger.run_id, "vargpt.preempted", "")
    print_run_link(logger, getattr(logger, "_tracking_uri", None))


def mark_preempted(logger: Any, signal_name: str, step: int) -> None:
    """Tag the run preempted and end it KILLED; --resume continues the same run (RUNNING again)."""
    c = logger.experiment
    c.set_tag(logger.run_id, "vargpt.preempted", f"{signal_name} after step {step}")
    c.set_terminated(logger.run_id, "KILLED")


def ensure_experiment(client: Any, name: str, root: Path) -> str:
    """The experiment's id, creating it with artifacts under ``root/name`` as make_logger does.
    Either way it carries the model-training kind tag (EXPERIMENT_KIND_TAG)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        if exp.tags.get(EXPERIMENT_KIND_TAG) is None:  # made before the tag, or by another tool
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
        return exp.experiment_id
    root.mkdir(parents=True, exist_ok=True)
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(name, artifact_location=(root / name).as_uri(),
                                        tags={EXPERIMENT_KIND_TAG: TRAINING_KIND})
    except MlflowException:
        # another process (a parallel pipeline job or sweep variant) created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _quote(value: str) -> str:
    if "'" in value:
        if '"' in value:
            raise ValueError(f"cannot search MLflow for a value with both quote kinds: {value!r}")
        return f'"{value}"'
    return f"'{value}'"


def tag_filter(tags: Dict[str, str], statuses: Iterable[str] = ()) -> str:
    """An MLflow search filter matching every tag exactly (and one of ``statuses``, if any)."""
    parts = [f"tags.`{k}` = {_quote(str(v))}" for k, v in tags.items()]
    statuses = list(statuses)
    if len(statuses) == 1:
        parts.append(f"attributes.status = '{statuses[0]}'")
    elif statuses:
        parts.append("attributes.status IN (" + ", ".join(f"'{s}'" for s in statuses) + ")")
    return " and ".join(parts)


def find_runs(client: Any, experiment_ids: List[str], tags: Dict[str, str],
              statuses: Iterable[str] = (), max_results: int = 5000) -> list:
    """Runs carrying all ``tags`` (oldest first), paging through every result."""
    from mlflow.entities import ViewType

    out: list = []
    token = None
    while True:
        page = client.search_runs(experiment_ids, tag_filter(tags, statuses), ViewType.ACTIVE_ONLY,
                                  max_results=min(max_results, 1000), order_by=["attributes.start_time ASC"],
                                  page_token=token)
        out += list(page)
        token = page.token
        if not token or len(out) >= max_results:
            return out


def all_experiment_ids(client: Any) -> List[str]:
    return [e.experiment_id for e in client.search_experiments()]


def log_text_to_run(client: Any, run_id: str, filename: str, text: str,
                    artifact_path: Optional[str] = None) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / filename
        p.write_text(text)
        client.log_artifact(run_id, str(p), artifact_path)


def sweep_env_tags() -> Dict[str, str]:
    """The tags a sweep launcher passed this process (``sweep_child_env``); {} outside a sweep."""
    env_tags = os.environ.get(SWEEP_ENV)
    return {str(k): str(v) for k, v in json.loads(env_tags).items()} if env_tags else {}


def sweep_child_env(tags: Dict[str, str]) -> Dict[str, str]:
    """The environment entry that makes a child's run carry ``tags`` (read by run_tags)."""
    return {SWEEP_ENV: json.dumps({str(k): str(v) for k, v in tags.items()})}


def eval_report_metrics(report: Dict[str, Any]) -> Dict[str, float]:
    """An evaluation report (experiments.evaluate's JSON) as MLflow metrics ``eval/...``
    (``modules.evaluation.report_metrics``: the one flattening, also behind the in-loop ``val/...``)."""
    return report_metrics(report, "eval/")


def log_eval_report(client: Any, run_id: str, report: Dict[str, Any], report_path: Optional[Path] = None) -> None:
    """Log an evaluation report to one MLflow run: its metrics, the protocol as params and the
    JSON itself (``report_path`` when it is on disk, else ``report.json`` from memory)."""
    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in eval_report_metrics(report).items()]
    params = [Param(f"protocol.{k}", str(v)[:500]) for k, v in (report.get("protocol") or {}).items()]
    client.log_batch(run_id, metrics=metrics, params=params)
    if report_path is not None and Path(report_path).is_file():
        client.log_artifact(run_id, str(report_path))
    else:
        client.log_dict(run_id, json.loads(json.dumps(report, default=str)), "report.json")


if __name__ == "__main__":  # python -m experiments.tracking init|links [URI]
    import sys

    if sys.argv[1:2] not in (["init"], ["links"]):
        sys.exit("usage: python -m experiments.tracking init|links [TRACKING_URI]")
    _uri = sys.argv[2] if len(sys.argv) > 2 else None
    if sys.argv[1] == "init":
        init_store(_uri)
    else:  # `make mlflow-ui`: the dashboard links to open (ui_links)
        print("\n".join(ui_links(_uri or default_tracking_uri())), flush=True)
