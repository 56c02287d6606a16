"""Sweep files: the schema, expansion into variants, and validation of every variant's config.

A sweep file (experiments/ablations/*.yaml) names a base experiment and what to vary::

    name: debug_lr_depth            # sweep id: MLflow parent run, runs/sweeps/<name>/
    base: ../debug.yaml             # experiment YAML, relative to this file
    metric: val/loss                # what `compare` ranks by ...
    mode: min                       # ... and in which direction
    metrics: [val/loss_img]         # the few more metrics the comparison is about (table, figures)
    overrides: {trainer.max_steps: 40}          # applied to every variant
    grid:                                       # cartesian product of the values
      optim.lr: [1.0e-3, 1.0e-2]
    variants:                                   # named override sets
      - {name: linear, overrides: {model.und_projector.name: linear}}
      - {name: mlp3,   overrides: {model.und_projector.depth: 3}}

With both ``grid`` and ``variants`` every named variant runs at every grid point (names join
with a comma: ``linear,optim.lr=0.01``); with one of them, just that one; with neither, the base.
``command: evaluate`` runs ``experiments.evaluate`` on one trained checkpoint per variant instead
of training (a sampling-protocol sweep: ``grid: {eval.cfg: [1.0, 3.0]}``).

``load_sweep`` loads and validates every variant before anything runs: a bad key in variant 7
raises ConfigError naming it before variant 1 starts. Nothing here starts processes or touches
MLflow (experiments.sweep_launcher and experiments.sweep_tracking do).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import functools
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from experiments.config import (REPO_ROOT, ConfigError, LoadedConfig, _rel, flatten, load_config, output_dir,
                                resolve_path)

ABLATIONS_DIR = REPO_ROOT / "experiments" / "ablations"
SWEEPS_DIR = REPO_ROOT / "runs" / "sweeps"
COMMANDS = {"train": "experiments.run", "evaluate": "experiments.evaluate"}
MODES = ("min", "max")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Keys the launcher sets itself for every child; a sweep file setting them would be overwritten.
_LAUNCHER_KEYS = ("logging.experiment", "logging.run_name", "logging.enabled", "output_dir")


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
    # The metrics the comparison shows beside the ranking one (its page, printed table, figures);
    # every other metric stays in table.csv. [] -> the defaults of the base's stage
    # (experiments.compare.DEFAULT_METRICS).
    metrics: List[str] = field(default_factory=list)
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
        if self.cfg.checkpoint:
            near = self.path.parent / self.cfg.checkpoint
            return near.resolve() if near.exists() else resolve_path(self.cfg.checkpoint)
        return output_dir(load_config(self.base).cfg)


# ----------------------------------------------------------------------------------------
# override values and names
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


def dotlist(overrides: Dict[str, Any]) -> List[str]:
    return [f"{k}={format_value(v)}" for k, v in overrides.items()]


def launcher_overrides(sweep_name: str, experiment: str, variant_name: str, out_dir: Path) -> List[str]:
    """What the launcher adds to every child's command line: its MLflow run and output folder."""
    return [
        "logging.enabled=true",
        f"logging.experiment={format_value(experiment)}",
        f"logging.run_name={json.dumps(variant_name)}",
        f"output_dir={json.dumps(str(out_dir / safe_name(variant_name)))}",
        "trainer.enable_progress_bar=false",
    ]


def eval_report_path(out_dir: Path, v: Variant) -> Path:
    """Where an evaluate variant writes its JSON report."""
    return out_dir / v.file_stem / "eval.json"


# ----------------------------------------------------------------------------------------
# reading, expansion, validation
# ----------------------------------------------------------------------------------------


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


def select(variants: Sequence[Variant], only: Sequence[str]) -> List[Variant]:
    """Variants whose name matches any of ``only`` (exact or a shell pattern)."""
    if not only:
        return list(variants)
    out = [v for v in variants if any(v.name == o or fnmatch.fnmatchcase(v.name, o) for o in only)]
    if not out:
        raise ConfigError(f"--only {list(only)} matches no variant; variants: {', '.join(v.name for v in variants)}")
    return out
