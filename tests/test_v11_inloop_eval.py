"""A v1.1 stage runs the ``eval:`` protocol after each validation, as a v1 stage does: the same
``EvalCallback`` with the net behind ``V11EvalModel`` (modules/stages/v11_stages.py), so its run
logs val/vqa_* and val/gen_* (and keeps them in the export's final metrics)."""
from __future__ import annotations

import json

import pytest
import torch

from experiments.config import REPO_ROOT, load_config

from tests.tiny import tiny_tokenizer_dir

CLASSIFIER = REPO_ROOT / "assets/world/classifier.safetensors"
SMALL = ["model.v11.llm.num_hidden_layers=1", "model.v11.tokenizer.base_ch=24", "model.v11.tokenizer.ch_mult=[1,1,1,1,1]", "model.v11.tokenizer.scales=[[1,1],[2,2],[4,4]]",
         "model.v11.decoder.depth=1"]


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    from datamodules.world import generate_split

    root = tmp_path_factory.mktemp("v11loop")
    generate_split(str(root / "train"), "train", {"vqa": 4, "gen": 4}, seed=0, size=64, shard_size=8)
    generate_split(str(root / "val"), "val", {"vqa": 4, "gen": 4}, seed=0, size=64)
    return root, tiny_tokenizer_dir(root)


def _over(root, tok, out, *extra):
    return ["stage=v11_stage1", f"model.tokenizer.path={tok}", f"data.root={root}", f"output_dir={out}",
            "logging.enabled=false", "trainer.max_steps=1", "trainer.val_every_n_steps=1", "trainer.limit_val_batches=1",
            "data.batch_size=2", "data.val_batch_size=2", "trainer.num_threads=1", "checkpoint.at_end=false",
            "data.val_sources=[{name: vqa_val, shards: 'val/vqa-*.tar', task: understanding}]", *SMALL, *extra]


@pytest.fixture(scope="module")
def run_with_eval(tiny_world, tmp_path_factory):
    """One step of v11_stage1 with validation and the eval protocol: (the export, its final metrics)."""
    from experiments.run import fit

    root, tok = tiny_world
    tmp = tmp_path_factory.mktemp("v11looprun")
    ev = ["eval.vqa_shards=val/vqa-*.tar", "eval.gen_shards=val/gen-*.tar", "eval.num_vqa=4", "eval.num_gen=4",
          "eval.max_new_tokens=2", "eval.batch_size=4", f"eval.classifier_path={CLASSIFIER}", "model.classifier.width=16",
          f"eval.cache_dir={tmp / 'cache'}"]
    torch.manual_seed(0)
    out = fit(load_config(REPO_ROOT / "experiments/v11/world.yaml", _over(root, tok, tmp / "run", *ev)))
    return out, json.loads((out.parent / "export.json").read_text())["metadata"]["final_metrics"]


def test_v11_stage_logs_the_in_loop_evaluation(run_with_eval):
    _, m = run_with_eval
    assert "val/loss" in m  # validation ran, and after it the evaluation
    for key in ("val/vqa_accuracy", "val/vqa_prior_baseline", "val/vqa_blind_baseline", "val/gen_attribute_accuracy",
                "val/fid"):
        assert key in m, (key, sorted(m))
    assert 0.0 <= m["val/vqa_accuracy"] <= 1.0 and 0.0 <= m["val/gen_attribute_accuracy"] <= 1.0


def test_v11_stage_without_eval_shards_has_no_evaluation(tiny_world):
    from modules.stages import build_stage

    root, tok = tiny_world
    cfg = load_config(REPO_ROOT / "experiments/v11/world.yaml", _over(root, tok, "unused")).cfg
    module, _ = build_stage(cfg)
    assert module.configure_callbacks() == []
    cfg = load_config(REPO_ROOT / "experiments/v11/world.yaml", _over(root, tok, "unused", "eval.vqa_shards=val/vqa-*.tar")).cfg
    (cb,) = build_stage(cfg)[0].configure_callbacks()
    assert cb.adapt is not None and cb.evaluator.tasks() == ["vqa"]


def test_in_loop_figures_equal_experiments_evaluate_on_the_export(run_with_eval, tiny_world, tmp_path):
    """The validation after the last step saw the exported weights: the offline evaluator on the
    export gives the same figures (same samples, seeds, classifier). The random model answers and
    draws nothing right (accuracies 0), so FID / IS, which move with every generated pixel, are
    what tie the two runs together."""
    from experiments.evaluate import main

    out, m = run_with_eval
    root, _ = tiny_world
    assert main([str(out.parent), "--tasks", "vqa,generation", "--out", str(tmp_path / "e.json"), "--no-mlflow",
                 f"data.root={root}"]) == 0
    r = json.loads((tmp_path / "e.json").read_text())
    for k in ("vqa_accuracy", "vqa_blind_baseline", "gen_attribute_accuracy", "fid", "inception_score"):
        assert abs(m[f"val/{k}"] - r[k]) <= 1e-5 * max(1.0, abs(r[k])), (k, m[f"val/{k}"], r[k])


def test_evaluation_guidance_does_not_stay_on_the_training_net():
    """The in-loop evaluation samples with eval.cfg; the training net's own cfg survives the call
    (and a failing call) untouched."""
    import types

    from modules.eval_v11 import V11EvalModel

    seen = []
    ev = V11EvalModel.__new__(V11EvalModel)  # no net needed: _ids/_images are replaced below
    ev.model = types.SimpleNamespace(cfg=types.SimpleNamespace(cfg=1.5))
    ev._ids = lambda text, with_image: [1, 2]
    ev._images = lambda rows, seeds, sources: seen.append(ev.model.cfg.cfg) or torch.zeros(len(rows), 3, 2, 2)
    assert ev.generate_image(["a red circle"], cfg=4.0, seed=[0]).shape == (1, 3, 2, 2)
    assert seen == [4.0] and ev.model.cfg.cfg == 1.5

    def boom(rows, seeds, sources):
        raise RuntimeError("sampler failed")
    ev._images = boom
    with pytest.raises(RuntimeError):
        ev.generate_image(["x"], cfg=3.0, seed=[0])
    assert ev.model.cfg.cfg == 1.5
