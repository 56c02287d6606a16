"""The parity command on a directory it never saw: other sizes, head counts, bit depth, scale
schedule and token ids (tests/v11_selfmade.py). Everything it needs is read from the directory."""
from __future__ import annotations

import json

import pytest

from benchmarks.vargpt11_parity import main

from tests.test_vargpt11_parity import KEYS
from tests.v11_selfmade import make


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # see tests/conftest.py
    yield


def test_other_sizes_ids_and_schedule(tmp_path, capsys):
    d = make(tmp_path / "other")
    assert main([str(d)]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for k in KEYS:
        assert k in r, k
    assert r["ok"] is True
    assert all(r[k] is True for k in KEYS if k.endswith("_equal"))
