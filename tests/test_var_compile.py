"""torch.compile of the per-scale sampling step (`sample(compile_mode=...)`): the compiled graph
computes what the eager step computes, so a tiny model draws the same indices and image."""
from __future__ import annotations

import pytest
import torch

from modules.components.var_decoder import VARConfig, build_var
from modules.components.var_sampling import compiled_step
from modules.components.vqvae import VQVAEConfig, build_vqvae


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # see tests/conftest.py
    yield


def _tiny():
    torch.manual_seed(0)
    vq = build_vqvae(VQVAEConfig(ch=32, ch_mult=[1, 1, 2], num_res_blocks=1, z_channels=8, vocab_size=64,
                                 patch_nums=[1, 2, 4])).eval()
    torch.nn.init.normal_(vq.quantize.embedding.weight)
    var = build_var(VARConfig(depth=2, embed_dim=32, num_heads=2, num_classes=3), vq).eval()
    with torch.no_grad():  # gates and head away from their ~0 init: the blocks must matter
        for b in var.blocks:
            b.ada_lin[-1].weight.normal_(0, 0.05)
            b.ada_lin[-1].bias.normal_(0, 0.5)
        var.head.weight.normal_(0, 0.2)
    return var


def test_compile_mode_errors():
    var = _tiny()
    with pytest.raises(ValueError, match="compile_mode must be one of"):
        var.sample(2, torch.tensor([0, 1]), parity=False, compile_mode="fastest")
    with pytest.raises(ValueError, match="KV-cached step"):
        var.sample(2, torch.tensor([0, 1]), parity=False, compile_mode="default", use_cache=False)


@pytest.mark.slow  # inductor compiles one graph per scale shape: ~tens of seconds on 2 cores
def test_compiled_sampling_draws_the_eager_indices_and_image():
    var = _tiny()
    assert compiled_step(var, "default") is compiled_step(var, "default")  # compiled once per (model, mode)
    assert compiled_step(var, "default") is not compiled_step(var, "default+freeze")
    label = torch.tensor([0, 1, 2])
    kw = dict(cfg=1.5, top_k=20, top_p=0.9, parity=False, dtype="fp32")
    lo_e, lo_c = [], []
    idx_e, img_e = var.sample(3, label, generator=torch.Generator().manual_seed(5), logits_out=lo_e, **kw)
    idx_c, img_c = var.sample(3, label, generator=torch.Generator().manual_seed(5), logits_out=lo_c,
                              compile_mode="default", **kw)
    assert all(torch.equal(a, b) for a, b in zip(idx_e, idx_c))
    assert (img_e - img_c).abs().max() <= 1e-5
    assert all((a - b).abs().max() <= 1e-4 for a, b in zip(lo_e, lo_c))
    # the blocks matter (a compiled graph that skipped them would not match): other labels draw otherwise
    idx_o, _ = var.sample(3, torch.tensor([2, 0, 1]), generator=torch.Generator().manual_seed(5),
                          compile_mode="default", **kw)
    assert not all(torch.equal(a, b) for a, b in zip(idx_e, idx_o))
