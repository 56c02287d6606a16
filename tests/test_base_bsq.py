"""base_bsq: the world's BSQ bit tokenizer as a stage-0 base (modules/stages/bases/bsq.py).

Its recipe has the world v1.1's tokenizer architecture (bits, scales, widths), its training
forward quantizes exactly as inference does (with straight-through gradients), and a tiny one
trains a few steps through ``python -m experiments.run`` into an export that loads strictly."""
from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from experiments.config import REPO_ROOT, load_config
from modules.checkpoint import load_strict, read_state_dict
from modules.components.bsq import BSQConfig, BSQTokenizer
from modules.stages.bases.bsq import bsq_loss, bsq_reconstructions, bsq_train_forward

ARCH = ("codebook_dim", "base_ch", "ch_mult", "num_res_blocks", "scales")
# 32 px -> 8x down -> a 4x4 latent: the world schedule 1, 2, 4 at a quarter of the pixels
TINY = BSQConfig(codebook_dim=8, base_ch=24, ch_mult=[1, 1, 1, 1], num_res_blocks=1, scales=[[1, 1], [2, 2], [4, 4]])


def test_recipe_has_the_world_v11_tokenizer_architecture():
    base = load_config(REPO_ROOT / "experiments/world/bases/bsq.yaml").cfg
    world = OmegaConf.load(REPO_ROOT / "experiments/v11/world.yaml").model.v11.tokenizer
    assert base.stage == "base_bsq" and base.output_dir == "runs/bases/bsq"
    t = base.model.v11.tokenizer
    assert {k: getattr(t, k) for k in ARCH} == {k: OmegaConf.to_container(world)[k] for k in ARCH}
    assert t.downsample * t.scales[-1][0] == 64  # the world's image side


def test_train_forward_quantizes_as_inference_and_passes_gradients():
    torch.manual_seed(0)
    tok = BSQTokenizer(TINY)
    x8 = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    x = x8.float() / 127.5 - 1
    out = bsq_train_forward(tok, x)
    with torch.no_grad():
        f = tok.encoder(x)
        ref = tok.summed_codes(tok.quantize(f))
    assert torch.allclose(out["f_hat"], ref, atol=1e-6)  # the same bits as encode(), straight-through
    loss, parts = bsq_loss(tok, x8)
    loss.backward()
    assert tok.encoder.conv_in.conv.weight.grad.abs().sum() > 0  # through the codes to the encoder
    assert tok.decoder.conv_out.conv.weight.grad.abs().sum() > 0
    # entropies in nats per token: 0 <= H <= d log 2
    for k in ("sample_entropy", "codebook_entropy"):
        assert 0 <= float(parts[k]) <= TINY.codebook_dim * 0.6932
    rec = bsq_reconstructions(tok, x8)
    assert rec.shape == x8.shape and rec.dtype == torch.uint8


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from datamodules.world import generate_split

    root = tmp_path_factory.mktemp("bsqworld")
    for split, n in (("train", 12), ("val", 4)):
        generate_split(str(root / split), split, {"gen": n, "class": n}, seed=0, size=32, shard_size=32)
    return root


def test_tiny_base_trains_a_few_steps_and_exports(world, tmp_path):
    from experiments.run import main as run_main

    tiny = [f"model.v11.tokenizer.{k}={v}" for k, v in (("codebook_dim", 8), ("base_ch", 24), ("ch_mult", "[1,1,1,1]"),
                                                        ("scales", "[[1,1],[2,2],[4,4]]"))]
    out = tmp_path / "bsq"
    assert run_main([str(REPO_ROOT / "experiments/world/bases/bsq.yaml"), f"data.root={world}", f"output_dir={out}",
                     "logging.enabled=false", "trainer.max_steps=3", "trainer.val_every_n_steps=3", "data.batch_size=4",
                     "data.val_batch_size=4", "trainer.num_threads=1", "checkpoint.at_end=false", *tiny]) == 0
    sd = read_state_dict(out / "model.safetensors")
    tok = BSQTokenizer(BSQConfig(**{**TINY.__dict__, "loss": TINY.loss}))
    init = {k: v.clone() for k, v in tok.state_dict().items()}
    load_strict(tok, sd, source="export")  # self.net is exactly the tokenizer: a strict load
    assert any(not torch.equal(init[k], v) for k, v in sd.items() if v.is_floating_point())
    m = json.loads((out / "export.json").read_text())["metadata"]["final_metrics"]
    assert 0 < m["val/psnr"] < 60 and 0 <= m["val/bit_balance"] <= 1


def test_image_side_mismatch_names_the_key(world, tmp_path):
    from modules.stages.bases.bsq import BSQModule

    cfg = load_config(REPO_ROOT / "experiments/world/bases/bsq.yaml", ["model.v11.tokenizer.scales=[[1,1],[2,2]]"]).cfg
    with pytest.raises(ValueError, match="base_bsq: world images are 64 px.*fix model.v11.tokenizer"):
        BSQModule(cfg).training_step({"image": torch.zeros(1, 3, 64, 64, dtype=torch.uint8)}, 0)


def test_vqvae_image_side_mismatch_names_the_key():
    from modules.stages.bases.vqvae import VQVAEModule

    cfg = load_config(REPO_ROOT / "experiments/world/bases/vqvae.yaml").cfg
    m = VQVAEModule(cfg)
    side = m.resolution * 2
    with pytest.raises(ValueError, match=f"base_vqvae: world images are {side} px.*fix model.vqvae"):
        m.training_step({"image": torch.zeros(1, 3, side, side, dtype=torch.uint8)}, 0)
