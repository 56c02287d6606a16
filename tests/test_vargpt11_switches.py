"""Each released VARGPT-v1.1 behaviour that changes a number has one switch: the released value
reproduces the official vectors (tests/test_vargpt11_parity.py), the corrected default differs
where it should and only there."""
from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from modules.components.qwen2vl import image_to_patches
from modules.vargpt11 import V11Switches
from modules.vargpt11_format import build_released

from tests.conftest import require_fixture

V11 = "vargpt_v11_official"


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # see tests/conftest.py
    yield


@pytest.fixture(scope="module")
def setup():
    d = require_fixture(V11)
    v = torch.load(d / "vectors.pt", weights_only=True)
    model, cfg = build_released(d, pn="0.06M", **asdict(V11Switches.released()))
    return model, v


def _px(u8):
    t = u8.permute(0, 3, 1, 2).float().div(255)
    return t.add(t).add_(-1)


def test_defaults_are_the_corrections():
    c, r = V11Switches(), V11Switches.released()
    diff = {k for k in asdict(c) if asdict(c)[k] != asdict(r)[k]}
    assert diff == {"ca_bf16", "uncond_path", "cond_drop", "bsc_in_eval", "gen_positions_with_deltas", "uint8",
                    "train_positions", "text_labels"}


def test_training_positions_switch(setup):
    model, v = setup
    u = v["und"]
    model.cfg.switches.train_positions = "mrope"
    try:
        lg = model.understand_logits(u["input_ids"], u["attention_mask"], u["pixel_values"], u["image_grid_thw"])
    finally:
        model.cfg.switches.train_positions = "1d"
    assert (lg - u["logits_mrope_positions"]).abs().max() < 1e-4  # training now sees generate's positions


def test_text_labels_switch(setup):
    model, v = setup
    g = v["gen"]
    ids, labels = g["input_ids"], g["labels_arg"].clone()
    labels[:, :5] = -100  # the caller's labels: say the system turn is not trained
    model.cfg.switches.text_labels = "labels"
    try:
        _, tgt = model.text_loss(torch.zeros(*ids.shape, 256), ids, labels, g["attention_mask"])
    finally:
        model.cfg.switches.text_labels = "input_ids"
    assert (tgt[:, :5] == -100).all() and (tgt[g["attention_mask"] == 0] == -100).all()
    _, rel = model.text_loss(torch.zeros(*ids.shape, 256), ids, labels, g["attention_mask"])
    assert torch.equal(rel, g["text_labels_used"])  # released: input_ids minus the gen pads


def test_generation_positions_and_uncond_path(setup):
    model, v = setup
    e = v["edit_infer"]
    pv, grid = image_to_patches(e["source_uint8_HWC"], model.cfg.llm)
    sw = model.cfg.switches
    sw.gen_positions_with_deltas, sw.uncond_path = True, "cached"
    model.gen.sw = sw
    tr = {}
    try:
        model.generate_image(e["prompt_ids"], pv, grid.view(1, 3), seed=3, trace=tr)
    finally:
        sw.gen_positions_with_deltas, sw.uncond_path = False, "released"
    ps = tr["per_scale"]
    delta = int(e["gen_start_step_position_ids"].flatten()[0]) - e["prompt_ids"].shape[1]
    # scale 0 follows the start token's M-RoPE position (released: cache index 28, no delta)
    assert int(ps[0]["position_ids_cond"].flatten()[0]) == int(e["per_scale"][0]["llm_position_ids_cond"].flatten()[0]) + delta
    # the unconditional half continues over earlier scales instead of restarting at 0
    assert int(ps[1]["position_ids_uncond"].flatten()[0]) == 1


def test_cond_drop_switch_also_drops_the_prompt_keys(setup):
    model, v = setup
    g = v["gen_b1_null"]
    kw = dict(train=True, cond_drop_B=torch.ones(1, dtype=torch.bool), flipped=g["bsc_flipped_bits_per_scale"])
    args = (g["input_ids"], g["attention_mask"], g["labels_arg"], None, None, _px(g["pixel_gen_uint8_BHWC"]))
    with torch.no_grad():
        rel = model.forward_train(*args, **kw)
        model.gen.sw.cond_drop = "sos_and_prompt"
        try:
            cor = model.forward_train(*args, **kw)
        finally:
            model.gen.sw.cond_drop = "sos"
    n = rel["ca_kv"].shape[0]
    assert torch.equal(cor["ca_kv"], model.gen.vargpt_gen.cfg_uncond[:n])
    assert not torch.equal(rel["ca_kv"], cor["ca_kv"])


def test_bsc_in_eval_and_uint8_switches(setup):
    model, v = setup
    g = v["edit"]
    x = _px(g["pixel_gen_uint8_BHWC"])
    model.gen.sw.bsc_in_eval = False
    try:
        _, st = model.gen.teacher_inputs(x, 640, train=False, generator=torch.Generator().manual_seed(0))
    finally:
        model.gen.sw.bsc_in_eval = True
    assert all(torch.equal(a, b) for a, b in zip(st["bsc"]["labels"], st["bsc"]["flipped"]))  # no flips in eval
    img = torch.full((1, 3, 2, 2), 0.999)
    model.gen.sw.uint8 = "round"
    try:
        assert int(model.gen.to_uint8(img).max()) == 255
    finally:
        model.gen.sw.uint8 = "truncate"
    assert int(model.gen.to_uint8(img).max()) == 254


def test_ca_bf16_switch_changes_only_rounding(setup):
    model, v = setup
    g = v["gen"]
    kw = dict(train=True, cond_drop_B=torch.zeros(2, dtype=torch.bool), flipped=g["bsc_flipped_bits_per_scale"])
    args = (g["input_ids"], g["attention_mask"], g["labels_arg"], None, None, _px(g["pixel_gen_uint8_BHWC"]))
    with torch.no_grad():
        model.gen.sw.ca_bf16 = False
        try:
            fp32 = model.forward_train(*args, **kw)["image_logits"]
        finally:
            model.gen.sw.ca_bf16 = True
    d = (fp32 - g["image_logits"]).abs().max()
    assert 1e-4 < d < 5e-2  # bf16-sized, not a different computation


def test_prompt_longer_than_the_unconditional_rows_is_refused(setup):
    model, _ = setup
    n = model.gen.vargpt_gen.cfg_uncond.shape[0] + 1
    with pytest.raises(ValueError, match="cfg_uncond, text_maxlen"):
        model.gen._uncond_rows(n)


def test_rope_scale_offset_switch(setup):
    model, v = setup
    dec = model.gen.vargpt_gen
    sched = [(h, w) for _, h, w in v["infer"]["scale_schedule"]]
    full_cos, _ = dec.rope(sched)
    cos, _ = dec.rope(sched, scale_ind=2)
    bug, _ = dec.rope(sched, scale_ind=2, scale_offset=False)
    assert torch.equal(cos, full_cos[5:21]) and torch.equal(bug, full_cos[:16]) and not torch.equal(cos, bug)
    assert model.cfg.switches.rope_scale_offset is True  # released (fused path) and corrected agree
