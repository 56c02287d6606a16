"""Shared test setup: offline hub, one thread per test process, fixture paths."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

REPO_ROOT = Path(__file__).resolve().parent.parent
# test vectors and real-format samples, vendored with the repository (see tests/fixtures/README.md)
FIXTURES = REPO_ROOT / "tests" / "fixtures"


def require_fixture(*parts: str | Path) -> Path:
    """tests/fixtures/<parts> (an absolute first part is kept as it is). A missing fixture fails
    the calling test (never skips it): the fixtures are part of the repository, so their absence
    is a broken checkout."""
    p = FIXTURES.joinpath(*parts)
    if not p.exists():
        pytest.fail(f"test fixture missing: {p} (the fixtures are vendored in the repository under "
                    f"tests/fixtures/; see tests/fixtures/README.md)", pytrace=False)
    return p


EVAL_EXTRA_HINT = "lmms-eval is the optional extra: install it with `make setup-eval`"


def eval_extra_missing(env: dict, installed: bool) -> tuple:
    """What a test needing the lmms-eval extra does without it: ("", "") when it is installed;
    ("fail", why) in CI (env CI=true: .ci/run installs the extra, so its absence is a broken CI,
    never a silent skip); ("skip", the install command) elsewhere."""
    if installed:
        return "", ""
    if str(env.get("CI", "")).lower() in ("1", "true", "yes"):
        return "fail", f"CI=true but {EVAL_EXTRA_HINT} (.ci/run runs it before the tests)"
    return "skip", EVAL_EXTRA_HINT


@pytest.fixture(scope="session")
def lmms_eval_extra() -> None:
    """Session-scoped, so it decides before any module fixture builds a checkpoint."""
    import importlib.util

    action, why = eval_extra_missing(dict(os.environ), importlib.util.find_spec("lmms_eval") is not None)
    if action == "fail":
        pytest.fail(why, pytrace=False)
    if action == "skip":
        pytest.skip(why)


def load_sharded_safetensors(d: Path | str, prefix: str = "", index: str = "model.safetensors.index.json"):
    """The state dict of a sharded Hugging Face checkpoint directory `d` (relative to
    tests/fixtures or absolute; `index` maps {"weight_map": {key: shard file}}): the keys under
    `prefix` (kept whole), in the stored dtypes. Fails the test if the index or a shard is
    missing or a shard's keys differ from what the index lists for it."""
    import json

    from safetensors.torch import load_file

    weight_map = json.loads(require_fixture(d, index).read_text())["weight_map"]
    sd = {}
    for shard in sorted(set(weight_map.values())):
        path = require_fixture(d, shard)
        tensors = load_file(path)
        listed = {k for k, f in weight_map.items() if f == shard}
        if set(tensors) != listed:
            pytest.fail(f"{path}: holds {len(tensors)} tensors, the index lists {len(listed)} for it "
                        f"(first difference: {sorted(set(tensors) ^ listed)[:3]})", pytrace=False)
        sd.update((k, t) for k, t in tensors.items() if k.startswith(prefix))
    return sd


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return require_fixture()


@pytest.fixture
def tracking_uri(tmp_path) -> str:
    """A fresh SQLite MLflow store per test, so tests never touch runs/mlflow.db."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_thread():
    """One intra-op thread for tests of many small ops: on a busy 2-core machine two OpenMP
    threads wait at every op's barrier for a descheduled partner (measured 20x slower)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
