"""Every experiment YAML in the repo loads and validates against the schema."""
from __future__ import annotations

import pytest

from experiments.config import EXPERIMENTS_DIR, all_experiment_yamls, load_config

YAMLS = all_experiment_yamls()


def test_there_are_experiments():
    assert (EXPERIMENTS_DIR / "base.yaml") in YAMLS and len(YAMLS) >= 2


@pytest.mark.parametrize("path", YAMLS, ids=[str(p.relative_to(EXPERIMENTS_DIR)) for p in YAMLS])
def test_yaml_loads(path):
    loaded = load_config(path)
    assert loaded.cfg.stage
    assert len(loaded.hash) == 12
