"""Linear probe of a checkpoint's vision features: is an understanding failure in the vision
tower or after it (projector + LLM)?

    python -m experiments.probe runs/world/stage2 [--shards "train/class-*.tar"] [--n 3000] [--train-frac 0.67]

Reads single-object world images with their (shape, colour) label (the `class` task), runs the
frozen vision tower exactly as the model does (its `feature_layer`, its transform) and fits one
linear softmax classifier per attribute on the flattened tokens (N, n_tokens * C) of the first
`train_frac` of the images; prints held-out accuracy per attribute as JSON. High probe accuracy
with low VQA accuracy on the same attribute puts the gap after the vision tower.

Expected runtime: about a minute on 2 CPU cores for 3000 images.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from datamodules.paths import resolve_path
from datamodules.world import COLOURS
from experiments.infer import load_exported
from modules.evaluation import iter_records


def linear_probe(x_NF: torch.Tensor, y_N: torch.Tensor, n_train: int, steps: int = 200, lr: float = 1e-2,
                 l2: float = 1e-4, seed: int = 0) -> float:
    """Held-out accuracy of a full-batch Adam-trained linear classifier on standardised features."""
    torch.manual_seed(seed)
    mu, sd = x_NF[:n_train].mean(0), x_NF[:n_train].std(0) + 1e-5
    x = (x_NF - mu) / sd
    k = int(y_N.max()) + 1
    W = torch.zeros(x.shape[1], k, requires_grad=True)
    b = torch.zeros(k, requires_grad=True)
    opt = torch.optim.Adam([W, b], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(x[:n_train] @ W + b, y_N[:n_train]) + l2 * W.pow(2).sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(((x[n_train:] @ W + b).argmax(1) == y_N[n_train:]).float().mean())


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.probe", description=__doc__.split("\n")[0])
    ap.add_argument("ckpt")
    ap.add_argument("--shards", default="train/class-*.tar", help="world class shards (records with `label`)")
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--train-frac", type=float, default=2 / 3)
    args = ap.parse_args(argv)

    net, cfg = load_exported(args.ckpt)
    root = str(resolve_path(cfg.data.root)) if cfg.data.root else ""
    samples = list(iter_records(args.shards, root, args.n))
    if any("label" not in s["record"] for s in samples):
        raise SystemExit(f"probe: records of {args.shards!r} have no `label`; use the world's class shards")
    tf = net.vision.image_transform()
    px = torch.stack([tf(s["images"][0]) for s in samples])
    with torch.no_grad():
        feats_NTC = torch.cat([net.vision(px[i:i + 256]) for i in range(0, len(px), 256)])
    label = torch.tensor([s["record"]["label"] for s in samples])
    targets: Dict[str, torch.Tensor] = {"shape": label // len(COLOURS), "colour": label % len(COLOURS)}
    n_train = int(len(samples) * args.train_frac)
    out = {"checkpoint": args.ckpt, "shards": args.shards, "n_train": n_train, "n_test": len(samples) - n_train,
           "features": f"{feats_NTC.shape[1]} tokens x {feats_NTC.shape[2]} (feature_layer {cfg.model.vision.feature_layer})"}
    for name, y in targets.items():
        out[f"probe_{name}_accuracy"] = round(linear_probe(feats_NTC.flatten(1), y, n_train), 4)
        out[f"chance_{name}"] = round(float(torch.bincount(y[n_train:]).max()) / (len(y) - n_train), 4)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
