"""Running a sweep: one process per variant, ``max_parallel`` at a time, stopped cleanly on signals.

Each variant runs as its own process (``python -m experiments.run BASE k=v ...``, or
``experiments.evaluate CHECKPOINT k=v ...`` for an evaluate sweep), in its own session, with
``cores // max_parallel`` threads; its output goes to ``<out_dir>/<variant>.log``. Relaunching
skips variants whose config hash already has a FINISHED run in this sweep and reruns failed or
missing ones. A crashed variant is marked FAILED; the others go on. At the end
``experiments.compare`` ranks the variants and attaches its table and plots to the parent run.
The MLflow side of all this is experiments.sweep_tracking.

Stopping: the launcher installs its own SIGINT and SIGTERM handlers while it runs (so it stops
the same way whatever dispositions it inherited, e.g. SIGINT ignored under a job scheduler).
Ctrl-C (SIGINT) sends each running child SIGINT (Lightning's graceful shutdown), then SIGTERM,
then SIGKILL; SIGTERM sends the children SIGTERM, then SIGKILL. The stopped variants are marked
KILLED, the parent run too, and ``run`` returns 128 + the signal number (130, 143).
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

from experiments.compare import compare as compare_runs
from experiments.config import REPO_ROOT
from experiments.sweep_schema import COMMANDS, Sweep, Variant, eval_report_path, launcher_overrides
from experiments.sweep_tracking import Attempt, SweepTracker
from modules.checkpoint import checkpoint_info, latest_valid_checkpoint

# How a child is stopped, by the signal the launcher received: (signal to send, seconds to wait
# for the child to exit) in turn; SIGKILL's wait is for the kernel to reap it.
STOP_SEQUENCE = {
    signal.SIGINT: ((signal.SIGINT, 15.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)),
    signal.SIGTERM: ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)),
}


def thread_budget(max_parallel: int) -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, max_parallel))


def child_argv(sweep: Sweep, v: Variant, out_dir: Path, threads: int) -> List[str]:
    """The command line a variant runs."""
    if sweep.cfg.command == "evaluate":
        # The launcher logs the report itself (in the sweep's experiment, under the parent).
        return [sys.executable, "-m", COMMANDS["evaluate"], str(sweep.checkpoint), *v.dotlist,
                "--out", str(eval_report_path(out_dir, v)), "--no-mlflow", *sweep.cfg.args]
    argv = [sys.executable, "-m", COMMANDS[sweep.cfg.command], str(sweep.base), *v.dotlist,
            *launcher_overrides(sweep.cfg.name, sweep.experiment, v.name, out_dir), *sweep.cfg.args]
    if not any(o.startswith("trainer.num_threads=") for o in v.dotlist):
        argv.append(f"trainer.num_threads={threads}")
    if resumable(out_dir / v.file_stem / "checkpoints", v.loaded.hash):
        argv.append("--resume")  # an interrupted variant continues from its checkpoint
    return argv


def resumable(ckpt_dir: Path, config_hash: str) -> bool:
    """A valid checkpoint of exactly this config is there (a relaunched sweep resumes it)."""
    path = latest_valid_checkpoint(ckpt_dir, warn=lambda m: print(f"[sweep] warning: {m}", flush=True))
    return path is not None and (checkpoint_info(path) or {}).get("config_hash") == config_hash


@dataclass
class Child:
    """A launched variant: its process, its open log file and its attempt record."""
    attempt: Attempt
    proc: subprocess.Popen
    log_file: Any


def stop_children(children: Sequence[Child], signum: int) -> None:
    """Stop every child's process group the way STOP_SEQUENCE says for ``signum``."""
    for sig, grace in STOP_SEQUENCE.get(signum, STOP_SEQUENCE[signal.SIGINT]):
        alive = [c for c in children if c.proc.poll() is None]
        if not alive:
            return
        for c in alive:
            try:
                os.killpg(c.proc.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace
        while time.time() < deadline and any(c.proc.poll() is None for c in alive):
            time.sleep(0.1)


class Launcher:
    def __init__(self, sweep: Sweep, out_dir: Path, max_parallel: int, rerun: bool = False,
                 compare: bool = True, poll_s: float = 0.2):
        self.sweep = sweep
        self.out_dir = out_dir
        self.max_parallel = max_parallel
        self.threads = thread_budget(max_parallel)
        self.rerun = rerun
        self.compare = compare
        self.poll_s = poll_s
        self.tracker = SweepTracker(sweep, out_dir, self.threads)
        self._stop_signal: Optional[int] = None  # set by the signal handler, acted on by the loop

    # -- processes ---------------------------------------------------------------------------
    def _start(self, v: Variant) -> Child:
        attempt_id = uuid.uuid4().hex
        self.out_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.out_dir / f"{v.file_stem}.log"
        env = {**os.environ, **self.tracker.child_env(v, attempt_id)}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(self.threads)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("MPLBACKEND", "Agg")
        argv = child_argv(self.sweep, v, self.out_dir, self.threads)
        log_file = open(log_path, "w")  # noqa: SIM115 - closed in _finish
        log_file.write("$ python " + shlex.join(argv[1:]) + "\n")
        log_file.flush()
        # Own session and process group: a Ctrl-C in the terminal reaches only the launcher, which
        # decides how each child stops (stop_children). The launcher's signal handlers are in
        # place, so the child starts with default SIGINT/SIGTERM dispositions, not inherited ignores.
        proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        return Child(Attempt(v, attempt_id, log_path), proc, log_file)

    def _finish(self, c: Child, rc: int, killed: bool = False) -> None:
        c.log_file.close()
        self.tracker.record(c.attempt, rc, killed)

    # -- signals -----------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._stop_signal is None:
            self._stop_signal = signum

    def _install_handlers(self) -> List[Tuple[int, Any]]:
        """Our handlers for SIGINT and SIGTERM (explicit, so they work even when the launcher was
        started with SIGINT ignored); returns what to restore. Signals only reach the main thread."""
        if threading.current_thread() is not threading.main_thread():
            return []
        return [(s, signal.signal(s, self._on_signal)) for s in (signal.SIGINT, signal.SIGTERM)]

    # -- the loop ----------------------------------------------------------------------------
    def run(self, variants: Sequence[Variant]) -> int:
        """Run the variants; the number of failed ones (capped at 255), or 128 + signal if stopped."""
        name = self.sweep.cfg.name
        self.tracker.open_parent()
        done = {} if self.rerun else self.tracker.finished_hashes()
        pending = [v for v in variants if v.config_hash not in done]
        skipped = [v for v in variants if v.config_hash in done]
        for v in skipped:
            print(f"[sweep] skip {v.name}: finished before (run {done[v.config_hash]})")
        print(f"[sweep] {name}: {len(pending)} to run, {len(skipped)} already finished; "
              f"{self.max_parallel} at a time, {self.threads} thread(s) each; logs in {self.out_dir}")
        running: List[Child] = []
        results: List[Attempt] = []
        total, started = len(pending), 0
        self._stop_signal = None
        previous = self._install_handlers()
        try:
            while (pending or running) and self._stop_signal is None:
                while pending and len(running) < self.max_parallel and self._stop_signal is None:
                    v = pending.pop(0)
                    started += 1
                    c = self._start(v)
                    running.append(c)
                    print(f"[sweep] start {started}/{total} {v.name} (pid {c.proc.pid}, log {c.attempt.log_path})",
                          flush=True)
                for c in list(running):
                    rc = c.proc.poll()
                    if rc is None:
                        continue
                    running.remove(c)
                    a = c.attempt
                    try:
                        self._finish(c, rc)
                    except Exception as e:  # noqa: BLE001 - bookkeeping trouble must not stop the others
                        a.status, a.error = "FAILED", f"could not record the result in MLflow: {type(e).__name__}: {e}"
                    results.append(a)
                    took = time.time() - a.started
                    msg = f"[sweep] {a.status} {a.variant.name} in {took:.1f}s (run {a.run_id})"
                    print(msg + (f": {a.error}; log {a.log_path}" if a.status != "FINISHED" else ""), flush=True)
                if self._stop_signal is None:
                    time.sleep(self.poll_s)
            if self._stop_signal is not None:
                return self._interrupted(running, self._stop_signal)
        except BaseException:
            stop_children(running, signal.SIGINT)  # never leave children behind
            raise
        finally:
            for s, handler in previous:
                signal.signal(s, handler)
        failed = [a for a in results if a.status != "FINISHED"]
        self._summarise(results, skipped, failed)
        return min(len(failed), 255)

    def _interrupted(self, running: List[Child], signum: int) -> int:
        """Stop the running children, mark them and the parent KILLED; 128 + signum."""
        self._stop_signal = signum  # further signals change nothing: the cleanup runs to its end
        what = "interrupted" if signum == signal.SIGINT else f"got {signal.Signals(signum).name}"
        print(f"\n[sweep] {what}: stopping {len(running)} running variant(s) ...", flush=True)
        stop_children(running, signum)
        for c in running:
            self._finish(c, c.proc.wait(), killed=True)
            print(f"[sweep] KILLED {c.attempt.variant.name} (run {c.attempt.run_id})", flush=True)
        self.tracker.mark_interrupted()
        return 128 + signum

    def _summarise(self, results: List[Attempt], skipped: List[Variant], failed: List[Attempt]) -> None:
        t = self.tracker
        t.close_parent(len(results) - len(failed), len(failed), len(skipped))
        print(f"[sweep] {self.sweep.cfg.name}: {len(results) - len(failed)} finished, {len(failed)} failed, "
              f"{len(skipped)} skipped; parent run {t.parent_id} in experiment '{self.sweep.experiment}' "
              f"({t.uri})")
        for a in failed:
            print(f"[sweep]   FAILED {a.variant.name}: {a.error} (log {a.log_path})")
        if self.compare:
            try:
                compare_runs(self.sweep.cfg.name, tracking_uri=t.uri, out_dir=self.out_dir / "compare")
            except Exception as e:  # noqa: BLE001 - the sweep's result stands without its report
                print(f"[sweep] warning: comparison failed: {type(e).__name__}: {e}", file=sys.stderr)
