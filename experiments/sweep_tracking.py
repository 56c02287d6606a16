"""A sweep's MLflow bookkeeping: one parent run per sweep, one child run per variant launch.

Children are the variants' own runs (experiments.run creates them, tagged through the
environment ``child_env`` returns); the tracker finds each by its attempt id when the process
ends and makes sure the run says how it ended: FINISHED, or FAILED / KILLED with the process
log and the Python traceback as artifacts. A child that died before creating a run, and an
evaluate variant (which writes a JSON report instead of a run), get a run made for them here,
with the variant's resolved config as params. ``finished_hashes`` is what lets a relaunch skip
variants that already finished. Tag names: the SWEEP_* constants in experiments.tracking.

mlflow itself is imported lazily (by experiments.tracking): it costs seconds at start-up.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from experiments import tracking
from experiments.config import ConfigError, _rel, flatten
from experiments.sweep_schema import Sweep, Variant, eval_report_path


@dataclass
class Attempt:
    """One launch of one variant, and how it ended."""
    variant: Variant
    attempt_id: str  # tags the child's run, so the run can be found when the process ends
    log_path: Path  # the process's stdout and stderr
    started: float = field(default_factory=time.time)
    status: str = "RUNNING"  # then FINISHED | FAILED | KILLED
    run_id: str = ""
    error: str = ""  # one line on why it did not finish


def extract_traceback(log_text: str) -> str:
    """The last Python traceback in a child's output ("" if none)."""
    i = log_text.rfind("Traceback (most recent call last):")
    return log_text[i:] if i >= 0 else ""


class SweepTracker:
    """The parent run of one sweep in its MLflow store, and the record of each attempt."""

    def __init__(self, sweep: Sweep, out_dir: Path, threads: int):
        self.sweep = sweep
        self.out_dir = out_dir
        self.threads = threads  # recorded on each child run
        cfg0 = sweep.variants[0].loaded.cfg
        self.uri = tracking.tracking_uri(cfg0)
        self.artifact_root = tracking.artifact_root(cfg0)
        for v in sweep.variants[1:]:
            if (tracking.tracking_uri(v.loaded.cfg), tracking.artifact_root(v.loaded.cfg)) != \
                    (self.uri, self.artifact_root):
                raise ConfigError(f"{_rel(sweep.path)}: variant '{v.name}' logs to another MLflow store; "
                                  "a sweep keeps all its runs in one store")
        self.client: Any = None  # set by open_parent
        self.exp_id = ""
        self.parent_id = ""

    # -- the parent run ----------------------------------------------------------------------
    def open_parent(self) -> None:
        """Create the sweep's parent run, or reopen it on a relaunch; attach the sweep file."""
        t = tracking
        self.client = t.get_client(self.uri)
        self.exp_id = t.ensure_experiment(self.client, self.sweep.experiment, self.artifact_root)
        name = self.sweep.cfg.name
        parents = t.find_runs(self.client, [self.exp_id], {t.SWEEP_ID: name, t.SWEEP_ROLE: "parent"})
        tags = {
            t.SWEEP_ID: name, t.SWEEP_ROLE: "parent", "sweep_file": _rel(self.sweep.path),
            "sweep_base": _rel(self.sweep.base), "sweep_metric": self.sweep.cfg.metric,
            "sweep_mode": self.sweep.cfg.mode, "sweep_command": self.sweep.cfg.command,
            "sweep_metrics": json.dumps(list(self.sweep.cfg.metrics)),
            "sweep_n_variants": str(len(self.sweep.variants)),
            **{k: v for k, v in t.git_info().items()},
        }
        if self.sweep.cfg.description:
            tags["mlflow.note.content"] = self.sweep.cfg.description
        if parents:
            self.parent_id = parents[0].info.run_id
            self.client.update_run(self.parent_id, status="RUNNING")
        else:
            self.parent_id = self.client.create_run(self.exp_id, run_name=name, tags=tags).info.run_id
        for k, v in tags.items():
            self.client.set_tag(self.parent_id, k, v)
        self.client.log_artifact(self.parent_id, str(self.sweep.path), "sweep")

    def finished_hashes(self) -> Dict[str, str]:
        """{config hash: run id} of this sweep's children that finished (a relaunch skips them)."""
        t = tracking
        runs = t.find_runs(self.client, [self.exp_id], {t.SWEEP_ID: self.sweep.cfg.name, t.SWEEP_ROLE: "child"},
                           statuses=["FINISHED"])
        return {r.data.tags.get(t.SWEEP_CONFIG_HASH, ""): r.info.run_id for r in runs}

    def close_parent(self, finished: int, failed: int, skipped: int) -> None:
        c = self.client
        for k, v in {"sweep_last_finished": finished, "sweep_last_failed": failed,
                     "sweep_last_skipped": skipped, "sweep_last_launch": "done"}.items():
            c.set_tag(self.parent_id, k, str(v))
        c.set_terminated(self.parent_id, "FAILED" if failed else "FINISHED")

    def mark_interrupted(self) -> None:
        self.client.set_tag(self.parent_id, "sweep_last_launch", "interrupted")
        self.client.set_terminated(self.parent_id, "KILLED")

    # -- the children ------------------------------------------------------------------------
    def child_tags(self, v: Variant, attempt_id: str) -> Dict[str, str]:
        t = tracking
        return {
            t.SWEEP_ID: self.sweep.cfg.name, t.SWEEP_ROLE: "child", t.SWEEP_VARIANT: v.name,
            t.SWEEP_OVERRIDES: json.dumps(v.overrides), t.SWEEP_ATTEMPT: attempt_id,
            t.SWEEP_CONFIG_HASH: v.config_hash, t.PARENT_RUN_ID: self.parent_id,
        }

    def child_env(self, v: Variant, attempt_id: str) -> Dict[str, str]:
        """Environment entries that make the child's own run carry its sweep tags."""
        return tracking.sweep_child_env(self.child_tags(v, attempt_id))

    def _child_run(self, a: Attempt):
        t = tracking
        runs = t.find_runs(self.client, [self.exp_id], {t.SWEEP_ATTEMPT: a.attempt_id})
        return runs[-1] if runs else None

    def record(self, a: Attempt, rc: int, killed: bool = False) -> None:
        """How an attempt ended (sets a.status, a.run_id, a.error); make sure its MLflow run says
        so, with the log attached."""
        ended = time.time()
        run = self._child_run(a)
        if self.sweep.cfg.command == "evaluate" and rc == 0 and not killed and run is None:
            run = self._log_eval_report(a)
        ok = rc == 0 and not killed and run is not None and run.info.status == "FINISHED"
        if ok:
            a.status, a.run_id = "FINISHED", run.info.run_id
            self._tag_process(a, rc, ended)
            return
        a.status = "KILLED" if killed else "FAILED"
        text = a.log_path.read_text(errors="replace") if a.log_path.is_file() else ""
        tb = extract_traceback(text)
        if rc == 0 and run is None:
            a.error = "exited 0 but created no MLflow run (logging disabled?)"
        elif rc == 0:
            a.error = f"exited 0 but its run is {run.info.status}"
        else:
            a.error = (tb.strip().splitlines()[-1] if tb else f"exit status {rc}")[:300]
        c = self.client
        if run is None:
            # The child died before Lightning created its run: create it, so the sweep's
            # table shows the variant with its status and the UI nests the log under the parent.
            run = self._create_child_run(a)
        a.run_id = run.info.run_id
        self._tag_process(a, rc, ended)
        if tb:
            tracking.log_text_to_run(c, a.run_id, "traceback.txt", tb)
        if a.log_path.is_file():
            c.log_artifact(a.run_id, str(a.log_path), "sweep")
        c.set_terminated(a.run_id, a.status)

    def _create_child_run(self, a: Attempt, status: Optional[str] = None):
        """A run for a variant whose process made none: tags as a child's, the resolved config as params."""
        from mlflow.entities import Param

        c = self.client
        tags = {**self.child_tags(a.variant, a.attempt_id), "mlflow.runName": a.variant.name,
                "config_hash": a.variant.loaded.hash, "stage": a.variant.loaded.cfg.stage,
                "config_source": a.variant.loaded.source, "sweep_command": self.sweep.cfg.command,
                **tracking.git_info()}
        run = c.create_run(self.exp_id, start_time=int(a.started * 1000), run_name=a.variant.name, tags=tags)
        flat = flatten(a.variant.loaded.yaml_cfg)
        params = [Param(k, ("" if v is None else str(v))[:6000]) for k, v in flat.items()]
        for i in range(0, len(params), 100):
            c.log_batch(run.info.run_id, params=params[i:i + 100])
        if status:
            c.set_terminated(run.info.run_id, status)
        return c.get_run(run.info.run_id)

    def _log_eval_report(self, a: Attempt):
        """An evaluate variant finished: its JSON report becomes its run (None if there is none)."""
        report_path = eval_report_path(self.out_dir, a.variant)
        if not report_path.is_file():
            return None
        # Logged exactly as experiments.evaluate logs its own run (tracking.log_eval_report).
        report = json.loads(report_path.read_text())
        run = self._create_child_run(a)
        rid = run.info.run_id
        tracking.log_eval_report(self.client, rid, report, report_path)
        self.client.set_tag(rid, "checkpoint", str(self.sweep.checkpoint))
        if report_path.with_suffix(".png").is_file():
            self.client.log_artifact(rid, str(report_path.with_suffix(".png")))
        self.client.log_artifact(rid, str(a.log_path), "sweep")
        self.client.set_terminated(rid, "FINISHED")
        return self.client.get_run(rid)

    def _tag_process(self, a: Attempt, rc: int, ended: float) -> None:
        """Process-level facts the run itself cannot know: wall time with imports, exit status."""
        for k, v in {"sweep_proc_start": f"{a.started:.3f}", "sweep_proc_end": f"{ended:.3f}",
                     "sweep_exit_status": str(rc), "sweep_threads": str(self.threads),
                     "sweep_log": str(a.log_path)}.items():
            self.client.set_tag(a.run_id, k, v)
