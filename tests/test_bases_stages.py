"""Stage 0 (modules/stages/bases/): every base stage trains a few steps on tiny generated world
shards through experiments.run, its export loads back strictly into the component, and its loss
goes down on one repeated batch. Sizes are shrunk on the command line so each test takes seconds.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from experiments.config import load_config
from experiments.run import fit
from modules.checkpoint import read_state_dict

BASES = Path(__file__).resolve().parent.parent / "experiments" / "world" / "bases"

# Small enough for a test, same code path as the world configs.
TINY_VQVAE = [
    "model.vqvae.ch=8", "model.vqvae.norm_groups=8", "model.vqvae.ch_mult=[1,1,1,1]",
    "model.vqvae.using_sa=false", "model.vqvae.using_mid_sa=false", "model.vqvae.vocab_size=64",
    "model.vqvae.z_channels=8", "model.vqvae.patch_nums=[1,2,4,8]",
]
TINY = {
    "vqvae": TINY_VQVAE,
    "var": TINY_VQVAE + ["model.var.depth=1", "model.var.embed_dim=32", "model.var.num_heads=2"],
    "classifier": ["model.classifier.width=8", "model.classifier.feature_dim=32"],
    "vision": ["model.vision.width=32", "model.vision.depth=2", "model.vision.heads=2", "model.vision.patch_size=16"],
    "llm": ["model.llm.hidden_size=32", "model.llm.num_layers=1", "model.llm.num_heads=2",
            "model.llm.intermediate_size=64", "model.tokenizer.path={out}/tokenizer", "data.max_length=32"],
}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from datamodules.world import generate_split

    root = tmp_path_factory.mktemp("world")
    generate_split(str(root / "train"), "train", {"class": 48, "gen": 32, "caption": 16, "vqa": 16, "conv": 16})
    generate_split(str(root / "val"), "val", {"class": 16, "gen": 16, "caption": 8, "vqa": 8, "conv": 8})
    return root


def _overrides(name: str, world: Path, out: Path, *extra: str):
    return [
        f"data.root={world}", f"output_dir={out / name}", "logging.enabled=false",
        "trainer.enable_progress_bar=false", "trainer.max_steps=3", "trainer.val_every_n_steps=3",
        "trainer.limit_val_batches=1", "trainer.num_threads=1", "data.batch_size=8", "data.val_batch_size=8",
        *[o.format(out=out) for o in TINY[name]], *extra,
    ]


def _load(name: str, world: Path, out: Path, *extra: str):
    return load_config(BASES / f"{name}.yaml", _overrides(name, world, out, *extra))


def _fit(name: str, world: Path, out: Path, *extra: str):
    loaded = _load(name, world, out, *extra)
    path = fit(loaded)
    assert path is not None and path.is_file()
    return loaded, read_state_dict(path)


def _overfit(module, datamodule, steps: int = 12, lr: float = 3e-3) -> tuple[float, float]:
    """(first, last) loss of `steps` AdamW steps on one fixed batch."""
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    module.train()
    losses = []
    for i in range(steps):
        loss = module.training_step(batch, i)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


class _NoLog:
    """Stage modules call self.log / log_throughput; outside a Trainer make them no-ops."""

    @staticmethod
    def patch(module):
        module.log = lambda *a, **k: None
        module.log_throughput = lambda *a, **k: None
        return module


def _stage(name, world, out, *extra):
    from modules.stages import build_stage

    loaded = _load(name, world, out, *extra)
    torch.manual_seed(0)
    module, dm = build_stage(loaded.cfg)
    return loaded, _NoLog.patch(module), dm


# ----------------------------------------------------------------------------------- vqvae + var


@pytest.fixture(scope="module")
def vqvae_run(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    loaded, sd = _fit("vqvae", world, out)
    return out, loaded, sd


def test_base_vqvae_export_loads_into_vqvae(vqvae_run):
    from modules.checkpoint import load_strict as strict_load
    from modules.components.vqvae import build_vqvae

    _, loaded, sd = vqvae_run
    vq = build_vqvae(loaded.cfg.model.vqvae)
    strict_load(vq, sd, source="VQVAE")  # raises on any missing/unexpected key
    # the export is the trained weights, not a fresh init
    fresh = build_vqvae(loaded.cfg.model.vqvae).state_dict()
    assert not torch.equal(fresh["encoder.conv_in.weight"], sd["encoder.conv_in.weight"])
    idx = vq.img_to_idx(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert [t.shape[1] for t in idx] == [1, 4, 16, 64]


def test_base_var_trains_and_exports(vqvae_run, world):
    from modules.components.var_decoder import build_var
    from modules.checkpoint import load_strict as strict_load
    from modules.components.vqvae import build_vqvae

    out, vq_loaded, vq_sd = vqvae_run
    load = [f"model.load=[{{path: {out / 'vqvae' / 'model.safetensors'}, into: vqvae}}]"]
    loaded, sd = _fit("var", world, out, *load)
    vq = build_vqvae(vq_loaded.cfg.model.vqvae)
    strict_load(vq, vq_sd)
    var = build_var(loaded.cfg.model.var, vq)
    strict_load(var, sd, source="VAR")
    assert var.class_emb.weight.shape[0] == 25  # 24 world classes + the null class
    assert not any(k.startswith(("encoder.", "decoder.", "quantize.")) for k in sd)  # VQVAE not exported
    # the VQ indices were cached once per split and are reused by the next run
    caches = sorted((out / "var" / "vq_cache").glob("*.pt"))
    assert len(caches) == 2
    mtimes = [p.stat().st_mtime_ns for p in caches]
    _fit("var", world, out, *load)
    assert [p.stat().st_mtime_ns for p in caches] == mtimes


def test_base_var_overfits_one_batch(vqvae_run, world, tmp_path):
    out = vqvae_run[0]
    load = f"model.load=[{{path: {out / 'vqvae' / 'model.safetensors'}, into: vqvae}}]"
    _, module, dm = _stage("var", world, tmp_path, load, "model.var.cond_drop_rate=0.0")
    first, last = _overfit(module, dm, steps=25, lr=1e-2)
    assert last < 0.8 * first, (first, last)


def test_base_var_applies_gen_input_noise_in_training_only(vqvae_run, world, tmp_path):
    """model.gen_input_noise reaches the base's teacher-forcing inputs as it does the VARGPT
    stages': in training the logits move, in eval they are the clean ones."""
    out = vqvae_run[0]
    load = f"model.load=[{{path: {out / 'vqvae' / 'model.safetensors'}, into: vqvae}}]"
    _, module, dm = _stage("var", world, tmp_path, load, "model.var.cond_drop_rate=0.0", "model.var.drop_path_rate=0.0",
                           "model.gen_input_noise=0.9")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))

    def logits(train: bool, rate: float) -> torch.Tensor:
        module.train(train)
        module.cfg.model.gen_input_noise = rate
        torch.manual_seed(0)
        with torch.no_grad():
            return module._forward(batch)[0]

    assert not torch.allclose(logits(True, 0.9), logits(True, 0.0))
    torch.testing.assert_close(logits(False, 0.9), logits(False, 0.0))
    torch.testing.assert_close(logits(True, 0.0), logits(False, 0.0))


def test_base_var_scene_labels():
    """data.scene_labels: `label` records keep theirs; with "scene" a one-object generation scene
    gets its (shape, colour) class and a multi-object one the null class; without it, or with
    neither, the error names the records and the key to set."""
    from datamodules.world import class_label
    from modules.stages.bases.var import record_labels

    obj = lambda shape, colour: {"shape": shape, "colour": colour}
    recs = [{"id": "c", "label": 5},
            {"id": "g1", "scene": {"objects": [obj("cross", "blue")]}},
            {"id": "g3", "scene": {"objects": [obj("circle", "red"), obj("square", "red"), obj("cross", "red")]}}]
    assert record_labels(recs, 24, "scene") == [5, class_label("cross", "blue"), 24]
    with pytest.raises(ValueError, match=r"2 records have none, e.g. \['g1', 'g3'\].*scene_labels: scene"):
        record_labels(recs, 24, "label")
    with pytest.raises(ValueError, match="record c: label 5 outside 0..3"):
        record_labels(recs, 4, "scene")
    with pytest.raises(ValueError, match="neither"):
        record_labels([{"id": "x"}], 24, "scene")


def test_base_var_without_vqvae_weights_says_how(world, tmp_path):
    from modules.stages import build_stage

    loaded = _load("var", world, tmp_path, f"model.load=[{{path: {tmp_path}/nope.safetensors, into: vqvae}}]")
    with pytest.raises(FileNotFoundError, match="vqvae.yaml"):
        build_stage(loaded.cfg)


# ----------------------------------------------------------------------------------- classifier


def test_base_classifier_trains_and_exports(world, tmp_path):
    from modules.components.classifier import build_classifier

    loaded, sd = _fit("classifier", world, tmp_path)
    clf = build_classifier(loaded.cfg.model.classifier)
    clf.load_state_dict(sd, strict=True)
    preds = clf.predict_attributes(torch.rand(3, 3, 64, 64))
    assert len(preds) == 3 and all("objects" in p and "count" in p for p in preds)


# ----------------------------------------------------------------------------------- vision


def test_base_vision_exports_tower_only(world, tmp_path):
    from modules.components.vision_encoders import build_vision_encoder
    from modules.config import LoadSpec
    from modules.weights import load_into

    loaded, sd = _fit("vision", world, tmp_path)
    assert all(k.startswith("tower.") for k in sd)  # the attribute heads are not exported
    enc = build_vision_encoder(loaded.cfg.model.vision)
    enc.load_state_dict(sd, strict=True)
    # the timm-layout copy loads through model.load (format timm) and gives the same features
    tower = tmp_path / "vision" / "tower.safetensors"
    enc2 = build_vision_encoder(loaded.cfg.model.vision)
    load_into(enc2, LoadSpec(path=str(tower), format="timm", into="vision"))
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(enc.eval()(x), enc2.eval()(x))


# ----------------------------------------------------------------------------------- llm


def test_base_llm_trains_tokenizer_and_exports(world, tmp_path):
    from modules.components.llm import build_llm
    from modules.components.text_tokenizer import build_tokenizer

    loaded, sd = _fit("llm", world, tmp_path)
    tok_dir = tmp_path / "tokenizer"
    assert (tok_dir / "tokenizer.json").is_file()
    tok = build_tokenizer(loaded.cfg.model.tokenizer)
    assert tok.convert_tokens_to_ids("<|image_gen_start|>") != tok.unk_token_id
    llm = build_llm(loaded.cfg.model.llm, vocab_size=len(tok))
    llm.load_state_dict(sd, strict=True)
    # a second run reuses the tokenizer instead of retraining it
    mtime = (tok_dir / "tokenizer.json").stat().st_mtime_ns
    _fit("llm", world, tmp_path)
    assert (tok_dir / "tokenizer.json").stat().st_mtime_ns == mtime


def test_world_texts_use_chat_template_without_image_token():
    from modules.stages.bases.llm import world_texts

    rec = {"messages": [{"role": "user", "content": "<image>\nWhat colour is the circle?"},
                        {"role": "assistant", "content": "red"}]}
    (text,) = world_texts([rec], eos="</s>")
    assert "<image>" not in text
    assert text.endswith("USER: What colour is the circle? ASSISTANT: red</s>")


@pytest.mark.parametrize("base, steps, ratio", [("vqvae", 15, 0.8), ("classifier", 15, 0.7), ("vision", 15, 0.7),
                                                ("llm", 12, 0.8)])
def test_base_overfits_one_batch(base, steps, ratio, world, tmp_path):
    # the VAR base needs the VQVAE run first: test_base_var_overfits_one_batch
    _, module, dm = _stage(base, world, tmp_path)
    first, last = _overfit(module, dm, steps=steps)
    assert last < ratio * first, (first, last)
