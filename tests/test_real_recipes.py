"""The VARGPT-7B recipes validate and build on the meta device (no weights, no memory)."""
from __future__ import annotations

import pytest
import torch

from experiments.config import REPO_ROOT, load_config
from modules.stages.vargpt_stages import STAGE_CLASSES
from modules.vargpt import VARGPT
from tests.tiny import tiny_tokenizer_dir

STAGES = ("stage1", "stage2", "stage3")


@pytest.fixture(scope="module")
def meta_model(tmp_path_factory):
    from modules.components.text_tokenizer import TokenizerConfig, build_tokenizer

    loaded = load_config(REPO_ROOT / "experiments/real/stage1.yaml", ["model.vision.config_dir=''", "model.load=[]"])
    # The recipe's tokenizer lives beside the 7B weights; any tokenizer with fewer than 32000
    # entries leaves the Vicuna vocabulary at 32000 rows (the LLM never shrinks).
    tok = build_tokenizer(TokenizerConfig(name="world", path=str(tiny_tokenizer_dir(tmp_path_factory.mktemp("tok")))))
    with torch.device("meta"):
        net = VARGPT(loaded.cfg.model, tokenizer=tok)
    return loaded, net


def _count(m):
    return sum(p.numel() for p in m.parameters())


def test_parameter_counts(meta_model):
    _, net = meta_model
    assert all(p.device.type == "meta" for p in net.parameters())
    assert _count(net.llm) == 6_738_415_616  # Vicuna-7B (LLaMA-7B, vocab 32000)
    assert _count(net.vision) == 303_507_456  # CLIP ViT-L/14-336 vision tower
    assert _count(net.und_proj) == 1024 * 4096 + 4096 + 4096 * 4096 + 4096  # mlp2x_gelu: 20.98M
    llava = _count(net.llm) + _count(net.vision) + _count(net.und_proj)
    assert abs(llava - 7.06e9) < 0.01e9  # LLaVA-1.5-7B
    assert abs(_count(net.var) - 2.0e9) < 0.05e9  # VAR-d30 (official: 2.0B)
    assert net.var.C == 1920 and net.var.L == 680 and net.var.V == 4096
    assert _count(net.gen_in) == 1920 * 4096 + 4096 + 4096 * 4096 + 4096
    assert _count(net.gen_out) == 4096 * 1920 + 1920 + 1920 * 1920 + 1920  # hidden = out width, as LLaVA
    assert 60e6 < _count(net.vqvae) < 120e6  # vae_ch160v4096z32 (108.9M incl. quantizer)


@pytest.mark.parametrize("stage", STAGES)
def test_recipe_validates_and_declares_its_trainable_set(stage, meta_model):
    loaded = load_config(REPO_ROOT / f"experiments/real/{stage}.yaml")
    cfg = loaded.cfg
    assert cfg.stage == stage and cfg.trainer.precision.startswith("bf16")
    assert cfg.model.llm.gradient_checkpointing and cfg.trainer.strategy in ("fsdp", "deepspeed_stage_3")
    if stage == "stage3":  # the released recipe
        assert cfg.optim.lr == 5e-5 and cfg.optim.warmup_ratio == 0.1 and cfg.optim.schedule == "cosine"
    _, net = meta_model
    module = STAGE_CLASSES[stage](cfg, net=net)
    names = module.trainable_parameter_names()
    tops = {n.split(".")[0] for n in names}
    n_train = sum(p.numel() for p in net.parameters() if p.requires_grad)
    if stage == "stage1":
        assert tops == {"gen_in", "gen_out", "var"}
        assert {n for n in names if n.startswith("var.")} == {"var.cond_emb.weight", "var.pos_start"}
        assert n_train < 60e6
    elif stage == "stage2":
        assert tops == {"llm"} and n_train == 6_738_415_616
    else:
        assert tops == {"gen_in", "gen_out", "var"} and n_train > 2.0e9
