"""The world VARGPT-v1.1's scoreboard: evaluate `make v11-world`'s exports and write
runs/pipeline-v11/report.json, in the keys of the v1 report (experiments/pipeline.py) so the
scoreboard sets it beside v1 and the default, plus the editing rows.

    python -m experiments.pipeline_v11 [--runs runs/world-v11] [--out runs/pipeline-v11/report.json]

Reads runs/world-v11/{gen,edit} (stage "gen": the release's stage 0, the generation side on
generation data; stage "edit": its stage 5, everything but the tokenizer on edits + generation +
understanding) and measures the final export (edit), the model a user gets:
  - VQA accuracy on the test split (bootstrap interval over questions) with the blind baseline,
    and on the held-out attribute combinations;
  - generation on the test prompts, one draw per prompt (the v1.1 sampler has no best-of): the
    attribute accuracy with its bootstrap interval over prompts, FID / IS, the real-vs-real floor
    and the BSQ tokenizer's ceiling on the same prompts; the same for the "gen" export, so the
    report says what the editing stage did to generation;
  - editing on the test edits (datamodules/world_edit.py): edit accuracy (the edited facts hold),
    preservation (the facts that should not change still hold) and success (both), with bootstrap
    intervals over samples, per operation, beside the two references on the same samples:
    the rendered targets (the scorer's ceiling) and the source handed back unedited (``copy``:
    edit 0, preservation near 1, so preservation alone says nothing).
No target is checked: the world's targets were set for the v1 recipe; the report is the record.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from experiments.config import REPO_ROOT
from experiments.evaluate import SAME_PROMPTS, run_evaluation
from experiments.run_guard import stale_inputs
from experiments.tracking import git_info

GEN_KEYS = ("gen_attribute_accuracy", "gen_attr_all", "gen_attr_object", "gen_attr_count", "gen_attr_position", "fid",
            "inception_score", "gen_n", "gen_attr_by_objects", "gen_attr_mean_ci95", "gen_attr_all_ci95")
EDIT_KEYS = ("edit_accuracy", "edit_accuracy_ci95", "edit_preservation", "edit_preservation_ci95", "edit_success",
             "edit_success_ci95", "edit_n", "edit_by_op")


def edit_references(edit_shards: str, num_edit: int, classifier_cfg: str, classifier: str) -> Dict[str, Any]:
    """The editing scorer on the rendered targets and on the unedited sources of the same samples."""
    from experiments.infer_edit import edit_samples, load_classifier, reference_scores  # lazy: start-up cost

    keep = ("edit", "edit_ci95", "preservation", "preservation_ci95", "success", "success_ci95", "n")
    refs = reference_scores(load_classifier(classifier_cfg, classifier), edit_samples(edit_shards, num_edit))
    return {name: {k: sc[k] for k in keep} for name, sc in refs.items()}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.pipeline_v11", description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default=str(REPO_ROOT / "runs" / "world-v11"))
    ap.add_argument("--out", default=str(REPO_ROOT / "runs" / "pipeline-v11" / "report.json"))
    ap.add_argument("--edit-shards", default="runs/data/world/edit/test/edit-*.tar")
    ap.add_argument("--num-vqa", type=int, default=600)
    ap.add_argument("--num-gen", type=int, default=200)
    ap.add_argument("--num-edit", type=int, default=200)
    args = ap.parse_args(argv)
    runs, out = Path(args.runs), Path(args.out)
    stale = stale_inputs(runs / "edit")
    if stale:
        print("pipeline_v11: stale stage exports:\n  " + "\n  ".join(stale), file=sys.stderr)
        return 1
    ev, final = out.parent, str(runs / "edit")
    common = [f"eval.num_vqa={args.num_vqa}", f"eval.num_gen={args.num_gen}", "eval.vqa_shards=test/vqa-*.tar",
              "eval.gen_shards=test/gen-*.tar"]
    rep: Dict[str, Any] = {"git": git_info(), "runs": str(runs), "family": "vargpt11"}
    # one load of the final export for its test-split VQA, generation (+ the floor and the BSQ
    # ceiling on the same prompts) and edits
    test = run_evaluation(final, ["vqa", "generation", "edit"], common, real_baseline=SAME_PROMPTS,
                         out=ev / "edit_test.json", edit_shards=args.edit_shards, num_edit=args.num_edit)
    held = run_evaluation(final, ["vqa"], [f"eval.num_vqa={args.num_vqa}", "eval.blind_baseline=false",
                                           "eval.vqa_shards=heldout/vqa-*.tar"], out=ev / "edit_vqa_heldout.json")
    rep["stage2"] = {  # the v1 report's understanding block (there: after stage 2), here the final model's
        "vqa_accuracy": test["vqa_accuracy"], "vqa_accuracy_ci95": test["vqa_accuracy_ci95"],
        "vqa_per_type": test["vqa_per_type"], "vqa_prior_baseline": test["vqa_prior_baseline"],
        "vqa_blind_baseline": test.get("vqa_blind_baseline"), "vqa_blind_baseline_ci95": test.get("vqa_blind_baseline_ci95"),
        "vqa_accuracy_heldout": held["vqa_accuracy"], "vqa_accuracy_heldout_ci95": held["vqa_accuracy_ci95"],
        "n": test["vqa_n"]}
    rep["stage3"] = {k: test.get(k) for k in GEN_KEYS if k in test}
    before = run_evaluation(str(runs / "gen"), ["generation"], common, out=ev / "gen_gen_test.json")
    rep["gen_stage"] = {k: before.get(k) for k in GEN_KEYS if k in before}
    rep["real_vs_real"] = test.get("real_vs_real")
    rep["bsq_reconstruction"] = test.get("bsq_reconstruction")  # the generation ceiling of this tokenizer
    rep["edit"] = {k: test.get(k) for k in EDIT_KEYS}
    from omegaconf import OmegaConf  # lazy: only the export's classifier path is read

    exported = runs / "edit" / "config.yaml"
    rep["edit_references"] = edit_references(args.edit_shards, args.num_edit, str(exported),
                                             OmegaConf.select(OmegaConf.load(exported), "eval.classifier_path"))
    rep["protocol"] = test["protocol"]
    rep["vqa_accuracy"] = rep["stage2"]["vqa_accuracy"]
    rep["gen_attribute_accuracy"] = test.get("gen_attribute_accuracy")
    rep["fid"] = test.get("fid")
    rep["inception_score"] = test.get("inception_score")
    floor = (rep["real_vs_real"] or {}).get("fid")
    if floor:
        rep["fid_over_floor"] = rep["fid"] / floor if floor > 0 else float("inf")
    rep["edit_accuracy"], rep["edit_preservation"] = rep["edit"]["edit_accuracy"], rep["edit"]["edit_preservation"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rep, indent=2, default=str) + "\n")
    print(json.dumps({k: rep.get(k) for k in ("vqa_accuracy", "gen_attribute_accuracy", "fid", "edit_accuracy",
                                               "edit_preservation")} | {"floor_fid": floor}, indent=1, default=str))
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
