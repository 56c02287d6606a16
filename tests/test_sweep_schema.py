"""Sweep files: schema, expansion into variants, validation before anything runs, and every
shipped ablation under experiments/ablations/ validating (--dry-run). No training here."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from experiments import sweep, sweep_launcher, sweep_schema, sweep_tracking
from experiments.config import REPO_ROOT, ConfigError

DEBUG = REPO_ROOT / "experiments" / "debug.yaml"
ABLATIONS = sorted(p for p in sweep_schema.ABLATIONS_DIR.rglob("*") if p.suffix in (".yaml", ".yml"))


def _write(tmp_path: Path, text: str, name: str = "s.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_there_are_shipped_ablations():
    assert ABLATIONS, "experiments/ablations/ should ship at least one sweep"


@pytest.mark.parametrize("path", ABLATIONS, ids=[str(p.relative_to(sweep_schema.ABLATIONS_DIR)) for p in ABLATIONS])
def test_shipped_ablation_validates(path, capsys, tmp_path):
    assert sweep.main([str(path), "--dry-run", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    loaded = sweep_schema.load_sweep(path, tmp_path)
    assert loaded.variants and f"{len(loaded.variants)} variant(s)" in out
    for v in loaded.variants:
        assert v.name in out and len(v.config_hash) == 12
    # Distinct variants must describe distinct experiments, or the rerun logic would merge them.
    assert len({v.config_hash for v in loaded.variants}) == len(loaded.variants)


def test_grid_times_variants_with_names_overrides_and_hashes(tmp_path):
    p = _write(tmp_path, f"""
        name: t
        base: {DEBUG}
        overrides: {{trainer.max_steps: 3, optim: {{weight_decay: 0.1}}}}
        grid:
          optim.lr: [1.0e-3, 0.01]
          model.und_projector.hidden_dim: [16]
        variants:
          - {{name: linear, overrides: {{model.und_projector.name: linear}}}}
          - {{name: deep, overrides: {{model: {{und_projector: {{depth: 3}}}}, trainer.max_steps: 5}}}}
    """)
    s = sweep_schema.load_sweep(p, tmp_path)
    names = [v.name for v in s.variants]
    assert names == [
        "linear,optim.lr=0.001,model.und_projector.hidden_dim=16",
        "linear,optim.lr=0.01,model.und_projector.hidden_dim=16",
        "deep,optim.lr=0.001,model.und_projector.hidden_dim=16",
        "deep,optim.lr=0.01,model.und_projector.hidden_dim=16",
    ]
    deep = s.variants[3]
    assert deep.overrides == {"model.und_projector.depth": 3, "trainer.max_steps": 5, "optim.lr": 0.01,
                              "model.und_projector.hidden_dim": 16}
    c = deep.loaded.cfg
    # The variant's own value beats the sweep-wide one; sweep-wide ones apply to all.
    assert (c.trainer.max_steps, c.optim.lr, c.optim.weight_decay, c.model.und_projector.depth) == (5, 0.01, 0.1, 3)
    assert s.variants[0].loaded.cfg.trainer.max_steps == 3
    assert c.logging.experiment == "sweep-t" and c.logging.run_name == deep.name
    assert c.output_dir == str(tmp_path / sweep_schema.safe_name(deep.name))
    assert len({v.config_hash for v in s.variants}) == 4
    # Launcher keys (logging, output_dir) are outside the hash: same hash as the plain config.
    from experiments.config import load_config

    assert s.variants[0].config_hash == load_config(DEBUG, s.variants[0].dotlist).hash


def test_no_grid_no_variants_is_the_base_and_threads_are_not_hashed(tmp_path):
    p = _write(tmp_path, f"name: b\nbase: {DEBUG}\n")
    s = sweep_schema.load_sweep(p, tmp_path)
    (v,) = s.variants
    assert v.name == "base" and v.overrides == {}
    argv1 = sweep_launcher.child_argv(s, v, tmp_path, 1)
    argv4 = sweep_launcher.child_argv(s, v, tmp_path, 4)
    assert argv1[1:3] == ["-m", "experiments.run"] and "trainer.num_threads=1" in argv1
    assert "trainer.num_threads=4" in argv4 and "trainer.num_threads=1" not in argv4
    assert sweep_launcher.thread_budget(10_000) == 1


@pytest.mark.parametrize("value", [0.001, 1e-5, 3, True, None, "linear", "1e-3", "a=b,c", "yes", [1, 2], "x y"])
def test_override_values_round_trip(value):
    parsed = OmegaConf.from_dotlist([f"k={sweep_schema.format_value(value)}"]).k
    assert (OmegaConf.to_container(parsed) if not isinstance(parsed, (str, int, float, bool, type(None))) else parsed) \
        == value


def test_bad_key_in_variant_seven_fails_before_anything_runs(tmp_path, capsys, monkeypatch):
    variants = "\n".join(f"  - {{name: v{i}, overrides: {{optim.lr: 0.00{i}}}}}" for i in range(1, 7))
    p = _write(tmp_path, f"""name: bad\nbase: {DEBUG}\nvariants:\n{variants}\n  - {{name: v7, overrides: {{optim.lrr: 1}}}}\n""")
    started = []
    monkeypatch.setattr(sweep_launcher.subprocess, "Popen", lambda *a, **k: started.append(a) or pytest.fail("ran"))
    rc = sweep.main([str(p), "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and not started and not (tmp_path / "out").exists()
    assert "variant 'v7'" in err and "optim.lrr" in err and "Did you mean 'optim.lr'" in err


@pytest.mark.parametrize("body, words", [
    ("mode: lowest", ["'mode'", "min, max"]),
    ("gird: {optim.lr: [1]}", ["unknown key 'gird'", "valid keys"]),
    ("grid: {optim.lr: 0.1}", ["grid.optim.lr"]),
    ("grid: {optim.lr: []}", ["no values"]),
    ("overrides: {logging.experiment: x}", ["`experiment:`"]),
    ("variants: [{name: a}, {name: a}]", ["duplicate variant names"]),
    ("variants: [{overrides: {optim.lr: 1}}]", ["variants[0] needs a 'name'"]),
    ("grid: {optim.lr: [1]}\nvariants: [{name: a, overrides: {optim.lr: 2}}]", ["also sweeps"]),
])
def test_sweep_file_errors_name_the_key(tmp_path, body, words):
    p = _write(tmp_path, f"name: e\nbase: {DEBUG}\n{body}\n")
    with pytest.raises(ConfigError) as e:
        sweep_schema.load_sweep(p, tmp_path)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_missing_base_and_bad_name(tmp_path):
    with pytest.raises(ConfigError, match="base experiment 'nope.yaml' not found"):
        sweep_schema.load_sweep(_write(tmp_path, "name: x\nbase: nope.yaml\n"), tmp_path)
    with pytest.raises(ConfigError, match="'name' must be"):
        sweep_schema.load_sweep(_write(tmp_path, f"name: 'a b'\nbase: {DEBUG}\n"), tmp_path)


def test_only_selects_by_name_or_pattern(tmp_path, capsys):
    p = _write(tmp_path, f"name: o\nbase: {DEBUG}\ngrid: {{optim.lr: [0.1, 0.2, 0.3]}}\n")
    s = sweep_schema.load_sweep(p, tmp_path)
    assert [v.name for v in sweep_schema.select(s.variants, ["optim.lr=0.2"])] == ["optim.lr=0.2"]
    assert len(sweep_schema.select(s.variants, ["optim.lr=0.[13]"])) == 2
    with pytest.raises(ConfigError, match="matches no variant"):
        sweep_schema.select(s.variants, ["nothing"])
    assert sweep.main([str(p), "--dry-run", "--only", "optim.lr=0.3", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "optim.lr=0.3" in out and "optim.lr=0.1" not in out


def test_traceback_extraction_and_safe_names():
    log = "noise\nTraceback (most recent call last):\n  old\nKeyError: 1\nmore\nTraceback (most recent call last):\n" \
          "  File x\nValueError: boom\n"
    tb = sweep_tracking.extract_traceback(log)
    assert tb.startswith("Traceback") and tb.strip().endswith("ValueError: boom") and "KeyError" not in tb
    assert sweep_tracking.extract_traceback("all good\n") == ""
    assert sweep_schema.safe_name("optim.lr=0.01,a=b") == "optim.lr=0.01,a=b"
    a, b = sweep_schema.safe_name("x/y"), sweep_schema.safe_name("x:y")
    assert "/" not in a and a != b


def test_cli_dry_run_and_config_error_exit_status(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    bad = _write(tmp_path, f"name: c\nbase: {DEBUG}\ngrid: {{optim.lr: [0.1], trainer.max_stepz: [1]}}\n")
    good = _write(tmp_path, f"name: c\nbase: {DEBUG}\ngrid: {{optim.lr: [0.1, 0.2]}}\n", "good.yaml")
    r = subprocess.run([sys.executable, "-m", "experiments.sweep", str(bad), "--dry-run"], cwd=REPO_ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "trainer.max_stepz" in r.stderr and "Did you mean 'trainer.max_steps'" in r.stderr
    r = subprocess.run([sys.executable, "-m", "experiments.sweep", str(good), "--dry-run", "--max-parallel", "2"],
                       cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "2 variant(s)" in r.stdout and "python -m experiments.run" in r.stdout and "optim.lr=0.2" in r.stdout
