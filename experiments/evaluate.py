"""Evaluate a checkpoint: VQA accuracy and/or generation FID / IS / attribute accuracy (and editing).

    python -m experiments.evaluate runs/world/stage3 --tasks vqa,generation \
        [--out runs/world/stage3/eval.json] [--real-baseline "test/gen-*.tar"] [eval.cfg=3.0 eval.num_gen=500 ...]
    python -m experiments.evaluate runs/v11/world --tasks vqa,generation,edit \
        --edit-shards "runs/data/world-edit/test/edit-*.tar" [--num-edit 64] [eval.* model.classifier.* ...]

An export of a ``model.family: vargpt11`` run is evaluated through ``modules.eval_v11.V11EvalModel``
(the same VQA / generation code, plus editing: edit accuracy and preservation on world edit
shards, with intervals); its tokenizer ceiling is ``bsq_reconstruction``.

Shard sets and the sampling protocol come from the checkpoint's `eval:` config section; any
`eval.*` (or `data.root`) key can be overridden as key=value. Works on any shard set: the world's,
or converted VQAv2 (`eval.vqa_shards`) / COCO captions (`eval.gen_shards`, with
`eval.extractor=inception eval.inception_weights_path=...` and, for the CLIP score,
`eval.clip_dir=<local CLIP directory>`). The JSON report records the protocol
(sample counts, seeds, cfg / top-k / top-p / temperature, feature extractor and its weights hash,
resolution and resize method) and is logged as an MLflow run (experiment `vargpt-eval`).
`--real-baseline same-prompts` adds FID / IS of real images drawn for the same prompts (the world
renders each request again with its own placement and seed) against the generation set's targets:
the floor a generated set's FID is read against; `--real-baseline PATTERN` uses PATTERN's targets
(other prompts) instead, for data the world did not render.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torchvision.utils import save_image

from experiments import tracking
from experiments.config import ConfigError
from experiments.infer import load_exported
from experiments.infer_v11 import is_v11_dir, load_v11_export
from modules import evaluation as ev
from modules.eval_v11 import V11EvalModel
from modules.evaluation import Evaluator
from modules.metrics_world import attribute_scores, requested_groups


# --real-baseline value: the generation prompts' own requests rendered again by the world
SAME_PROMPTS = "same-prompts"


def run_evaluation(ckpt: str, tasks: List[str], overrides: List[str], real_baseline: str = "",
                   out: Optional[Path] = None, log_mlflow: bool = True, edit_shards: str = "",
                   num_edit: int = 64) -> Dict[str, Any]:
    with torch.no_grad():  # a context, not set_grad_enabled: callers (tests, pipelines) go on training
        return _run_evaluation(ckpt, tasks, overrides, real_baseline, out, log_mlflow, edit_shards, num_edit)


def _load(ckpt: str, overrides: List[str]):
    """(the model behind the evaluator's interface, the run config): a v1 VARGPT itself, a v1.1
    export through V11EvalModel."""
    if is_v11_dir(ckpt):
        model, cfg = load_v11_export(ckpt, tuple(overrides), with_cfg=True)
        return V11EvalModel(model), cfg
    return load_exported(ckpt, tuple(overrides))


def _reconstructions(net: Any, images: torch.Tensor) -> tuple:
    """(report key, the tokenizer's reconstructions of images in [0, 1])."""
    if isinstance(net, V11EvalModel):
        return "bsq_reconstruction", net.reconstruct(images)
    return "vqvae_reconstruction", ev.vqvae_reconstructions(net.vqvae, images)


def _run_evaluation(ckpt: str, tasks: List[str], overrides: List[str], real_baseline: str,
                    out: Optional[Path], log_mlflow: bool, edit_shards: str = "", num_edit: int = 64) -> Dict[str, Any]:
    net, cfg = _load(ckpt, overrides)
    e = cfg.eval
    evaluator = Evaluator(e, cfg.model, cfg.data.root, edit_shards=edit_shards, num_edit=num_edit)
    t0 = time.perf_counter()
    report: Dict[str, Any] = {"checkpoint": str(Path(ckpt).resolve()), "stage": cfg.stage, "name": cfg.name,
                              "tasks": tasks}
    try:
        r = evaluator.run(net, tasks)
    except ValueError as err:  # a task without shards: say which key to set
        raise SystemExit(f"evaluate: {err}") from None
    if "vqa_rows" in r:
        r["vqa_examples"] = r.pop("vqa_rows")
    grid = r.pop("gen_images", None)
    r.pop("gen_prompts", None)
    report.update(r)
    if grid is not None and real_baseline:
        samples, clf, res = evaluator.samples("generation"), evaluator.classifier, grid.shape[-1]
        reals_a = ev.target_images(samples, res)
        if real_baseline == SAME_PROMPTS:
            # The floor a generator is compared with: real images drawn for the same prompts (same
            # n), so only what the prompt leaves open differs, as between a generated image and its target.
            other = samples
            reals_b = ev.rerendered_targets(samples, res, seed=e.seed + 1)
        else:
            other = list(ev.iter_records(real_baseline, evaluator.root, len(samples)))
            reals_b = ev.target_images(other, res)
        rr = ev.fid_is(reals_b, reals_a, e, clf, real_key=evaluator.real_key)
        report["real_vs_real"] = {"fid": rr["fid"], "inception_score": rr["inception_score"],
                                  "n": len(other), "shards": real_baseline}
        # The tokenizer's ceiling: the same real images through the VQVAE (multi-scale indices,
        # then decoded). A generator can only draw what its tokenizer can draw, so this is the
        # best attribute accuracy / FID any sampler reaches with these VQVAE weights.
        rec_key, recon_b = _reconstructions(net, reals_b)
        rc = ev.fid_is(recon_b, reals_a, e, clf, real_key=evaluator.real_key)
        report[rec_key] = {"fid": rc["fid"], "inception_score": rc["inception_score"],
                                          "n": len(other), "shards": real_baseline}
        if clf is not None:
            groups_b = [requested_groups(s["record"]) for s in other]
            for part, imgs in (("real_vs_real", reals_b), (rec_key, recon_b)):
                scores = attribute_scores(clf, imgs, groups_b)
                report[part]["attribute_accuracy"] = scores["mean"]
                report[part]["attribute_accuracy_ci95"] = scores["mean_ci95"]
                report[part]["attr_all"], report[part]["attr_all_ci95"] = scores["all"], scores["all_ci95"]
                # the ceiling per number of requested objects, beside the generator's gen_attr_by_objects
                report[part]["attribute_accuracy_by_objects"] = {n: s["mean"] for n, s in scores["by_objects"].items()}
    report["protocol"] = report.pop("protocol")  # last, as before
    report["seconds"] = round(time.perf_counter() - t0, 1)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=str))
        if grid is not None:
            save_image(grid[: e.grid_images], out.with_suffix(".png"), nrow=8, padding=2, pad_value=1.0)
    if log_mlflow:
        _log(report, cfg, out)
    return report


def _log(report: Dict[str, Any], cfg: Any, out: Optional[Path]) -> None:
    """One MLflow run in experiment ``vargpt-eval`` (created race-safe) with the report's metrics."""
    client = tracking.get_client(tracking.tracking_uri(cfg))
    exp_id = tracking.ensure_experiment(client, "vargpt-eval", tracking.artifact_root(cfg))
    run = client.create_run(exp_id, run_name=f"eval-{report['name']}",
                            tags={**tracking.git_info(), "stage": report["stage"], "checkpoint": report["checkpoint"]})
    rid = run.info.run_id
    try:
        tracking.log_eval_report(client, rid, report)
        if out is not None and out.with_suffix(".png").is_file():
            client.log_artifact(rid, str(out.with_suffix(".png")))
    except BaseException:
        client.set_terminated(rid, "FAILED")
        raise
    client.set_terminated(rid, "FINISHED")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("ckpt", help="export directory of experiments.run (model.safetensors + config.yaml)")
    ap.add_argument("overrides", nargs="*", help="eval.* / data.root overrides, key=value")
    ap.add_argument("--tasks", default="vqa,generation", help="comma list of vqa, generation, edit (v1.1 exports)")
    ap.add_argument("--edit-shards", default="", help="world edit shards for --tasks edit (python -m datamodules.world_edit)")
    ap.add_argument("--num-edit", type=int, default=64, help="edit samples (the first N in shard order)")
    ap.add_argument("--out", default="", help="report JSON (default <ckpt>/eval.json)")
    ap.add_argument("--real-baseline", default="",
                    help=f"'{SAME_PROMPTS}' (world: the prompts rendered again) or shards whose targets give the "
                         "real-vs-real FID floor")
    ap.add_argument("--no-mlflow", action="store_true")
    args = ap.parse_intermixed_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = [t for t in tasks if t not in ev.TASKS]
    if bad:
        ap.error(f"unknown task(s) {bad}; valid: {', '.join(ev.TASKS)}")
    out = Path(args.out) if args.out else Path(args.ckpt) / "eval.json"
    try:
        report = run_evaluation(args.ckpt, tasks, args.overrides, args.real_baseline, out, not args.no_mlflow,
                                args.edit_shards, args.num_edit)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    keys = ("vqa_accuracy", "vqa_accuracy_ci95", "vqa_prior_baseline", "vqa_blind_baseline", "gen_attribute_accuracy",
            "gen_attr_mean_ci95", "fid", "inception_score", "clip_score", "edit_accuracy", "edit_accuracy_ci95",
            "edit_preservation", "edit_preservation_ci95")
    print(json.dumps({k: report[k] for k in keys if k in report}
                     | {k: report[k] for k in ("real_vs_real", "vqvae_reconstruction", "bsq_reconstruction") if k in report}))
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
