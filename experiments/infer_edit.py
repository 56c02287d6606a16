"""Edit the source images of a world edit shard set with a v1.1 export and score the edits.

    python -m experiments.infer_edit runs/v11/world --shards "runs/data/world-edit/test/edit-*.tar" \\
        [--limit 64] [--seed 0] [--out edits.json] [--grid edits.png]

Every sample's source image and instruction (``datamodules/world_edit.py`` records) go through
the model's editing path (``experiments.infer --edit-image``): prompts of one length are one
batch, sample i draws from seed ``--seed + i``. The reference classifier reads the edited images
and ``modules.metrics_world.edit_scores`` gives edit accuracy, preservation accuracy and both
(``success``), overall and per edit. Two references are scored on the same samples, from the
shards alone: ``targets`` (the rendered target images: the scorer's ceiling) and ``copy`` (the
unedited source handed back: edit 0, preservation about 1, so preservation alone means nothing).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from datamodules.config import SourceConfig
from datamodules.paths import resolve_path
from datamodules.schema import EDIT_TASK
from datamodules.stream import ShardStream
from experiments.infer_v11 import WorldPrompts, load_v11_export
from modules.checkpoint import load_strict, read_state_dict
from modules.components.classifier import ClassifierConfig, build_classifier
from modules.metrics_world import edit_accuracy


def _as_float(images_NHW3: List[np.ndarray], side: int) -> torch.Tensor:
    """uint8 (H, W, 3) images -> (N, 3, side, side) in [0, 1] (the classifier's input size)."""
    x = torch.stack([torch.from_numpy(np.array(a, copy=True)).permute(2, 0, 1).float() / 255 for a in images_NHW3])
    return x if x.shape[-1] == side else F.interpolate(x, size=(side, side), mode="bilinear", antialias=True,
                                                        align_corners=False)


def load_classifier(config_yaml: str, weights: str):
    """The world reference classifier: sizes from ``model.classifier`` of a YAML, weights strict."""
    sec = OmegaConf.select(OmegaConf.load(resolve_path(config_yaml)), "model.classifier")
    if sec is None:
        raise SystemExit(f"{config_yaml} has no model.classifier section (the reference classifier's sizes)")
    clf = build_classifier(OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ClassifierConfig), sec)))
    load_strict(clf, read_state_dict(str(resolve_path(weights))), source=weights)
    return clf.eval()


def edit_samples(shards: str, limit: int) -> List[Dict[str, Any]]:
    """The first ``limit`` samples of an edit shard set, in order (every record checked)."""
    stream = ShardStream([SourceConfig("edit", shards, 1.0, EDIT_TASK)], "eval")
    out: List[Dict[str, Any]] = []
    for s in stream:
        rec = s["record"]
        if "source_scene" not in rec:
            raise SystemExit(f"sample {s['key']} ({s['url']}) has no source_scene: not a world edit sample "
                             f"(render them with python -m datamodules.world_edit)")
        out.append(s)
        if limit and len(out) >= limit:
            break
    if not out:
        raise SystemExit(f"no readable edit sample in {shards}")
    return out


def run_edits(model, samples: List[Dict[str, Any]], seed: int) -> List[np.ndarray]:
    """The model's edit of each sample (uint8 (H, W, 3)); equal-length prompts batched."""
    prompts = WorldPrompts(model)
    rows = []
    for s in samples:
        pv, grid = prompts.pil_image(s["images"][0])
        user = next(m["content"] for m in s["record"]["messages"] if m["role"] == "user")
        rows.append((prompts.ids(user, grid), pv, grid))
    out: List[Optional[np.ndarray]] = [None] * len(rows)
    groups: Dict[int, List[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(len(r[0]), []).append(i)
    for idx in groups.values():
        res = model.generate_image(torch.tensor([rows[i][0] for i in idx]), torch.cat([rows[i][1] for i in idx]),
                                   torch.cat([rows[i][2] for i in idx]), seed=[seed + i for i in idx])
        for j, i in enumerate(idx):
            out[i] = res["uint8"][j].numpy()
    return out  # type: ignore[return-value]


def reference_scores(clf, samples: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """The editing scorer on the samples' rendered targets (``targets``: its ceiling) and on their
    unedited sources (``copy``: edit 0, preservation near 1), beside which a model's edits read."""
    recs, side = [s["record"] for s in samples], clf.cfg.image_size
    return {name: edit_accuracy(clf, _as_float([np.asarray(s["images"][i].convert("RGB")) for s in samples], side), recs)
            for name, i in (("targets", 1), ("copy", 0))}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.infer_edit", description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt", help="an experiments.run export of a model.family: vargpt11 run")
    ap.add_argument("--shards", required=True, help="world edit shards (python -m datamodules.world_edit)")
    ap.add_argument("--limit", type=int, default=64, help="samples (0 = all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--classifier", default="assets/world/classifier.safetensors")
    ap.add_argument("--classifier-config", default="experiments/world/model.yaml",
                    help="YAML whose model.classifier gives the classifier's sizes")
    ap.add_argument("--out", default="", help="write the scores as JSON here")
    ap.add_argument("--grid", default="", help="PNG: one row per sample, source | edited | target")
    args = ap.parse_args(argv)
    samples = edit_samples(args.shards, args.limit)
    model, _ = load_v11_export(args.ckpt)
    clf = load_classifier(args.classifier_config, args.classifier)
    side = clf.cfg.image_size
    recs = [s["record"] for s in samples]
    edited = run_edits(model, samples, args.seed)
    src = [np.asarray(s["images"][0].convert("RGB")) for s in samples]
    tgt = [np.asarray(s["images"][1].convert("RGB")) for s in samples]
    report = {"model": edit_accuracy(clf, _as_float(edited, side), recs), **reference_scores(clf, samples),
              "ckpt": str(args.ckpt), "shards": args.shards, "n": len(samples), "seed": args.seed}
    text = json.dumps(report, indent=1, sort_keys=True)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    if args.grid:
        from PIL import Image

        r = edited[0].shape[0]
        size = lambda a: np.asarray(Image.fromarray(a).resize((r, r), Image.BICUBIC))  # noqa: E731
        rows = [np.concatenate([size(a), e, size(b)], 1) for a, e, b in zip(src, edited, tgt)]
        Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.concatenate(rows, 0)).save(args.grid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
