"""The world VARGPT-v1.1 chain (make v11-world, make v11-dpo) at tiny size: the recipes
experiments/world/v11/{gen,edit,dpo}.yaml through ``python -m experiments.run`` from stand-in bases
(a random world Qwen2-VL and BSQ file, loaded the way the recipes load the shipped ones), the
scoreboard report (experiments/pipeline_v11.py) with understanding, generation and editing rows,
the scoreboard rendering it beside the other columns, and the DPO ablation's pairs and comparison
(experiments/dpo_world.py)."""
from __future__ import annotations

import json

import pytest
import torch

from experiments.config import REPO_ROOT, load_config
from modules.checkpoint import read_state_dict, save_state_dict

from tests.tiny import tiny_tokenizer_dir

W = REPO_ROOT / "experiments" / "world" / "v11"
# the world v1.1 at its smallest that still has every part; image_side 32: a 64 px ViT input costs
# more than the rest here
SMALL = ["model.v11.llm.num_hidden_layers=1", "model.v11.llm.vision_depth=1", "model.v11.tokenizer.base_ch=24",
         "model.v11.tokenizer.ch_mult=[1,1,1,1,1]", "model.v11.tokenizer.scales=[[1,1],[2,2],[4,4]]",
         "model.v11.decoder.depth=1", "model.v11.image_side=32"]
RUN = ["logging.enabled=false", "trainer.max_steps=2", "data.batch_size=2", "trainer.num_threads=1",
       "checkpoint.at_end=false", "data.num_workers=0", "data.shuffle_buffer=4", "trainer.val_every_n_steps=0",
       "data.val_sources=[]"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """World shards (64 px) as the recipes read them (data root world/, edits beside it in
    world/edit/) and stand-in bases: a random v1.1's visual/model/lm_head and its tokenizer."""
    from datamodules.world import generate_split
    from datamodules.world_edit import BUILDERS
    from modules.vargpt11_world import VARGPT11World

    root = tmp_path_factory.mktemp("v11chain")
    w = root / "world"
    e = w / "edit"  # as make v11-world renders them: runs/data/world/edit
    generate_split(str(w / "train"), "train", {"gen": 8, "vqa": 8}, seed=0, size=64, shard_size=8)
    for split in ("test", "heldout"):
        generate_split(str(w / split), split, {"gen": 4, "vqa": 4}, seed=0, size=64)
    generate_split(str(e / "train"), "train", {"edit": 6}, seed=0, size=64, builders=BUILDERS)
    generate_split(str(e / "test"), "test", {"edit": 3}, seed=0, size=64, builders=BUILDERS)
    tok = tiny_tokenizer_dir(root)
    cfg = load_config(W / "model.yaml", ["model.load=[]", f"model.tokenizer.path={tok}", *SMALL]).cfg
    torch.manual_seed(0)
    sd = VARGPT11World(cfg.model, template=cfg.data.chat).state_dict()
    save_state_dict({k: v for k, v in sd.items() if k.startswith(("visual.", "model.", "lm_head."))}, root / "qwen2vl.safetensors")
    save_state_dict({k[len("gen.vae_local."):]: v for k, v in sd.items() if k.startswith("gen.vae_local.")},
                    root / "bsq.safetensors")
    return root, tok


def _common(root, tok):
    return [f"model.tokenizer.path={tok}", f"data.root={root / 'world'}", *SMALL, *RUN]


def test_v11_world_chain_writes_a_report_with_editing_rows(world, tmp_path):
    from experiments import pipeline_v11
    from experiments.run import main as run_main
    from experiments.scoreboard import render_scoreboard, scoreboard_rows

    root, tok = world
    runs = tmp_path / "world-v11"
    load = (f"model.load=[{{path: {root / 'bsq.safetensors'}, into: gen.vae_local}}, "
            f"{{path: {root / 'qwen2vl.safetensors'}, allow_missing: ['gen.*']}}]")
    assert run_main([str(W / "gen.yaml"), *_common(root, tok), load, f"output_dir={runs / 'gen'}"]) == 0
    gen_sd = read_state_dict(runs / "gen" / "model.safetensors")
    base = read_state_dict(root / "qwen2vl.safetensors")
    # stage "gen" (the release's stage 0): the world Qwen2-VL arrived and stayed frozen
    assert all(torch.equal(gen_sd[k], v) for k, v in base.items())
    assert run_main([str(W / "edit.yaml"), *_common(root, tok), f"output_dir={runs / 'edit'}",
                     f"init_from={runs / 'gen'}"]) == 0
    edit_sd = read_state_dict(runs / "edit" / "model.safetensors")
    # stage "edit" (the release's stage 5): the ViT and the LLM trained, the tokenizer did not
    assert not torch.equal(edit_sd["visual.merger.mlp.0.weight"], gen_sd["visual.merger.mlp.0.weight"])
    assert all(torch.equal(edit_sd[k], gen_sd[k]) for k in gen_sd if k.startswith("gen.vae_local."))

    out = tmp_path / "pipeline-v11" / "report.json"
    assert pipeline_v11.main(["--runs", str(runs), "--out", str(out), "--edit-shards",
                              str(root / "world" / "edit" / "test" / "edit-*.tar"), "--num-vqa", "4", "--num-gen", "4",
                              "--num-edit", "3"]) == 0
    rep = json.loads(out.read_text())
    assert rep["family"] == "vargpt11" and rep["stage2"]["n"] == 4 and rep["stage3"]["gen_n"] == 4
    assert rep["edit"]["edit_n"] == 3 and 0 <= rep["edit_accuracy"] <= 1
    assert rep["edit_references"]["targets"]["edit"] == 1.0  # the scorer reads the rendered targets right
    assert rep["edit_references"]["copy"]["edit"] == 0.0  # and an unedited source as no edit
    assert rep["gen_stage"]["gen_n"] == 4 and rep["bsq_reconstruction"]["n"] == 4
    rows = dict(scoreboard_rows(rep))
    assert "**editing: edit accuracy** (the edited facts hold; test edits)" in rows
    assert rows["VQA accuracy, test split"].startswith(f"**{rep['vqa_accuracy']:.4g}".rstrip("0"))
    # beside a v1 column: the rows one column lacks read n/a
    sb = {"presets": {"v11": {"provenance": {"commit": "abc1234", "cpu_model": "cpu", "timings": {}}, "report": rep},
                      "default": {"provenance": {"commit": "abc1234", "cpu_model": "cpu", "timings": {}},
                                  "report": {k: v for k, v in rep.items() if k not in ("edit", "edit_references", "gen_stage")}}}}
    table = render_scoreboard(sb)
    edit_line = next(line for line in table.splitlines() if line.startswith("| **editing: edit accuracy**"))
    assert edit_line.count("n/a") == 1 and "VARGPT-v1.1 (`make v11-world`)" in table


def test_dpo_ablation_pairs_train_and_compare(world, tmp_path, monkeypatch):
    """Pairs from the export's draws on training prompts (ranked by a scorer; here one that prefers
    draw 1 so every prompt makes a pair), DPO on them through the launcher, then before vs after on
    the test prompts with a paired interval."""
    from experiments import dpo_world
    from experiments.run import main as run_main
    from modules.vargpt11_world import VARGPT11World

    root, tok = world
    loaded = load_config(W / "model.yaml", ["model.load=[]", f"model.tokenizer.path={tok}", f"data.root={root / 'world'}",
                                            *SMALL, "model.classifier.width=16"])
    torch.manual_seed(1)
    export = tmp_path / "edit"
    export.mkdir()
    save_state_dict(VARGPT11World(loaded.cfg.model, template=loaded.cfg.data.chat).state_dict(), export / "model.safetensors")
    (export / "config.yaml").write_text(loaded.to_yaml())

    calls = []
    real_score = dpo_world._score

    def ranked(clf, images, samples):  # the real reading, then draw 1 made the best and draw 0 the worst
        right, asked = real_score(clf, images, samples)
        calls.append(len(samples))
        k = len(calls) - 1
        return torch.full_like(asked, {0: 0.0, 1: 1.0}.get(k, 0.5)) * asked, asked

    monkeypatch.setattr(dpo_world, "_score", ranked)
    pairs = tmp_path / "pairs"
    assert dpo_world.main(["pairs", str(export), "--out", str(pairs), "--prompts", "3", "--draws", "3"]) == 0
    info = json.loads((pairs / "pairs.json").read_text())
    assert info["pairs"] == 3 and info["no_pair_all_draws_equal"] == 0 and info["mean_chosen"] == 1.0
    assert info["mean_rejected"] == 0.0
    monkeypatch.setattr(dpo_world, "_score", real_score)

    assert run_main([str(W / "dpo.yaml"), f"model.tokenizer.path={tok}", f"data.root={pairs}", *SMALL, *RUN,
                     f"init_from={export}", f"output_dir={tmp_path / 'dpo'}"]) == 0
    out = tmp_path / "dpo.json"
    assert dpo_world.main(["compare", str(export), str(tmp_path / "dpo"), "--out", str(out), "--prompts", "4",
                           "--pairs", str(pairs / "pairs.json"), "--dpo-run", str(tmp_path / "dpo")]) == 0
    res = json.loads(out.read_text())
    d = res["difference"]
    assert res["before"]["n"] == res["after"]["n"] == 4
    assert d["after_minus_before"] == pytest.approx(res["after"]["attribute_accuracy"] - res["before"]["attribute_accuracy"],
                                                    abs=1e-3)
    assert d["ci95_paired"][0] <= d["after_minus_before"] <= d["ci95_paired"][1]
    assert res["dpo"]["config"]["beta"] == 0.1 and res["pairs"]["pairs"] == 3


def test_paired_interval():
    from experiments.dpo_world import paired_diff_ci

    asked = torch.full((50,), 4.0)
    a = torch.randint(0, 5, (50,)).float()
    assert paired_diff_ci(a, a, asked) == [0.0, 0.0]  # the same draws: no difference, no spread
    lo, hi = paired_diff_ci(a, a + 1, asked)  # one more attribute right on every prompt: +0.25 exactly
    assert lo == pytest.approx(0.25) and hi == pytest.approx(0.25)
    b = a.clone()
    b[:10] += 1
    lo, hi = paired_diff_ci(a, b, asked)
    assert 0 < lo < 0.05 < hi  # 10 of 50 prompts one better: +0.05, an interval that excludes 0


def test_world_qwen2vl_base_recipe_trains_from_a_llama(world, tmp_path):
    """experiments/world/bases/qwen2vl.yaml (stage v11_und) through the launcher: the LLM arrives from a
    file in the suite's Llama names (format llama_qwen2), then the ViT, merger and LLM train."""
    from experiments.run import main as run_main

    root, tok = world
    qwen = read_state_dict(root / "qwen2vl.safetensors")
    llama = {f"llm.{k}": v for k, v in qwen.items() if k.startswith(("model.", "lm_head.")) and not k.endswith("_proj.bias")}
    save_state_dict(llama, tmp_path / "llava.safetensors")
    out = tmp_path / "qwen2vl"
    assert run_main([str(REPO_ROOT / "experiments/world/bases/qwen2vl.yaml"), f"model.tokenizer.path={tok}",
                     f"data.root={root / 'world'}", *SMALL, *RUN, "eval.vqa_shards=", f"output_dir={out}",
                     "data.sources=[{name: vqa, shards: 'train/vqa-*.tar', task: understanding}]",
                     f"model.load=[{{path: {tmp_path / 'llava.safetensors'}, format: llama_qwen2}}]"]) == 0
    sd = read_state_dict(out / "model.safetensors")
    # trained from where they started: the ViT's merger (random), an LLM weight (the file's), a
    # q bias (zero: the Llama has none)
    assert not torch.equal(sd["visual.merger.mlp.0.weight"], qwen["visual.merger.mlp.0.weight"])
    assert not torch.equal(sd["model.layers.0.mlp.up_proj.weight"], qwen["model.layers.0.mlp.up_proj.weight"])
    assert sd["model.layers.0.self_attn.q_proj.bias"].abs().max() > 0
