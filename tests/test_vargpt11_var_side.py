"""The generation seam has two implementations: v1.1's Infinity side and v1's VAR side. A v1.1
LLM with v1's VAR decoder (``model.v11.gen_side: var``) trains and generates through the same
composed model; the seam's calls are the only contact."""
from __future__ import annotations

import pytest
import torch

from modules.components.bsq import BSQConfig
from modules.components.infinity import InfinityConfig
from modules.components.qwen2vl import Qwen2VLConfig
from modules.components.var_decoder import VARConfig
from modules.components.vqvae import VQVAEConfig
from modules.gen_side import GenerationSide
from modules.gen_side_var import VARSide
from modules.vargpt11 import TokenIds, VARGPT11, VARGPT11Config, VarSideConfig


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # see tests/conftest.py
    yield


def _cfg(side: str) -> VARGPT11Config:
    llm = Qwen2VLConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, mrope_section=[2, 3, 3], vision_depth=1, vision_embed_dim=32,
                        vision_num_heads=2, vision_mlp_ratio=2)
    vq = VQVAEConfig(vocab_size=32, z_channels=8, ch=16, ch_mult=[1, 1, 2], num_res_blocks=1, norm_groups=8,
                     patch_nums=[1, 2, 4], using_sa=False, using_mid_sa=False)
    var = VARConfig(depth=1, embed_dim=32, num_heads=2, cond_mode="external")
    return VARGPT11Config(gen_side=side, var_side=VarSideConfig(vqvae=vq, var=var), llm=llm,
                          tokenizer=BSQConfig(codebook_dim=8, base_ch=24, ch_mult=[1, 1, 1], num_res_blocks=1,
                                              scales=[[1, 1], [2, 2], [4, 4]]),
                          decoder=InfinityConfig(embed_dim=128, depth=1, block_chunks=1, num_heads=2, ffn_hidden=128,
                                                 text_channels=128, cond_dim=128, d_vae=8, text_maxlen=16),
                          ids=TokenIds(pad=0, eos=2, vision_start=50, vision_end=51, image_pad=52, gen_start=53,
                                       gen_end=54, gen_pad=55))


@pytest.mark.parametrize("side", ["infinity", "var"])
def test_both_sides_train_and_generate_through_the_seam(side):
    torch.manual_seed(0)
    cfg = _cfg(side)
    model = VARGPT11(cfg)
    assert isinstance(model.gen, GenerationSide)
    L = model.gen.tokens_per_image
    res = model.gen.resolution
    ids = torch.tensor([[1, 5, 6, 7, 53] + [55] * L + [54, 2]])
    px = torch.rand(1, 3, res, res) * 2 - 1
    model.train()
    out = model.forward_train(ids, torch.ones_like(ids), ids.clone(), None, None, px,
                              generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out["loss"]) and 0 <= float(out["acc_img"]) <= 1
    out["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.gen.parameters())
    model.eval()
    a = model.generate_image(ids[:, :5], seed=4)
    b = model.generate_image(ids[:, :5], seed=4)
    assert a["image"].shape == (1, 3, res, res) and torch.equal(a["uint8"], b["uint8"])


def test_var_side_is_v1s_teacher_forcing():
    torch.manual_seed(0)
    side = VARSide(_cfg("var").var_side.vqvae, _cfg("var").var_side.var, llm_hidden=32)
    px = torch.rand(2, 3, side.resolution, side.resolution) * 2 - 1
    x, st = side.teacher_inputs(px, side.var.L, train=False)
    idx = side.vqvae.img_to_idx(px)
    ref = side.gen_in(side.var.front_end(torch.zeros(2, dtype=torch.long), side.vqvae.idx_to_var_input(idx)))
    assert torch.equal(x, ref) and all(torch.equal(a, b) for a, b in zip(st["idx"], idx))


def test_v1s_own_parts_behind_the_seam_give_v1s_image_loss(tmp_path):
    """A v1 VARGPT's generation parts (shared, not copied) behind the interface: teacher inputs,
    then train_outputs on the same LLM states, give exactly VARGPT.forward's image loss."""
    from modules.vargpt import VARGPT

    from tests.tiny import collator_for, gen_sample, tiny_model_config

    torch.manual_seed(0)
    net = VARGPT(tiny_model_config(tmp_path)).eval()
    batch = collator_for(net)([gen_sample("a"), gen_sample("b", "Draw a blue square.", (200, 30, 30))])
    ref = net(batch)["loss_img"]
    side = VARSide.of(net)
    slot_x, state = side.teacher_inputs(batch["gen_images"], net.L, train=False,
                                        cond_drop_B=batch["gen_uncond"])
    ids = batch["input_ids"]
    gen_mask = ids == net.gen_pad_id
    emb = net.llm.get_input_embeddings()(ids).masked_scatter(gen_mask.unsqueeze(-1), slot_x)
    h = net.llm_states(emb, batch["attention_mask"], gen_mask)
    out = side.train_outputs(h[gen_mask].view(2, net.L, -1), None, state)
    assert torch.allclose(out["loss_img"], ref, atol=1e-6, rtol=0)
    assert not any(k.startswith("gen") and k.split(".")[0] not in ("gen_in", "gen_out") for k in net.state_dict())
