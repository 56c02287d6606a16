"""``python -m experiments.evaluate`` on a VARGPT-v1.1 world export: VQA (with its interval),
one-draw generation attribute accuracy (with its interval) and the editing rows (edit accuracy,
preservation) from world edit shards, through the v1 evaluator's code (modules/eval_v11.py)."""
from __future__ import annotations

import json

import pytest
import torch

from experiments.config import REPO_ROOT, load_config
from modules.checkpoint import save_state_dict

from tests.tiny import tiny_tokenizer_dir

SMALL = ["model.v11.llm.num_hidden_layers=1", "model.v11.tokenizer.base_ch=24", "model.v11.tokenizer.ch_mult=[1,1,1,1,1]", "model.v11.tokenizer.scales=[[1,1],[2,2],[4,4]]",
         "model.v11.decoder.depth=1"]
CLASSIFIER = REPO_ROOT / "assets/world/classifier.safetensors"


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny random v1.1 world export (model.safetensors + config.yaml, as experiments.run writes)
    and world shards: gen + vqa (64 px) and edit pairs."""
    from datamodules.world import generate_split
    from datamodules.world_edit import BUILDERS
    from modules.vargpt11_world import VARGPT11World

    root = tmp_path_factory.mktemp("v11eval")
    generate_split(str(root / "data"), "test", {"gen": 4, "vqa": 5, "edit": 3}, seed=0, size=64, builders=BUILDERS)
    tok = tiny_tokenizer_dir(root)
    loaded = load_config(REPO_ROOT / "experiments/v11/world.yaml",
                         [f"model.tokenizer.path={tok}", f"data.root={root / 'data'}", *SMALL,
                          "eval.vqa_shards=vqa-*.tar", "eval.gen_shards=gen-*.tar", "eval.num_vqa=5", "eval.num_gen=4",
                          "eval.batch_size=4", "eval.max_new_tokens=3", f"eval.classifier_path={CLASSIFIER}",
                          "model.classifier.width=16"])
    torch.manual_seed(0)
    net = VARGPT11World(loaded.cfg.model, template=loaded.cfg.data.chat)
    d = root / "run"
    d.mkdir()
    save_state_dict(net.state_dict(), d / "model.safetensors")
    (d / "config.yaml").write_text(loaded.to_yaml())
    return d, root


class _Editor:
    """A stand-in model for ``evaluate_edit``: hands back each sample's rendered target or its source."""

    def __init__(self, samples, give: str):
        self.by_prompt = {id(s["images"][0]): s for s in samples}
        self.give = give

    def edit_images(self, sources, instructions, seeds):
        import numpy as np

        pick = [self.by_prompt[id(im)]["images"][1 if self.give == "target" else 0] for im in sources]
        return torch.stack([torch.from_numpy(np.asarray(p.convert("RGB")).copy()).permute(2, 0, 1).float() / 255
                            for p in pick])


def test_evaluate_edit_scores_targets_as_edits_and_sources_as_copies(tmp_path):
    """The editing rows through the evaluator: the rendered targets score edit 1 (the scorer reads
    them right), the unedited sources edit 0 with preservation near 1; intervals bracket the means."""
    from datamodules.world import generate_split
    from datamodules.world_edit import BUILDERS
    from modules import evaluation as ev
    from modules.components.classifier import ClassifierConfig

    generate_split(str(tmp_path), "test", {"edit": 6}, seed=0, size=64, builders=BUILDERS)
    samples, bad = ev.read_records(str(tmp_path / "edit-*.tar"))
    assert bad == 0 and len(samples) == 6
    clf = ev.load_world_classifier(str(CLASSIFIER), type("M", (), {"classifier": ClassifierConfig(width=16)})())
    cfg = ev.EvalConfig(batch_size=4)
    good = ev.evaluate_edit(_Editor(samples, "target"), samples, cfg, clf)
    copy = ev.evaluate_edit(_Editor(samples, "source"), samples, cfg, clf)
    assert good["edit_n"] == 6 and good["edit_accuracy"] >= 5 / 6 and copy["edit_accuracy"] == 0.0
    assert copy["edit_preservation"] >= 0.9
    for r in (good, copy):
        for k in ("edit_accuracy", "edit_preservation", "edit_success"):
            lo, hi = r[f"{k}_ci95"]
            assert 0 <= lo <= r[k] <= hi <= 1
    with pytest.raises(ValueError, match="no editing path"):
        ev.evaluate_edit(object(), samples, cfg, clf)


def _in01(x) -> bool:
    return 0.0 <= x <= 1.0


@pytest.mark.slow
def test_evaluate_v11_export_reports_vqa_generation_and_edit_rows(export, tmp_path, capsys):
    from experiments.evaluate import main

    d, root = export
    out = tmp_path / "eval.json"
    assert main([str(d), "--tasks", "vqa,generation,edit", "--edit-shards", str(root / "data/edit-*.tar"),
                 "--num-edit", "3", "--out", str(out), "--no-mlflow", "--real-baseline", "same-prompts",
                 f"data.root={root / 'data'}"]) == 0
    r = json.loads(out.read_text())
    # VQA: accuracy with a bootstrap interval around it, and the blind baselines
    assert r["vqa_n"] == 5 and _in01(r["vqa_accuracy"]) and _in01(r["vqa_prior_baseline"])
    lo, hi = r["vqa_accuracy_ci95"]
    assert lo <= r["vqa_accuracy"] <= hi and _in01(lo) and _in01(hi)
    # generation: one draw per prompt, attribute accuracy read by the reference classifier, with its interval
    assert r["gen_n"] == 4 and _in01(r["gen_attribute_accuracy"])
    lo, hi = r["gen_attr_mean_ci95"]
    assert lo <= r["gen_attribute_accuracy"] <= hi
    assert r["fid"] >= 0 and "gen_loss_img" not in r  # the v1 prompt-gain diagnostic is skipped for v1.1
    # editing rows: edit accuracy and preservation with intervals, per edit op
    assert r["edit_n"] == 3 and _in01(r["edit_accuracy"]) and _in01(r["edit_preservation"]) and _in01(r["edit_success"])
    for k in ("edit_accuracy", "edit_preservation"):
        lo, hi = r[f"{k}_ci95"]
        assert lo <= r[k] <= hi
    assert set(r["edit_by_op"]) <= {"colour", "position", "size", "remove", "add", "shape"}
    # the floor and the tokenizer's ceiling: the prompts rendered again, and through the BSQ tokenizer
    assert "vqvae_reconstruction" not in r and r["bsq_reconstruction"]["n"] == 4
    assert _in01(r["bsq_reconstruction"]["attribute_accuracy"]) and _in01(r["real_vs_real"]["attribute_accuracy"])
    p = r["protocol"]
    assert p["model_family"] == "vargpt11" and p["resolution"] == 64 and p["num_edit"] == 3
    assert "edit_accuracy" in capsys.readouterr().out


def test_evaluate_v11_refuses_v1_diagnostics_and_edit_without_shards(export, tmp_path):
    from experiments.evaluate import main

    d, root = export
    with pytest.raises(SystemExit, match="--edit-shards"):
        main([str(d), "--tasks", "edit", "--no-mlflow", "--out", str(tmp_path / "e.json")])
    with pytest.raises(SystemExit, match="teacher_scales"):
        main([str(d), "--tasks", "generation", "--no-mlflow", "--out", str(tmp_path / "g.json"),
              f"data.root={root / 'data'}", "eval.teacher_scales=2"])
