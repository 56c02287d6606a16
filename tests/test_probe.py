"""The vision-feature linear probe (experiments/probe.py) separates what is linearly readable."""
from __future__ import annotations

import torch

from experiments.probe import linear_probe


def test_linear_probe_reads_a_planted_attribute_and_not_noise():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (600,), generator=g)
    x = torch.randn(600, 32, generator=g)
    x[torch.arange(600), y] += 3.0  # the label is written into one feature per class
    assert linear_probe(x, y, n_train=400) > 0.9
    y_noise = torch.randint(0, 4, (600,), generator=g)
    assert linear_probe(x, y_noise, n_train=400) < 0.45  # chance is 0.25


def test_shape_word_positions_in_prompt_order():
    from experiments.probe import shape_word_positions

    pieces = ["<s>", "Draw", " a", " red", " circle", " and", " a", " blue", " Square", "."]
    assert shape_word_positions(pieces, ["circle", "square", "triangle"]) == [4, 8]
    assert shape_word_positions(["a", " circ", "le"], ["circle"]) == []  # split word: not lined up


def test_prompt_binding_probes_every_representation(tmp_path):
    """On a tiny prompt_attn model with the bigram map and a prompt encoder: one probe per LLM
    layer, the gen_cond context and the context the VAR reads; prompts whose shape words do not
    line up are counted."""
    from dataclasses import replace

    from experiments.probe import prompt_binding
    from modules.vargpt import VARGPT
    from tests.tiny import gen_sample, tiny_model_config

    torch.manual_seed(0)
    net = VARGPT(replace(tiny_model_config(tmp_path), var_cond="prompt_attn", prompt_encoder_layers=1,
                                 prompt_context_bigram=True)).eval()
    colours, shapes = ["red", "blue", "green"], ["circle", "square"]
    samples = []
    for i in range(40):
        c, sh = colours[i % 3], shapes[(i // 3) % 2]
        s = gen_sample(f"g{i}", instr=f"Draw a {c} {sh}.")
        s["record"]["scene"] = {"objects": [{"shape": sh, "colour": c}]}
        samples.append(s)
    odd = gen_sample("odd", instr="Draw two red circles.")  # one shape word, two objects: skipped
    odd["record"]["scene"] = {"objects": [{"shape": "circle", "colour": "red"}] * 2}
    out = prompt_binding(net, samples + [odd], train_frac=0.5)
    n_layers = net.llm.config.num_hidden_layers
    assert out["prompts_skipped"] >= 1 and out["objects_train"] + out["objects_test"] <= 40
    keys = [k for k in out if k.startswith("colour_at_shape_word_")]
    assert keys[-2:] == ["colour_at_shape_word_gen_cond_context", "colour_at_shape_word_cross_attn_context"]
    assert len(keys) == n_layers + 3 and all(0.0 <= out[k] <= 1.0 for k in keys)


def test_llm_path_measures_what_gen_out_adds(tmp_path):
    """var_skip at init (gen_out's last layer zero): the LLM path adds nothing, and zeroing it
    changes no loss; with weights it adds something and zeroing it changes the loss."""
    from dataclasses import replace

    from experiments.probe import llm_path
    from modules.vargpt import VARGPT
    from tests.tiny import gen_sample, tiny_model_config, und_sample

    torch.manual_seed(0)
    net = VARGPT(replace(tiny_model_config(tmp_path), var_skip=True)).eval()
    samples = [gen_sample(f"g{i}") for i in range(4)] + [und_sample("u")]  # the last batch: no target at all
    out = llm_path(net, samples, batch_size=4)
    assert out["targets"] == 4 and out["var_skip"] is True
    assert out["rms_gen_out"] == 0.0 and out["rms_front_end"] > 0
    assert out["loss_img"] == out["loss_img_without_llm_path"]
    with torch.no_grad():
        for p in net.gen_out.parameters():
            p.normal_(0, 0.5)
    out = llm_path(net, samples, batch_size=4)
    assert out["rms_gen_out"] > 0 and out["loss_img"] != out["loss_img_without_llm_path"]


def test_llm_path_cli_prints_its_json(tmp_path, monkeypatch, capsys):
    """`python -m experiments.probe CKPT --llm-path` on records as the shard reader yields them."""
    import json
    from dataclasses import replace
    from types import SimpleNamespace

    import experiments.probe as probe
    from modules.vargpt import VARGPT
    from tests.tiny import gen_sample, tiny_model_config, und_sample

    torch.manual_seed(0)
    net = VARGPT(replace(tiny_model_config(tmp_path), var_skip=True)).eval()
    cfg = SimpleNamespace(data=SimpleNamespace(root=""))
    recs = [gen_sample("g0"), und_sample("u0"), gen_sample("g1")]
    for r in recs:  # the shard reader's task names (train/gen-*.tar -> "gen")
        r["task"] = {"generation": "gen", "understanding": "vqa"}[r["task"]]
    seen = {}

    def fake_records(shards, root, n):
        seen.update(shards=shards, n=n)
        return iter(recs)

    monkeypatch.setattr(probe, "load_exported", lambda ckpt: (net, cfg))
    monkeypatch.setattr(probe, "iter_records", fake_records)
    assert probe.main(["some/export", "--llm-path"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert seen == {"shards": "val/gen-*.tar", "n": 64}
    assert out["targets"] == 2 and out["loss_img"] == out["loss_img_without_llm_path"]
