"""Smoke test of benchmarks/var_sampling.py (the full run takes minutes: `python -m benchmarks.var_sampling`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import var_official
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


def test_cli_without_official_tiny(tmp_path):
    """`python -m benchmarks.var_sampling` as today (no --official), at batch 1, in a subprocess
    (its peak-memory probe changes malloc settings of the process it runs in)."""
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root), HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "benchmarks.var_sampling", "--quick", "--reps", "1", "--batch", "1",
                        "--out", str(tmp_path)], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((tmp_path / "var_sampling.json").read_text())["results"]
    assert [(x["depth"], x["res"], x["B"]) for x in rows] == [(2, 128, 1), (2, 256, 1)]
    assert "| 2 | 256 | 680 | 1 |" in (tmp_path / "var_sampling.md").read_text()


def test_dtype_sweep_rows_and_table():
    case = ("tiny", [1, 2, 3, 4], 512, 16, [1, 1, 2, 2], 32, (1,), dict(cfg=1.5, top_k=5, top_p=0.0))
    sweep = bench.dtype_sweep(1, widths=(64,), cases=(case,))
    (row,) = sweep["rows"]
    assert (row["width"], row["heads"], row["B"], row["res"]) == (64, 2, 1, 32) and row["gain"] > 0
    md = bench.sweep_markdown({"cpu": "x", "threads": 1, "torch": torch.__version__, "reps": 1, "loadavg": [0.5]}, sweep)
    assert "| tiny | 64 | 2 | 1 |" in md and f"BF16_MIN_WIDTH = {sweep['rule_min_width']}" in md


# A stand-in for a FoundationVision/VAR checkout: the official constructor signatures and the one
# sampling entry point, implemented with this repository's classes (parity mode), so the whole
# --official pipeline (import from PATH, sys.modules clean-up, equal weights, index hook, parity
# check, JSON / markdown) runs without the official code.
FAKE_VQVAE = '''
import dist  # the official models import the top-level dist.py of their checkout
from modules.components.vqvae import VQVAEConfig, build_vqvae

def VQVAE(vocab_size, z_channels, ch, v_patch_nums, test_mode=True, **kw):
    return build_vqvae(VQVAEConfig(vocab_size=vocab_size, z_channels=z_channels, ch=ch, patch_nums=list(v_patch_nums)))
'''
FAKE_VAR = '''
import torch
from modules.components.var_decoder import VARConfig, VARDecoder

class VAR(VARDecoder):
    def __init__(self, vae_local, num_classes, depth, embed_dim, num_heads, patch_nums, **kw):
        print("[constructor] fake official VAR")
        super().__init__(VARConfig(depth=depth, embed_dim=embed_dim, num_heads=num_heads, num_classes=num_classes), vae_local)
        self.vae_quant_proxy = (vae_local.quantize,)

    def autoregressive_infer_cfg(self, B, label_B, g_seed=None, cfg=1.5, top_k=0, top_p=0.0):
        g = torch.Generator().manual_seed(g_seed)
        return self.sample(B, label_B, cfg=cfg, top_k=top_k, top_p=top_p, generator=g, parity=True)[1]
'''


def _stand_in_checkout(tmp_path: Path) -> Path:
    fake = tmp_path / "VAR"
    (fake / "models").mkdir(parents=True)
    (fake / "dist.py").write_text("")
    (fake / "models" / "__init__.py").write_text("")
    (fake / "models" / "vqvae.py").write_text(FAKE_VQVAE)
    (fake / "models" / "var.py").write_text(FAKE_VAR)
    return fake


def test_official_comparison_pipeline_with_a_stand_in(tmp_path):
    fake = _stand_in_checkout(tmp_path)
    out = tmp_path / "results"

    def official_names():
        return {k for k in sys.modules if k in ("models", "dist") or k.startswith("models.")}

    before = official_names()
    res = var_official.run(str(fake), lambda d: bench.build_models(d, 128, torch.device("cpu")), [2], B=1, reps=1,
                           vq_ch=32, out=out)
    assert official_names() == before and str(fake) not in sys.path
    (row,) = res["results"]
    assert row["parity_indices_equal"] and row["parity_ok"] and row["parity_img_max_abs"] <= var_official.IMG_TOL
    assert row["depth"] == 2 and row["res"] == 128 and row["suite_default_sampler"] == "fast"
    for m in var_official.METHODS:  # every method timed in every round
        assert row[f"{m}_s"] > 0 and len(row[f"{m}_all_s"]) == 1
    for *_, key in var_official.PAIRS:
        assert row[key] > 0 and f"{key}_wo_decode" in row
    assert row["default_ratio"] in (row["bf16_ratio"], row["fast_fp32_ratio"])
    meta = json.loads((out / "var_sampling_vs_official.json").read_text())["meta"]
    assert len(meta["loadavg_start"]) == 3 and meta["machine"]["threads"] == 1 and "commit" in meta["repo"]
    assert set(meta["target"]) >= {"fast_met", "parity_met", "parity_ok"}
    md = (out / "var_sampling_vs_official.md").read_text()
    # one row per (depth, precision, suite method): fp32 parity, fp32 fast, bf16 autocast fast
    assert md.count("| 2 | 128 | fp32 |") == 2 and md.count("| 2 | 128 | bf16 autocast |") == 1
    assert "Parity mode draws the official indices: **yes**" in md
    # the official precision map: fp32 regions around the front-end and the VQVAE, on instances only
    ovq, ovar = var_official.build_official(var_official.load_official(fake), *bench.build_models(2, 128, torch.device("cpu")))
    var_official.official_precision_map(ovar, ovq)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ovar.blocks[0].ada_lin(torch.randn(2, 128)).dtype == torch.float32
        assert ovar.blocks[0].attn.proj(torch.randn(2, 128)).dtype == torch.bfloat16
    with pytest.raises(FileNotFoundError, match="checkout"):
        var_official.load_official(tmp_path / "nothing")


def test_official_bound_with_a_stand_in(tmp_path):
    """benchmarks.var_official_bound on the stand-in checkout: one profiled call per precision,
    the time split by kernel category adds up, and the ceilings follow from it."""
    from benchmarks import var_official_bound

    fake = _stand_in_checkout(tmp_path)
    out = tmp_path / "results"
    assert var_official_bound.main(["--official", str(fake), "--depths", "2", "--batch", "1", "--res", "128",
                                    "--out", str(out)]) == 0
    rows = json.loads((out / "var_official_bound.json").read_text())["results"]
    assert [r["precision"] for r in rows] == ["fp32", "bf16 autocast"]
    for r in rows:
        cats = r["by_category_s"]
        assert abs(sum(cats.values()) - r["profiled_self_s"]) < 1e-3 and cats["gemm"] > 0
        assert r["ceiling_ratio"] >= r["ceiling_same_kernels"] >= 1.0
        assert r["counted_gflop"] >= r["gemm_gflop"] > 0 and r["peak_gflops"] > 0
    md = (out / "var_official_bound.md").read_text()
    assert "| 2 | 128 | fp32 |" in md and "128 px" in md and rows[0]["adaln_gemm_s"] > 0


def test_train_step_bound_row_and_table(tmp_path):
    """benchmarks.train_step_bound with a stand-in worker: the official step's ops sorted into
    kernel categories, the ceilings from them, the table row."""
    from types import SimpleNamespace

    from benchmarks import train_step_bound as tb

    ops = {"aten::mm": 1.0, "aten::addmm": 0.2, "aten::_scaled_dot_product_flash_attention_for_cpu": 0.1,
           "aten::silu_backward": 0.1, "aten::convolution_backward": 0.1, "aten::copy_": 0.5}
    asked = []

    class FakeOfficial:
        def ask(self, **cmd):
            asked.append(cmd)
            assert Path(cmd["batch"]).is_file()
            return {"self_s_by_op": ops, "loss": 10.0}

    net = SimpleNamespace(L=30, num_image_tokens=16, vision=SimpleNamespace(image_size=56),
                          vqvae=SimpleNamespace(cfg=SimpleNamespace(resolution=64)))
    row = tb.bound_row(FakeOfficial(), net, tmp_path, "small", "gen", "fp32")
    assert asked[0]["cmd"] == "profile" and asked[0]["precision"] == "fp32"
    c = row["by_category_s"]
    assert (c["gemm"], c["attention"], c["activation"], c["convolution"]) == (1.2, 0.1, 0.1, 0.1)
    assert c["other"] == pytest.approx(0.5) and row["official_step_s"] == pytest.approx(2.0)
    assert row["ceiling_same_kernels"] == pytest.approx(2.0 / 1.4, abs=1e-3) and row["ceiling_gemm_only"] == pytest.approx(2.0 / 1.2, abs=1e-3)
    meta = {"official": {"commit": "abcdef0123", "transformers": "4.46.1"}, "cpu_model": "x", "torch": "t",
            "loadavg_start": [1.0], "loadavg_end": [1.0], "commit": "c", "command": "cmd"}
    assert "| small | gen | fp32 | 2.000 | 1.200 | 0.100 | 0.100 | 0.100 | 0.500 | 60% | 1.67x | **1.43x** |" in tb.to_markdown(meta, [row])
