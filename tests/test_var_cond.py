"""model.var_cond gen_start: the LLM state at <|image_gen_start|> conditions the VAR's AdaLN.

It starts as v1 (label): the projector's last layer is zero, so the logits are v1's until it
trains. Once it has weights, the prompt changes the VAR condition, KV-cached inference computes
the training logits, the stage trainable sets include it, and the released layout refuses it."""
from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from modules.vargpt import VARGPT
from tests.tiny import (assert_inference_is_training, collator_for, gen_sample, plain_and_variant,
                        teacher_forced_per_scale, tiny_model_config)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    cfg = tiny_model_config(tmp_path_factory.mktemp("tiny"))
    torch.manual_seed(0)
    v1 = VARGPT(cfg).eval()
    torch.manual_seed(0)
    gs = VARGPT(replace(cfg, var_cond="gen_start")).eval()
    gs.load_state_dict(v1.state_dict(), strict=False)  # the same weights, plus gen_cond (zero last layer)
    return v1, gs


def _give_weights(net):
    net = copy.deepcopy(net)
    with torch.no_grad():
        for p in list(net.gen_cond.parameters()) + list(net.var.head.parameters()):
            p.normal_(0, 0.5)
    return net


def test_gen_start_starts_as_v1(pair):
    v1, gs = pair
    assert v1.gen_cond is None and gs.gen_cond is not None
    b = collator_for(v1)([gen_sample("g0"), gen_sample("g1", instr="two blue squares at the top")])
    with torch.no_grad():
        a, g = v1(b, return_logits=True), gs(b, return_logits=True)
    torch.testing.assert_close(g["logits_img"], a["logits_img"], atol=0, rtol=0)


def test_gen_start_condition_carries_the_prompt(pair):
    gs = _give_weights(pair[1])
    col = collator_for(gs)
    s1, s2 = gen_sample("g0", instr="Draw a red circle."), gen_sample("g0", instr="two blue squares at the top please")
    with torch.no_grad():
        b1, b2 = col([s1]), col([s2])
        _, m1, _, _ = gs.embed(b1)
        h1 = gs.run_llm(gs.embed(b1)[0], b1["attention_mask"], use_cache=False).last_hidden_state
        h2 = gs.run_llm(gs.embed(b2)[0], b2["attention_mask"], use_cache=False).last_hidden_state
        c1, c2 = gs.prompt_condition(h1, m1), gs.prompt_condition(h2, b2["input_ids"] == gs.gen_pad_id)
    assert c1.shape == (1, gs.c_var) and not torch.allclose(c1, c2)
    # the state read is the one at <|image_gen_start|>: the token before the first pad slot
    first_pad = int((b1["input_ids"][0] == gs.gen_pad_id).nonzero()[0])
    assert int(b1["input_ids"][0, first_pad - 1]) == gs.ids["gen_start"]


def test_gen_start_inference_computes_the_training_logits(pair):
    gs = _give_weights(pair[1])
    train, got = teacher_forced_per_scale(gs, ["Draw a red circle on the left."],
                                          gen_sample("g0", instr="Draw a red circle on the left."))
    torch.testing.assert_close(got, train, atol=1e-4, rtol=1e-4)
    # and sampling runs with guidance (the unconditional half reads the null prompt's state)
    img = gs.generate_image(["Draw a red circle.", "two squares"], cfg=2.0, seed=[0, 1])
    assert img.shape[0] == 2 and torch.isfinite(img).all()


def test_gen_start_config_checks(tmp_path):
    cfg = tiny_model_config(tmp_path)
    with pytest.raises(ValueError, match="var_cond"):
        replace(cfg, var_cond="prompt").validate()
    with pytest.raises(ValueError, match="cfg_uncond=null_prompt"):
        replace(cfg, var_cond="gen_start", cfg_uncond="noise").validate()
    from modules.vargpt_format import FormatError, check_exportable

    with pytest.raises(FormatError, match="var_cond must be label"):
        check_exportable(VARGPT(replace(cfg, var_cond="gen_start")))
    with pytest.raises(FormatError, match="var_skip must be false"):
        check_exportable(VARGPT(replace(cfg, var_skip=True)))


@pytest.fixture(scope="module")
def attn_pair(tmp_path_factory):
    cfg = tiny_model_config(tmp_path_factory.mktemp("tiny_attn"))
    torch.manual_seed(0)
    v1 = VARGPT(cfg).eval()
    pa = VARGPT(replace(cfg, var_cond="prompt_attn")).eval()
    pa.load_state_dict(v1.state_dict(), strict=False)  # v1's weights; gen_cond and var.cross new
    return v1, pa


def _give_attn_weights(net):
    net = copy.deepcopy(net)
    with torch.no_grad():
        for p in list(net.var.cross.parameters()) + list(net.var.head.parameters()):
            p.normal_(0, 0.3)
    return net


def test_prompt_attn_starts_as_v1_then_reads_the_prompt(attn_pair):
    v1, pa = attn_pair
    assert pa.var.cross is not None and len(pa.var.cross) == pa.var.depth and v1.var.cross is None
    b = collator_for(v1)([gen_sample("g0"), gen_sample("g1", instr="two blue squares at the top")])
    with torch.no_grad():
        torch.testing.assert_close(pa(b, return_logits=True)["logits_img"], v1(b, return_logits=True)["logits_img"],
                                   atol=0, rtol=0)  # cross-attention output starts at zero
    net = _give_attn_weights(pa)
    col = collator_for(net)
    with torch.no_grad():
        b1, b2 = col([gen_sample("g0", instr="Draw a red circle.")]), col([gen_sample("g0", instr="a cross please")])
        ctx1 = net.prompt_context(net.run_llm(net.embed(b1)[0], b1["attention_mask"], use_cache=False).last_hidden_state,
                                  b1["input_ids"] == net.gen_pad_id, b1["attention_mask"])
    first_pad = int((b1["input_ids"][0] == net.gen_pad_id).nonzero()[0])
    assert ctx1[0].shape == (1, first_pad, net.c_var) and bool(ctx1[1].all())  # the prompt, gen_start included
    # a batch-mate's longer prompt pads this sample's context: the logits do not change
    with torch.no_grad():
        alone = net(b1, return_logits=True)["logits_img"]
        both = net(col([gen_sample("g0", instr="Draw a red circle."),
                        gen_sample("g1", instr="Can you make an image showing a blue square at the top and a "
                                               "blue triangle on the left?")]), return_logits=True)["logits_img"]
        other = net(b2, return_logits=True)["logits_img"]
    torch.testing.assert_close(both[:1], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(alone, other)


def test_prompt_attn_inference_computes_the_training_logits(attn_pair):
    net = _give_attn_weights(attn_pair[1])
    assert_inference_is_training(net)


def test_official_var_loads_into_a_cross_attention_decoder(attn_pair, tmp_path):
    """A class-conditional VAR checkpoint (no cross.*) loads into a prompt_attn model: the
    cross-attention layers are the only new keys."""
    from modules.config import LoadSpec
    from modules.weights import apply_load_spec
    from safetensors.torch import save_file

    _, pa = attn_pair
    sd = {k: v for k, v in pa.var.state_dict().items() if not k.startswith("cross.") and k != "cond_emb.weight"}
    sd["class_emb.weight"] = torch.zeros(25, pa.var.C)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "var.safetensors"))
    net = copy.deepcopy(pa)
    apply_load_spec(net, LoadSpec(path=str(tmp_path / "var.safetensors"), format="official_var"))
    torch.testing.assert_close(net.var.blocks[0].attn.proj.weight, pa.var.blocks[0].attn.proj.weight)


# ------------------------------------------------------------------ model.var_skip
@pytest.fixture(scope="module")
def skip_net(tmp_path_factory):
    cfg = tiny_model_config(tmp_path_factory.mktemp("tiny_skip"))
    torch.manual_seed(0)
    return VARGPT(replace(cfg, var_cond="prompt_attn", var_skip=True)).eval()


def test_var_skip_starts_as_the_bare_var(skip_net):
    """gen_out's last layer starts at zero: the blocks read exactly the VAR's own front end, so a
    pretrained VAR computes what it did before VARGPT (the LLM adds nothing yet)."""
    net = skip_net
    b = collator_for(net)([gen_sample("g0"), gen_sample("g1", instr="two blue squares at the top")])
    with torch.no_grad():
        got = net(b, return_logits=True)["logits_img"]
        idx = net.encode_targets(b)
        front = net.gen_front_end(idx, torch.zeros(2, dtype=torch.long))  # (N, L, C_var)
        prompt = net.prompt_context(net.run_llm(net.embed(b)[0], b["attention_mask"], use_cache=False).last_hidden_state,
                                    b["input_ids"] == net.gen_pad_id, b["attention_mask"])
        bare = net.var.forward_blocks(front, torch.zeros(2, dtype=torch.long), None, prompt)
    torch.testing.assert_close(got, bare, atol=1e-5, rtol=1e-5)


def test_var_skip_inference_computes_the_training_logits(skip_net):
    net = copy.deepcopy(skip_net)
    with torch.no_grad():  # give the LLM path and the cross-attention weights
        for p in list(net.gen_out.parameters()) + list(net.var.cross.parameters()):
            p.normal_(0, 0.3)
    assert_inference_is_training(net)
    with torch.no_grad():  # and the LLM path now changes the logits
        b = collator_for(net)([gen_sample("g0")])
        assert not torch.allclose(net(b, return_logits=True)["logits_img"],
                                  skip_net(b, return_logits=True)["logits_img"])


# ------------------------------------------------------------------ model.prompt_encoder_layers
@pytest.fixture(scope="module")
def enc_pair(tmp_path_factory):
    return plain_and_variant(tmp_path_factory.mktemp("tiny_enc"), {"prompt_encoder_layers": 2}, "prompt_enc")


def test_prompt_encoder_positions_count_back_from_the_prompt_end():
    from modules.components.prompt_encoder import PromptEncoder

    enc = PromptEncoder(8, 2, 1, max_len=16)
    with torch.no_grad():
        for p in enc.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(1, 3, 8)
    right = enc(torch.cat([x, torch.randn(1, 2, 8)], 1), torch.tensor([[True, True, True, False, False]]))
    left = enc(torch.cat([torch.randn(1, 2, 8), x], 1), torch.tensor([[False, False, True, True, True]]))
    # the same 3-token prompt, padded on either side with anything: the same encoding
    torch.testing.assert_close(right[:, :3], left[:, 2:], atol=1e-5, rtol=1e-5)
    # and order matters: positions make a permuted prompt encode differently
    perm = enc(x[:, [1, 0, 2]], torch.ones(1, 3, dtype=torch.bool))
    assert not torch.allclose(perm[:, 2], enc(x, torch.ones(1, 3, dtype=torch.bool))[:, 2], atol=1e-4)


# ------------------------------------------------------------------ model.prompt_context_bigram
@pytest.fixture(scope="module")
def bigram_pair(tmp_path_factory):
    # a window of 3 (the bigram and one more): the general path, KV-cached generation included
    return plain_and_variant(tmp_path_factory.mktemp("tiny_bigram"),
                             {"prompt_context_bigram": True, "prompt_context_window": 3}, "gen_cond_bigram")


@pytest.mark.parametrize("window", [2, 3])
def test_prompt_bigram_reads_each_token_and_the_ones_before(window):
    """The context at position t changes with tokens t-window+1..t and not with earlier or later
    ones (model.prompt_context_window; 2 = the bigram), and padding on either side leaves the
    prompt's context as it is."""
    from types import SimpleNamespace

    from modules.vargpt import VARGPT as V

    torch.manual_seed(0)
    d, c, P = 6, 5, 6
    net = SimpleNamespace(gen_cond_bigram=torch.nn.Linear(window * d, c), prompt_enc=None,
                          project_cond=lambda h: torch.zeros(*h.shape[:-1], c))
    emb = torch.randn(1, P, d)
    ones = torch.ones(1, P, dtype=torch.bool)
    with torch.no_grad():
        base = V.cross_context(net, emb, ones, emb)
        prev = emb.clone()
        prev[0, 1] += 1.0  # token 1 changes: positions 1..window change, the others do not
        got = V.cross_context(net, emb, ones, prev)
        changed = (got - base).abs().sum(-1)[0] > 1e-6
        assert changed.tolist() == [1 <= t <= window for t in range(P)]
        pads = torch.randn(1, 2, d)  # any values under the padding
        right = V.cross_context(net, torch.cat([emb, pads], 1), torch.cat([ones, torch.zeros(1, 2, dtype=torch.bool)], 1),
                                torch.cat([emb, pads], 1))
        left = V.cross_context(net, torch.cat([pads, emb], 1), torch.cat([torch.zeros(1, 2, dtype=torch.bool), ones], 1),
                               torch.cat([pads, emb], 1))
    torch.testing.assert_close(right[:, :P], base)
    torch.testing.assert_close(left[:, 2:], base)
    with pytest.raises(ValueError, match="needs the prompt's input embeddings"):
        V.cross_context(net, emb, ones)


# ------------------------------------------------------------------ both prompt-context parts
PARTS = [("enc_pair", "prompt_enc", {"prompt_encoder_layers": 1}),
         ("bigram_pair", "gen_cond_bigram", {"prompt_context_bigram": True})]


def _give_part_weights(net, part: str):
    """A copy of ``net`` whose zero-initialised part ``part`` has random weights."""
    net = copy.deepcopy(net)
    with torch.no_grad():
        for p in net.get_submodule(part).parameters():
            p.normal_(0, 0.3)
    return net


@pytest.mark.parametrize("pair_name", [p[0] for p in PARTS])
def test_prompt_part_starts_at_identity(request, pair_name):
    """An export without the part, loaded into a model with it, computes the same logits."""
    plain, variant = request.getfixturevalue(pair_name)
    b = collator_for(plain)([gen_sample("g0"), gen_sample("g1", instr="two blue squares at the top")])
    with torch.no_grad():
        torch.testing.assert_close(variant(b, return_logits=True)["logits_img"],
                                   plain(b, return_logits=True)["logits_img"], atol=0, rtol=0)


@pytest.mark.parametrize("pair_name, part, _", PARTS)
def test_prompt_part_inference_computes_the_training_logits(request, pair_name, part, _):
    plain, variant = request.getfixturevalue(pair_name)
    net = _give_part_weights(variant, part)
    assert_inference_is_training(net)
    with torch.no_grad():  # the part now changes what the VAR reads
        b = collator_for(net)([gen_sample("g0")])
        assert not torch.allclose(net(b, return_logits=True)["logits_img"], plain(b, return_logits=True)["logits_img"])


@pytest.mark.parametrize("pair_name, part, over", PARTS)
def test_prompt_part_trains_in_stages_1_and_3_and_needs_prompt_attn(request, pair_name, part, over):
    from types import SimpleNamespace

    from modules.config import ModelConfig
    from modules.stages.vargpt_stages import Stage1, Stage2, Stage3

    variant = request.getfixturevalue(pair_name)[1]
    for cls, trains in ((Stage1, True), (Stage2, False), (Stage3, True)):
        cfg = SimpleNamespace(model=variant.cfg)
        if cls is Stage2:
            cfg.model = replace(variant.cfg, train_und_projector=False)
        stage = cls(cfg, net=copy.deepcopy(variant))
        assert all(p.requires_grad == trains for p in stage.net.get_submodule(part).parameters()), cls.__name__
    key = next(iter(over))
    with pytest.raises(ValueError, match=f"model.{key}\\S* needs model.var_cond=prompt_attn"):
        ModelConfig(var_cond="label", **over).validate()


def test_prompt_context_window_is_checked_and_sets_the_map_width(bigram_pair):
    from modules.config import ModelConfig

    with pytest.raises(ValueError, match="prompt_context_window must be >= 1"):
        ModelConfig(var_cond="prompt_attn", prompt_context_bigram=True, prompt_context_window=0).validate()
    # a window without the map it sizes would be silently unused: refused with the fix
    with pytest.raises(ValueError, match="prompt_context_window=6 .*prompt_context_bigram=true"):
        ModelConfig(var_cond="prompt_attn", prompt_context_window=6).validate()
    variant = bigram_pair[1]
    assert variant.gen_cond_bigram.in_features == 3 * variant.llm.config.hidden_size
