"""The world DPO ablation for VARGPT-v1.1: what the DPO stage on image bits does to attribute accuracy.

    python -m experiments.dpo_world pairs runs/world-v11/edit --out runs/data/world-v11-dpo [--prompts 400 --draws 4]
    python -m experiments.run experiments/world/v11/dpo.yaml        # DPO from that export on those pairs
    python -m experiments.dpo_world compare runs/world-v11/edit runs/world-v11/dpo --out runs/pipeline-v11/dpo.json

``pairs``: the export draws ``--draws`` images for each of the first ``--prompts`` **training**
prompts (train/gen shards; draw k of prompt i seeded ``--seed + 1000 k + i``), the reference
classifier reads them, and the prompt becomes a pair when its draws differ: chosen = the draw with
the most requested attributes right (ties: the first), rejected = the one with the fewest (ties:
the last). Prompts whose draws all score the same give no pair (counted). Written in the pair shard
format (datamodules/pairs.py) with a manifest of what was kept.

``compare``: both exports draw one image per **test** prompt with the same seeds (the scoreboard's
one-draw protocol, eval.seed + i), the classifier scores each, and the report has each model's
attribute accuracy with its bootstrap interval over prompts and the difference with a paired
bootstrap interval (the same resampled prompts for both). No test prompt is used to make pairs.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from experiments.config import REPO_ROOT


def paired_diff_ci(right_a: torch.Tensor, right_b: torch.Tensor, asked: torch.Tensor) -> List[float]:
    """Bootstrap interval of sum(right_b)/sum(asked) - sum(right_a)/sum(asked) with the prompts
    resampled together for both (paired: the same prompts and seeds): ``bootstrap_ci`` of the
    per-prompt differences, as the ratio's numerator and denominator resample together."""
    from modules.metrics_world import bootstrap_ci  # lazy: start-up cost

    return bootstrap_ci(right_b - right_a, asked)


def _setup(ckpt: str, classifier: str, classifier_cfg: str):
    from experiments.infer_edit import load_classifier  # lazy: the classifier and PIL
    from experiments.infer_v11 import load_v11_export  # lazy: start-up cost
    from modules.eval_v11 import V11EvalModel  # lazy: start-up cost

    model, cfg = load_v11_export(ckpt, with_cfg=True)
    return V11EvalModel(model), cfg, load_classifier(classifier_cfg, classifier)


def _score(clf: Any, images: torch.Tensor, samples: Sequence[Dict[str, Any]]):
    """(right (N,), asked (N,)) per prompt: the classifier's reading against each prompt's request
    (``attribute_scores``' counts, per prompt)."""
    from modules.metrics_world import predict_scenes, prompt_counts, requested_groups  # lazy: start-up cost

    right, asked, _ = prompt_counts(predict_scenes(clf, images), [requested_groups(s["record"]) for s in samples])
    return right.float(), asked.float()


def _draw(net: Any, prompts: Sequence[str], eval_cfg: Any, seed: int, cfg_scale: float) -> torch.Tensor:
    """The evaluator's generation (``generate_for``: prompt i seeded ``seed + i``, eval.batch_size rows a call)."""
    from dataclasses import replace  # lazy: start-up cost

    from modules.evaluation import generate_for  # lazy: start-up cost

    return generate_for(net, prompts, replace(eval_cfg, seed=seed, cfg=cfg_scale))


def _png(img_3HW: torch.Tensor) -> bytes:
    from datamodules.world import png_bytes  # lazy: start-up cost

    return png_bytes(img_3HW.mul(255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy())


def make_pairs(args: argparse.Namespace) -> int:
    from datamodules.pairs import pair_sample, write_pairs  # lazy: start-up cost
    from modules.evaluation import read_records, user_text  # lazy: start-up cost

    net, cfg, clf = _setup(args.ckpt, args.classifier, args.classifier_config)
    samples, unreadable = read_records(args.shards, cfg.data.root, args.prompts)
    if unreadable:
        print(f"[dpo_world] {unreadable} unreadable training records in {args.shards} skipped (counted)")
    prompts = [user_text(s["record"]) for s in samples]
    t0 = time.perf_counter()
    scores = []
    images = []
    for k in range(args.draws):
        im = _draw(net, prompts, cfg.eval, args.seed + 1000 * k, args.cfg)
        right, asked = _score(clf, im, samples)
        scores.append(right / asked.clamp(min=1))
        images.append(im)
    s_KN = torch.stack(scores)
    kept, ties, pairs = [], 0, []
    for i, smp in enumerate(samples):
        col = s_KN[:, i]
        best = int(col.argmax())
        worst = len(col) - 1 - int(col.flip(0).argmin())
        if col[best] <= col[worst]:
            ties += 1
            continue
        rec = smp["record"]
        pairs.append(pair_sample(f"pair{i:06d}", rec["messages"], [], ("png", _png(images[best][i])),
                                 ("png", _png(images[worst][i])), source="world-v11-dpo",
                                 extra={"scene": rec.get("scene"), "chosen_score": float(col[best]),
                                        "rejected_score": float(col[worst])}))
        kept.append(i)
    info = {"ckpt": str(args.ckpt), "shards": args.shards, "prompts": len(samples), "draws": args.draws,
            "pairs": len(kept), "no_pair_all_draws_equal": ties, "unreadable": unreadable, "cfg": args.cfg,
            "seed": args.seed, "mean_draw_score": round(float(s_KN.mean()), 4),
            "mean_chosen": round(float(s_KN.max(0).values[kept].mean()), 4) if kept else None,
            "mean_rejected": round(float(s_KN.min(0).values[kept].mean()), 4) if kept else None,
            "seconds": round(time.perf_counter() - t0, 1)}
    if kept:
        write_pairs(str(Path(args.out) / "train"), pairs, source="world-v11-dpo", extra=info)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "pairs.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info))
    return 0 if kept else 1


def compare(args: argparse.Namespace) -> int:
    from experiments.tracking import git_info  # lazy: start-up cost
    from experiments.machine import cpu_model  # lazy: start-up cost
    from modules.evaluation import read_records, user_text  # lazy: start-up cost
    from modules.metrics_world import bootstrap_ci  # lazy: start-up cost

    res: Dict[str, Any] = {"git": git_info(), "cpu_model": cpu_model(), "command": "python -m experiments.dpo_world "
                           + " ".join(sys.argv[1:] if args.argv is None else args.argv)}
    rights, asked, samples = {}, None, None
    for name, ckpt in (("before", args.before), ("after", args.after)):
        net, cfg, clf = _setup(ckpt, args.classifier, args.classifier_config)
        if samples is None:  # the test prompts under the first export's data root (the DPO run's is its pairs)
            samples, unreadable = read_records(args.shards, args.root or cfg.data.root, args.prompts)
            prompts = [user_text(s["record"]) for s in samples]
        t0 = time.perf_counter()
        im = _draw(net, prompts, cfg.eval, cfg.eval.seed, args.cfg)
        r, a = _score(clf, im, samples)
        rights[name], asked = r, a
        res[name] = {"ckpt": str(ckpt), "attribute_accuracy": round(float(r.sum() / a.sum()), 4),
                     "attribute_accuracy_ci95": bootstrap_ci(r, a), "n": len(samples), "unreadable": unreadable,
                     "seconds": round(time.perf_counter() - t0, 1)}
    diff = float(rights["after"].sum() / asked.sum() - rights["before"].sum() / asked.sum())
    res["difference"] = {"after_minus_before": round(diff, 4),
                         "ci95_paired": paired_diff_ci(rights["before"], rights["after"], asked),
                         "prompts_better": int((rights["after"] > rights["before"]).sum()),
                         "prompts_worse": int((rights["after"] < rights["before"]).sum())}
    res["protocol"] = {"shards": args.shards, "prompts": args.prompts, "cfg": args.cfg,
                       "seeds": "eval.seed + i, the same for both", "classifier": args.classifier}
    if args.pairs:
        res["pairs"] = json.loads(Path(args.pairs).read_text())
    if args.dpo_run:
        cfgp = Path(args.dpo_run) / "config.yaml"
        if cfgp.is_file():
            from omegaconf import OmegaConf  # lazy: start-up cost

            c = OmegaConf.load(cfgp)
            res["dpo"] = {"config": OmegaConf.to_container(c.get("dpo")), "max_steps": c.trainer.max_steps,
                          "lr": c.optim.lr, "batch_size": c.data.batch_size}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1, default=str) + "\n")
    print(json.dumps(res["difference"] | {"before": res["before"]["attribute_accuracy"],
                                          "after": res["after"]["attribute_accuracy"]}))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.dpo_world", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pairs", help="preference pairs from the export's own draws on training prompts")
    p.add_argument("ckpt")
    p.add_argument("--out", required=True)
    p.add_argument("--shards", default="train/gen-*.tar", help="training prompts (relative to the export's data.root)")
    p.add_argument("--prompts", type=int, default=400)
    p.add_argument("--draws", type=int, default=4)
    p.add_argument("--seed", type=int, default=100000, help="draw k of prompt i: seed + 1000 k + i")
    c = sub.add_parser("compare", help="one draw per test prompt before and after DPO, paired")
    c.add_argument("before")
    c.add_argument("after")
    c.add_argument("--out", required=True)
    c.add_argument("--shards", default="test/gen-*.tar")
    c.add_argument("--prompts", type=int, default=200)
    c.add_argument("--root", default="", help="data root of --shards (default: the first export's data.root)")
    c.add_argument("--pairs", default="", help="the pairs.json of `pairs`, recorded in the report")
    c.add_argument("--dpo-run", default="", help="the DPO export, whose dpo section is recorded")
    for q in (p, c):
        q.add_argument("--cfg", type=float, default=3.0, help="guidance scale (the scoreboard's eval.cfg)")
        q.add_argument("--classifier", default="assets/world/classifier.safetensors")
        q.add_argument("--classifier-config", default="experiments/world/v11/model.yaml")
    args = ap.parse_args(argv)
    args.argv = argv
    return make_pairs(args) if args.cmd == "pairs" else compare(args)


if __name__ == "__main__":
    sys.exit(main())
