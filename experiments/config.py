"""Typed experiment configs: OmegaConf YAML merged onto dataclass schemas.

Merge order (later wins):

    schema defaults  <  experiments/base.yaml  <  experiments/stages/<stage>.yaml
                     <  the experiment file (and the files it ``inherits:``)  <  key=value args

Each layer is merged on its own, so an unknown key, a wrong type or an unknown component name
fails naming the full dotted key and the file (or "command line") it came from. The merged
config is converted to typed dataclass objects (``ExperimentConfig``) before anything uses it.
No import strings live in YAML: components are chosen by registered short names.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

import modules.components  # noqa: F401  (registers every component family for validation)
from datamodules.config import DataConfig, validate_data_config
from datamodules.paths import REPO_ROOT, resolve_path, run_dir  # noqa: F401  (resolve_path: re-exported for launchers)
from modules.components.registry import REGISTRIES, ComponentConfig
from modules.config import EvalConfig, ModelConfig
from modules.stages import STAGES
EXPERIMENTS_DIR = REPO_ROOT / "experiments"
BASE_YAML = EXPERIMENTS_DIR / "base.yaml"
STAGES_DIR = EXPERIMENTS_DIR / "stages"
# Keys a YAML file may carry that are not part of the schema.
INHERIT_KEY = "inherits"


class ConfigError(ValueError):
    """A config that cannot be loaded: the message names the key, the file and the fix."""


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0  # applied to matrices only (no decay on norms/biases/embeddings)
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    schedule: str = "cosine"  # cosine | constant (both after linear warmup)
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps == 0: fraction of trainer.max_steps
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    grad_clip: float = 1.0  # 0 disables clipping


@dataclass
class TrainerConfig:
    max_steps: int = 100
    accelerator: str = "auto"  # cpu | gpu | auto
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | ddp_spawn | fsdp | deepspeed_stage_3 ...
    precision: str = "32-true"  # 32-true | bf16-mixed | bf16-true | 16-mixed
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 10
    val_every_n_steps: int = 0  # 0 disables in-loop validation
    limit_val_batches: int = 0  # 0 = all batches of the (finite) validation stream
    num_threads: int = 0  # torch.set_num_threads; 0 leaves the default
    deterministic: bool = False
    enable_progress_bar: bool = True
    save_checkpoint: bool = True  # export model.safetensors + config.yaml at the end


@dataclass
class LoggingConfig:
    enabled: bool = True
    # "" -> $MLFLOW_TRACKING_URI, else sqlite:///<repo>/runs/mlflow.db
    tracking_uri: str = ""
    # Where new MLflow experiments keep artifacts; relative paths are from the repo root.
    artifact_root: str = "runs/mlartifacts"
    experiment: str = ""  # "" -> "vargpt-<stage>"
    run_name: str = ""  # "" -> the experiment's `name`
    tags: Dict[str, str] = field(default_factory=dict)


@dataclass
class ExperimentConfig:
    name: str = "unnamed"
    stage: str = "debug"  # which LightningModule runs: see modules.stages.STAGES
    seed: int = 0
    output_dir: str = ""  # "" -> runs/<name>; relative paths are from the repo root
    # Start from another run's exported weights (model.safetensors). Loading is strict:
    # only the parameters listed in init_allow_missing may be absent from the file.
    init_from: str = ""
    init_allow_missing: List[str] = field(default_factory=list)
    # Free-form path variables for interpolation, e.g. `paths: {llava: /ckpt/llava-v1.5-7b}` and
    # `model.load: [{path: "${paths.llava}", format: llava}]`: one place to point a recipe at disk.
    paths: Dict[str, str] = field(default_factory=dict)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# Sections that do not change what a run computes: left out of the config hash, so a rerun
# with another run name or tracking store is recognised as the same experiment.
_HASH_EXCLUDE = ("name", "output_dir", "logging", "trainer.enable_progress_bar")


# ----------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError and friends: say which file
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(cfg).__name__}")
    return cfg


def _inherit_chain(path: Path, seen: Tuple[Path, ...] = ()) -> List[Tuple[str, DictConfig]]:
    """[(origin, layer)] for ``path`` and the files it inherits from, parents first."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular `{INHERIT_KEY}:` chain: {' -> '.join(map(str, seen))}")
    cfg = _read_yaml(path)
    parents = cfg.pop(INHERIT_KEY, None)
    chain: List[Tuple[str, DictConfig]] = []
    if parents is not None:
        if isinstance(parents, str):
            parents = [parents]
        for p in parents:
            chain += _inherit_chain((path.parent / str(p)), seen + (path,))
    chain.append((_rel(path), cfg))
    return chain


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"command line: override {o!r} must look like key=value (e.g. optim.lr=1e-4)")
    # `key=` means the empty string (OmegaConf would read None, which a str field rejects)
    overrides = [o + "''" if o.endswith("=") else o for o in overrides]
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise ConfigError(f"command line: cannot parse overrides {list(overrides)}: {e}") from e


def _valid_keys(schema: DictConfig, dotted_parent: str) -> List[str]:
    node = OmegaConf.select(schema, dotted_parent) if dotted_parent else schema
    if isinstance(node, DictConfig):
        return [str(k) for k in node.keys()]
    return []


def _merge_layer(merged: DictConfig, layer: DictConfig, origin: str) -> DictConfig:
    try:
        return OmegaConf.merge(merged, layer)  # type: ignore[return-value]
    except ConfigKeyError as e:
        key = e.full_key or str(e.key)
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        valid = _valid_keys(merged, parent)
        leaf = key.rsplit(".", 1)[-1]
        hint = difflib.get_close_matches(leaf, valid, n=1)
        did_you_mean = f" Did you mean '{(parent + '.') if parent else ''}{hint[0]}'?" if hint else ""
        raise ConfigError(
            f"{origin}: unknown key '{key}'.{did_you_mean} "
            f"Valid keys{(' under ' + repr(parent)) if parent else ''}: {', '.join(valid)}"
        ) from None
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(e).split("\n")[0]
        raise ConfigError(f"{origin}: bad value for '{key}': {msg}") from None


def config_layers(path: str | Path, overrides: Sequence[str] = ()) -> List[Tuple[str, DictConfig]]:
    """The YAML layers, lowest priority first, each with where it came from."""
    exp_chain = _inherit_chain(Path(path))
    cli = _parse_overrides(overrides)
    # The stage decides which stage file sits between base.yaml and the experiment.
    stage = None
    for _, layer in exp_chain + [("command line", cli)]:
        if "stage" in layer:
            stage = layer.stage
    layers: List[Tuple[str, DictConfig]] = []
    if BASE_YAML.is_file() and Path(path).resolve() != BASE_YAML:
        layers.append((_rel(BASE_YAML), _read_yaml(BASE_YAML)))
    if stage is not None:
        stage_file = STAGES_DIR / f"{stage}.yaml"
        if stage_file.is_file() and all(o != _rel(stage_file) for o, _ in exp_chain):
            layers += _inherit_chain(stage_file)
    layers += exp_chain
    if len(cli):
        layers.append(("command line", cli))
    return layers


def merge_layers(layers: Sequence[Tuple[str, DictConfig]]) -> DictConfig:
    merged: DictConfig = OmegaConf.structured(ExperimentConfig)
    for origin, layer in layers:
        merged = _merge_layer(merged, layer, origin)
    return merged


def origin_of(layers: Sequence[Tuple[str, DictConfig]], dotted: str) -> str:
    """Which layer last set ``dotted`` (for error messages); "schema default" if none did."""
    for origin, layer in reversed(layers):
        if OmegaConf.select(layer, dotted, default="__missing__") != "__missing__":
            return origin
    return "schema default"


def validate_components(cfg: Any, layers: Sequence[Tuple[str, DictConfig]] = (), prefix: str = "") -> None:
    """Check every component config's ``name`` against its family registry."""
    if not dataclasses.is_dataclass(cfg):
        return
    if isinstance(cfg, ComponentConfig) and cfg.family:
        reg = REGISTRIES.get(cfg.family)
        if reg is None:
            raise ConfigError(f"internal: no registry for family {cfg.family!r} ({prefix})")
        if cfg.name not in reg:
            key = f"{prefix}.name" if prefix else "name"
            raise ConfigError(
                f"{origin_of(layers, key)}: unknown {cfg.family} '{cfg.name}' at '{key}'; "
                f"valid choices: {', '.join(reg.names())}"
            )
    for f in dataclasses.fields(cfg):
        validate_components(getattr(cfg, f.name), layers, f"{prefix}.{f.name}" if prefix else f.name)


def validate_stage(cfg: ExperimentConfig, layers: Sequence[Tuple[str, DictConfig]] = ()) -> None:
    if cfg.stage not in STAGES:
        raise ConfigError(
            f"{origin_of(layers, 'stage')}: unknown stage '{cfg.stage}' at 'stage'; "
            f"valid choices: {', '.join(STAGES.names())}"
        )


@dataclass
class LoadedConfig:
    cfg: ExperimentConfig  # typed objects: what code uses
    yaml_cfg: DictConfig  # the resolved merged config, for printing and logging
    layers: List[Tuple[str, DictConfig]]
    source: str

    @property
    def hash(self) -> str:
        return config_hash(self.yaml_cfg)

    def to_yaml(self) -> str:
        return OmegaConf.to_yaml(self.yaml_cfg, resolve=True)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> LoadedConfig:
    """Load an experiment YAML with overrides into typed objects; raise ConfigError if bad."""
    layers = config_layers(path, overrides)
    merged = merge_layers(layers)
    try:
        OmegaConf.resolve(merged)
        typed: ExperimentConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(
            f"{origin_of(layers, key) if key != '?' else path}: cannot resolve '{key}': {str(e).splitlines()[0]}"
        ) from None
    validate_stage(typed, layers)
    validate_components(typed, layers)
    try:
        validate_data_config(typed.data)
        typed.model.validate()
    except ValueError as e:
        raise ConfigError(f"{_rel(Path(path))} (merged): {e}") from None
    return LoadedConfig(typed, merged, layers, _rel(Path(path)))


def config_hash(cfg: DictConfig) -> str:
    """A short stable hash of what the run computes (see _HASH_EXCLUDE)."""
    c = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for key in _HASH_EXCLUDE:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(c, parent) if parent else c
        if isinstance(node, DictConfig) and leaf in node:
            node.pop(leaf)
    text = OmegaConf.to_yaml(c, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def flatten(cfg: DictConfig | Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{"optim.lr": 0.001, ...}: the resolved config as flat params (lists kept as strings)."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, (DictConfig, ListConfig)) else cfg
    out: Dict[str, Any] = {}
    for k, v in container.items():  # type: ignore[union-attr]
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def output_dir(cfg: ExperimentConfig) -> Path:
    """Where a run writes (``datamodules.paths.run_dir``: relative to the repo root)."""
    return run_dir(cfg)


def all_experiment_yamls() -> List[Path]:
    """Every runnable experiment YAML (sweep files under ablations/ have their own schema)."""
    return sorted(
        p for p in EXPERIMENTS_DIR.rglob("*.yaml") if "ablations" not in p.relative_to(EXPERIMENTS_DIR).parts
    )
