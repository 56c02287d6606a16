"""Ablation sweeps: ``python -m experiments.sweep SWEEP.yaml [--dry-run] [--max-parallel N] [--only NAME]``.

A sweep file (experiments/ablations/*.yaml) names a base experiment and what to vary::

    name: debug_lr_depth            # sweep id: MLflow parent run, runs/sweeps/<name>/
    base: ../debug.yaml             # experiment YAML, relative to this file
    metric: val/loss                # what `compare` ranks by ...
    mode: min                       # ... and in which direction
    overrides: {trainer.max_steps: 40}          # applied to every variant
    grid:                                       # cartesian product of the values
      optim.lr: [1.0e-3, 1.0e-2]
    variants:                                   # named override sets
      - {name: linear, overrides: {model.und_projector.name: linear}}
      - {name: mlp3,   overrides: {model.und_projector.depth: 3}}

With both ``grid`` and ``variants`` every named variant runs at every grid point (names join
with a comma: ``linear,optim.lr=0.01``); with one of them, just that one; with neither, the base.
``command: evaluate`` runs ``experiments.evaluate`` on one trained checkpoint per variant instead
of training (a sampling-protocol sweep: ``grid: {eval.cfg: [1.0, 3.0]}``); the launcher logs each
JSON report as the variant's run (``eval/<metric>``).

Every variant is loaded and validated before anything runs: a bad key in variant 7 stops the
launch before variant 1 starts. Each variant then runs as its own process
(``python -m experiments.run BASE k=v ...``), sequentially or ``--max-parallel N`` at a time with
``cores // N`` threads each, as an MLflow child run nested under one parent run for the sweep.
Output goes to ``runs/sweeps/<name>/<variant>.log``. Relaunching skips variants whose config hash
already has a FINISHED run in this sweep and reruns failed or missing ones. A crashed variant is
marked FAILED with its traceback as an artifact; the others go on. Exit status: the number of
failed variants (0 when all finished, capped at 255), 2 for a bad sweep file, 130 after Ctrl-C
(running variants are stopped and marked KILLED). At the end ``experiments.compare`` runs and
attaches its table and plots to the parent run.
"""
from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import functools
import hashlib
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from experiments.config import REPO_ROOT, ConfigError, LoadedConfig, _rel, flatten, load_config

ABLATIONS_DIR = REPO_ROOT / "experiments" / "ablations"
SWEEPS_DIR = REPO_ROOT / "runs" / "sweeps"
COMMANDS = {"train": "experiments.run", "evaluate": "experiments.evaluate"}
MODES = ("min", "max")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Keys the launcher sets itself for every child; a sweep file setting them would be overwritten.
_LAUNCHER_KEYS = ("logging.experiment", "logging.run_name", "logging.enabled", "output_dir")
# Seconds a child gets to shut down after Ctrl-C (SIGINT: Lightning's graceful shutdown), then
# after SIGTERM, before SIGKILL.
_STOP_GRACE_S = (15.0, 5.0)


# ----------------------------------------------------------------------------------------
# schema
# ----------------------------------------------------------------------------------------


@dataclass
class VariantSpec:
    name: str = ""
    overrides: Dict[str, Any] = field(default_factory=dict)  # dotted keys or nested mappings


@dataclass
class SweepConfig:
    name: str = ""  # sweep id; letters, digits, _ . -
    base: str = ""  # experiment YAML, relative to the sweep file (or to the repo root)
    metric: str = "val/loss"  # ranking metric (an MLflow metric key)
    mode: str = "min"  # min | max
    # train: each variant trains (experiments.run BASE k=v ...).
    # evaluate: each variant evaluates one trained checkpoint with other eval.* settings
    # (experiments.evaluate CHECKPOINT k=v ...), e.g. a cfg / top-k sweep; the launcher logs
    # each report as the variant's run (eval/<metric> metrics, eval.json artifact).
    command: str = "train"
    checkpoint: str = ""  # evaluate: export directory; "" -> the base experiment's output_dir
    args: List[str] = field(default_factory=list)  # extra flags for the command, e.g. [--tasks, generation]
    description: str = ""
    experiment: str = ""  # MLflow experiment for the parent and children; "" -> "sweep-<name>"
    max_parallel: int = 1  # default for --max-parallel
    overrides: Dict[str, Any] = field(default_factory=dict)  # applied to every variant
    grid: Dict[str, List[Any]] = field(default_factory=dict)
    variants: List[VariantSpec] = field(default_factory=list)


@dataclass
class Variant:
    name: str
    overrides: Dict[str, Any]  # what this variant changes (grid point + named variant), flat
    dotlist: List[str]  # the sweep's common overrides followed by the variant's: what it runs
    loaded: LoadedConfig  # validated config as the child will see it (plus launcher keys)
    config_hash: str  # hash of the config the sweep file describes (no launcher thread budget)

    @property
    def file_stem(self) -> str:
        return safe_name(self.name)


@dataclass
class Sweep:
    cfg: SweepConfig
    path: Path  # the sweep file
    base: Path  # the resolved base experiment YAML
    variants: List[Variant]

    @property
    def experiment(self) -> str:
        return self.cfg.experiment or f"sweep-{self.cfg.name}"

    @functools.cached_property
    def checkpoint(self) -> Path:
        """The export directory an evaluate sweep reads (model.safetensors + config.yaml)."""
        from experiments.config import output_dir, resolve_path

        if self.cfg.checkpoint:
            near = self.path.parent / self.cfg.checkpoint
            return near.resolve() if near.exists() else resolve_path(self.cfg.checkpoint)
        return output_dir(load_config(self.base).cfg)


# ----------------------------------------------------------------------------------------
# loading and expansion
# ----------------------------------------------------------------------------------------


def format_value(v: Any) -> str:
    """A value as a ``key=value`` override string that parses back to the same value."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        try:
            back = OmegaConf.from_dotlist([f"k={v}"]).k
        except Exception:  # noqa: BLE001 - anything unparsable gets quoted
            back = None
        return v if back == v else json.dumps(v)
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v)  # JSON is YAML flow syntax
    raise ConfigError(f"cannot pass value {v!r} ({type(v).__name__}) as an override")


def flatten_overrides(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{"optim": {"lr": 1}, "trainer.max_steps": 3} -> {"optim.lr": 1, "trainer.max_steps": 3}."""
    return flatten(d, prefix)


def safe_name(name: str) -> str:
    """A variant name as a file name: readable, unique (a hash suffix when shortened)."""
    s = re.sub(r"[^A-Za-z0-9._=,+-]+", "_", name).strip("._") or "variant"
    if len(s) > 100 or s != name:
        s = f"{s[:90]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return s


def read_sweep(path: str | Path) -> SweepConfig:
    """The sweep file as a typed SweepConfig; ConfigError names the file and key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    try:
        raw = OmegaConf.load(path)
    except Exception as e:  # noqa: BLE001 - yaml errors of every kind
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    origin = _rel(path)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(SweepConfig), raw)
        cfg: SweepConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except ConfigKeyError as e:
        valid = ", ".join(f.name for f in dataclasses.fields(SweepConfig))
        raise ConfigError(f"{origin}: unknown key '{e.full_key or e.key}' in sweep file; valid keys: {valid}. "
                          "(Experiment keys go under `overrides:`, `grid:` or `variants:`.)") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{origin}: bad value for '{getattr(e, 'full_key', '?')}': "
                          f"{str(e).splitlines()[0]}") from None
    if not cfg.name or not _NAME_RE.match(cfg.name):
        raise ConfigError(f"{origin}: 'name' must be a non-empty id of letters, digits, '_', '.', '-' "
                          f"(it names the MLflow parent run and runs/sweeps/<name>/), got {cfg.name!r}")
    if not cfg.base:
        raise ConfigError(f"{origin}: 'base' is required: the experiment YAML the variants start from, "
                          "relative to the sweep file (e.g. base: ../debug.yaml)")
    if cfg.mode not in MODES:
        raise ConfigError(f"{origin}: 'mode' must be one of {', '.join(MODES)}, got {cfg.mode!r}")
    if cfg.command not in COMMANDS:
        raise ConfigError(f"{origin}: 'command' must be one of {', '.join(COMMANDS)}, got {cfg.command!r}")
    if cfg.max_parallel < 1:
        raise ConfigError(f"{origin}: 'max_parallel' must be >= 1, got {cfg.max_parallel}")
    for key, values in cfg.grid.items():
        if not values:
            raise ConfigError(f"{origin}: grid key '{key}' has no values")
    return cfg


def resolve_base(cfg: SweepConfig, sweep_path: Path) -> Path:
    for cand in (sweep_path.parent / cfg.base, REPO_ROOT / cfg.base):
        if cand.is_file():
            return cand.resolve()
    raise ConfigError(f"{_rel(sweep_path)}: base experiment '{cfg.base}' not found (looked next to the "
                      f"sweep file and under the repo root)")


def expand(cfg: SweepConfig, origin: str) -> List[Tuple[str, Dict[str, Any]]]:
    """[(variant name, flat overrides)]: named variants x grid points, in file order."""
    grid_keys = list(cfg.grid)
    points: List[Tuple[str, Dict[str, Any]]] = [
        (",".join(f"{k}={_display(v)}" for k, v in zip(grid_keys, combo)), dict(zip(grid_keys, combo)))
        for combo in itertools.product(*(cfg.grid[k] for k in grid_keys))
    ] if grid_keys else [("", {})]
    named: List[Tuple[str, Dict[str, Any]]] = []
    for i, v in enumerate(cfg.variants):
        if not v.name:
            raise ConfigError(f"{origin}: variants[{i}] needs a 'name'")
        named.append((v.name, flatten_overrides(v.overrides)))
    if not named:
        named = [("", {})]
    out: List[Tuple[str, Dict[str, Any]]] = []
    for vname, vover in named:
        for gname, gover in points:
            clash = sorted(set(vover) & set(gover))
            if clash:
                raise ConfigError(f"{origin}: variant '{vname}' sets {clash}, which the grid also sweeps; "
                                  "drop it from one of them")
            out.append((",".join(p for p in (vname, gname) if p) or "base", {**vover, **gover}))
    seen: Dict[str, int] = {}
    for name, _ in out:
        seen[name] = seen.get(name, 0) + 1
    dup = [n for n, c in seen.items() if c > 1]
    if dup:
        raise ConfigError(f"{origin}: duplicate variant names {dup}; every variant needs its own name")
    return out


def _display(v: Any) -> str:
    return v if isinstance(v, str) else format_value(v)


def dotlist(overrides: Dict[str, Any]) -> List[str]:
    return [f"{k}={format_value(v)}" for k, v in overrides.items()]


def launcher_overrides(sweep_name: str, experiment: str, variant_name: str, out_dir: Path) -> List[str]:
    return [
        "logging.enabled=true",
        f"logging.experiment={format_value(experiment)}",
        f"logging.run_name={json.dumps(variant_name)}",
        f"output_dir={json.dumps(str(out_dir / safe_name(variant_name)))}",
        "trainer.enable_progress_bar=false",
    ]


def load_sweep(path: str | Path, out_dir: Optional[Path] = None) -> Sweep:
    """Read the sweep file and validate every variant's full config (ConfigError on the first bad one)."""
    path = Path(path)
    cfg = read_sweep(path)
    origin = _rel(path)
    base = resolve_base(cfg, path)
    common = flatten_overrides(cfg.overrides)
    for key in _LAUNCHER_KEYS:
        if key in common or any(key in flatten_overrides(v.overrides) for v in cfg.variants) or key in cfg.grid:
            raise ConfigError(f"{origin}: '{key}' is set by the sweep launcher for each variant; "
                              + ("use the sweep's `experiment:` key instead" if key == "logging.experiment"
                                 else "remove it from the sweep file"))
    out_dir = out_dir or SWEEPS_DIR / cfg.name
    experiment = cfg.experiment or f"sweep-{cfg.name}"
    variants: List[Variant] = []
    for name, over in expand(cfg, origin):
        # A variant's own keys override the common ones; the order of the dotlist says so.
        user = dotlist({**{k: v for k, v in common.items() if k not in over}, **over})
        try:
            loaded = load_config(base, user + launcher_overrides(cfg.name, experiment, name, out_dir))
        except ConfigError as e:
            raise ConfigError(f"{origin}: variant '{name}' ({' '.join(dotlist(over)) or 'no overrides'}): {e}") \
                from None
        # The launcher's keys are all outside the config hash; the thread budget (which is in it)
        # is added only on the child's command line, so this hash does not depend on --max-parallel.
        variants.append(Variant(name, over, user, loaded, loaded.hash))
    return Sweep(cfg, path, base, variants)


def thread_budget(max_parallel: int) -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, max_parallel))


def eval_report_path(out_dir: Path, v: Variant) -> Path:
    return out_dir / v.file_stem / "eval.json"


def child_argv(sweep: Sweep, v: Variant, out_dir: Path, threads: int) -> List[str]:
    if sweep.cfg.command == "evaluate":
        # The launcher logs the report itself (in the sweep's experiment, under the parent).
        return [sys.executable, "-m", COMMANDS["evaluate"], str(sweep.checkpoint), *v.dotlist,
                "--out", str(eval_report_path(out_dir, v)), "--no-mlflow", *sweep.cfg.args]
    argv = [sys.executable, "-m", COMMANDS[sweep.cfg.command], str(sweep.base), *v.dotlist,
            *launcher_overrides(sweep.cfg.name, sweep.experiment, v.name, out_dir), *sweep.cfg.args]
    if not any(o.startswith("trainer.num_threads=") for o in v.dotlist):
        argv.append(f"trainer.num_threads={threads}")
    return argv


# ----------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------


@dataclass
class Attempt:
    variant: Variant
    attempt_id: str
    log_path: Path
    proc: subprocess.Popen
    log_file: Any
    started: float = field(default_factory=time.time)
    status: str = "RUNNING"
    run_id: str = ""
    error: str = ""


def extract_traceback(log_text: str) -> str:
    """The last Python traceback in a child's output ("" if none)."""
    i = log_text.rfind("Traceback (most recent call last):")
    return log_text[i:] if i >= 0 else ""


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
        cfg0 = sweep.variants[0].loaded.cfg
        from experiments import tracking

        self.tracking = tracking
        self.uri = tracking.tracking_uri(cfg0)
        self.artifact_root = tracking.artifact_root(cfg0)
        for v in sweep.variants[1:]:
            if (tracking.tracking_uri(v.loaded.cfg), tracking.artifact_root(v.loaded.cfg)) != (self.uri, self.artifact_root):
                raise ConfigError(f"{_rel(sweep.path)}: variant '{v.name}' logs to another MLflow store; "
                                  "a sweep keeps all its runs in one store")

    # -- MLflow bookkeeping -------------------------------------------------------------------
    def _open_parent(self) -> None:
        t = self.tracking
        self.client = t.get_client(self.uri)
        self.exp_id = t.ensure_experiment(self.client, self.sweep.experiment, self.artifact_root)
        name = self.sweep.cfg.name
        parents = t.find_runs(self.client, [self.exp_id], {t.SWEEP_ID: name, t.SWEEP_ROLE: "parent"})
        tags = {
            t.SWEEP_ID: name, t.SWEEP_ROLE: "parent", "sweep_file": _rel(self.sweep.path),
            "sweep_base": _rel(self.sweep.base), "sweep_metric": self.sweep.cfg.metric,
            "sweep_mode": self.sweep.cfg.mode, "sweep_command": self.sweep.cfg.command,
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

    def _finished_hashes(self) -> Dict[str, str]:
        t = self.tracking
        runs = t.find_runs(self.client, [self.exp_id], {t.SWEEP_ID: self.sweep.cfg.name, t.SWEEP_ROLE: "child"},
                           statuses=["FINISHED"])
        return {r.data.tags.get(t.SWEEP_CONFIG_HASH, ""): r.info.run_id for r in runs}

    def _child_tags(self, v: Variant, attempt_id: str) -> Dict[str, str]:
        t = self.tracking
        return {
            t.SWEEP_ID: self.sweep.cfg.name, t.SWEEP_ROLE: "child", t.SWEEP_VARIANT: v.name,
            t.SWEEP_OVERRIDES: json.dumps(v.overrides), t.SWEEP_ATTEMPT: attempt_id,
            t.SWEEP_CONFIG_HASH: v.config_hash, t.PARENT_RUN_ID: self.parent_id,
        }

    # -- processes ---------------------------------------------------------------------------
    def _start(self, v: Variant) -> Attempt:
        attempt_id = uuid.uuid4().hex
        self.out_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.out_dir / f"{v.file_stem}.log"
        env = {**os.environ, **self.tracking.sweep_child_env(self._child_tags(v, attempt_id))}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(self.threads)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("MPLBACKEND", "Agg")
        argv = child_argv(self.sweep, v, self.out_dir, self.threads)
        log_file = open(log_path, "w")  # noqa: SIM115 - closed in _finish
        log_file.write("$ python " + shlex.join(argv[1:]) + "\n")
        log_file.flush()
        # Own process group: the launcher decides how a child stops (see _stop_all).
        proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        return Attempt(v, attempt_id, log_path, proc, log_file)

    def _child_run(self, a: Attempt):
        t = self.tracking
        runs = t.find_runs(self.client, [self.exp_id], {t.SWEEP_ATTEMPT: a.attempt_id})
        return runs[-1] if runs else None

    def _finish(self, a: Attempt, rc: int, killed: bool = False) -> None:
        """Record how an attempt ended; make sure its MLflow run says so, with the log attached."""
        a.log_file.close()
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
            self.tracking.log_text_to_run(c, a.run_id, "traceback.txt", tb)
        if a.log_path.is_file():
            c.log_artifact(a.run_id, str(a.log_path), "sweep")
        c.set_terminated(a.run_id, a.status)

    def _create_child_run(self, a: Attempt, status: Optional[str] = None):
        """A run for a variant whose process made none: tags as a child's, the resolved config as params."""
        from mlflow.entities import Param

        from experiments.config import flatten

        c = self.client
        tags = {**self._child_tags(a.variant, a.attempt_id), "mlflow.runName": a.variant.name,
                "config_hash": a.variant.loaded.hash, "stage": a.variant.loaded.cfg.stage,
                "config_source": a.variant.loaded.source, "sweep_command": self.sweep.cfg.command,
                **self.tracking.git_info()}
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
        report = json.loads(report_path.read_text())
        # Same metric names as experiments.evaluate's own MLflow run.
        flat = {f"eval/{k}": v for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for k, v in (report.get("vqa_per_type") or {}).items():
            if isinstance(v, (int, float)):
                flat[f"eval/vqa_{k}"] = v
        for k, v in (report.get("real_vs_real") or {}).items():
            if isinstance(v, (int, float)):
                flat[f"eval/real_vs_real_{k}"] = v
        run = self._create_child_run(a)
        rid = run.info.run_id
        for k, v in flat.items():
            self.client.log_metric(rid, k, float(v))
        self.client.set_tag(rid, "checkpoint", str(self.sweep.checkpoint))
        self.client.log_artifact(rid, str(report_path))
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

    def _stop_all(self, running: List[Attempt]) -> None:
        """Ctrl-C: SIGINT each child's group (Lightning shuts down gracefully), then TERM, KILL."""
        for sig, grace in ((signal.SIGINT, _STOP_GRACE_S[0]), (signal.SIGTERM, _STOP_GRACE_S[1]),
                           (signal.SIGKILL, None)):
            alive = [a for a in running if a.proc.poll() is None]
            if not alive:
                return
            for a in alive:
                try:
                    os.killpg(a.proc.pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + (grace or 10.0)
            while time.time() < deadline and any(a.proc.poll() is None for a in alive):
                time.sleep(0.1)

    # -- the loop ----------------------------------------------------------------------------
    def run(self, variants: Sequence[Variant]) -> int:
        name = self.sweep.cfg.name
        self._open_parent()
        done = {} if self.rerun else self._finished_hashes()
        pending = [v for v in variants if v.config_hash not in done]
        skipped = [v for v in variants if v.config_hash in done]
        for v in skipped:
            print(f"[sweep] skip {v.name}: finished before (run {done[v.config_hash]})")
        print(f"[sweep] {name}: {len(pending)} to run, {len(skipped)} already finished; "
              f"{self.max_parallel} at a time, {self.threads} thread(s) each; logs in {self.out_dir}")
        running: List[Attempt] = []
        results: List[Attempt] = []
        total, started = len(pending), 0
        main_thread = threading.current_thread() is threading.main_thread()  # signals only go there
        prev_int = signal.getsignal(signal.SIGINT)
        prev_term = signal.signal(signal.SIGTERM, _raise_interrupt) if main_thread else None
        try:
            while pending or running:
                while pending and len(running) < self.max_parallel:
                    v = pending.pop(0)
                    started += 1
                    a = self._start(v)
                    running.append(a)
                    print(f"[sweep] start {started}/{total} {v.name} (pid {a.proc.pid}, log {a.log_path})", flush=True)
                for a in list(running):
                    rc = a.proc.poll()
                    if rc is None:
                        continue
                    running.remove(a)
                    try:
                        self._finish(a, rc)
                    except Exception as e:  # noqa: BLE001 - bookkeeping trouble must not stop the others
                        a.status, a.error = "FAILED", f"could not record the result in MLflow: {type(e).__name__}: {e}"
                    results.append(a)
                    took = time.time() - a.started
                    msg = f"[sweep] {a.status} {a.variant.name} in {took:.1f}s (run {a.run_id})"
                    print(msg + (f": {a.error}; log {a.log_path}" if a.status != "FINISHED" else ""), flush=True)
                time.sleep(self.poll_s)
        except KeyboardInterrupt:
            if main_thread:
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
            print(f"\n[sweep] interrupted: stopping {len(running)} running variant(s) ...", flush=True)
            self._stop_all(running)
            for a in running:
                self._finish(a, a.proc.wait(), killed=True)
                print(f"[sweep] KILLED {a.variant.name} (run {a.run_id})", flush=True)
            self.client.set_tag(self.parent_id, "sweep_last_launch", "interrupted")
            self.client.set_terminated(self.parent_id, "KILLED")
            return 130
        except BaseException:
            self._stop_all(running)  # never leave children behind
            raise
        finally:
            if main_thread:
                signal.signal(signal.SIGINT, prev_int)
                signal.signal(signal.SIGTERM, prev_term)
        failed = [a for a in results if a.status != "FINISHED"]
        self._summarise(results, skipped, failed)
        return min(len(failed), 255)

    def _summarise(self, results: List[Attempt], skipped: List[Variant], failed: List[Attempt]) -> None:
        c = self.client
        for k, v in {"sweep_last_finished": len(results) - len(failed), "sweep_last_failed": len(failed),
                     "sweep_last_skipped": len(skipped), "sweep_last_launch": "done"}.items():
            c.set_tag(self.parent_id, k, str(v))
        c.set_terminated(self.parent_id, "FAILED" if failed else "FINISHED")
        print(f"[sweep] {self.sweep.cfg.name}: {len(results) - len(failed)} finished, {len(failed)} failed, "
              f"{len(skipped)} skipped; parent run {self.parent_id} in experiment '{self.sweep.experiment}' "
              f"({self.uri})")
        for a in failed:
            print(f"[sweep]   FAILED {a.variant.name}: {a.error} (log {a.log_path})")
        if self.compare:
            try:
                from experiments import compare

                compare.compare(self.sweep.cfg.name, tracking_uri=self.uri, out_dir=self.out_dir / "compare")
            except Exception as e:  # noqa: BLE001 - the sweep's result stands without its report
                print(f"[sweep] warning: comparison failed: {type(e).__name__}: {e}", file=sys.stderr)


def _raise_interrupt(signum, frame):  # SIGTERM to the launcher stops it like Ctrl-C
    raise KeyboardInterrupt


# ----------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------


def select(variants: Sequence[Variant], only: Sequence[str]) -> List[Variant]:
    """Variants whose name matches any of ``only`` (exact or a shell pattern)."""
    if not only:
        return list(variants)
    out = [v for v in variants if any(v.name == o or fnmatch.fnmatchcase(v.name, o) for o in only)]
    if not out:
        raise ConfigError(f"--only {list(only)} matches no variant; variants: {', '.join(v.name for v in variants)}")
    return out


def print_plan(sweep: Sweep, variants: Sequence[Variant], out_dir: Path, max_parallel: int) -> None:
    c = sweep.cfg
    print(f"# sweep {c.name}: base {_rel(sweep.base)}, {len(variants)} variant(s), rank by {c.metric} ({c.mode}), "
          f"MLflow experiment '{sweep.experiment}', {max_parallel} at a time")
    if c.command == "evaluate":
        ready = (sweep.checkpoint / "config.yaml").is_file()
        print(f"# evaluates checkpoint {sweep.checkpoint}" + ("" if ready else " (not trained yet)"))
    threads = thread_budget(max_parallel)
    for v in variants:
        print(f"- {v.name}  config_hash={v.config_hash}")
        print("    python " + shlex.join(child_argv(sweep, v, out_dir, threads)[1:]))


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.sweep", description=__doc__.split("\n")[0])
    p.add_argument("sweep", help="sweep YAML, e.g. experiments/ablations/debug_lr.yaml")
    p.add_argument("--dry-run", action="store_true", help="validate every variant, print the plan, run nothing")
    p.add_argument("--max-parallel", type=int, default=None,
                   help="variants at once, each its own process with cores//N threads (default: the file's, 1)")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help="run only this variant (exact name or shell pattern); repeatable")
    p.add_argument("--rerun", action="store_true", help="run variants even if they finished before")
    p.add_argument("--no-compare", action="store_true", help="skip the comparison report at the end")
    p.add_argument("--out-dir", default=None, help="logs and report (default runs/sweeps/<name>)")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        cfg = read_sweep(args.sweep)
        out_dir = Path(args.out_dir).resolve() if args.out_dir else SWEEPS_DIR / cfg.name
        sweep = load_sweep(args.sweep, out_dir)
        variants = select(sweep.variants, args.only)
        max_parallel = args.max_parallel or cfg.max_parallel
        if max_parallel < 1:
            raise ConfigError(f"--max-parallel must be >= 1, got {max_parallel}")
        if args.dry_run:
            print_plan(sweep, variants, out_dir, max_parallel)
            return 0
        if cfg.command == "evaluate" and not (sweep.checkpoint / "config.yaml").is_file():
            raise ConfigError(f"{_rel(sweep.path)}: checkpoint {sweep.checkpoint} has no config.yaml: train it first "
                              f"(python -m experiments.run {_rel(sweep.base)}) or set `checkpoint:`")
        launcher = Launcher(sweep, out_dir, max_parallel, rerun=args.rerun, compare=not args.no_compare)
    except ConfigError as e:
        print(f"sweep config error: {e}", file=sys.stderr)
        return 2
    return launcher.run(variants)


if __name__ == "__main__":
    sys.exit(main())
