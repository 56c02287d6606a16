"""The 7B VARGPT-v1.1 stage recipes (experiments/real/vargpt_v11_stage{0..5}.yaml) validate, build on
the meta device (no weights, no memory), and train exactly the parameter counts the release's freeze
rule gives on the real key set (tests/fixtures/vargpt_v11_official/official_real_keys.json)."""
from __future__ import annotations

import json

import pytest
import torch

from experiments.config import REPO_ROOT, load_config
from modules.stages.v11_stages import STAGE_CLASSES
from tests.conftest import require_fixture
from tests.test_vargpt11_release_stages import RELEASE_FORBIDDEN
from tests.tiny import tiny_tokenizer_dir

REAL = "vargpt_v11_official"


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # see tests/conftest.py
    yield


@pytest.fixture(scope="module")
def meta_net(tmp_path_factory):
    from modules.components.text_tokenizer import TokenizerConfig, build_tokenizer
    from modules.vargpt11_world import VARGPT11World

    loaded = load_config(REPO_ROOT / "experiments/real/vargpt_v11_stage0.yaml", ["model.load=[]"])
    # the recipe's tokenizer lives beside the weights; a smaller one keeps the release's 152064 rows
    tok = build_tokenizer(TokenizerConfig(name="world", path=str(tiny_tokenizer_dir(tmp_path_factory.mktemp("tok")))))
    with torch.device("meta"):
        net = VARGPT11World(loaded.cfg.model, tokenizer=tok)
    return net


@pytest.fixture(scope="module")
def real():
    r = json.loads(require_fixture(REAL, "official_real_keys.json").read_text())
    buffers = set(r["persistent_buffers"])
    return {k: torch.Size(s).numel() for k, s in r["keys"].items() if k not in buffers}, r


def test_total_parameter_count_is_the_release(meta_net, real):
    params, r = real
    assert all(p.device.type == "meta" for p in meta_net.parameters())
    n = sum(p.numel() for p in meta_net.parameters())
    assert n == sum(params.values()) == 10_948_395_235  # 10,948,528,387 elements less 66 persistent buffers (133,152)
    assert r["n_elements"] - n == sum(torch.Size(r["keys"][k]).numel() for k in r["persistent_buffers"])


@pytest.mark.parametrize("i", range(6))
def test_recipe_is_sharded_bf16_and_trains_the_release_count(i, meta_net, real):
    from modules.parallel import layer_classes

    params, _ = real
    cfg = load_config(REPO_ROOT / f"experiments/real/vargpt_v11_stage{i}.yaml").cfg
    assert cfg.stage == f"v11_stage{i}" and cfg.model.family == "vargpt11"
    assert cfg.trainer.strategy == "fsdp" and cfg.trainer.precision == "bf16-mixed"
    assert cfg.optim.lr == 5e-5 and cfg.optim.warmup_ratio == 0.1 and cfg.optim.schedule == "cosine"
    # every recomputed group is a layer of this model: 28 LLM layers, 32 Infinity blocks (+ 32 ViT blocks)
    ac = tuple(layer_classes(cfg.trainer.fsdp.activation_checkpointing))
    n_ac = sum(isinstance(m, ac) for m in meta_net.modules())
    assert n_ac == 28 + 32 + (32 if "vision_layer" in cfg.trainer.fsdp.activation_checkpointing else 0)
    wrap = tuple(layer_classes(cfg.trainer.fsdp.wrap))
    assert sum(isinstance(m, wrap) for m in meta_net.modules()) == 28 + 32 + 32
    module = STAGE_CLASSES[cfg.stage](cfg, net=meta_net)
    mine = sum(p.numel() for p in module.net.parameters() if p.requires_grad)
    release = sum(n for k, n in params.items() if not any(f in k for f in RELEASE_FORBIDDEN[i]))
    assert mine == release
    # the figures of docs/v11.md
    assert mine == {0: 2_546_901_568, 1: 342_337_536, 2: 7_615_616_512, 3: 2_546_901_568, 4: 10_162_518_080,
                    5: 10_838_277_184}[i]
