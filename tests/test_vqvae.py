"""Multi-scale VQVAE: official parity, key layouts, small configs, training, fingerprint, loading."""
from __future__ import annotations

import json

import pytest
import torch

import modules.components.vqvae as vqvae_mod
from modules.components.vqvae import (
    TOKENIZERS,
    StateDictMismatchError,
    VQVAEConfig,
    build_vqvae,
)

from tests.conftest import FIXTURES, require_fixture

FIX = FIXTURES / "var_official"


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # see tests/conftest.py
    yield

# the embedded 64 px world: 8x down, 8x8x16 latent, 512 codes
WORLD = dict(ch=32, ch_mult=[1, 1, 2, 2], num_res_blocks=1, z_channels=16, vocab_size=512, patch_nums=[1, 2, 3, 4, 6, 8])


@pytest.fixture(scope="module")
def official():
    from benchmarks.var_parity import configs_from_official, load_weights

    c = json.loads(require_fixture("var_official", "config.json").read_text())
    for part in c["weights"].values():  # the VQVAE is in the vargpt_official shard (tests/fixtures/README.md)
        require_fixture(FIX / part["file"])
    w = load_weights(FIX, c)
    v = torch.load(require_fixture("var_official", "vectors.pt"), weights_only=True)
    vq_cfg, _ = configs_from_official(c)
    m = build_vqvae(vq_cfg).eval()
    m.load_official_state_dict(w["vae"])
    return m, w, v


def test_official_indices_teacher_input_and_recon(official):
    m, _, v = official
    idx = m.img_to_idx(v["images"])
    assert [tuple(i.shape) for i in idx] == [tuple(i.shape) for i in v["gt_idx"]]
    for si, (a, b) in enumerate(zip(idx, v["gt_idx"])):
        assert torch.equal(a, b), f"scale {si}: {(a != b).sum()} indices differ"
    x = m.idx_to_var_input(v["gt_idx"])
    assert x.shape == v["x_BLCv_wo_first_l"].shape
    assert (x - v["x_BLCv_wo_first_l"]).abs().max() <= 1e-5
    assert (m.idx_to_img(v["gt_idx"]) - v["recon"]).abs().max() <= 1e-4
    assert (m.img_to_recon(v["images"]) - v["recon"]).abs().max() <= 1e-4


def test_fp32_inside_autocast(official):
    m, _, v = official
    with torch.autocast("cpu", dtype=torch.bfloat16):
        idx = m.img_to_idx(v["images"])
        img = m.idx_to_img(v["gt_idx"])
    assert all(torch.equal(a, b) for a, b in zip(idx, v["gt_idx"]))
    assert img.dtype == torch.float32 and (img - v["recon"]).abs().max() <= 1e-4


def test_strict_loading_lists_keys(official):
    m, w, _ = official
    sd = dict(w["vae"])
    sd.pop("quant_conv.weight")
    sd["encoder.extra.weight"] = torch.zeros(1)
    sd["post_quant_conv.bias"] = torch.zeros(3)
    with pytest.raises(StateDictMismatchError) as e:
        m.load_official_state_dict(sd)
    msg = str(e.value)
    assert "missing keys (1): quant_conv.weight" in msg
    assert "unexpected keys (1): encoder.extra.weight" in msg
    assert "post_quant_conv.bias: checkpoint (3,) vs model (16,)" in msg
    # explicitly allowed keys pass (the shape error must still be fixed)
    sd["post_quant_conv.bias"] = w["vae"]["post_quant_conv.bias"]
    m2 = build_vqvae(m.cfg)
    m2.load_official_state_dict(sd, allow_missing=["quant_conv.*"], allow_unexpected=["encoder.extra.weight"])
    assert torch.equal(m2.post_quant_conv.weight, m.post_quant_conv.weight)


@pytest.mark.parametrize("share,expect", [
    (0, ["quantize.quant_resi.0.weight", "quantize.quant_resi.5.weight"]),
    (1, ["quantize.quant_resi.qresi.weight"]),
    (3, ["quantize.quant_resi.qresi_ls.0.weight", "quantize.quant_resi.qresi_ls.2.weight"]),
])
def test_phi_sharing_key_layouts(share, expect):
    m = build_vqvae(VQVAEConfig(**WORLD, share_quant_resi=share))
    keys = [k for k in m.state_dict() if k.startswith("quantize.quant_resi") and k.endswith("weight")]
    assert sorted(keys) == sorted(set(keys))
    for k in expect:
        assert k in keys
    n_phi = {0: 6, 1: 1, 3: 3}[share]
    assert len(keys) == n_phi
    # every scale picks a phi; with n == K non-shared, scale k uses phi k
    if share == 0:
        assert [m.quantize.quant_resi[k] is m.quantize.phi(k) for k in range(6)] == [True] * 6


def test_world_config_shapes_and_registry():
    assert "msvq" in TOKENIZERS.names()
    cfg = VQVAEConfig(**WORLD)
    assert cfg.downsample == 8 and cfg.resolution == 64
    m = build_vqvae(cfg).eval()
    img = torch.rand(2, 3, 64, 64) * 2 - 1
    idx = m.img_to_idx(img)
    assert [tuple(i.shape) for i in idx] == [(2, pn * pn) for pn in WORLD["patch_nums"]]
    assert all(i.dtype == torch.long and int(i.max()) < 512 for i in idx)
    assert m.idx_to_var_input(idx).shape == (2, m.L - 1, 16)
    out = m.idx_to_img(idx)
    assert out.shape == (2, 3, 64, 64) and out.abs().max() <= 1
    # a prefix of the scales decodes too (coarse image)
    assert m.idx_to_img(idx[:3]).shape == (2, 3, 64, 64)
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\)"):
        m.img_to_idx(torch.zeros(1, 3, 32, 32))


def test_groupnorm_constraint_message():
    with pytest.raises(ValueError, match="norm_groups"):
        build_vqvae(VQVAEConfig(**{**WORLD, "ch": 16, "ch_mult": [1, 3]}, ))
    # a divisor of every width works
    m = build_vqvae(VQVAEConfig(**{**WORLD, "ch": 16, "ch_mult": [1, 3], "patch_nums": [1, 2, 32]}, norm_groups=8))
    assert m.encoder.conv_in.out_channels == 16


def _blobs(n: int, g: torch.Generator) -> torch.Tensor:
    """Coloured squares on a grey background: a learnable toy image set."""
    img = torch.full((n, 3, 64, 64), 0.5)
    for i in range(n):
        x, y = torch.randint(0, 40, (2,), generator=g).tolist()
        img[i, :, y:y + 20, x:x + 20] = torch.rand(3, 1, 1, generator=g)
    return img * 2 - 1


def test_training_reduces_reconstruction_loss_and_tracks_usage():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    m = build_vqvae(VQVAEConfig(**WORLD, dead_code_restart_every=5)).train()
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3, betas=(0.9, 0.95))
    img = _blobs(4, g)
    first = None
    restarted = 0.0
    for step in range(20):
        recon, losses = m(img)
        assert recon.shape == img.shape and losses["loss"].requires_grad
        rec = float(losses["l1"] + losses["mse"])
        first = rec if first is None else first
        restarted += float(losses["dead_restarted"])
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
    assert rec < 0.5 * first, (first, rec)
    assert restarted > 0  # most of 512 codes are unused on 4 images: the restart fired
    assert 0 < float(losses["usage"]) <= 1
    assert m.quantize.ema_vocab_hit_SV.sum() > 0  # usage tracked without torch.distributed
    # gradients reach encoder (commitment / straight-through), codebook and phi
    recon, losses = m(img)
    opt.zero_grad()
    losses["loss"].backward()
    for p in (m.encoder.conv_in.weight, m.quantize.embedding.weight, m.decoder.conv_out.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_fingerprint_stable_and_sensitive():
    cfg = VQVAEConfig(**WORLD)
    torch.manual_seed(0)
    a = build_vqvae(cfg)
    torch.manual_seed(0)
    b = build_vqvae(cfg)
    assert a.fingerprint() == b.fingerprint() and len(a.fingerprint()) == 16
    b.quantize.ema_vocab_hit_SV += 1  # usage statistics do not change the mapping
    assert a.fingerprint() == b.fingerprint()
    with torch.no_grad():
        b.quantize.embedding.weight[0, 0] += 1e-3
    assert a.fingerprint() != b.fingerprint()


def test_inference_decode_in_place_is_bit_identical():
    """Without autograd the conv blocks run SiLU and the residual add in place: the same image bit
    for bit (both layouts), the input untouched, and with autograd the gradients still flow."""
    torch.manual_seed(0)
    m = build_vqvae(VQVAEConfig(**WORLD)).eval()
    f = torch.randn(2, 16, 8, 8)
    keep = f.clone()
    ref = m.fhat_to_img(f.clone().requires_grad_(True))  # grad mode: the out-of-place ops
    ref.sum().backward()
    f_cl = f.contiguous(memory_format=torch.channels_last)
    ref_cl = m.fhat_to_img(f_cl.clone().requires_grad_(True)).detach()
    with torch.no_grad():
        assert torch.equal(m.fhat_to_img(f), ref.detach())
        assert torch.equal(m.fhat_to_img(f_cl), ref_cl)
    assert torch.equal(f, keep)
    assert all(p.grad is not None for p in m.decoder.parameters())


def test_cpu_inference_decode_goes_image_by_image(monkeypatch):
    """Without autograd a CPU batch of large images decodes one image at a time (faster: the
    full-resolution activations of one image stay nearer the cache); the images are the batched
    decode's up to float rounding (oneDNN may block a batch differently), and a batch of one is
    unchanged. The world's small images (under DECODE_PER_IMAGE_BYTES) decode as one batch."""
    torch.manual_seed(0)
    m = build_vqvae(VQVAEConfig(**WORLD)).eval()
    f = torch.randn(3, 16, 8, 8)
    calls = []
    hook = m.decoder.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    with torch.no_grad():
        m.fhat_to_img(f)
    assert calls == [3]
    calls.clear()
    monkeypatch.setattr(vqvae_mod, "DECODE_PER_IMAGE_BYTES", 0)
    with torch.no_grad():
        got = m.fhat_to_img(f)
    assert calls == [1, 1, 1]
    calls.clear()
    batched = m.fhat_to_img(f).detach()  # autograd on: one call for the batch
    assert calls == [3]
    hook.remove()
    assert torch.allclose(got, batched, atol=1e-5, rtol=0)
    with torch.no_grad():
        assert torch.equal(m.fhat_to_img(f[1:2]), got[1:2])
