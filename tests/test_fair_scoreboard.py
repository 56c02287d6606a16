"""The scoreboard's fairness pieces: the same-prompt real-vs-real floor (the world renders each
request again), bootstrap intervals over prompts, and both readings of attribute accuracy."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from datamodules.world import make_sample, render, rerender_request
from modules.metrics_world import bootstrap_ci, check_scene, prompt_counts, requested_groups


def _gen(i, split="test"):
    rec, _ = make_sample(0, split, "gen", i)
    return rec


def test_rerender_keeps_what_the_prompt_states_and_redraws_the_rest():
    changed_pos = changed_look = 0
    for i in range(60):
        rec = _gen(i)
        new = rerender_request(rec, seed=1)
        old_o, new_o = rec["scene"]["objects"], new["objects"]
        assert [(o["shape"], o["colour"]) for o in new_o] == [(o["shape"], o["colour"]) for o in old_o]
        # the request is the same, so the classifier-facing groups are the same
        assert requested_groups({**rec, "scene": new}) == requested_groups(rec)
        if rec["checks"]["position"]:
            assert [o["position"] for o in new_o] == [o["position"] for o in old_o]
        else:
            changed_pos += [o["position"] for o in new_o] != [o["position"] for o in old_o]
        if rec["checks"]["size"]:
            assert [o["size"] for o in new_o] == [o["size"] for o in old_o]
        changed_look += new["background"] != rec["scene"]["background"]
        # a perfect reader of the re-rendered scene satisfies the request
        truth = {"objects": [{k: o[k] for k in ("shape", "colour", "size", "position")} for o in new_o]}
        assert check_scene(requested_groups(rec), truth)["all"]
    assert changed_look == 60 and changed_pos > 10  # independent placement where the prompt is silent
    rec = _gen(3)
    a, b = render(rerender_request(rec, 1)), render(rerender_request(rec, 1))
    assert np.array_equal(a, b)  # a pure function of (record, seed)
    assert not np.array_equal(a, render(rerender_request(rec, 2)))


def test_bootstrap_interval_of_a_ratio_over_prompts():
    ones = torch.ones(50, dtype=torch.float64)
    assert bootstrap_ci(ones, ones) == [1.0, 1.0]
    g = torch.Generator().manual_seed(0)
    hits = (torch.rand(400, generator=g) < 0.6).double()
    lo, hi = bootstrap_ci(hits, torch.ones_like(hits))
    p = float(hits.mean())
    half = 1.96 * (p * (1 - p) / 400) ** 0.5  # 0/1 scores: the bootstrap agrees with the binomial
    assert lo < p < hi and abs((hi - lo) / 2 - half) < 0.2 * half
    # prompts that ask for more attributes weigh more in the pooled ratio
    right, asked = torch.tensor([4.0, 0.0]), torch.tensor([4.0, 1.0])
    assert bootstrap_ci(right, asked, reps=4000) == [0.0, 1.0]


def test_prompt_counts_give_both_readings():
    groups = [[{"shape": "circle", "colour": "red", "count": 1}],
              [{"shape": "square", "colour": "blue", "count": 2, "positions": ["left", "right"]}]]
    predicted = [{"objects": [{"shape": "circle", "colour": "red", "size": "small", "position": "top"}]},
                 {"objects": [{"shape": "square", "colour": "blue", "size": "small", "position": "left"}]}]
    right, asked, all_ok = prompt_counts(predicted, groups)
    assert right.tolist() == [2.0, 1.0] and asked.tolist() == [2.0, 3.0] and all_ok.tolist() == [1.0, 0.0]
    # mean over requested attributes 3/5; every attribute right: 1 image of 2
    assert float(right.sum() / asked.sum()) == pytest.approx(0.6) and float(all_ok.mean()) == 0.5


def test_a_corrupted_base_is_refused_at_load_naming_the_file(tmp_path):
    """The shipped bases are checked against MANIFEST.json's sha256 when they load."""
    import shutil

    from experiments.config import REPO_ROOT
    from modules.checkpoint import WeightsIntegrityError, read_state_dict

    src = REPO_ROOT / "assets" / "world"
    for f in ("MANIFEST.json", "var.safetensors", "vqvae.safetensors"):
        shutil.copy(src / f, tmp_path / f)
    assert read_state_dict(tmp_path / "var.safetensors")  # intact: loads
    raw = bytearray((tmp_path / "vqvae.safetensors").read_bytes())
    raw[-10] ^= 0xFF  # one flipped byte inside the last tensor: safetensors itself would load it
    (tmp_path / "vqvae.safetensors").write_bytes(bytes(raw))
    with pytest.raises(WeightsIntegrityError, match=r"vqvae.safetensors: sha256 .* differs from .*MANIFEST.json.*"
                                                    r"git checkout -- .*vqvae.safetensors.*make clean-bases bases"):
        read_state_dict(tmp_path / "vqvae.safetensors")


def test_a_corrupted_base_stops_a_run_with_one_clear_line(tmp_path, capsys):
    import shutil

    from experiments.config import REPO_ROOT
    from experiments.run import main

    dst = tmp_path / "world"
    shutil.copytree(REPO_ROOT / "assets" / "world", dst)
    raw = bytearray((dst / "llava.safetensors").read_bytes())
    raw[-3] ^= 0x01
    (dst / "llava.safetensors").write_bytes(bytes(raw))
    rc = main([str(REPO_ROOT / "experiments/world/stage1.yaml"), f"model.tokenizer.path={dst / 'tokenizer'}",
               f"model.load=[{{path: {dst / 'llava.safetensors'}, keys: [llm, vision, und_proj]}}]",
               f"output_dir={tmp_path / 'out'}", "logging.enabled=false", "trainer.max_steps=1",
               f"data.root={tmp_path / 'no-data'}"])
    err = capsys.readouterr().err
    assert rc == 1 and "llava.safetensors: sha256" in err and "Traceback" not in err, err


def test_pack_records_who_trained_each_base(tmp_path):
    """export.json keeps the run's provenance as JSON values; `bases pack` copies it per base."""
    from experiments.bases import base_provenance
    from modules.checkpoint import write_export

    meta = {"config_hash": "abc", "stage": "base_var", "config_source": "experiments/world/bases/var.yaml",
            "seed": 3, "steps": 1500, "fit_seconds": 862.0, "cpu_model": "Some CPU",
            "git": {"git_commit": "f" * 40, "git_dirty": "false"}, "final_metrics": {"val/loss": 2.1}}
    write_export(tmp_path / "var", {"model.safetensors": {"w": torch.zeros(2)}}, "seed: 3\n", meta)
    got = base_provenance(tmp_path / "var" / "model.safetensors")["trained_by"]
    assert got["steps"] == 1500 and got["seed"] == 3 and got["final_metrics"] == {"val/loss": 2.1}
    assert got["git"]["git_commit"] == "f" * 40 and got["config_source"].endswith("bases/var.yaml")
    assert "unknown" in base_provenance(tmp_path / "nope" / "model.safetensors")["provenance"]
