"""Config system: merge order, typed objects, errors that name the key and the file."""
from __future__ import annotations


import pytest
from omegaconf import OmegaConf

from experiments import config as C
from experiments.config import ConfigError, load_config


@pytest.fixture
def exp_tree(tmp_path, monkeypatch):
    """A private experiments/ tree: base.yaml, stages/debug.yaml, an experiment inheriting one."""
    exp = tmp_path / "experiments"
    (exp / "stages").mkdir(parents=True)
    (exp / "base.yaml").write_text("seed: 1\noptim: {lr: 0.1, eps: 1.0e-6}\ntrainer: {max_steps: 7}\n")
    (exp / "stages" / "debug.yaml").write_text("optim: {lr: 0.2}\ntrainer: {max_steps: 8}\n")
    (exp / "parent.yaml").write_text("stage: debug\nname: parent\noptim: {warmup_steps: 3}\n")
    (exp / "child.yaml").write_text("inherits: parent.yaml\nname: child\noptim: {lr: 0.3}\n")
    monkeypatch.setattr(C, "BASE_YAML", exp / "base.yaml")
    monkeypatch.setattr(C, "STAGES_DIR", exp / "stages")
    return exp


def test_merge_order(exp_tree):
    got = load_config(exp_tree / "child.yaml").cfg
    assert isinstance(got, C.ExperimentConfig) and isinstance(got.optim, C.OptimConfig)
    assert got.seed == 1  # base
    assert got.optim.eps == 1e-6  # base, untouched by later layers
    assert got.trainer.max_steps == 8  # stage file beats base
    assert got.optim.warmup_steps == 3  # inherited experiment file
    assert got.optim.lr == 0.3  # experiment file beats stage file
    assert got.name == "child"
    cli = load_config(exp_tree / "child.yaml", ["optim.lr=0.5", "trainer.max_steps=2"]).cfg
    assert cli.optim.lr == 0.5 and cli.trainer.max_steps == 2  # command line beats everything


def test_unknown_key_names_key_and_file(exp_tree):
    (exp_tree / "bad.yaml").write_text("inherits: parent.yaml\noptim: {lrr: 1}\n")
    with pytest.raises(ConfigError) as e:
        load_config(exp_tree / "bad.yaml")
    msg = str(e.value)
    assert "optim.lrr" in msg and "bad.yaml" in msg and "optim.lr" in msg  # suggestion
    with pytest.raises(ConfigError, match=r"command line: unknown key 'trainer.max_step'"):
        load_config(exp_tree / "parent.yaml", ["trainer.max_step=3"])


def test_unknown_key_in_inherited_file_names_that_file(exp_tree):
    (exp_tree / "parent.yaml").write_text("stage: debug\ndata: {batchsize: 3}\n")
    with pytest.raises(ConfigError, match=r"parent.yaml: unknown key 'data.batchsize'"):
        load_config(exp_tree / "child.yaml")


def test_wrong_type(exp_tree):
    with pytest.raises(ConfigError, match=r"command line: bad value for 'optim.lr'"):
        load_config(exp_tree / "parent.yaml", ["optim.lr=fast"])
    (exp_tree / "t.yaml").write_text("stage: debug\ntrainer: {max_steps: [1, 2]}\n")
    with pytest.raises(ConfigError, match=r"t.yaml: bad value for 'trainer.max_steps'"):
        load_config(exp_tree / "t.yaml")


def test_unknown_component_lists_choices(exp_tree):
    (exp_tree / "p.yaml").write_text("stage: debug\nmodel: {und_projector: {name: mlp3}}\n")
    with pytest.raises(ConfigError) as e:
        load_config(exp_tree / "p.yaml")
    msg = str(e.value)
    assert "p.yaml" in msg and "model.und_projector.name" in msg and "linear, mlp" in msg
    with pytest.raises(ConfigError, match=r"command line: unknown projector 'x'.*valid choices: linear, mlp"):
        load_config(exp_tree / "parent.yaml", ["model.gen_in_projector.name=x"])


def test_unknown_stage_lists_choices(exp_tree):
    with pytest.raises(ConfigError, match=r"command line: unknown stage 'nope'.*valid choices: .*debug"):
        load_config(exp_tree / "parent.yaml", ["stage=nope"])


def test_bad_override_syntax_and_missing_file(exp_tree):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(exp_tree / "parent.yaml", ["optim.lr"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(exp_tree / "nope.yaml")


def test_empty_override_is_empty_string(exp_tree):
    # `output_dir=` on a shell means "": OmegaConf alone reads None, which a str field rejects
    got = load_config(exp_tree / "parent.yaml", ["output_dir=", "name=x"]).cfg
    assert got.output_dir == "" and got.name == "x"


def test_inherit_cycle(exp_tree):
    (exp_tree / "a.yaml").write_text("inherits: b.yaml\n")
    (exp_tree / "b.yaml").write_text("inherits: a.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(exp_tree / "a.yaml")


def test_config_hash_ignores_names_and_logging(exp_tree):
    a = load_config(exp_tree / "child.yaml")
    b = load_config(exp_tree / "child.yaml", ["name=other", "logging.tracking_uri=sqlite:///x.db"])
    c = load_config(exp_tree / "child.yaml", ["optim.lr=0.31"])
    assert a.hash == b.hash
    assert a.hash != c.hash


def test_flatten():
    flat = C.flatten(OmegaConf.create({"a": {"b": 1, "c": [1, 2]}, "d": "x", "e": {}}))
    assert flat == {"a.b": 1, "a.c": [1, 2], "d": "x", "e": {}}


def test_eval_best_of_must_be_at_least_one(exp_tree):
    assert load_config(exp_tree / "parent.yaml", ["eval.best_of=4"]).cfg.eval.best_of == 4
    with pytest.raises(ConfigError, match=r"eval.best_of.*must be >= 1, got 0"):
        load_config(exp_tree / "parent.yaml", ["eval.best_of=0"])


def test_vargpt_stage_validation_needs_val_sources(exp_tree):
    """A VARGPT stage asked to validate without validation data would silently never validate
    (Lightning skips the loop, and the in-loop evaluation with it)."""
    (exp_tree / "s2.yaml").write_text("stage: stage2\nname: s2\ntrainer: {val_every_n_steps: 10}\n")
    with pytest.raises(ConfigError, match=r"trainer.val_every_n_steps.*data.val_sources is empty"):
        load_config(exp_tree / "s2.yaml")
    ok = load_config(exp_tree / "s2.yaml", ["data.val_sources=[{name: v, shards: 'val/vqa-*.tar'}]"]).cfg
    assert ok.trainer.val_every_n_steps == 10 and len(ok.data.val_sources) == 1
    assert load_config(exp_tree / "s2.yaml", ["trainer.val_every_n_steps=0"]).cfg.data.val_sources == []
    # the debug stage and the bases bring their own validation data
    assert load_config(exp_tree / "parent.yaml", ["trainer.val_every_n_steps=5"]).cfg.trainer.val_every_n_steps == 5
