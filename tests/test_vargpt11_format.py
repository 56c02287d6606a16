"""The released VARGPT-v1.1 layout in and out: strict shard-streamed loading (a stray or missing
key is refused by name), experiments.export writing the layout back (round trip), the real
1706-key set of the release reproduced on the meta device, sizes read from tensor shapes."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from experiments.export import main as export_main
from modules.components.bsq import BSQConfig
from modules.components.infinity import InfinityConfig
from modules.components.qwen2vl import Qwen2VLConfig
from modules.vargpt11 import VARGPT11, VARGPT11Config
from modules.vargpt11_format import (ReleasedLayoutError, build_released, config_from_released, expected_keys,
                                     load_released)

from tests.conftest import require_fixture

V11 = "vargpt_v11_official"


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # see tests/conftest.py
    yield


@pytest.fixture(scope="module")
def released():
    return build_released(require_fixture(V11), pn="0.06M")


def test_sizes_and_ids_come_from_the_directory(released):
    _, cfg = released
    assert (cfg.decoder.embed_dim, cfg.decoder.depth, cfg.decoder.block_chunks, cfg.decoder.num_heads) == (128, 4, 2, 2)
    assert (cfg.tokenizer.base_ch, cfg.tokenizer.codebook_dim, cfg.llm.num_key_value_heads) == (24, 32, 2)
    assert (cfg.ids.gen_start, cfg.ids.gen_pad, cfg.ids.image_pad, cfg.sos_rows) == (214, 216, 212, 215)


def _copy(tmp_path, name="ck"):
    d = tmp_path / name
    shutil.copytree(require_fixture(V11), d, ignore=shutil.ignore_patterns("vectors.pt", "*.json.bak"))
    return d


def _rewrite_shard(d, fn):
    shard = d / "model-00001-of-00002.safetensors"
    sd = fn(load_file(shard))
    save_file(sd, shard, metadata={"format": "pt"})
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    idx["weight_map"] = {k: v for k, v in idx["weight_map"].items() if v != shard.name}
    idx["weight_map"].update({k: shard.name for k in sd})
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))


def test_stray_and_missing_keys_are_refused_by_name(tmp_path, released):
    model, _ = released
    d = _copy(tmp_path, "stray")
    _rewrite_shard(d, lambda sd: {**sd, "vargpt_gen.extra_thing": torch.zeros(2)})
    with pytest.raises(ReleasedLayoutError, match=r"stray \['vargpt_gen\.extra_thing'\]"):
        load_released(model, d)
    d = _copy(tmp_path, "missing")
    _rewrite_shard(d, lambda sd: {k: v for k, v in sd.items() if k != "lm_head.weight"})
    with pytest.raises(ReleasedLayoutError, match=r"missing \['lm_head\.weight'\]"):
        load_released(model, d)
    with pytest.raises(ReleasedLayoutError, match="config.json"):
        config_from_released(tmp_path)


def test_export_round_trip(tmp_path, released, capsys):
    model, _ = released
    out = tmp_path / "out"
    assert export_main([str(require_fixture(V11)), str(out), "--format", "vargpt11", "--max-shard-bytes", "2000000"]) == 0
    assert len(set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
    again, cfg = build_released(out, pn="0.06M")
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    src_conf = json.loads(require_fixture(V11, "config.json").read_text())
    out_conf = json.loads((out / "config.json").read_text())
    for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_key_value_heads", "rope_scaling", "special_tokens",
              "image_token_id", "vision_start_token_id", "eos_token_id"):
        assert out_conf[k] == src_conf[k], k


class _S:
    def __init__(self, s):
        self.shape = tuple(s)


def test_the_real_7b_key_set_on_the_meta_device():
    real = json.loads(require_fixture(V11, "official_real_keys.json").read_text())
    keys = {k: tuple(v) for k, v in real["keys"].items()}
    assert len(keys) == real["n_keys"] == 1706
    sh = {k: _S(v) for k, v in keys.items()}
    cfg = VARGPT11Config(llm=Qwen2VLConfig(), tokenizer=BSQConfig.from_state_dict(sh, "vae_local."),
                         decoder=InfinityConfig.from_state_dict(sh, "vargpt_gen."),
                         sos_rows=keys["sos_embedding.weight"][0])
    assert (cfg.decoder.depth, cfg.decoder.block_chunks, cfg.decoder.embed_dim, cfg.tokenizer.base_ch) == (32, 8, 2048, 128)
    with torch.device("meta"):
        model = VARGPT11(cfg)
    mine = {k: tuple(v.shape) for k, v in expected_keys(model).items()}
    assert set(mine) - set(keys) == set() and set(keys) - set(mine) == set()
    assert {k for k in keys if mine[k] != keys[k]} == set()
    assert sum(torch.Size(s).numel() for s in mine.values()) == real["n_elements"]


def test_model_load_format_vargpt11(released):
    from modules.config import LoadSpec
    from modules.weights import load_into

    model, cfg = released
    fresh = VARGPT11(cfg)
    load_into(fresh, LoadSpec(path=str(require_fixture(V11)), format="vargpt11"))
    a, b = model.state_dict(), fresh.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_release_recipe_builds_the_1706_keys_on_meta(tmp_path):
    """experiments/real/vargpt_v11.yaml at the release's sizes: its keys and shapes are the release's."""
    from experiments.config import REPO_ROOT, load_config
    from modules.components.text_tokenizer import TokenizerConfig, build_tokenizer
    from modules.vargpt11_world import VARGPT11World

    from tests.tiny import tiny_tokenizer_dir

    loaded = load_config(REPO_ROOT / "experiments/real/vargpt_v11.yaml", ["model.load=[]"])
    tok = build_tokenizer(TokenizerConfig(name="world", path=str(tiny_tokenizer_dir(tmp_path))))
    with torch.device("meta"):
        net = VARGPT11World(loaded.cfg.model, tokenizer=tok)
    real = json.loads(require_fixture(V11, "official_real_keys.json").read_text())
    mine = {k: list(v.shape) for k, v in expected_keys(net).items()}
    assert mine == real["keys"]
