"""A VARGPT-v1.1 world-sized model (experiments/v11/world.yaml) builds and trains a few steps of
every stage type through experiments.run on tiny world shards; each stage changes exactly its
declared parameters; the export loads back and writes the released v1.1 layout."""
from __future__ import annotations

import pytest
import torch

from experiments.config import REPO_ROOT, load_config
from modules.stages.v11_stages import TRAINABLE

from tests.tiny import tiny_tokenizer_dir


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    from datamodules.world import generate_split

    root = tmp_path_factory.mktemp("v11world")
    generate_split(str(root / "train"), "train", {"caption": 4, "vqa": 8, "gen": 8}, seed=0, size=32, shard_size=8)
    return root, tiny_tokenizer_dir(root)


def _under(name, prefixes):
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("stage", list(TRAINABLE))
def test_every_stage_type_trains_through_the_launcher(stage, tiny_world, tmp_path, tracking_uri):
    from experiments.run import fit

    from modules.checkpoint import read_state_dict
    from modules.stages import build_stage

    root, tok = tiny_world
    over = [f"stage={stage}", f"model.tokenizer.path={tok}", f"data.root={root}", f"output_dir={tmp_path / stage}",
            f"logging.tracking_uri={tracking_uri}", f"logging.artifact_root={tmp_path / 'art'}",
            "trainer.max_steps=2", "data.batch_size=4", "trainer.log_every_n_steps=1", "trainer.num_threads=1",
            "logging.enabled=false", "trainer.save_checkpoint=true", "checkpoint.at_end=false",
            "model.v11.llm.num_hidden_layers=2", "model.v11.tokenizer.base_ch=24", "model.v11.tokenizer.ch_mult=[1,1,1,1,1]", "model.v11.tokenizer.scales=[[1,1],[2,2],[4,4]]"]
    loaded = load_config(REPO_ROOT / "experiments/v11/world.yaml", over)
    torch.manual_seed(0)
    module, _ = build_stage(loaded.cfg)
    before = {n: p.detach().clone() for n, p in module.net.named_parameters()}
    out = fit(loaded)
    after = read_state_dict(out)
    changed = {n for n in before if not torch.equal(before[n], after[n].to(before[n].dtype))}
    assert changed, "nothing trained"
    assert all(_under(n, TRAINABLE[stage]) for n in changed), sorted(n for n in changed if not _under(n, TRAINABLE[stage]))[:5]
    assert not any(n.startswith("gen.vae_local.") for n in changed)


def test_world_export_writes_the_released_layout(tiny_world, tmp_path, tracking_uri):
    from experiments.export import main as export_main
    from experiments.run import fit
    from modules.vargpt11_format import build_released

    root, tok = tiny_world
    over = ["stage=stage1", f"model.tokenizer.path={tok}", f"data.root={root}", f"output_dir={tmp_path / 'run'}",
            f"logging.tracking_uri={tracking_uri}", f"logging.artifact_root={tmp_path / 'art'}",
            "trainer.max_steps=1", "data.batch_size=2", "trainer.num_threads=1", "model.v11.llm.num_hidden_layers=1",
            "model.v11.tokenizer.base_ch=24", "model.v11.tokenizer.ch_mult=[1,1,1,1,1]", "model.v11.tokenizer.scales=[[1,1],[2,2],[4,4]]"]
    out = fit(load_config(REPO_ROOT / "experiments/v11/world.yaml", over))
    assert export_main([str(out.parent), str(tmp_path / "released"), "--format", "vargpt11", "--dtype", "float32"]) == 0
    model, cfg = build_released(tmp_path / "released", scales=[[1, 1], [2, 2], [4, 4]])
    assert (cfg.decoder.embed_dim, cfg.tokenizer.codebook_dim, cfg.llm.num_hidden_layers) == (128, 16, 1)
    # the run itself through experiments.infer: a question about an image, a drawing, an edit
    from PIL import Image

    from experiments.infer import main as infer_main

    src = tmp_path / "src.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(src)
    assert infer_main([str(out.parent), "--question", "What colour is the circle?", "--image", str(src),
                       "--max-new-tokens", "2", "--prompt", "Draw a red circle.", "--prompt", "Make it blue.",
                       "--edit-image", "", "--edit-image", str(src), "--out", str(tmp_path / "g.png")]) == 0
    assert Image.open(tmp_path / "g.png").size == (2 * 64, 64)
