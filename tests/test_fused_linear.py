"""modules/components/fused_linear.py: bf16 inference linears (cached bf16 weights, bias and GELU
fused in one oneDNN call) against the plain autocast path they replace in VAR sampling."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from modules.components import fused_linear
from modules.components.var_decoder import VARConfig, build_var
from modules.components.vqvae import VQVAEConfig, build_vqvae

needs_bf16 = pytest.mark.skipif(not fused_linear.supported(), reason="no oneDNN bf16 on this CPU")


def _layer(i=64, o=256, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(i, o)


def test_outside_the_context_it_is_the_module_call():
    lin = _layer()
    seen = []
    lin.register_forward_hook(lambda m, inp, out: seen.append(1))
    x = torch.randn(3, 5, 64)
    assert torch.equal(fused_linear.linear(x, lin), lin(x))
    assert torch.equal(fused_linear.linear(x, lin, act="gelu_tanh"), F.gelu(lin(x), approximate="tanh"))
    assert len(seen) == 4  # the module's hooks still run (2 here + 2 references)
    parts = (torch.randn(100), torch.randn(156))
    assert torch.equal(fused_linear.linear(x, lin, bias=parts), F.linear(x, lin.weight, torch.cat(parts)))


@needs_bf16
def test_fused_matches_autocast_to_bf16_rounding():
    lin = _layer()
    x = torch.randn(4, 7, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.gelu(lin(x), approximate="tanh").float()
        with fused_linear.bf16_inference() as on:
            got = fused_linear.linear(x, lin, act="gelu_tanh")
    assert on and got.dtype == torch.bfloat16
    # GELU sees the fp32 sum here, autocast's bf16 rounding of it: one bf16 step apart at most
    assert torch.allclose(got.float(), ref, rtol=2 ** -7, atol=2 ** -7)


@needs_bf16
def test_cache_follows_the_weights_and_adds_no_state():
    lin = _layer()
    keys = set(lin.state_dict())
    x = torch.randn(2, 64)
    with torch.no_grad(), fused_linear.bf16_inference():
        a = fused_linear.linear(x, lin)
        lin.weight.mul_(2)  # an in-place update (an optimiser step, a load) bumps the version
        b = fused_linear.linear(x, lin)
        want_b = F.linear(x, lin.weight, lin.bias)
        lin.load_state_dict({"weight": lin.weight * 0, "bias": lin.bias * 0})
        c = fused_linear.linear(x, lin)
    assert not torch.allclose(a.float(), b.float(), atol=1e-2)
    assert torch.allclose(b.float(), want_b, rtol=2 ** -6, atol=2 ** -6)
    assert torch.count_nonzero(c) == 0
    assert set(lin.state_dict()) == keys


@needs_bf16
def test_not_used_while_autograd_records():
    lin = _layer()
    x = torch.randn(2, 64, requires_grad=True)
    with fused_linear.bf16_inference(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = fused_linear.linear(x, lin)
    y.float().sum().backward()
    assert x.grad is not None and lin.weight.grad is not None
    assert "_bf16_cache" not in lin.__dict__


@needs_bf16
def test_var_bf16_sampling_logits_match_the_autocast_path(monkeypatch):
    """The fast bf16 sampler's per-scale logits (teacher-forced through the KV cache, so both runs
    see the same tokens) with the fused linears against the plain autocast linears."""
    torch.manual_seed(0)
    vq = build_vqvae(VQVAEConfig(vocab_size=64, z_channels=8, ch=16, norm_groups=8, ch_mult=[1, 2],
                                 patch_nums=[1, 2, 3])).eval()
    var = build_var(VARConfig(depth=2, embed_dim=64, num_heads=2, num_classes=4), vq).eval()
    with torch.no_grad():  # off the near-identity init, so the blocks' linears move the logits
        for p in var.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    idx, _ = var.sample(2, torch.tensor([0, 1]), generator=torch.Generator().manual_seed(0), decode=False)

    def logits(fused: bool):
        monkeypatch.setattr(fused_linear, "supported", lambda: fused)
        out = []
        var.sample(2, torch.tensor([0, 1]), teacher_idx=idx, logits_out=out, decode=False, parity=False, dtype="bf16")
        return torch.cat([t.flatten(1) for t in out], 1)

    plain = logits(False)
    assert "_bf16_cache" not in var.blocks[0].ffn.fc1.__dict__
    fused = logits(True)
    assert all("_bf16_cache" in m.__dict__ for m in (var.blocks[1].ffn.fc1, var.blocks[1].attn.mat_qkv, var.head))
    assert (plain - fused).abs().max() <= 0.05 * plain.abs().max()


def test_ab_benchmark_variants_switch_and_restore():
    """benchmarks.var_sampling_ab's switches turn each change off inside the block only."""
    from benchmarks.var_sampling_ab import variant
    from modules.components import vqvae
    before = (fused_linear.supported(), vqvae.DECODE_PER_IMAGE_BYTES)
    with variant(fused=False, per_image=False):
        assert not fused_linear.supported() and vqvae.DECODE_PER_IMAGE_BYTES > 1 << 40
        with fused_linear.bf16_inference() as on:
            assert not on
    assert (fused_linear.supported(), vqvae.DECODE_PER_IMAGE_BYTES) == before


@needs_bf16
def test_bf16_stored_weights_are_used_as_they_are():
    lin = _layer().to(torch.bfloat16)
    with torch.no_grad(), fused_linear.bf16_inference():
        fused_linear.linear(torch.randn(2, 64), lin)
    w16, _ = fused_linear.bf16_params(lin, lin.bias)
    assert w16.data_ptr() == lin.weight.data_ptr()  # no second copy of a bf16 weight
