"""Smoke test of benchmarks/var_sampling.py (the full run takes minutes: `python -m benchmarks.var_sampling`)."""
from __future__ import annotations

import pytest
import torch

from benchmarks import var_sampling as bench


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_bench_config_row_and_table():
    cpu = torch.device("cpu")
    row = bench.bench_config(2, 128, B=1, reps=1, device=cpu, mem=bench.PeakMemory(cpu, enable=False))  # keep malloc settings
    for m in ("cached", "no_cache", "raster", "cached_official"):
        assert row[f"{m}_s"] > 0 and row[f"{m}_img_s"] > 0
    assert row["L"] == 155 and row["speedup_vs_raster"] > 0 and row["cached_peak_mib"] is None
    md = bench.to_markdown({"device": "cpu", "threads": 1, "torch": torch.__version__, "reps": 1,
                            "timing": "process CPU time"}, [row])
    assert md.count("\n| 2 | 128 | 155 | 1 |") == 1


def test_raster_baseline_generates_tokens():
    vq, var = bench.build_models(2, 128, torch.device("cpu"))
    out = bench.sample_raster(var, 2, torch.tensor([0, 1]), cfg=1.0, top_k=5, top_p=0.0,
                              generator=torch.Generator().manual_seed(0), n_tokens=7, sampler="fast")
    assert out.shape == (2, var.L)
    assert int(out[:, :7].max()) < var.V and int(out[:, :7].min()) >= 0
