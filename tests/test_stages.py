"""Stage modules: exactly the declared parameters train; the three stages chain end to end."""
from __future__ import annotations

import copy

import pytest
import torch

from experiments.config import ExperimentConfig, REPO_ROOT, load_config
from modules.stages.vargpt_stages import STAGE_CLASSES
from modules.vargpt import VARGPT
from tests.tiny import collator_for, gen_sample, tiny_model_config, tiny_tokenizer_dir, und_sample

EXPECTED = {
    "llava_align": ("und_proj",),
    "llava_sft": ("und_proj", "llm"),
    "stage1": ("gen_in", "gen_out", "var.cond_emb", "var.pos_start"),
    "stage2": ("llm",),
    "stage3": ("gen_in", "gen_out", "var"),
}


# the parts a model variant adds to the generation side's trainable sets (stages 1 and 3)
VARIANTS = {
    "v1": ({}, {}),
    # the world default: the VAR cross-attends to the prompt (gen_cond + var.cross), var_skip
    "world": (dict(var_cond="prompt_attn", var_skip=True), {"stage1": ("gen_cond", "var.cross"), "stage3": ("gen_cond",)}),
    # + every optional part
    "world+extras": (dict(var_cond="prompt_attn", var_skip=True, prompt_encoder_layers=1, gen_lora_rank=2,
                          prompt_context_bigram=True),
                     {"stage1": ("gen_cond", "gen_cond_bigram", "var.cross", "prompt_enc", "gen_lora"),
                      "stage3": ("gen_cond", "gen_cond_bigram", "prompt_enc", "gen_lora")}),
}


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    from dataclasses import replace

    cfg = tiny_model_config(tmp_path_factory.mktemp("stages"))
    out = {}
    for name, (over, _) in VARIANTS.items():
        torch.manual_seed(0)
        net = VARGPT(replace(cfg, **over))
        with torch.no_grad():  # the zero-initialised outputs (var_skip's gen_out, cross-attention, LoRA B)
            for part in (net.gen_out, net.var, net.prompt_enc, net.gen_lora, net.gen_cond_bigram):
                for p in (part.parameters() if part is not None else ()):
                    if not p.abs().sum() > 0:
                        p.normal_(0, 0.05)
        out[name] = net
    return out


@pytest.fixture(scope="module")
def base_net(nets):
    return nets["v1"]


def _under(name, prefixes):
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("stage", list(EXPECTED))
def test_step_changes_exactly_the_trainable_set(stage, variant, nets):
    base_net = nets[variant]
    cfg = ExperimentConfig(stage=stage)
    cfg.model = base_net.cfg
    cfg.optim.lr = 1e-2
    cfg.optim.warmup_steps = 0
    module = STAGE_CLASSES[stage](cfg, net=copy.deepcopy(base_net))
    net = module.net
    names = set(module.trainable_parameter_names())
    expected = EXPECTED[stage] + VARIANTS[variant][1].get(stage, ())
    assert names == {n for n, _ in net.named_parameters() if _under(n, expected)}
    assert names, stage
    module.train()
    assert all(not m.training for m in net.vqvae.modules())
    if stage in ("stage1", "stage3"):
        assert not net.llm.training and not net.vision.training  # frozen parts in eval mode
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    batch = collator_for(net)([und_sample("u"), gen_sample("g"), und_sample("v", a="two blue squares")])
    opt = module.configure_optimizers()["optimizer"]
    loss = net(batch)["loss"]
    loss.backward()
    no_grad = [n for n, p in net.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not no_grad, f"{stage}: trainable parameters without gradient: {no_grad[:5]}"
    frozen_grad = [n for n, p in net.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not frozen_grad
    opt.step()
    after = net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == names, f"{stage}: changed-but-frozen {sorted(changed - names)[:5]}, unchanged-trainable {sorted(names - changed)[:5]}"


@pytest.mark.parametrize("stage", ["stage1", "stage3"])
def test_generation_stage_without_llm_backward(nets, stage):
    """model.stage1/stage3_through_llm false: gen_in leaves the stage's trainable set, the LLM runs
    without a graph, and the losses are those of v1's stage (only what trains changes)."""
    base = nets["world"]
    batch = collator_for(base)([gen_sample("g"), gen_sample("h", instr="Draw a blue square.", colour=(200, 30, 30))])
    seen = []
    losses = {}
    for through in (True, False):
        cfg = ExperimentConfig(stage=stage)
        cfg.model = copy.deepcopy(base.cfg)
        setattr(cfg.model, f"{stage}_through_llm", through)
        module = STAGE_CLASSES[stage](cfg, net=copy.deepcopy(base))
        net = module.net
        names = set(module.trainable_parameter_names())
        own = ("gen_out", "var", "gen_cond") if stage == "stage3" else \
            ("gen_out", "var.cond_emb", "var.pos_start", "var.cross", "gen_cond")
        want = own + (("gen_in",) if through else ())
        assert names == {n for n, _ in net.named_parameters() if _under(n, want)}
        hook = net.llm.get_decoder().register_forward_hook(lambda m, a, out: seen.append(out.last_hidden_state.requires_grad))
        module.train()
        torch.manual_seed(0)  # the same teacher-forcing noise in both runs
        out = net(batch)
        hook.remove()
        out["loss"].backward()
        assert all(p.grad is not None for n, p in net.named_parameters() if n in names)
        losses[through] = (out["loss_img"].item(), out["loss_text"].item())
    assert seen == [True, False]
    assert losses[True] == losses[False]


@pytest.mark.parametrize("stage", ["stage1", "stage3"])
def test_forward_only_stage_needs_no_lora(stage):
    from modules.config import ModelConfig

    with pytest.raises(ValueError, match=f"{stage}_through_llm"):
        ModelConfig(**{f"{stage}_through_llm": False}, gen_lora_rank=2).validate()


def test_stage2_switch_trains_und_projector(base_net):
    cfg = ExperimentConfig(stage="stage2")
    cfg.model = copy.deepcopy(base_net.cfg)
    cfg.model.train_und_projector = True
    module = STAGE_CLASSES["stage2"](cfg, net=copy.deepcopy(base_net))
    names = module.trainable_parameter_names()
    assert any(n.startswith("und_proj.") for n in names) and any(n.startswith("llm.") for n in names)
    assert not any(n.startswith(("gen_in.", "var.", "vision.")) for n in names)


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    from datamodules.world import generate_split

    root = tmp_path_factory.mktemp("tinyworld")
    generate_split(str(root / "train"), "train", {"caption": 16, "vqa": 16, "gen": 24}, seed=0, size=32, shard_size=8)
    generate_split(str(root / "val"), "val", {"gen": 8, "vqa": 8}, seed=0, size=32)
    for split in ("test", "heldout"):  # what the scoreboard (experiments.pipeline) reads
        generate_split(str(root / split), split, {"gen": 4, "vqa": 4}, seed=0, size=32)
    tok = tiny_tokenizer_dir(root)
    return root, tok


# v1's model, and the world recipe's (the prompt through cross-attention, the VAR's own front end)
@pytest.mark.parametrize("model_over", [[], ["model.var_cond=prompt_attn", "model.var_skip=true"]], ids=["v1", "world"])
def test_three_stages_chain_end_to_end(tiny_world, tmp_path, tracking_uri, model_over):
    """The CI-sized pipeline: stage 1 -> 2 -> 3 through the launcher, each from the previous export."""
    import mlflow

    from experiments.run import fit

    from modules.checkpoint import save_state_dict
    from modules.components.classifier import ClassifierConfig, build_classifier

    root, tok = tiny_world
    clf = tmp_path / "classifier.safetensors"  # an untrained reference classifier: metrics run, values arbitrary
    save_state_dict(build_classifier(ClassifierConfig(image_size=16)).state_dict(), clf)
    prev = None
    for stage in ("stage1", "stage2", "stage3"):
        over = [f"model.tokenizer.path={tok}", f"data.root={root}", f"output_dir={tmp_path / stage}",
                f"logging.tracking_uri={tracking_uri}", f"logging.artifact_root={tmp_path / 'art'}",
                f"eval.classifier_path={clf}", f"eval.cache_dir={tmp_path / 'cache'}", "model.classifier.image_size=16",
                *model_over]
        if prev is not None:
            over.append(f"init_from={prev}")
        loaded = load_config(REPO_ROOT / f"experiments/tiny/{stage}.yaml", over)
        prev = fit(loaded)
        assert prev.is_file()
    client = mlflow.MlflowClient(tracking_uri)
    for stage in ("stage1", "stage2", "stage3"):
        (run,) = client.search_runs([client.get_experiment_by_name(f"vargpt-{stage}").experiment_id])
        assert run.info.status == "FINISHED"
        m = run.data.metrics
        assert "train/loss" in m and "train/lr" in m and "train/samples_per_s" in m and "train/tokens_per_s" in m
        if stage != "stage2":
            assert "train/loss_img" in m
        assert int(run.data.params["params/trainable"]) < int(run.data.params["params/total"])
    m = run.data.metrics  # stage 3 validated on held-out shards, with the in-loop evaluation
    assert "val/loss_img" in m
    for key in ("val/vqa_accuracy", "val/vqa_prior_baseline", "val/vqa_blind_baseline", "val/fid",
                "val/inception_score", "val/gen_attribute_accuracy", "val/gen_attr_all"):
        assert key in m, key
    assert 0.0 <= m["val/vqa_accuracy"] <= 1.0 and m["val/fid"] >= 0.0
    arts = [a.path for a in client.list_artifacts(run.info.run_id, "eval")]
    assert any(a.endswith(".png") for a in arts) and any("vqa_rows" in a for a in arts)
    if model_over:  # the scoreboard on the world recipe's chain: best of 2 draws beside the one-draw figures
        import json

        from experiments.pipeline import main as pipeline

        report = tmp_path / "pipeline" / "report.json"
        assert pipeline(["--runs", str(tmp_path), "--out", str(report), "--num-vqa", "4", "--num-gen", "4",
                         "--best-of", "2"]) == 0
        rep = json.loads(report.read_text())
        assert rep["gen_best_of"] == 2 and rep["protocol"]["best_of"] == 2
        for k in ("gen_attribute_accuracy", "gen_attribute_accuracy_one_draw", "fid", "fid_one_draw"):
            assert isinstance(rep[k], float), k
        assert "gen_attribute_accuracy_one_draw>=0.50_minimum" in rep["targets_met"]
        assert sum(rep["stage3"]["gen_best_of_kept"].values()) == pytest.approx(1.0)
        # the fair scoreboard's figures: intervals, both attribute readings, each draw a one-draw run
        s3 = rep["stage3"]
        seeds = s3["gen_draw_seeds"]
        assert len(seeds["attribute_accuracy"]["values"]) == 2 and len(seeds["fid"]["values"]) == 2
        assert seeds["attribute_accuracy"]["values"][0] == pytest.approx(rep["gen_attribute_accuracy_one_draw"], abs=1e-4)
        assert seeds["fid"]["values"][0] == pytest.approx(rep["fid_one_draw"], abs=1e-3)
        one = s3["gen_one_draw"]
        assert one["mean"] == rep["gen_attribute_accuracy_one_draw"] and 0.0 <= one["all"] <= one["mean"] + 1e-9
        assert one["mean_ci95"][0] <= one["mean"] <= one["mean_ci95"][1]
        lo, hi = rep["stage2"]["vqa_accuracy_ci95"]
        assert lo <= rep["vqa_accuracy"] <= hi and hi - lo > 0 or rep["vqa_accuracy"] in (0.0, 1.0)
        # one owner of VQA intervals: the pipeline copies the evaluator's, the blind baseline's too
        ev = json.loads((report.parent / "stage2_vqa_test.json").read_text())
        assert rep["stage2"]["vqa_accuracy_ci95"] == ev["vqa_accuracy_ci95"]
        assert rep["stage2"]["vqa_blind_baseline_ci95"] == ev["vqa_blind_baseline_ci95"]
        assert rep["real_vs_real"]["shards"] == "same-prompts" and rep["real_vs_real"]["n"] == 4
        assert "attr_all" in rep["real_vs_real"] and "attr_all" in rep["vqvae_reconstruction"]


def test_infer_cli_answers_and_draws(tiny_world, tmp_path, tracking_uri, capsys):
    from experiments.infer import main
    from experiments.run import fit

    root, tok = tiny_world
    loaded = load_config(REPO_ROOT / "experiments/tiny/stage1.yaml", [
        f"model.tokenizer.path={tok}", f"data.root={root}", f"output_dir={tmp_path / 's1'}",
        f"logging.tracking_uri={tracking_uri}", "trainer.max_steps=1"])
    fit(loaded)
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 20, 20)).save(tmp_path / "q.png")
    out = tmp_path / "gen.png"
    assert main([str(tmp_path / "s1"), "--image", str(tmp_path / "q.png"), "--question", "What colour?",
                 "--max-new-tokens", "3", "--prompt", "draw a red circle", "--prompt", "two blue squares",
                 "--out", str(out), "--top-k", "5"]) == 0
    printed = capsys.readouterr().out
    assert "Q: What colour?" in printed and "A:" in printed and out.is_file()
    assert Image.open(out).size[1] == 16 + 2 * 2  # one row of 16 px images with 2 px padding
    # best of 3 draws, judged by the model: one kept draw per prompt, reported
    assert main([str(tmp_path / "s1"), "--prompt", "draw a red circle", "--prompt", "two blue squares on the left",
                 "--out", str(out), "--top-k", "5", "--best-of", "3"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("of 3 (implied answers' log-probability") == 2 and Image.open(out).size[0] == 2 * 16 + 3 * 2
    with pytest.raises(SystemExit):  # a prompt with no world object cannot be judged: refused before loading
        main([str(tmp_path / "s1"), "--prompt", "a photo of a dog", "--best-of", "2"])
    assert "names no world object" in capsys.readouterr().err


def test_evaluate_cli_writes_report_with_protocol(tiny_world, tmp_path, tracking_uri, monkeypatch):
    import json

    from experiments.evaluate import main
    from experiments.run import fit
    from modules.checkpoint import save_state_dict
    from modules.components.classifier import ClassifierConfig, build_classifier

    root, tok = tiny_world
    clf = tmp_path / "clf.safetensors"
    save_state_dict(build_classifier(ClassifierConfig(image_size=16)).state_dict(), clf)
    loaded = load_config(REPO_ROOT / "experiments/tiny/stage3.yaml", [
        f"model.tokenizer.path={tok}", f"data.root={root}", f"output_dir={tmp_path / 's3'}", "init_from=''",
        f"logging.tracking_uri={tracking_uri}", "trainer.max_steps=1", "trainer.val_every_n_steps=0",
        "model.classifier.image_size=16"])
    fit(loaded)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    out = tmp_path / "report.json"
    rc = main([str(tmp_path / "s3"), "--out", str(out), f"eval.classifier_path={clf}", f"eval.cache_dir={tmp_path / 'c'}",
               "eval.num_gen=4", "--real-baseline", "train/gen-*.tar"])
    assert rc == 0
    rep = json.loads(out.read_text())
    for k in ("vqa_accuracy", "vqa_blind_baseline", "vqa_prior_baseline", "gen_attribute_accuracy", "fid",
              "inception_score"):
        assert k in rep, k
    assert rep["real_vs_real"]["n"] == 4 and rep["real_vs_real"]["fid"] >= 0
    rc = rep["vqvae_reconstruction"]  # the tokenizer's ceiling on the same real images
    assert rc["n"] == 4 and rc["fid"] >= 0 and 0.0 <= rc["attribute_accuracy"] <= 1.0
    # per number of requested objects: the generator and the ceiling, over the same prompt split
    by = rep["gen_attr_by_objects"]
    assert sum(v["prompts"] for v in by.values()) == 4 and all(k.isdigit() for k in by)
    assert rc["attribute_accuracy_by_objects"] and all(
        k.isdigit() and 0.0 <= v <= 1.0 for k, v in rc["attribute_accuracy_by_objects"].items())
    assert rep["gen_prompt_gain"] == pytest.approx(rep["gen_loss_img_rolled_prompts"] - rep["gen_loss_img"])
    p = rep["protocol"]
    assert p["num_gen"] == 4 and p["seed"] == 0 and p["extractor"] == "world" and p["resolution"] == 16
    gp = rep["gen_metrics_protocol"]
    assert gp["num_fake_images"] == 4 and gp["num_real_images"] == 4 and gp["extractor"]  # extractor + weights hash
    assert out.with_suffix(".png").is_file()
    import mlflow

    c = mlflow.MlflowClient(tracking_uri)
    (run,) = c.search_runs([c.get_experiment_by_name("vargpt-eval").experiment_id])
    assert "eval/fid" in run.data.metrics and "eval/vqa_accuracy" in run.data.metrics
    assert "eval/vqvae_reconstruction_attribute_accuracy" in run.data.metrics
    assert any(k.startswith("eval/gen_attr_objects") and k.endswith("_mean") for k in run.data.metrics)


@pytest.mark.parametrize("stage", ["stage1", "stage2", "stage3"])
def test_world_recipes_build_their_stage(stage):
    """Each shipped world stage builds its module with the recipe's model (random weights: no
    load, no init_from): its trainable set matches parameters of that model."""
    loaded = load_config(REPO_ROOT / f"experiments/world/{stage}.yaml", ["init_from=", "model.load=[]"])
    module = STAGE_CLASSES[loaded.cfg.stage](loaded.cfg)
    assert module.trainable_parameter_names()
