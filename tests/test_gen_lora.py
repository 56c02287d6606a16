"""model.gen_lora_rank: LoRA deltas on the LLM's linears that act only at the image slots.

A fresh rank computes what the model without it computes (B = 0); with weights the image logits
change while every text position before an image slot (so understanding, and the prompt states)
does not; KV-cached inference computes the training logits; the deltas train with the
generation side (stages 1 and 3), not in stage 2; the released layout refuses them."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from modules.vargpt import VARGPT
from tests.tiny import (assert_inference_is_training, collator_for, gen_sample, plain_and_variant, tiny_model_config,
                        und_sample)


@pytest.fixture(scope="module")
def lora_pair(tmp_path_factory):
    # the LLM's own keys are unchanged (hooks, not wrapped modules): only the deltas are new;
    # gen_out warm: the LLM states at the image slots reach the VAR
    return plain_and_variant(tmp_path_factory.mktemp("tiny_lora"), {"gen_lora_rank": 4}, "gen_lora",
                             warm=("var.cross", "gen_out"))


def _give_lora_weights(net):
    net = copy.deepcopy(net)  # the copy's hooks must drive the copy's deltas
    with torch.no_grad():
        for p in net.gen_lora.parameters():
            p.normal_(0, 0.3)
    return net


def _batch(net):
    return collator_for(net)([gen_sample("g0"), und_sample("u0"), gen_sample("g1", instr="two blue squares at the top")])


def test_gen_lora_starts_as_the_model_without_it(lora_pair):
    plain, lora = lora_pair
    b = _batch(plain)
    with torch.no_grad():
        a, c = plain(b, return_logits=True), lora(b, return_logits=True)
    for k in ("logits_img", "logits_text"):
        torch.testing.assert_close(c[k], a[k], atol=0, rtol=0)


def test_gen_lora_changes_the_image_slots_only(lora_pair):
    plain, lora = lora_pair
    net = _give_lora_weights(lora)
    b = _batch(plain)
    with torch.no_grad():
        a, c = plain(b, return_logits=True), net(b, return_logits=True)
    assert not torch.allclose(c["logits_img"], a["logits_img"], atol=1e-3)
    # text logits at every position before the first image slot of each row are the frozen LLM's:
    # the understanding sample entirely, the generation samples' prompts
    ids = b["input_ids"][:, :-1]
    first = torch.where((ids == plain.gen_pad_id).any(1), (ids == plain.gen_pad_id).int().argmax(1),
                        torch.full((ids.shape[0],), ids.shape[1]))
    before = torch.arange(ids.shape[1]).view(1, -1) < first.view(-1, 1)
    assert before[1].all() and before[0].any()
    torch.testing.assert_close(c["logits_text"][before], a["logits_text"][before], atol=0, rtol=0)


def test_gen_lora_inference_computes_the_training_logits(lora_pair):
    assert_inference_is_training(_give_lora_weights(lora_pair[1]))


def test_gen_lora_trains_with_the_generation_side(lora_pair):
    from modules.config import ModelConfig
    from modules.stages.vargpt_stages import Stage1, Stage2, Stage3

    lora = lora_pair[1]
    for cls, trains in ((Stage1, True), (Stage2, False), (Stage3, True)):
        stage = cls(SimpleNamespace(model=lora.cfg), net=copy.deepcopy(lora))
        assert all(p.requires_grad == trains for p in stage.net.gen_lora.parameters()), cls.__name__
        assert any(p.requires_grad for p in stage.net.llm.parameters()) == (cls is Stage2), cls.__name__
    with pytest.raises(ValueError, match="gen_lora_rank=-1"):
        ModelConfig(gen_lora_rank=-1).validate()


def test_gen_lora_gradient_reaches_the_deltas_only_through_image_slots(lora_pair):
    """One training step's gradient: nonzero on the deltas from a generation batch, zero from an
    understanding-only batch (the mask is None there: the deltas are not even computed)."""
    net = copy.deepcopy(lora_pair[1]).train()
    with torch.no_grad():
        for p in net.gen_lora.parameters():
            p.normal_(0, 0.1)
    col = collator_for(net)
    net(col([gen_sample("g0")]))["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.gen_lora.parameters())
    net.zero_grad(set_to_none=True)
    net(col([und_sample("u0")]))["loss"].backward()
    assert all(p.grad is None for p in net.gen_lora.parameters())


def test_released_layout_refuses_gen_lora(tmp_path):
    from modules.vargpt_format import check_exportable

    v1 = VARGPT(tiny_model_config(tmp_path, gen_lora_rank=2))  # v1 in every other respect
    with pytest.raises(ValueError, match="gen_lora_rank must be 0"):
        check_exportable(v1)
