"""The vendored fixtures (tests/fixtures/) are complete and as first made: the vargpt_official
checkpoint, stored as two shards, is the released single-file checkpoint byte for byte; the
VQVAE that var_official and vargpt_official share is stored once and reproduces the official
VQ indices of both; a missing fixture fails, never skips."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save

from benchmarks.var_parity import configs_from_official, load_weights
from modules.components.vqvae import VQVAEConfig, build_vqvae

from tests.conftest import FIXTURES, load_sharded_safetensors, require_fixture

VARGPT = "vargpt_official"
# sha256 of the single-file model.safetensors the official code wrote (see tests/fixtures/README.md)
VARGPT_MODEL_SHA256 = "a75abcbcb080c54a6db2b2fd8ff54f5051039f07efdb51a78ca901e4985d9458"


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # see tests/conftest.py
    yield


@pytest.fixture(scope="module")
def vargpt_sd():
    return load_sharded_safetensors(VARGPT)


def test_every_listed_fixture_is_present():
    for parts in [
        ("README.md",), ("vqav2_scoring_vectors.json",), ("formats", "README.md"),
        ("var_official", "README.md"), ("var_official", "config.json"), ("var_official", "var.safetensors"),
        ("var_official", "vectors.pt"),
        *[(VARGPT, n) for n in ("README.md", "config.json", "meta.json", "vectors.pt", "official_real_keys.json",
                                "official_real_config.reconstructed.json", "official_generated.png",
                                "model.safetensors.index.json", "model-00001-of-00002.safetensors",
                                "model-00002-of-00002.safetensors")],
    ]:
        require_fixture(*parts)


def test_missing_fixture_fails_not_skips():
    with pytest.raises(pytest.fail.Exception, match=r"test fixture missing: .*no_such_fixture\.pt"):
        require_fixture("no_such_fixture.pt")


def test_vargpt_shards_rebuild_the_released_file(vargpt_sd):
    """Same keys, dtypes and bytes as the single file: re-serialized, it has the original sha256."""
    index = json.loads(require_fixture(VARGPT, "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in vargpt_sd.values())
    assert set(index["weight_map"]) == set(vargpt_sd) and len(vargpt_sd) == 454
    for k, f in index["weight_map"].items():
        assert f == ("model-00002-of-00002.safetensors" if k.startswith("vae_local.") else "model-00001-of-00002.safetensors")
    assert {t.dtype for k, t in vargpt_sd.items() if k.startswith("vae_local.")} == {torch.float32}
    assert hashlib.sha256(save(vargpt_sd, metadata={"format": "pt"})).hexdigest() == VARGPT_MODEL_SHA256


def test_vargpt_keys_match_the_released_7b_key_set(vargpt_sd):
    real = json.loads(require_fixture(VARGPT, "official_real_keys.json").read_text())
    assert len(real["keys"]) == real["n_keys"] == 1424
    assert set(vargpt_sd) <= set(real["keys"])  # the tiny config has fewer layers, not other names


def test_var_official_vqvae_is_the_vargpt_vae_local(vargpt_sd):
    c = json.loads(require_fixture("var_official", "config.json").read_text())
    assert c["weights"]["vae"] == {"file": "../vargpt_official/model-00002-of-00002.safetensors",
                                   "prefix": "vae_local."}
    w = load_weights(FIXTURES / "var_official", c)
    vae_local = {k[len("vae_local."):]: t for k, t in vargpt_sd.items() if k.startswith("vae_local.")}
    assert set(w["vae"]) == set(vae_local) and all(torch.equal(w["vae"][k], vae_local[k]) for k in vae_local)
    assert set(w["var"]) == set(load_file(require_fixture("var_official", "var.safetensors")))
    # the one tensor the two official runs saved differently: usage statistics, zeros in both, with the
    # scale count of each (4 here, 10 in var_official); the loader keeps the model's own for another count
    assert torch.equal(vae_local["quantize.ema_vocab_hit_SV"], torch.zeros(4, 512))
    vq_cfg, _ = configs_from_official(c)
    m = build_vqvae(vq_cfg)
    m.load_official_state_dict(w["vae"])
    assert torch.equal(m.quantize.ema_vocab_hit_SV, torch.zeros(len(c["patch_nums"]), c["V"]))


@torch.no_grad()
def test_vae_local_reproduces_the_vargpt_vq_indices_and_image(vargpt_sd):
    meta = json.loads(require_fixture(VARGPT, "meta.json").read_text())
    v = torch.load(require_fixture(VARGPT, "vectors.pt"), weights_only=True)
    cfg = VQVAEConfig(vocab_size=meta["V"], z_channels=meta["Cvae"], ch=meta["vqvae_ch"],
                      share_quant_resi=meta["share_quant_resi"], patch_nums=list(meta["patch_nums"]))
    m = build_vqvae(cfg).eval()
    m.load_official_state_dict({k[len("vae_local."):]: t for k, t in vargpt_sd.items() if k.startswith("vae_local.")})
    g = v["gen"]
    idx = m.img_to_idx(g["pixel_gen_values"])
    assert torch.equal(torch.cat(idx, 1), g["gt_BL"])
    assert (m.idx_to_var_input(idx) - g["x_BLCv_wo_first_l"]).abs().max() <= 1e-5
    inf = v["infer"]
    assert (m.idx_to_fhat(inf["idx"]) - inf["f_hat"]).abs().max() <= 1e-5
    assert ((m.idx_to_img(inf["idx"]) + 1) / 2 - inf["recon_01"]).abs().max() <= 1e-5


V11 = "vargpt_v11_official"
# sha256 of the single-file model.safetensors the official v1.1 code wrote (tests/fixtures/README.md)
V11_MODEL_SHA256 = "9c70d639a927ab9ad1a84e18b1e68ca9e237ee7a6f9283e10092eec8ba8931c7"


def test_vargpt_v11_fixture_is_complete_and_rebuilds_the_released_file():
    for n in ("README.md", "config.json", "generation_config.json", "meta.json", "vectors.pt",
              "official_real_keys.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
              "model-00002-of-00002.safetensors"):
        require_fixture(V11, n)
    sd = load_sharded_safetensors(V11)
    assert len(sd) == 366
    assert hashlib.sha256(save(sd, metadata={"format": "pt"})).hexdigest() == V11_MODEL_SHA256
    real = json.loads(require_fixture(V11, "official_real_keys.json").read_text())
    assert set(sd) <= set(real["keys"])  # the tiny config has fewer layers, not other names
