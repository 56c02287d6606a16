"""VARGPT-v1.1's released training stages 0-5 (modules/stages/v11_stages.py RELEASE_STAGES): each
declared set is the release's freeze rule applied to the released names; one optimiser step at
tiny size changes exactly the declared set (less the parameters the training forward never
reaches); a stage runs through experiments.run with its experiments/stages/<stage>.yaml."""
from __future__ import annotations

import copy

import pytest
import torch

from experiments.config import REPO_ROOT, load_config
from modules.stages.v11_stages import RELEASE_STAGES, STAGE_CLASSES
from modules.vargpt11_format import to_released_key

from tests.tiny import collator_for, gen_sample, tiny_tokenizer_dir, und_sample

# The release's forbidden modules per stage (VARGPT-family-training, src/llamafactory/model/
# model_utils/visual.py get_forbidden_modules, vargpt_version "qwen2vl-v1.1"); its adapter freezes a
# parameter when any of these is a substring of its name (_setup_full_tuning).
RELEASE_FORBIDDEN = {
    0: ("model", "language_model", "lm_head", "visual", "vae_local"),
    1: ("model", "language_model", "lm_head", "visual", "vae_local", "vargpt_gen"),
    2: ("visual", "vae_local", "vargpt_gen", "sos_embedding", "image_gen_projector", "image_gen_projector_out"),
    3: ("model", "language_model", "lm_head", "visual", "vae_local"),
    4: ("visual", "vae_local"),
    5: ("vae_local",),
}

# Trainable parameters the training forward never reaches, so a step leaves them as they are
# (facts of the release, docs/v11.md): the projectors' ln_q is stored, never applied; the decoder's
# text_proj_for_ca is not applied to the cross-attention keys; cfg_uncond is read only by CFG
# sampling; the SOS pool attends to one SOS token, so its learned query gets a zero gradient.
NEVER_REACHED = {"gen.image_gen_projector.ln_q.weight", "gen.image_gen_projector.ln_q.bias",
                 "gen.image_gen_projector_out.ln_q.weight", "gen.image_gen_projector_out.ln_q.bias",
                 "gen.vargpt_gen.cfg_uncond", "gen.vargpt_gen.text_proj_for_sos.ca.mat_q"}
NEVER_REACHED_PREFIX = "gen.vargpt_gen.text_proj_for_ca."

TINY = ["model.v11.llm.num_hidden_layers=1", "model.v11.llm.vision_depth=1", "model.v11.decoder.depth=1",
        "model.v11.tokenizer.base_ch=24", "model.v11.tokenizer.ch_mult=[1,1,1,1,1]", "model.v11.tokenizer.scales=[[1,1],[2,2],[4,4]]"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # see tests/conftest.py
    yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from modules.vargpt11_world import VARGPT11World

    tok = tiny_tokenizer_dir(tmp_path_factory.mktemp("v11rel"))
    cfg = load_config(REPO_ROOT / "experiments/v11/world.yaml", [f"model.tokenizer.path={tok}"] + TINY).cfg
    torch.manual_seed(0)
    net = VARGPT11World(cfg.model, template=cfg.data.chat)
    batch = collator_for(net)([und_sample("u"), gen_sample("g")])
    return cfg, net, batch, tok


def test_the_six_stages_are_registered_and_named_after_the_release():
    from modules.stages import STAGES

    assert list(RELEASE_STAGES) == [f"v11_stage{i}" for i in range(6)]
    assert all(s in STAGES for s in RELEASE_STAGES)
    assert all((REPO_ROOT / f"experiments/stages/{s}.yaml").is_file() for s in RELEASE_STAGES)


@pytest.mark.parametrize("i", range(6))
def test_declared_set_is_the_release_rule(i, tiny):
    cfg, net, _, _ = tiny
    module = STAGE_CLASSES[f"v11_stage{i}"](cfg, net=copy.deepcopy(net))
    mine = {to_released_key(n) for n in module.trainable_parameter_names()}
    release = {to_released_key(n) for n, _ in net.named_parameters()
               if not any(f in to_released_key(n) for f in RELEASE_FORBIDDEN[i])}
    assert mine == release, (sorted(mine - release)[:5], sorted(release - mine)[:5])
    assert not any(k.startswith("vae_local.") for k in mine)


@pytest.mark.parametrize("stage", list(RELEASE_STAGES))
def test_one_step_changes_exactly_the_trainable_set(stage, tiny):
    cfg, net, batch, _ = tiny
    cfg = copy.deepcopy(cfg)
    cfg.stage, cfg.optim.lr, cfg.optim.warmup_steps = stage, 1e-2, 0
    module = STAGE_CLASSES[stage](cfg, net=copy.deepcopy(net))
    names = set(module.trainable_parameter_names())
    before = {n: p.detach().clone() for n, p in module.net.named_parameters()}
    opt = module.configure_optimizers()["optimizer"]
    module.train()
    torch.manual_seed(1)
    module.net(batch)["loss"].backward()
    assert not [n for n, p in module.net.named_parameters() if not p.requires_grad and p.grad is not None]
    opt.step()
    changed = {n for n, p in module.net.named_parameters() if not torch.equal(before[n], p)}
    unreached = {n for n in names if n in NEVER_REACHED or n.startswith(NEVER_REACHED_PREFIX)}
    assert changed == names - unreached, (sorted(changed - names)[:5], sorted(names - unreached - changed)[:5])


def test_v1_model_is_refused_by_name():
    from modules.stages import build_stage

    cfg = load_config(REPO_ROOT / "experiments/debug.yaml", ["stage=v11_stage5"]).cfg
    with pytest.raises(ValueError, match="model.family: vargpt11"):
        build_stage(cfg)


def test_a_release_stage_runs_through_the_launcher(tiny, tmp_path, tracking_uri):
    """python -m experiments.run's main with stage=v11_stage1: its stage YAML is a layer, the run
    exports, and only the stage's parameters moved from the seeded initialisation."""
    from datamodules.world import generate_split
    from experiments.run import main
    from modules.checkpoint import read_state_dict
    from modules.stages import build_stage

    _, _, _, tok = tiny
    generate_split(str(tmp_path / "w" / "train"), "train", {"vqa": 4, "gen": 4}, seed=0, size=32, shard_size=8)
    out = tmp_path / "run"
    argv = [str(REPO_ROOT / "experiments/v11/world.yaml"), "stage=v11_stage1", f"model.tokenizer.path={tok}",
            f"data.root={tmp_path / 'w'}", f"output_dir={out}", f"logging.tracking_uri={tracking_uri}",
            f"logging.artifact_root={tmp_path / 'art'}", "logging.enabled=false", "trainer.max_steps=1",
            "data.batch_size=4", "trainer.num_threads=1", "checkpoint.at_end=false", "seed=0", *TINY]
    loaded = load_config(argv[0], argv[1:])
    assert "experiments/stages/v11_stage1.yaml" in [o for o, _ in loaded.layers]
    torch.manual_seed(0)
    before = {n: p.detach().clone() for n, p in build_stage(loaded.cfg)[0].net.named_parameters()}
    assert main(argv) == 0
    after = read_state_dict(out / "model.safetensors")
    changed = {n for n in before if not torch.equal(before[n], after[n].to(before[n].dtype))}
    assert changed and all(n.startswith(RELEASE_STAGES["v11_stage1"]) for n in changed), sorted(changed)[:5]


def test_run_every_part_runs_the_unused_parts_and_adds_an_exact_zero(tiny):
    """Sharded training sets run_every_part: a text-only batch still runs the ViT and the generation
    side (each rank must gather every unit each step), and the loss is unchanged."""
    cfg, net, _, _ = tiny
    module = STAGE_CLASSES["v11_stage5"](cfg, net=copy.deepcopy(net))
    net = module.net
    text = {"key": "t", "task": "understanding", "images": [], "vq": [], "n_unreadable": 0,
            "record": {"id": "t", "task": "understanding", "source": "test", "images": [],
                       "messages": [{"role": "user", "content": "Say red."}, {"role": "assistant", "content": "red"}]}}
    batch = collator_for(net)([text])
    assert "gen_images" not in batch and not batch["pixel_values"].numel()
    grads = {}
    for every in (False, True):
        net.zero_grad(set_to_none=True)
        net.run_every_part = every
        loss = net(batch)["loss"]
        loss.backward()
        grads[every] = ({n for n, p in net.named_parameters() if p.grad is not None}, loss.detach())
    assert torch.equal(grads[False][1], grads[True][1])
    idle = {n for n, p in net.named_parameters() if p.requires_grad and n.startswith(("visual.", "gen."))
            and n not in NEVER_REACHED and not n.startswith(NEVER_REACHED_PREFIX)}
    assert idle and not idle & grads[False][0] and idle <= grads[True][0]
