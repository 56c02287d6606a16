"""``model.load``'s ``into:`` takes a dotted submodule path (modules/weights.py ``submodule``): a
file loads into a nested part (the v1.1 tokenizer at ``gen.vae_local``), a path that is not there
is refused naming the entry and the names that are; experiments/v11/world_bases.yaml loads the
shipped BSQ base (assets/world/bsq.safetensors, sha256 from its MANIFEST.json) into the world v1.1."""
from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn as nn

from experiments.config import REPO_ROOT, load_config
from modules.checkpoint import WeightsIntegrityError, read_state_dict, save_state_dict
from modules.config import LoadSpec, ModelConfig
from modules.weights import apply_load_spec, load_weights, submodule

BSQ = REPO_ROOT / "assets/world/bsq.safetensors"


def _tree() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Module()
    m.gen = nn.Module()
    m.gen.vae_local = nn.Linear(3, 2)
    m.gen.head = nn.Linear(2, 2)
    m.lm_head = nn.Linear(2, 4)
    return m


def test_dotted_into_loads_the_nested_part_only(tmp_path):
    m = _tree()
    want = {"weight": torch.randn(2, 3), "bias": torch.randn(2)}
    save_state_dict(want, tmp_path / "w.safetensors")
    others = {k: v.clone() for k, v in m.state_dict().items() if not k.startswith("gen.vae_local.")}
    load_weights(m, [LoadSpec(path=str(tmp_path / "w.safetensors"), into="gen.vae_local")])
    assert torch.equal(m.gen.vae_local.weight, want["weight"]) and torch.equal(m.gen.vae_local.bias, want["bias"])
    assert all(torch.equal(m.state_dict()[k], v) for k, v in others.items())  # nothing else touched
    # a file for another nested part is refused strictly (shapes), not loaded somewhere
    with pytest.raises(Exception, match="shape"):
        apply_load_spec(m, LoadSpec(path=str(tmp_path / "w.safetensors"), into="gen.head"))


def test_missing_path_names_the_entry_and_what_exists(tmp_path):
    m = _tree()
    save_state_dict({"weight": torch.zeros(2, 3), "bias": torch.zeros(2)}, tmp_path / "w.safetensors")
    ok = LoadSpec(path=str(tmp_path / "w.safetensors"), into="gen.vae_local")
    with pytest.raises(ValueError) as e:
        load_weights(m, [ok, LoadSpec(path=str(tmp_path / "w.safetensors"), into="gen.vae_locl")])
    msg = str(e.value)
    assert "model.load[1]" in msg and "'gen.vae_locl'" in msg and "gen.vae_local, gen.head" in msg
    with pytest.raises(ValueError, match=r"no top-level 'gn'.*top-level: gen, lm_head"):
        submodule(m, "gn.vae_local")
    with pytest.raises(ValueError, match="under 'lm_head'"):  # a leaf has no children
        submodule(m, "lm_head.weight")
    assert submodule(m, "gen") is m.gen


def test_config_accepts_dotted_paths_and_refuses_bad_ones():
    ModelConfig(load=[LoadSpec(path="x", into="vqvae.encoder")]).validate()
    with pytest.raises(ValueError, match="into='nothere.encoder'"):
        ModelConfig(load=[LoadSpec(path="x", into="nothere.encoder")]).validate()
    with pytest.raises(ValueError, match="into='vqvae..encoder'"):
        ModelConfig(load=[LoadSpec(path="x", into="vqvae..encoder")]).validate()


@pytest.fixture(scope="module")
def world_bases_cfg():
    # one LLM layer, one decoder block: the tokenizer is what is checked, at its world size
    return load_config(REPO_ROOT / "experiments/v11/world_bases.yaml",
                       ["model.v11.llm.num_hidden_layers=1", "model.v11.decoder.depth=1"]).cfg


def test_world_bases_loads_the_shipped_bsq_into_the_tokenizer(world_bases_cfg):
    from modules.vargpt11_world import VARGPT11World

    cfg = world_bases_cfg
    assert [(s.path, s.into) for s in cfg.model.load] == [("assets/world/bsq.safetensors", "gen.vae_local")]
    torch.manual_seed(0)
    net = VARGPT11World(cfg.model, template=cfg.data.chat)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    load_weights(net, cfg.model.load)
    file = read_state_dict(BSQ)  # sha256 checked against assets/world/MANIFEST.json on the way
    own = net.gen.vae_local.state_dict()
    assert set(own) == set(file)
    assert all(torch.equal(own[k], v.to(own[k].dtype)) for k, v in file.items())
    assert any(not torch.equal(before[f"gen.vae_local.{k}"], own[k]) for k in own if own[k].is_floating_point())
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("gen.vae_local."))


def test_a_damaged_base_is_refused_by_the_manifest(tmp_path):
    for name in ("bsq.safetensors", "MANIFEST.json"):
        shutil.copy(BSQ.parent / name, tmp_path / name)
    raw = bytearray((tmp_path / "bsq.safetensors").read_bytes())
    raw[-1] ^= 0x01  # one bit of the last tensor
    (tmp_path / "bsq.safetensors").write_bytes(bytes(raw))
    m = _tree()
    with pytest.raises(WeightsIntegrityError, match="sha256"):
        apply_load_spec(m, LoadSpec(path=str(tmp_path / "bsq.safetensors"), into="gen.vae_local"))
