"""benchmarks/train_step.py and its measuring library benchmarks/step_timing.py work on the tiny preset
(a smoke test, no timing claims)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import step_timing as st
from benchmarks import train_step as bt


def test_count_flops_of_a_linear_layer():
    lin = torch.nn.Linear(8, 16, bias=False)
    x = torch.randn(4, 8)
    assert st.count_flops(lambda: lin(x)) == 2 * 4 * 8 * 16

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, batch):
            return {"loss": self.lin(batch["x"]).square().mean()}

    fwd, step = st.train_flops(Net(), {"x": x})
    # backward: the weight gradient only (the input needs none) -> one more matmul of the same size
    assert (fwd, step) == (2 * 4 * 8 * 16, 2 * 2 * 4 * 8 * 16)
    assert lin.weight.grad is None  # train_flops leaves no gradients behind


def test_lower_envelope_takes_each_batch_fastest_occurrence():
    # warmup 1, 2 distinct batches: timed step k used batch (1 + k) % 2 -> 1, 0, 1, 0
    reps = [[5.0, 2.0, 3.0, 9.0], [4.0, 7.0, 6.0, 1.0]]
    assert st.lower_envelope(reps, warmup=1, distinct=2) == pytest.approx((3.0 + 1.0) / 2)


def test_step_estimates_per_clock_and_method():
    # warmup 1, 2 distinct batches; one method, two reps of two timed steps
    rep = {"wall": [2.0, 4.0], "cpu": [1.0, 3.0], "wall_outside": [0.5, 0.1], "cpu_outside": [0.2, 0.4]}
    fast = {k: [x / 2 for x in v] for k, v in rep.items()}
    est = st.step_estimates({"plain": [rep, fast]}, warmup=1, distinct=2)
    assert list(est) == ["wall", "cpu"]
    assert list(est["wall"]) == ["envelope", "best_mean", "outside_median", "outside_mean"]
    assert est["wall"]["envelope"]["plain"] == pytest.approx((1.0 + 2.0) / 2)
    assert est["cpu"]["best_mean"]["plain"] == pytest.approx(1.0)
    assert est["wall"]["outside_median"]["plain"] == pytest.approx((0.1 + 0.25) / 2)
    assert est["cpu"]["outside_mean"]["plain"] == pytest.approx((0.2 + 0.4 + 0.1 + 0.2) / 4)


def test_matmul_peak_reports_both_clocks():
    peak = st.matmul_peak(n=128, seconds=0.1, window=0.02)
    assert set(peak) == {"wall", "cpu"}
    assert all(math.isfinite(v) and v > 1e6 for v in peak.values())


def test_default_yamls_fall_back_to_tiny(monkeypatch, tmp_path):
    monkeypatch.setattr(bt, "WORLD", {s: tmp_path / f"{s}.yaml" for s in bt.STAGES})
    preset, yamls = bt.default_yamls()
    assert preset == "tiny" and yamls["stage2"] == bt.TINY["stage2"]
    for p in bt.WORLD.values():
        p.write_text("stage: stage1\n")
    assert bt.default_yamls() == ("world", bt.WORLD)


@pytest.fixture(scope="module")
def tiny_row(tmp_path_factory):
    """One (config, stage) measured in-process: tiny stage 1, 2 timed steps, MLflow on."""
    work = tmp_path_factory.mktemp("bench_train_step")
    yaml = bt.TINY["stage1"]
    extra, notes = bt.stand_in_overrides(yaml, bt.BENCH_OVERRIDES, work)
    row = bt.run_one(str(yaml), extra, "stage1", "tiny", steps=2, warmup=1, reps=1, distinct=2, threads=1,
                     mlflow=True, peak_n=256, peak_seconds=0.2)
    row["stand_ins"] = notes
    return row


def test_run_one_measures_a_tiny_stage(tiny_row):
    r = tiny_row
    assert r["config"] == "tiny" and r["stage"] == "stage1" and r["threads"] == 1
    assert 0 < r["params_trainable"] < r["params_total"]
    assert r["batch_size"] == 4 and r["tokens_per_batch"] > 0 and r["gen_targets_per_batch"] == 4  # stage 1: all gen
    assert 0 < r["flops_fwd"] < r["flops_step"]
    assert 0 < r["flops_fwd_analytic_llm"] < r["flops_fwd"]  # the LLM is only part of the counted forward
    for k in ("step_s_plain", "step_s_lightning", "step_s_lightning_mlflow", "samples_per_s", "tokens_per_s",
              "peak_fraction", "peak_fraction_cpu"):
        assert r[k] > 0 and math.isfinite(r[k]), k
    assert r["lightning_overhead"] > -1 and math.isfinite(r["lightning_overhead_cpu"])
    assert r["lightning_mlflow_overhead"] is not None
    assert len(r["step_s_all"]["plain"][0]["wall"]) == 2 and len(r["step_s_all"]["lightning"][0]["cpu"]) == 2
    # the model's own work (forward, backward, update) is found inside each step: outside < step
    for method in ("plain", "lightning"):
        rep = r["step_s_all"][method][0]
        assert all(0 <= o < t for o, t in zip(rep["cpu_outside"], rep["cpu"])), method
    assert set(r["lightning_added_s"]) == {"wall", "cpu"}
    assert r["peak_rss_mb"] >= r["rss_after_build_mb"] > 0
    json.dumps(r)  # the subprocess hands rows back as JSON


def test_markdown_table_has_a_row_per_measurement(tiny_row):
    result = {"machine": st.machine_info(), "rows": [tiny_row, dict(tiny_row, config="tiny-larger")],
              "settings": {"steps": 2, "warmup": 1, "reps": 1, "distinct": 2, "peak_n": 256},
              "configs": {"tiny": {"yamls": ["experiments/tiny/stage1.yaml"], "overrides": []}}}
    md = bt.to_markdown(result)
    lines = md.splitlines()
    assert lines[0].startswith("| config | stage |") and "overhead +MLflow" in lines[0]
    assert sum(ln.startswith("| tiny | stage1 |") for ln in lines) == 1
    assert sum(ln.startswith("| tiny-larger | stage1 |") for ln in lines) == 1
    assert len({ln.count("|") for ln in lines[:4]}) == 1  # header, rule and rows have the same columns


@pytest.mark.slow
def test_cli_writes_json_and_markdown(tmp_path):
    """The full driver: a fresh subprocess per configuration, results gathered as JSON."""
    assert bt.main(["--quick", "--configs", "default", "--stages", "stage1", "--stage1", str(bt.TINY["stage1"]),
                    "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "train_step.json").read_text())
    (row,) = result["rows"]
    assert row["config"] == "custom" and row["stage"] == "stage1" and row["step_s_lightning"] > 0
    assert "| custom | stage1 |" in (tmp_path / "train_step.md").read_text()


def test_length_groups_benchmark_smoke(tmp_path):
    """benchmarks/length_groups.py end to end on the world stage-2 YAML (stand-in shards where the
    world data is missing): both group counts timed, fewer LLM positions with 2 groups."""
    from benchmarks import length_groups as lg

    out = tmp_path / "lg"
    assert lg.main(["--stages", "stage2_und_only", "--groups", "1", "2", "--quick", "--out", str(out)]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    (row,) = res["results"]
    pos = row["llm_positions_per_row"]
    assert pos["1"] == pytest.approx(row["padded_positions_per_row"])
    assert row["real_positions_per_row"] <= pos["2"] <= pos["1"]
    assert all(math.isfinite(row["step_s"][c][k]) and row["step_s"][c][k] > 0 for c in ("wall", "cpu") for k in ("1", "2"))
    assert "| stage2_und_only | 2 |" in out.with_suffix(".md").read_text()
