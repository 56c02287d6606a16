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
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

import modules.components  # noqa: F401  (registers every component family for validation)
from datamodules.config import DataConfig, validate_data_config
from datamodules.paths import REPO_ROOT, resolve_path, run_dir  # noqa: F401  (resolve_path: re-exported for launchers)
from modules.components.registry import REGISTRIES, ComponentConfig
from modules.config import EvalConfig, ModelConfig
from modules.dpo import DPOConfig
from modules.stages import STAGES, VARGPT_STAGES
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
class FSDPConfig:
    """``trainer.strategy: fsdp``: per-parameter sharding (FSDP2, modules/sharded.py) over every
    rank, on CUDA (NCCL) and CPU (gloo) alike. Layer groups by name (modules/parallel.py):
    llm_decoder_layer, var_block, vision_layer. The VQVAE is never sharded."""

    # FULL_SHARD: a unit frees its gathered parameters after forward (gathers again in backward);
    # SHARD_GRAD_OP: keeps them until its backward (more memory, one gather less per step)
    sharding_strategy: str = "FULL_SHARD"
    wrap: List[str] = field(default_factory=lambda: ["llm_decoder_layer", "var_block", "vision_layer"])
    activation_checkpointing: List[str] = field(default_factory=list)  # groups recomputed in backward
    # "" = from trainer.precision (bf16-mixed: compute in bf16, reduce in fp32, fp32 master
    # weights); bf16 = that policy whatever trainer.precision says
    mixed_precision: str = ""
    # sharded: each rank writes its shards into a checkpoint directory (torch.distributed.checkpoint;
    # resume needs the same number of ranks' worth of memory, any rank count works); full: rank 0
    # gathers and writes one file. The export (model.safetensors) always gathers.
    state_dict_type: str = "sharded"
    cpu_offload: bool = False
    # write <output_dir>/sharding.rank<r>.json at the end of fit (shard shapes and hashes, bytes
    # of parameters and optimizer state, losses): what tests/test_sharded.py reads. Any strategy.
    report: bool = False


@dataclass
class DeepSpeedConfig:
    """``trainer.strategy: deepspeed_stage_3`` (needs `pip install deepspeed`)."""

    offload_optimizer: bool = False
    offload_parameters: bool = False


@dataclass
class TrainerConfig:
    max_steps: int = 100
    accelerator: str = "auto"  # cpu | gpu | auto
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | ddp_spawn | fsdp (trainer.fsdp) | deepspeed_stage_3
    precision: str = "32-true"  # 32-true | bf16-mixed | bf16-true | 16-mixed
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 10
    val_every_n_steps: int = 0  # 0 disables in-loop validation
    limit_val_batches: int = 0  # 0 = all batches of the (finite) validation stream
    num_threads: int = 0  # torch.set_num_threads; 0 leaves the default
    # glibc keeps freed blocks (up to 1 GiB) for reuse instead of fresh page-faulted mmap pages each
    # step (experiments.machine.keep_freed_memory)
    keep_freed_memory: bool = True
    # torch.compile of the LLM decoder layers and VAR blocks (VARGPT.compile_blocks): auto (compile
    # when the run is long enough to pay back the first step's compilation: compile_decision) | always | never
    compile: str = "auto"
    compile_min_steps: int = 1000
    # A file a scheduler may write a thread count into while the run trains: read every 10 steps and
    # applied when it changes ('' = none). `make pipeline` gives stage 2 the baseline's core this way.
    threads_file: str = ""
    deterministic: bool = False
    enable_progress_bar: bool = True
    save_checkpoint: bool = True  # export model.safetensors + config.yaml at the end
    # A loss that is NaN/inf: stop (name the step and the part, keep the last good checkpoint,
    # export nothing) | skip (no update for that batch, counted as train/nonfinite_skipped;
    # stops after max_nonfinite_in_a_row such batches in a row).
    on_nonfinite: str = "stop"
    max_nonfinite_in_a_row: int = 10
    # Write <output_dir>/sample_keys.txt: "batch_index key key ..." per training batch (data audits).
    log_sample_keys: bool = False
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)


@dataclass
class CheckpointConfig:
    """Training checkpoints (resume with `python -m experiments.run X.yaml --resume`): what exact
    continuation needs (trainable weights, optimizer + LR schedule, step, RNGs, data position,
    MLflow run id, config hash), written atomically with a sidecar of hashes; the last
    ``keep_last`` are kept. SIGTERM / SIGUSR1 always write one before exiting."""

    every_n_steps: int = 0  # 0: off
    every_n_minutes: float = 30.0  # 0: off (wall clock since the last checkpoint)
    keep_last: int = 2
    at_end: bool = True
    dir: str = ""  # "" -> <output_dir>/checkpoints


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
    # only the parameters listed in init_allow_missing may be absent from the file, and only the
    # tensors listed in init_allow_unexpected may be in it without a parameter (fnmatch patterns).
    init_from: str = ""
    init_allow_missing: List[str] = field(default_factory=list)
    init_allow_unexpected: List[str] = field(default_factory=list)
    # Free-form path variables for interpolation, e.g. `paths: {llava: /ckpt/llava-v1.5-7b}` and
    # `model.load: [{path: "${paths.llava}", format: llava}]`: one place to point a recipe at disk.
    paths: Dict[str, str] = field(default_factory=dict)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    dpo: Optional[DPOConfig] = None  # stage v11_dpo (modules/dpo.py); a mapping, even {}, sets it


# Sections that do not change what a run computes: left out of the config hash, so a rerun
# with another run name or tracking store is recognised as the same experiment.
_HASH_EXCLUDE = ("name", "output_dir", "logging", "trainer.enable_progress_bar", "checkpoint",
                 "trainer.log_sample_keys", "trainer.num_threads", "trainer.threads_file", "trainer.fsdp.report",
                 "trainer.keep_freed_memory", "trainer.compile", "trainer.compile_min_steps")


def hash_excluded(flat_key: str) -> bool:
    """Whether a flat config key ("checkpoint.every_n_steps") is one the config hash leaves out:
    it names an excluded key or lies in an excluded section."""
    return any(flat_key == k or flat_key.startswith(k + ".") for k in _HASH_EXCLUDE)


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
        for key, problem in value_problems(typed):
            raise ValueError(f"{key}: {problem}")
    except ValueError as e:
        key = str(e).split(":")[0].split("=")[0].strip()
        where = origin_of(layers, key) if "." in key else f"{_rel(Path(path))} (merged)"
        raise ConfigError(f"{where}: {e}") from None
    return LoadedConfig(typed, merged, layers, _rel(Path(path)))


SCHEDULES = ("cosine", "constant")
PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
ON_NONFINITE = ("stop", "skip")
STRATEGIES = ("auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true", "fsdp", "deepspeed_stage_3")
EXTRACTORS = ("world", "inception")


def value_problems(cfg: ExperimentConfig) -> List[Tuple[str, str]]:
    """(dotted key, what is wrong) for values the types alone cannot check: enums, ranges and
    finite numbers, so a bad value fails at load instead of after the model is built."""
    out: List[Tuple[str, str]] = []

    def need(ok: bool, key: str, problem: str) -> None:
        if not ok:
            out.append((key, problem))

    def finite(x: float) -> bool:
        return math.isfinite(x)

    def one_of(key: str, value: str, valid: Sequence[str]) -> None:
        if value not in valid:
            hint = difflib.get_close_matches(value, valid, n=1)
            need(False, key, f"{value!r} is not one of {', '.join(valid)}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))

    o, t, c, e = cfg.optim, cfg.trainer, cfg.checkpoint, cfg.eval
    one_of("optim.schedule", o.schedule, SCHEDULES)
    need(finite(o.lr) and o.lr > 0, "optim.lr", f"must be a finite number > 0, got {o.lr}")
    need(finite(o.weight_decay) and o.weight_decay >= 0, "optim.weight_decay", f"must be finite and >= 0, got {o.weight_decay}")
    need(len(o.betas) == 2 and all(finite(b) and 0 <= b < 1 for b in o.betas), "optim.betas",
         f"must be two numbers in [0, 1), got {list(o.betas)}")
    need(finite(o.eps) and o.eps > 0, "optim.eps", f"must be finite and > 0, got {o.eps}")
    need(o.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    need(finite(o.warmup_ratio) and 0 <= o.warmup_ratio < 1, "optim.warmup_ratio", f"must be in [0, 1), got {o.warmup_ratio}")
    need(finite(o.min_lr_ratio) and 0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")
    need(finite(o.grad_clip) and o.grad_clip >= 0, "optim.grad_clip", f"must be finite and >= 0 (0 = off), got {o.grad_clip}")
    need(t.max_steps >= 1, "trainer.max_steps", f"must be >= 1, got {t.max_steps}")
    need(t.devices >= 1 and t.num_nodes >= 1, "trainer.devices", f"devices and num_nodes must be >= 1, got {t.devices}, {t.num_nodes}")
    one_of("trainer.accelerator", t.accelerator, ACCELERATORS)
    one_of("trainer.precision", t.precision, PRECISIONS)
    one_of("trainer.on_nonfinite", t.on_nonfinite, ON_NONFINITE)
    need(t.max_nonfinite_in_a_row >= 1, "trainer.max_nonfinite_in_a_row", f"must be >= 1, got {t.max_nonfinite_in_a_row}")
    one_of("trainer.strategy", t.strategy, STRATEGIES)
    if t.fsdp.sharding_strategy in ("HYBRID_SHARD", "NO_SHARD"):
        need(False, "trainer.fsdp.sharding_strategy",
             f"{t.fsdp.sharding_strategy!r} is not available with per-parameter sharding: use FULL_SHARD or "
             f"SHARD_GRAD_OP (or trainer.strategy=ddp for no sharding)")
    else:
        one_of("trainer.fsdp.sharding_strategy", t.fsdp.sharding_strategy, ("FULL_SHARD", "SHARD_GRAD_OP"))
    one_of("trainer.fsdp.mixed_precision", t.fsdp.mixed_precision, ("", "bf16"))
    one_of("trainer.fsdp.state_dict_type", t.fsdp.state_dict_type, ("full", "sharded"))
    if t.strategy == "fsdp":
        # bf16-true would convert the whole model, the VQVAE included (it encodes fp32 images in fp32);
        # the parts' own dtypes are model.llm.dtype / projector_dtype / var_dtype
        need(t.precision in ("32-true", "32", "bf16-mixed"), "trainer.precision",
             f"{t.precision!r} does not run sharded (trainer.strategy=fsdp): use bf16-mixed (bf16 compute, fp32 "
             f"master weights) or 32-true")
        need(not (t.fsdp.cpu_offload and t.accelerator == "cpu"), "trainer.fsdp.cpu_offload",
             "is true with trainer.accelerator=cpu: on CPU ranks the shards already live in CPU memory (offload "
             "moves them between GPU and CPU); set trainer.fsdp.cpu_offload=false")
        need(cfg.model.llm_length_groups == 1, "model.llm_length_groups",
             f"is {cfg.model.llm_length_groups}, but under trainer.strategy=fsdp every rank must call the LLM the "
             f"same number of times per step (each call gathers its sharded layers together): set it to 1")
        need(not (t.val_every_n_steps > 0 and (cfg.eval.vqa_shards or cfg.eval.gen_shards)), "trainer.val_every_n_steps",
             f"is {t.val_every_n_steps} with eval.vqa_shards / eval.gen_shards set, but the in-loop evaluation decodes "
             f"with whole weights, which no rank holds under trainer.strategy=fsdp: evaluate the export instead "
             f"(python -m experiments.evaluate), or set eval.vqa_shards= eval.gen_shards=")
    for k in ("wrap", "activation_checkpointing"):
        for name in getattr(t.fsdp, k):
            one_of(f"trainer.fsdp.{k}", name, ("llm_decoder_layer", "var_block", "vision_layer"))
    need(t.accumulate_grad_batches >= 1, "trainer.accumulate_grad_batches", f"must be >= 1, got {t.accumulate_grad_batches}")
    need(t.log_every_n_steps >= 1, "trainer.log_every_n_steps", f"must be >= 1, got {t.log_every_n_steps}")
    for k in ("val_every_n_steps", "limit_val_batches", "num_threads", "compile_min_steps"):
        need(getattr(t, k) >= 0, f"trainer.{k}", f"must be >= 0, got {getattr(t, k)}")
    one_of("trainer.compile", t.compile, ("auto", "always", "never"))
    # Lightning skips the validation loop when there is no validation data, and the in-loop
    # evaluation (eval.vqa_shards / eval.gen_shards) runs at its end: both would never run.
    need(not (cfg.stage in VARGPT_STAGES and t.val_every_n_steps > 0 and not cfg.data.val_sources),
         "trainer.val_every_n_steps", f"is {t.val_every_n_steps} but data.val_sources is empty, so no validation "
         "(and no in-loop evaluation) would run: add a source, e.g. data.val_sources: "
         "[{name: vqa_val, shards: 'val/vqa-*.tar', task: understanding}], or set trainer.val_every_n_steps=0")
    need(c.every_n_steps >= 0, "checkpoint.every_n_steps", f"must be >= 0 (0 = off), got {c.every_n_steps}")
    need(finite(c.every_n_minutes) and c.every_n_minutes >= 0, "checkpoint.every_n_minutes",
         f"must be finite and >= 0 (0 = off), got {c.every_n_minutes}")
    need(c.keep_last >= 1, "checkpoint.keep_last", f"must be >= 1, got {c.keep_last}")
    need(finite(cfg.model.w_img) and cfg.model.w_img >= 0, "model.w_img", f"must be finite and >= 0, got {cfg.model.w_img}")
    one_of("eval.extractor", e.extractor, EXTRACTORS)
    need(finite(e.cfg) and e.cfg >= 0, "eval.cfg", f"must be finite and >= 0, got {e.cfg}")
    need(e.top_k >= 0, "eval.top_k", f"must be >= 0 (0 = off), got {e.top_k}")
    need(finite(e.top_p) and 0 <= e.top_p <= 1, "eval.top_p", f"must be in [0, 1] (0 = off), got {e.top_p}")
    need(finite(e.temperature) and e.temperature > 0, "eval.temperature", f"must be finite and > 0, got {e.temperature}")
    one_of("eval.sampler", e.sampler, ("auto", "official", "fast"))
    one_of("eval.sample_dtype", e.sample_dtype, ("auto", "fp32", "bf16", "fp16", "inherit"))
    for k in ("num_vqa", "num_gen", "batch_size", "best_of"):
        need(getattr(e, k) >= 1, f"eval.{k}", f"must be >= 1, got {getattr(e, k)}")
    need(e.teacher_scales >= 0, "eval.teacher_scales", f"must be >= 0 (0 = off), got {e.teacher_scales}")
    if cfg.dpo is not None:
        out.extend(cfg.dpo.problems())
    return out


def compile_decision(cfg: ExperimentConfig) -> Tuple[bool, str]:
    """Whether a run compiles its VARGPT blocks (``trainer.compile``), and why. ``auto`` compiles
    where it was measured to pay: a VARGPT v1 stage on one CPU process, without activation
    checkpointing, its thread count fixed (no ``trainer.threads_file``), of at least
    ``trainer.compile_min_steps`` steps. Measured: the bf16 step of the 125M model 0.913 -> 0.810 s
    (mixed batch) and 1.158 -> 0.998 s (generation), 1 thread, after a first step of 38 s wall
    compiling, cold cache (benchmarks/results/train_step_vs_official.md); the world's stage 2 (fp32),
    400 steps, 2 threads, warm compile cache: 95.6 s eager, 78.4 s compiled.
    Elsewhere (GPUs, DDP/FSDP ranks, recomputed layers) it is not measured here, so ``auto`` leaves
    the model eager and ``always`` compiles anyway; the v1.1 stages never compile (their model has no
    ``compile_blocks``)."""
    t = cfg.trainer
    if t.compile == "never":
        return False, "trainer.compile=never"
    if cfg.stage not in VARGPT_STAGES:
        return False, f"stage {cfg.stage!r} is not a VARGPT v1 stage"
    if t.compile == "always":
        return True, "trainer.compile=always"
    why = []
    if t.accelerator not in ("cpu", "auto") or (t.accelerator == "auto" and torch.cuda.is_available()):
        why.append("not a CPU run")
    if t.devices * t.num_nodes != 1 or t.strategy not in ("auto",):
        why.append("more than one process")
    if cfg.model.llm.gradient_checkpointing or t.fsdp.activation_checkpointing:
        why.append("layers recomputed in the backward")
    if t.threads_file:  # compiled kernels keep the thread count they were compiled with
        why.append("trainer.threads_file changes the thread count mid-run")
    if t.max_steps < t.compile_min_steps:
        why.append(f"max_steps {t.max_steps} < trainer.compile_min_steps {t.compile_min_steps}")
    return (not why), ("trainer.compile=auto: " + ("; ".join(why) if why else
                                                     f"a one-CPU run of {t.max_steps} steps"))


def config_hash(cfg: DictConfig) -> str:
    """A short stable hash of what the run computes (see _HASH_EXCLUDE)."""
    c = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    if "dpo" in c and c.dpo is None:
        c.pop("dpo")  # postdates every earlier run: absent from their hashes
    model = c.get("model")
    if isinstance(model, DictConfig) and model.get("family", "vargpt") == "vargpt":
        # the v1.1 family's fields postdate the v1 runs: absent from a v1 config's hash
        for k in ("family", "v11"):
            if k in model and (k == "family" or model[k] is None):
                model.pop(k)
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
    """Every runnable experiment YAML (sweep files under ablations/ and lmms-eval task files under
    lmms_tasks/ have schemas of their own)."""
    other = {"ablations", "lmms_tasks"}
    return sorted(p for p in EXPERIMENTS_DIR.rglob("*.yaml") if not other & set(p.relative_to(EXPERIMENTS_DIR).parts))
