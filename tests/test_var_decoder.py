"""VAR decoder: mask, cached vs teacher-forced logits, sampling options, strict loading, training."""
from __future__ import annotations

import pytest
import torch

from modules.components.var_decoder import (
    EXTERNAL_FROM_CLASS_CKPT,
    VAR_DECODERS,
    VARConfig,
    VARDecoder,
    build_var,
)
from modules.components.var_sampling import sample_top_k_top_p
from modules.components.vqvae import StateDictMismatchError, VQVAEConfig, build_vqvae

WORLD_VQ = dict(ch=32, ch_mult=[1, 1, 2, 2], num_res_blocks=1, z_channels=16, vocab_size=512, patch_nums=[1, 2, 3, 4, 6, 8])


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # see tests/conftest.py
    yield


@pytest.fixture(scope="module")
def vqvae():
    torch.manual_seed(0)
    m = build_vqvae(VQVAEConfig(**WORLD_VQ)).eval()
    # spread the codebook so different indices give visibly different inputs
    torch.nn.init.normal_(m.quantize.embedding.weight)
    return m


def make_var(vqvae, **kw) -> VARDecoder:
    torch.manual_seed(1)
    kw.setdefault("num_classes", 5)
    var = build_var(VARConfig(depth=2, **kw), vqvae).eval()
    # the official init starts AdaLN gates at ~1e-5 (blocks ~ identity): randomise them so the
    # comparisons below exercise attention across scales
    with torch.no_grad():
        for b in var.blocks:
            if hasattr(b, "ada_lin"):
                b.ada_lin[-1].weight.normal_(0, 0.05)
                b.ada_lin[-1].bias.normal_(0, 0.5)
            else:
                b.ada_gss.normal_(0, 0.5)
        var.head.weight.normal_(0, 0.2)
    return var


def random_idx(vqvae, B, g):
    return [torch.randint(0, vqvae.V, (B, pn * pn), generator=g) for pn in vqvae.patch_nums]


def test_config_defaults_and_registry(vqvae):
    assert "var" in VAR_DECODERS.names()
    var = build_var(VARConfig(depth=3, num_classes=4), vqvae)
    assert (var.C, var.num_heads, var.V, var.Cvae, var.L) == (192, 3, 512, 16, 1 + 4 + 9 + 16 + 36 + 64)
    var = build_var(VARConfig(depth=2, embed_dim=96, num_heads=4, num_classes=4), vqvae)
    assert (var.C, var.num_heads) == (96, 4)
    assert var.class_emb.weight.shape == (5, 96)  # + null class
    with pytest.raises(ValueError, match="does not match the VQVAE"):
        build_var(VARConfig(depth=2, patch_nums=[1, 2, 4, 8]), vqvae)
    with pytest.raises(ValueError, match="no VQVAE"):
        build_var(VARConfig(depth=2))
    with pytest.raises(ValueError, match="cond_mode"):
        build_var(VARConfig(depth=2, cond_mode="text"), vqvae)


def test_block_causal_mask(vqvae):
    var = make_var(vqvae)
    m = var.attn_bias_for_masking
    assert m.shape == (1, 1, var.L, var.L)
    scale = torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(var.patch_nums)])
    allowed = scale[:, None] >= scale[None, :]
    assert torch.equal(m[0, 0] == 0, allowed)
    assert torch.isinf(m[0, 0][~allowed]).all() and (m[0, 0][~allowed] < 0).all()
    # within a scale every token sees every other; a scale never sees a later one
    b1, e1 = var.begin_ends[1]
    assert (m[0, 0, b1:e1, b1:e1] == 0).all()
    assert torch.isinf(m[0, 0, b1:e1, e1:]).all()
    assert torch.equal(var.lvl_1L[0], scale)


@pytest.mark.parametrize("shared_aln", [False, True])
def test_cached_logits_equal_teacher_forced_class_mode(vqvae, shared_aln):
    var = make_var(vqvae, shared_aln=shared_aln)
    B = 3
    g = torch.Generator().manual_seed(0)
    idx = random_idx(vqvae, B, g)
    label = torch.tensor([0, 3, 4])
    x_in = vqvae.idx_to_var_input(idx)
    with torch.no_grad():
        tf_cond = var(label, x_in)
        tf_unc = var(torch.full_like(label, var.num_classes), x_in)
    per_scale = []
    out_idx, img = var.sample(B, label, teacher_idx=idx, logits_out=per_scale, decode=False)
    assert img is None and all(torch.equal(a, b) for a, b in zip(out_idx, idx))
    assert len(per_scale) == len(var.patch_nums)
    for si, (bg, ed) in enumerate(var.begin_ends):
        assert per_scale[si].shape == (2 * B, ed - bg, var.V)
        assert torch.allclose(per_scale[si][:B], tf_cond[:, bg:ed], atol=1e-5), f"scale {si} cond"
        assert torch.allclose(per_scale[si][B:], tf_unc[:, bg:ed], atol=1e-5), f"scale {si} uncond"
    # the comparison is not vacuous: later scales depend on the earlier tokens
    idx2 = [i.clone() for i in idx]
    idx2[0] = (idx2[0] + 1) % vqvae.V
    other = []
    var.sample(B, label, teacher_idx=idx2, logits_out=other, decode=False)
    assert not torch.allclose(other[-1], per_scale[-1], atol=1e-4)


def test_teacher_idx_prefix_forces_the_first_scales_then_samples(vqvae):
    """teacher_idx shorter than the scales: those scales are the given indices, the rest are
    drawn, and the draws after the prefix are those of a full sample that drew the same prefix."""
    var = make_var(vqvae)
    g = torch.Generator().manual_seed(0)
    idx = random_idx(vqvae, 2, g)
    label = torch.tensor([0, 3])
    out, _ = var.sample(2, label, teacher_idx=idx[:2], generator=torch.Generator().manual_seed(5), decode=False)
    assert len(out) == len(var.patch_nums)
    assert all(torch.equal(a, b) for a, b in zip(out[:2], idx[:2]))
    again, _ = var.sample(2, label, teacher_idx=idx[:2], generator=torch.Generator().manual_seed(5), decode=False)
    assert all(torch.equal(a, b) for a, b in zip(out, again))
    free, _ = var.sample(2, label, teacher_idx=idx[:1], generator=torch.Generator().manual_seed(5), decode=False)
    assert not all(torch.equal(a, b) for a, b in zip(out[1:], free[1:]))  # scale 1 is drawn now


def test_cached_logits_equal_teacher_forced_external_mode(vqvae):
    var = make_var(vqvae, cond_mode="external")
    assert not hasattr(var, "class_emb") and var.cond_emb.weight.shape == (2, var.C)
    B = 2
    idx = random_idx(vqvae, B, torch.Generator().manual_seed(1))
    # a stand-in "LLM": a fixed per-position map of the front-end states (no cross-position mixing
    # needed for the check, but position-dependent so a wrong offset would show)
    torch.manual_seed(3)
    W = torch.randn(var.C, var.C) / var.C**0.5
    pos_gain = torch.rand(var.L, 1) + 0.5

    def llm(x_BlC, begin):
        return torch.tanh(x_BlC @ W) * pos_gain[begin:begin + x_BlC.shape[1]]

    seen = []

    def hook(si, x_chunk):
        seen.append((si, tuple(x_chunk.shape)))
        return llm(x_chunk, var.begin_ends[si][0])

    per_scale = []
    var.sample(B, None, teacher_idx=idx, logits_out=per_scale, step_hook=hook, decode=False)
    assert seen == [(si, (2 * B, pn * pn, var.C)) for si, pn in enumerate(var.patch_nums)]
    x_in = vqvae.idx_to_var_input(idx)
    with torch.no_grad():
        for half, c in ((slice(0, B), 0), (slice(B, 2 * B), 1)):
            cond = torch.full((B,), c)
            h = llm(var.front_end(cond, x_in), 0)
            tf = var.forward_blocks(h, cond)
            for si, (bg, ed) in enumerate(var.begin_ends):
                assert torch.allclose(per_scale[si][half], tf[:, bg:ed], atol=1e-5), f"scale {si} cond {c}"


def test_sampling_options_and_determinism(vqvae):
    var = make_var(vqvae)
    kw = dict(cfg=2.0, top_k=20, top_p=0.9)
    a, img = var.sample(4, torch.tensor([0, 1, 2, 3]), generator=torch.Generator().manual_seed(7), **kw)
    b, _ = var.sample(4, torch.tensor([0, 1, 2, 3]), generator=torch.Generator().manual_seed(7), decode=False, **kw)
    c, _ = var.sample(4, torch.tensor([0, 1, 2, 3]), generator=torch.Generator().manual_seed(8), decode=False, **kw)
    assert img.shape == (4, 3, 64, 64) and 0 <= img.min() and img.max() <= 1
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    # recomputing the prefix without a cache (benchmark baseline) draws the same tokens
    d, _ = var.sample(4, torch.tensor([0, 1, 2, 3]), generator=torch.Generator().manual_seed(7), decode=False,
                      use_cache=False, **kw)
    assert all(torch.equal(x, y) for x, y in zip(a, d))
    # int label, random labels, temperature all run
    var.sample(2, 1, generator=torch.Generator().manual_seed(0), decode=False, temperature=0.5)
    var.sample(2, None, generator=torch.Generator().manual_seed(0), decode=False)
    with pytest.raises(ValueError, match="step_hook"):
        var.sample(1, 0, step_hook=lambda si, x: x[:, :1], decode=False)


def test_top_k_top_p():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[[3.0, 2.0, 2.0, 1.0, -5.0]]]).expand(1, 2000, 5).clone()
    idx = sample_top_k_top_p(logits.clone(), top_k=2, generator=g)
    assert set(idx.unique().tolist()) == {0, 1, 2}  # ties with the 2nd largest are kept
    idx = sample_top_k_top_p(logits.clone(), top_p=0.5, generator=g)
    assert set(idx.unique().tolist()) == {0}  # softmax mass of token 0 is ~0.58 >= top_p
    idx = sample_top_k_top_p(logits.clone(), top_p=0.9, generator=g)
    assert set(idx.unique().tolist()) == {0, 1, 2}
    idx = sample_top_k_top_p(logits.clone(), generator=g)
    assert 3 in idx.unique().tolist()


def _top_k_top_p_full_sort(logits_BlV, top_k, top_p, generator):
    """The official sampler's operations as published (top-p by a full ascending sort over V)."""
    B, l, V = logits_BlV.shape
    if top_k > 0:
        logits_BlV.masked_fill_(logits_BlV < logits_BlV.topk(top_k, sorted=False, dim=-1)[0].amin(-1, keepdim=True), -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits_BlV.sort(dim=-1, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False
        logits_BlV.masked_fill_(remove.scatter(sorted_idx.ndim - 1, sorted_idx, remove), -torch.inf)
    return torch.multinomial(logits_BlV.softmax(dim=-1).view(-1, V), 1, replacement=True, generator=generator).view(B, l)


def test_top_p_from_the_sorted_top_k_draws_as_a_full_sort():
    """sample_top_k_top_p builds the official ascending sort from the sorted top-k (no sort over V):
    the same draws as the full sort, with and without ties (at the k-th value: the full-sort path)."""
    for trial in range(12):
        g = torch.Generator().manual_seed(trial)
        V = (4096, 300, 64)[trial % 3]
        x = torch.randn(2, 17, V, generator=g) * (1 + trial % 4)
        if trial % 2:
            x = (x * 2).round() / 2  # many ties, also at the k-th value
        for k, p in ((min(900, V - 1), 0.96), (50, 0.9), (1, 0.5), (V, 0.8), (0, 0.7), (20, 0.0)):
            a = sample_top_k_top_p(x.clone(), k, p, torch.Generator().manual_seed(trial))
            b = _top_k_top_p_full_sort(x.clone(), k, p, torch.Generator().manual_seed(trial))
            assert torch.equal(a, b), (trial, k, p)


def test_strict_loading_errors_and_allow_lists(vqvae):
    var = make_var(vqvae)
    sd = {k: v.clone() for k, v in var.state_dict().items()}
    fresh = build_var(VARConfig(depth=2, num_classes=5), vqvae)
    fresh.load_official_state_dict(sd)
    assert torch.equal(fresh.head.weight, var.head.weight)

    bad = dict(sd)
    bad.pop("blocks.1.ffn.fc2.bias")
    bad["blocks.2.attn.proj.weight"] = torch.zeros(1)
    bad["class_emb.weight"] = torch.zeros(1001, var.C)
    with pytest.raises(StateDictMismatchError) as e:
        fresh.load_official_state_dict(bad)
    msg = str(e.value)
    assert "missing keys (1): blocks.1.ffn.fc2.bias" in msg
    assert "unexpected keys (1): blocks.2.attn.proj.weight" in msg
    assert f"class_emb.weight: checkpoint (1001, {var.C}) vs model (6, {var.C})" in msg

    # VARGPT: an external-mode decoder initialised from a class-conditional checkpoint
    ext = build_var(VARConfig(depth=2, cond_mode="external"), vqvae)
    with pytest.raises(StateDictMismatchError, match="cond_emb.weight"):
        ext.load_official_state_dict(sd)
    before = ext.cond_emb.weight.clone()
    ext.load_official_state_dict(sd, **EXTERNAL_FROM_CLASS_CKPT)
    assert torch.equal(ext.blocks[0].attn.mat_qkv.weight, var.blocks[0].attn.mat_qkv.weight)
    assert torch.equal(ext.cond_emb.weight, before)

    # shared AdaLN has other keys, and a checkpoint made with other patch_nums is refused
    shared = build_var(VARConfig(depth=2, num_classes=5, shared_aln=True), vqvae)
    with pytest.raises(StateDictMismatchError, match=r"shared_ada_lin\.1\.weight"):
        shared.load_official_state_dict(sd)
    lvl = dict(sd)
    lvl["lvl_1L"] = sd["lvl_1L"].flip(1)
    with pytest.raises(StateDictMismatchError, match="patch_nums"):
        fresh.load_official_state_dict(lvl)


def _overfit(var, step_fn, steps=40):
    opt = torch.optim.AdamW([p for p in var.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = step_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_class_mode_trains(vqvae):
    torch.manual_seed(0)
    var = build_var(VARConfig(depth=2, num_classes=4, drop_path_rate=0.1), vqvae).train()
    g = torch.Generator().manual_seed(0)
    idx = random_idx(vqvae, 4, g)
    x_in = vqvae.idx_to_var_input(idx)
    label = torch.tensor([0, 1, 2, 3])
    losses = _overfit(var, lambda: var.loss(var(label, x_in), idx))
    assert losses[-1] < losses[0] - 1.0, losses[::10]


def test_external_mode_trains(vqvae):
    torch.manual_seed(0)
    var = build_var(VARConfig(depth=2, cond_mode="external"), vqvae).train()
    gen_out = torch.nn.Linear(var.C, var.C)  # stands in for LLM + gen-out projector
    g = torch.Generator().manual_seed(1)
    idx = random_idx(vqvae, 4, g)
    x_in = vqvae.idx_to_var_input(idx)
    cond = torch.tensor([0, 0, 1, 0])
    params = list(var.parameters()) + list(gen_out.parameters())
    opt = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for _ in range(40):
        h = gen_out(var.front_end(cond, x_in))
        loss = var.loss(var.forward_blocks(h, cond), idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 1.0, losses[::10]
    assert var.cond_emb.weight.grad is not None and var.cond_emb.weight.grad.abs().sum() > 0


def test_class_dropout_only_in_training(vqvae):
    var = build_var(VARConfig(depth=2, num_classes=4, cond_drop_rate=1.0), vqvae)
    label = torch.tensor([0, 1, 2, 3])
    assert torch.equal(var.eval().drop_cond(label), label)
    assert (var.train().drop_cond(label) == 4).all()


def test_fast_sampler_same_distribution():
    from modules.components.var_sampling import sample_top_k_top_p_fast

    torch.manual_seed(0)
    logits = torch.randn(1, 1, 50).expand(1, 40000, 50).contiguous() * 2
    for top_k, top_p in ((10, 0.0), (0, 0.8), (10, 0.7), (0, 0.0)):
        a = sample_top_k_top_p(logits.clone(), top_k, top_p, torch.Generator().manual_seed(0))
        b = sample_top_k_top_p_fast(logits.clone(), top_k, top_p, torch.Generator().manual_seed(1))
        fa = torch.bincount(a.flatten(), minlength=50).float() / a.numel()
        fb = torch.bincount(b.flatten(), minlength=50).float() / b.numel()
        if top_k or top_p:  # the same truncated support (without truncation rare tokens may not show)
            assert torch.equal(fa > 0, fb > 0), (top_k, top_p)
        assert (fa - fb).abs().max() < 0.015, (top_k, top_p, (fa - fb).abs().max())


@pytest.mark.parametrize("sampler", ["official", "fast"])
def test_per_sample_generators_make_rows_independent(vqvae, sampler):
    var = make_var(vqvae)
    kw = dict(cfg=1.5, top_k=50, top_p=0.9, decode=False, sampler=sampler)
    batch, _ = var.sample(3, torch.tensor([0, 1, 2]), generator=[torch.Generator().manual_seed(s) for s in (5, 6, 7)], **kw)
    one, _ = var.sample(1, torch.tensor([1]), generator=[torch.Generator().manual_seed(6)], **kw)
    assert all(torch.equal(b[1:2], o) for b, o in zip(batch, one))
    assert not all(torch.equal(b[0:1], o) for b, o in zip(batch, one))
    # random labels also come from the per-sample generators
    r1, _ = var.sample(2, None, generator=[torch.Generator().manual_seed(s) for s in (1, 2)], **kw)
    r2, _ = var.sample(2, None, generator=[torch.Generator().manual_seed(s) for s in (1, 2)], **kw)
    assert all(torch.equal(a, b) for a, b in zip(r1, r2))
    with pytest.raises(ValueError, match="sampler"):
        var.sample(1, 0, sampler="greedy", decode=False)


def test_official_sizes_on_meta_device():
    """The default configs have the official parameter counts (VAR README: d16 310M, d20 600M,
    d24 1.0B, d30 2.0B; vae_ch160v4096z32 about 109M), built on the meta device (no memory)."""
    with torch.device("meta"):
        vq = build_vqvae(VQVAEConfig())
        assert abs(sum(p.numel() for p in vq.parameters()) / 1e6 - 108.95) < 0.1
        for depth, millions in ((16, 310), (20, 600), (24, 1033), (30, 2010)):
            var = build_var(VARConfig(depth=depth), vq)
            assert (var.C, var.num_heads, var.L, var.V) == (64 * depth, depth, 680, 4096)
            n = sum(p.numel() for p in var.parameters()) / 1e6
            assert abs(n - millions) / millions < 0.01, (depth, n)
            assert var.class_emb.weight.shape == (1001, 64 * depth)


def test_runs_under_bf16_autocast(vqvae):
    """Mixed precision (Lightning bf16-mixed) must not break training or sampling; the VQVAE
    parts stay fp32 (checked in test_vqvae)."""
    var = build_var(VARConfig(depth=2, num_classes=4), vqvae)
    idx = random_idx(vqvae, 2, torch.Generator().manual_seed(0))
    x_in = vqvae.idx_to_var_input(idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = var(torch.tensor([0, 1]), x_in)
        loss = var.loss(logits, idx)
        loss.backward()
        out, img = var.eval().sample(2, torch.tensor([0, 1]), top_k=10, generator=torch.Generator().manual_seed(0))
    assert logits.dtype == torch.float32 and torch.isfinite(loss)
    assert var.head.weight.grad is not None
    assert img.dtype == torch.float32 and [o.shape[1] for o in out] == [pn * pn for pn in vqvae.patch_nums]


# -- the fast generation path (parity=False) and the dtype rule -------------------------------------
def test_fast_path_valid_images_and_deterministic(vqvae):
    var = make_var(vqvae)
    kw = dict(cfg=1.5, top_k=50, top_p=0.96, parity=False)
    label = torch.tensor([0, 1, 2, 3])
    for dtype in ("auto", "bf16"):  # "auto" is fp32 at this width; bf16 runs on every CPU (emulated without AVX512-BF16)
        a, img = var.sample(4, label, generator=torch.Generator().manual_seed(3), dtype=dtype, **kw)
        b, img_b = var.sample(4, label, generator=torch.Generator().manual_seed(3), dtype=dtype, **kw)
        c, _ = var.sample(4, label, generator=torch.Generator().manual_seed(4), dtype=dtype, decode=False, **kw)
        assert img.shape == (4, 3, 64, 64) and img.dtype == torch.float32 and torch.isfinite(img).all()
        assert 0 <= img.min() and img.max() <= 1 and torch.equal(img, img_b)
        assert [t.shape for t in a] == [(4, pn * pn) for pn in vqvae.patch_nums]
        assert all(t.dtype == torch.long and 0 <= int(t.min()) and int(t.max()) < vqvae.V for t in a)
        assert all(torch.equal(x, y) for x, y in zip(a, b)), dtype
        assert not all(torch.equal(x, y) for x, y in zip(a, c)), dtype
        # the fast decode (channels-last latent) is the VQVAE's image of the drawn indices
        assert img.is_contiguous() and (img - vqvae.idx_to_img(a).add(1).mul(0.5)).abs().max() <= 1e-3
    # a frozen model (autocast re-casts its weights per use instead of once) draws the same
    var.requires_grad_(False)
    d, _ = var.sample(4, label, generator=torch.Generator().manual_seed(3), dtype="bf16", decode=False, **kw)
    var.requires_grad_(True)
    e, _ = var.sample(4, label, generator=torch.Generator().manual_seed(3), dtype="bf16", decode=False, **kw)
    assert all(torch.equal(x, y) for x, y in zip(d, e))


def test_fast_path_computes_the_parity_logits(vqvae):
    """parity=False changes the sampler and the compute dtype only: in fp32 the per-scale logits
    (teacher-forced through the cache) are the parity ones; in bf16 they are close."""
    var = make_var(vqvae)
    idx = random_idx(vqvae, 2, torch.Generator().manual_seed(0))
    runs = {}
    for name, kw in {"parity": dict(parity=True), "fast32": dict(parity=False, dtype="fp32"),
                     "fast16": dict(parity=False, dtype=torch.bfloat16)}.items():
        runs[name] = []
        var.sample(2, torch.tensor([0, 1]), teacher_idx=idx, logits_out=runs[name], decode=False, **kw)
    for p, f32, f16 in zip(runs["parity"], runs["fast32"], runs["fast16"]):
        assert torch.equal(p, f32)
        assert f16.dtype == torch.float32 and (p - f16).abs().max() <= 0.05 * p.abs().max() + 0.05


def test_parity_mode_is_fp32_under_a_callers_autocast(vqvae):
    """Parity mode draws the official (fp32) indices also inside a bf16 autocast region (Lightning
    bf16-mixed); step_hook runs under the caller's autocast state, the VAR blocks under `dtype`."""
    var = make_var(vqvae, cond_mode="external")
    kw = dict(cfg=1.5, top_k=50, top_p=0.9, decode=False)
    ref, _ = var.sample(2, None, generator=torch.Generator().manual_seed(0), **kw)
    seen = []

    def hook(si, x):
        seen.append((torch.is_autocast_enabled("cpu"), x.dtype))
        return x

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = var.sample(2, None, generator=torch.Generator().manual_seed(0), step_hook=hook, **kw)
    assert all(torch.equal(a, b) for a, b in zip(ref, out))
    assert seen == [(True, torch.float32)] * len(vqvae.patch_nums)
    seen.clear()
    var.sample(2, None, generator=torch.Generator().manual_seed(0), step_hook=hook, parity=False, dtype="bf16", **kw)
    assert seen == [(False, torch.float32)] * len(vqvae.patch_nums)
    # dtype=None keeps the caller's autocast: bf16 logits, other draws than fp32 may follow
    with torch.autocast("cpu", dtype=torch.bfloat16):
        var.sample(2, None, generator=torch.Generator().manual_seed(0), dtype=None, **kw)


def test_sampling_dtype_rule_and_resolution(vqvae, monkeypatch):
    from modules.components import var_sampling as vs

    real = vs.fast_bf16
    assert isinstance(real("cpu"), bool) and real("meta") is False
    small, wide = make_var(vqvae), make_var(vqvae, embed_dim=vs.BF16_MIN_WIDTH, num_heads=4)
    assert small.C < vs.BF16_MIN_WIDTH <= wide.C
    for fast in (True, False):
        monkeypatch.setattr(vs, "fast_bf16", lambda device, fast=fast: fast)
        assert vs.default_sampling_dtype(small) == torch.float32  # small widths stay fp32 everywhere
        assert vs.default_sampling_dtype(wide) == (torch.bfloat16 if fast else torch.float32)
    monkeypatch.setattr(vs, "fast_bf16", lambda device: True)
    assert vs.resolve_sampling(wide, parity=True) == ("official", torch.float32)
    assert vs.resolve_sampling(wide, parity=False) == ("fast", torch.bfloat16)
    assert vs.resolve_sampling(small, parity=False) == ("fast", torch.float32)
    assert vs.resolve_sampling(wide, parity=False, sampler="official", dtype="fp32") == ("official", torch.float32)
    assert vs.resolve_sampling(small, parity=True, sampler="fast", dtype=None) == ("fast", None)
    assert vs.resolve_sampling(small, dtype="bfloat16")[1] == torch.bfloat16
    assert vs.resolve_sampling(small, parity=False, dtype="inherit") == ("fast", None)
    for bad in (dict(sampler="greedy"), dict(dtype="int8"), dict(dtype=torch.float64)):
        with pytest.raises(ValueError):
            vs.resolve_sampling(small, **bad)
