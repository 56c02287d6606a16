"""The composed model: per-sample insertion, switches, KV-cached inference."""
from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from PIL import Image

from modules.vargpt import VARGPT
from tests.tiny import collator_for, gen_sample, teacher_forced_per_scale, tiny_model_config, und_sample


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    net = VARGPT(tiny_model_config(tmp_path_factory.mktemp("tiny")))
    net.eval()
    return net


def _samples():
    return [und_sample("u0"), gen_sample("g0"), und_sample("u1", q="How many squares?", a="two", colour=(20, 200, 20)),
            gen_sample("g1", instr="I need an image of two blue squares.", colour=(200, 200, 20))]


def test_mixed_batch_equals_each_sample_alone(tiny):
    col = collator_for(tiny)
    samples = _samples()
    with torch.no_grad():
        mixed = tiny(col(samples))
        alone = [tiny(col([s])) for s in samples]
    assert mixed["loss_text_per_sample"].shape == (4,)
    for i, out in enumerate(alone):
        torch.testing.assert_close(mixed["loss_text_per_sample"][i], out["loss_text_per_sample"][0], atol=1e-5, rtol=1e-5)
    gen_alone = torch.stack([alone[1]["loss_img_per_target"][0], alone[3]["loss_img_per_target"][0]])
    torch.testing.assert_close(mixed["loss_img_per_target"], gen_alone, atol=1e-5, rtol=1e-5)
    assert mixed["acc_img_scale"].shape == (len(tiny.patch_nums),)


def test_released_mixed_batches_train_on_pad_states(tiny):
    """The released if/elif: a batch with input images gets no VAR inputs in its gen pad slots,
    yet the image loss is computed on the LLM states there; generation-only batches are unchanged."""
    col = collator_for(tiny)
    batch = col(_samples())
    with torch.no_grad():
        ours = tiny(batch)
        ours_gen = tiny(col([gen_sample("g")]))
    tiny.cfg.mixed_batches = "released"
    try:
        with torch.no_grad():
            out = tiny(batch)
            only_gen = tiny(col([gen_sample("g")]))
    finally:
        tiny.cfg.mixed_batches = ""
    assert int(out["n_img_tokens"]) == 2 * tiny.L  # both targets still give an image loss ...
    assert not torch.isclose(out["loss_img"], ours["loss_img"])  # ... on states without the VAR inputs
    und = [0, 2]  # the understanding rows do not see the change
    torch.testing.assert_close(out["loss_text_per_sample"][und], ours["loss_text_per_sample"][und])
    torch.testing.assert_close(only_gen["loss_img"], ours_gen["loss_img"])  # no input image: as ours


def test_text_loss_on_all_tokens_supervises_the_prompt(tiny):
    g = [gen_sample("g0")]
    answers = collator_for(tiny)(g)
    all_tok = collator_for(tiny, text_loss_on="all_tokens")(g)
    n_ans = int((answers["labels"] != -100).sum())
    n_all = int((all_tok["labels"] != -100).sum())
    assert n_ans == 1 + 1  # <|image_gen_start|> and the EOS after the span
    assert n_all > 10 * n_ans
    with torch.no_grad():
        assert not torch.isclose(tiny(answers)["loss_text"], tiny(all_tok)["loss_text"])


def test_prompt_dropout_uses_null_prompt_and_uncond_row(tiny):
    col = collator_for(tiny, prompt_dropout=0.999, seed=1)
    b = col([gen_sample("g0")])
    assert bool(b["gen_uncond"].all())
    text = tiny.tokenizer.decode(b["input_ids"][0], skip_special_tokens=True)
    assert "red circle" not in text
    with torch.no_grad():
        cond = tiny(collator_for(tiny)([gen_sample("g0")]))
        unc = tiny(b)
    assert not torch.isclose(cond["loss_img"], unc["loss_img"])


def test_answer_with_kv_cache_equals_without(tiny):
    ims = [Image.new("RGB", (32, 32), (200, 30, 30)), Image.new("RGB", (32, 32), (20, 30, 230)), None]
    qs = ["What colour is the circle?", "How many squares are there?", "Describe a circle."]
    a = tiny.answer(ims, qs, max_new_tokens=6, use_cache=True)
    b = tiny.answer(ims, qs, max_new_tokens=6, use_cache=False)
    assert a == b and len(a) == 3
    one = tiny.answer(ims[1:2], qs[1:2], max_new_tokens=6)
    assert one[0] == a[1]  # batching (left padding) does not change an answer


def test_generate_image_batched_equals_one_by_one(tiny):
    prompts = ["Draw a red circle on the left.", "I need an image of two blue squares.", "Paint a cross."]
    imgs, idx = tiny.generate_image(prompts, cfg=2.0, top_k=8, seed=[11, 12, 13], return_indices=True)
    assert imgs.shape == (3, 3, 16, 16) and 0.0 <= float(imgs.min()) and float(imgs.max()) <= 1.0
    for i, p in enumerate(prompts):
        im1, idx1 = tiny.generate_image([p], cfg=2.0, top_k=8, seed=[11 + i], return_indices=True)
        for k in range(len(idx)):
            assert torch.equal(idx[k][i], idx1[k][0]), f"prompt {i} scale {k}"
        torch.testing.assert_close(imgs[i], im1[0], atol=1e-5, rtol=1e-5)


def test_cfg_uncond_noise_changes_sampling(tiny):
    p = ["Draw a red circle on the left."] * 2
    _, a = tiny.generate_image(p, cfg=4.0, top_k=8, seed=[5, 6], return_indices=True)
    tiny.cfg.cfg_uncond = "noise"
    try:
        _, b = tiny.generate_image(p, cfg=4.0, top_k=8, seed=[5, 6], return_indices=True)
    finally:
        tiny.cfg.cfg_uncond = ""
    assert any(not torch.equal(x, y) for x, y in zip(a[1:], b[1:]))
    _, c = tiny.generate_image(p, cfg=4.0, top_k=8, seed=[5, 6], return_indices=True)
    assert all(torch.equal(x, y) for x, y in zip(a, c))  # same seeds, same switch: same images


def test_numeric_answer_first_token_is_supervised(tiny):
    """The world tokenizer splits digits, so " 2" is "Ġ" + "2": the "Ġ" after "ASSISTANT:" must be
    a label too, or greedy decoding from "ASSISTANT:" can never start a count answer."""
    b = collator_for(tiny)([und_sample("u", q="How many squares?", a="2")])
    ids, labels = b["input_ids"][0], b["labels"][0]
    sup = [tiny.tokenizer.convert_ids_to_tokens(int(i)) for i, l in zip(ids, labels) if l != -100]
    assert sup[:2] == ["Ġ", "2"] and sup[-1] == tiny.tokenizer.eos_token
    prompt = tiny._prompt_encoder().encode_prompt([{"role": "user", "content": "<image>\nHow many squares?"}])
    n = len(prompt)
    assert ids[:n].tolist() == prompt and labels[n] != -100  # training continues exactly where inference starts


def test_generation_inference_computes_the_training_logits(tiny):
    """Teacher-forced through generate_image's KV-cached LLM chunks + VAR steps, the conditional
    rows' per-scale logits equal the training forward's logits for the same prompt and target."""
    train, got = teacher_forced_per_scale(tiny, ["Draw a red circle on the left."],
                                          gen_sample("g0", instr="Draw a red circle on the left."))
    torch.testing.assert_close(got, train, atol=1e-4, rtol=1e-4)


def test_prompt_gain_compares_right_and_rolled_prompts(tiny):
    from modules.evaluation import prompt_gain

    import copy

    net = copy.deepcopy(tiny).eval()
    with torch.no_grad():  # the VAR head starts at zero (uniform logits): give it weights
        for p in net.var.head.parameters():
            p.normal_(0, 0.5)
    same = [gen_sample(f"s{i}", "Draw a red circle.", colour=(30, 30, 30 + 60 * i)) for i in range(3)]
    r = prompt_gain(net, same, batch_size=2)
    # identical instructions: rolling them changes nothing
    assert r["gen_prompt_gain"] == 0.0 and r["gen_loss_img"] == r["gen_loss_img_rolled_prompts"] > 0
    diff = [gen_sample("a", "Draw a red circle.", colour=(200, 30, 30)),
            gen_sample("b", "two blue squares at the top please", colour=(30, 30, 200)),
            gen_sample("c", "Create an image of a small black cross.", colour=(20, 20, 20))]
    r = prompt_gain(net, diff, batch_size=2)
    assert r["gen_loss_img"] != r["gen_loss_img_rolled_prompts"]  # the random model does see the prompt
    assert r["gen_prompt_gain"] == pytest.approx(r["gen_loss_img_rolled_prompts"] - r["gen_loss_img"])
    with pytest.raises(ValueError, match="at least 2"):
        prompt_gain(net, diff[:1])


def test_prompt_gain_one_pass_equals_two_separate_passes(tiny):
    """The batched prompt gain (right and rolled rows in one pass, targets encoded once) gives
    the per-target losses of two separate passes."""
    import copy

    from modules.evaluation import prompt_gain

    net = copy.deepcopy(tiny).eval()
    with torch.no_grad():
        for p in net.var.head.parameters():
            p.normal_(0, 0.5)
    samples = [gen_sample("a", "Draw a red circle.", colour=(200, 30, 30)),
               gen_sample("b", "two blue squares at the top please", colour=(30, 30, 200)),
               gen_sample("c", "Create an image of a small black cross.", colour=(20, 20, 20))]
    col = net.collator()
    with torch.no_grad():
        right = net(col([dict(s, task="generation") for s in samples]))["loss_img_per_target"].mean()
        rolled = []
        for s, o in zip(samples, samples[1:] + samples[:1]):
            rec = dict(s["record"], messages=[dict(m) for m in s["record"]["messages"]])
            rec["messages"][0]["content"] = next(m["content"] for m in o["record"]["messages"] if m["role"] == "user")
            rolled.append(dict(s, record=rec, task="generation"))
        wrong = net(col(rolled))["loss_img_per_target"].mean()
    for bs in (2, 4, 16):
        r = prompt_gain(net, samples, batch_size=bs)
        assert r["gen_loss_img"] == pytest.approx(float(right), abs=1e-5)
        assert r["gen_loss_img_rolled_prompts"] == pytest.approx(float(wrong), abs=1e-5)


def test_img_loss_weighting_scale_averages_the_scales(tiny):
    """model.img_loss_weighting scale: the objective is the mean of the per-scale token means (the
    coarse scales weigh as much as the last); loss_img, the logged figure, stays the token mean."""
    import torch.nn.functional as F

    net = tiny
    b = collator_for(net)([gen_sample("g0"), gen_sample("g1", instr="two blue squares at the top")])
    scaled = copy.deepcopy(net)
    scaled.cfg = replace(net.cfg, img_loss_weighting="scale")
    with torch.no_grad():
        tok, sc = net(b, return_logits=True), scaled(b)
        ce = F.cross_entropy(tok["logits_img"].transpose(1, 2), torch.cat(net.encode_targets(b), 1), reduction="none")
    per_scale = torch.stack([ce[:, s:e].mean() for s, e in net.var.begin_ends])
    torch.testing.assert_close(sc["loss_img"], tok["loss_img"])
    torch.testing.assert_close(tok["loss"], tok["loss_text"] + ce.mean())
    torch.testing.assert_close(sc["loss"], sc["loss_text"] + per_scale.mean())
    assert not torch.allclose(sc["loss"], tok["loss"])


def test_teacher_scales_all_give_the_vqvae_reconstruction(tiny):
    """eval.teacher_scales = K forces every scale from the target: the images are the VQVAE's
    reconstructions of the targets (the tokenizer's ceiling); fewer scales sample the rest."""
    from modules.config import EvalConfig
    from modules.evaluation import generate_for, vqvae_reconstructions

    net = tiny
    targets = torch.rand(3, 3, net.cfg.vqvae.resolution, net.cfg.vqvae.resolution)
    idx = net.vqvae.img_to_idx(targets.mul(2).sub(1))
    prompts = ["Draw a red circle.", "two blue squares", "a green cross at the top"]
    e = EvalConfig(batch_size=2, cfg=1.5)
    with torch.no_grad():
        full = generate_for(net, prompts, e, idx)
        recon = vqvae_reconstructions(net.vqvae, targets)
        part = generate_for(net, prompts, e, idx[:1])
        free = generate_for(net, prompts, e)
    torch.testing.assert_close(full, recon, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(part, recon, atol=1e-3) and not torch.allclose(part, free, atol=1e-3)


def _grads_and_losses(net, batch):
    net.zero_grad(set_to_none=True)
    out = net(batch)
    (out["loss_text"] + out["loss_img"]).backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    return out, grads


def test_llm_length_groups_give_the_one_call_losses_and_gradients(tiny):
    """model.llm_length_groups runs the LLM on length-sorted groups of rows, each cut to its own
    longest row: the losses and every gradient are those of one call on the padded batch."""
    net = copy.deepcopy(tiny)
    col = collator_for(net)
    long_q = "Describe the picture in detail: which shapes, what colours, where and how many are there?"
    samples = _samples() + [und_sample("u2", q=long_q, a="one red circle at the top and two squares")]
    batch = col(samples)
    lens = batch["attention_mask"].sum(1)
    assert lens.unique().numel() >= 3  # rows of several lengths, so there is padding to skip
    net.cfg = replace(net.cfg, llm_length_groups=1)
    one, g_one = _grads_and_losses(net, batch)
    net.cfg = replace(net.cfg, llm_length_groups=3)
    groups = net._length_groups(batch["attention_mask"])
    assert groups is not None and len(groups) >= 2
    assert sorted(torch.cat([r for r, _ in groups]).tolist()) == list(range(len(samples)))
    assert sum(len(r) * n for r, n in groups) < lens.max() * len(samples)  # fewer positions computed
    split, g_split = _grads_and_losses(net, batch)
    for k in ("loss_text_per_sample", "loss_img_per_target", "loss_text", "loss_img"):
        torch.testing.assert_close(split[k], one[k], atol=1e-5, rtol=1e-5)
    assert g_split.keys() == g_one.keys() and any(n.startswith("llm.") for n in g_one)
    for n in g_one:
        torch.testing.assert_close(g_split[n], g_one[n], atol=1e-5, rtol=1e-4, msg=n)
    # the head on the supervised positions only gives the full logits' per-sample losses
    with torch.no_grad():
        full = net(batch, return_logits=True)
    torch.testing.assert_close(full["loss_text_per_sample"], split["loss_text_per_sample"], atol=1e-5, rtol=1e-5)


def test_length_groups_choose_the_fewest_positions(tiny):
    net = copy.deepcopy(tiny)
    mask = torch.zeros(5, 20, dtype=torch.long)
    for b, n in enumerate([20, 5, 6, 5, 19]):
        mask[b, :n] = 1
    net.cfg = replace(net.cfg, llm_length_groups=2)
    groups = net._length_groups(mask)
    assert [(sorted(r.tolist()), n) for r, n in groups] == [([1, 2, 3], 6), ([0, 4], 20)]
    net.cfg = replace(net.cfg, llm_length_groups=3)  # {5,5} {6} {19,20}: 56 positions, against 58 in two groups
    assert [(sorted(r.tolist()), n) for r, n in net._length_groups(mask)] == [([1, 3], 5), ([2], 6), ([0, 4], 20)]
    assert net._length_groups(mask.flip(1)) is None  # left padding: one call
    assert net._length_groups(torch.ones(4, 9, dtype=torch.long)) is None  # no padding: one group is best
    net.cfg = replace(net.cfg, llm_length_groups=1)
    assert net._length_groups(mask) is None
