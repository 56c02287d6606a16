"""The BSQ tokenizer family reproduces the official VARGPT-v1.1 tokenizer (vendored vectors):
bits per scale equal, decoded image within 1e-4, sizes read from tensor shapes."""
from __future__ import annotations

import pytest
import torch

from modules.components.bsq import BSQConfig, BSQTokenizer

from tests.conftest import load_sharded_safetensors, require_fixture

V11 = "vargpt_v11_official"


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # see tests/conftest.py
    yield


@pytest.fixture(scope="module")
def tok_and_vectors():
    sd = load_sharded_safetensors(V11, prefix="vae_local.")
    sd = {k[len("vae_local."):]: t.float() if t.is_floating_point() else t for k, t in sd.items()}
    vec = torch.load(require_fixture(V11, "vectors.pt"), weights_only=True)["tokenizer"]
    scales = [[h, w] for _, h, w in vec["scale_schedule"]]
    tok = BSQTokenizer(BSQConfig.from_state_dict(sd, scales=scales)).eval()
    tok.load_state_dict(sd, strict=True)
    return tok, vec


def test_sizes_come_from_tensor_shapes(tok_and_vectors):
    tok, _ = tok_and_vectors
    assert (tok.cfg.codebook_dim, tok.cfg.base_ch, tok.cfg.ch_mult, tok.cfg.num_res_blocks) == (32, 24, [1, 2, 4, 4, 4], 1)


def test_encode_bits_inputs_and_decode_match_the_release(tok_and_vectors):
    tok, v = tok_and_vectors
    t = v["input_uint8_BHWC"].permute(0, 3, 1, 2).float().div(255)
    out = tok.encode(t.add(t).add_(-1))
    assert (out["features"] - v["raw_features"]).abs().max() < 1e-4
    for mine, ref in zip(out["bits"], v["bits_per_scale"]):
        assert torch.equal(mine, ref.to(torch.uint8))
    assert (out["f_hat"] - v["z_quantized_out"]).abs().max() < 1e-5
    for mine, ref in zip(tok.next_inputs(out["bits"]), v["var_input_per_scale"]):
        assert (mine - ref.squeeze(2)).abs().max() < 1e-5
    recon = tok.decode_bits(v["bits_per_scale"])
    assert (recon - v["recon_from_bits"]).abs().max() < 1e-4


def test_missing_tensor_names_the_key():
    with pytest.raises(KeyError, match="encoder.conv_in.conv.weight"):
        BSQConfig.from_state_dict({}, prefix="vae_local.")
