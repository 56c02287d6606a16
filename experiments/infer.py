"""Ask a trained model a question or have it draw: the quickest look at a checkpoint.

    python -m experiments.infer runs/world/stage2 --image img.png --question "What colour is the circle?"
    python -m experiments.infer runs/world/stage3 --prompt "draw a red circle on the left" --out red.png

CKPT is an export directory of `experiments.run` (model.safetensors + config.yaml) or the
model.safetensors file itself. Several --prompt / --image+--question pairs run as one batch.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from experiments.config import load_config
from modules.vargpt import VARGPT
from modules.weights import load_weights


def load_exported(ckpt: str | Path, overrides: tuple = ()):
    """(VARGPT in eval mode, typed config) from an export directory or its model.safetensors."""
    p = Path(ckpt)
    d = p if p.is_dir() else p.parent
    cfg_file = d / "config.yaml"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: CKPT must be an export directory of experiments.run "
                                f"(model.safetensors + config.yaml)")
    loaded = load_config(cfg_file, ["init_from=''", "model.load=[]", *overrides])
    net = VARGPT(loaded.cfg.model, template=loaded.cfg.data.chat)
    load_weights(net, [], init_from=str(d.resolve() / "model.safetensors"))
    return net.eval(), loaded.cfg


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.infer", description=__doc__.split("\n")[0])
    ap.add_argument("ckpt")
    ap.add_argument("--image", action="append", default=[], help="input image (pairs with --question)")
    ap.add_argument("--question", action="append", default=[])
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--prompt", action="append", default=[], help="generation instruction")
    ap.add_argument("--out", default="generated.png", help="output PNG (a grid when several prompts)")
    ap.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance at the last scale")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=0.0)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not args.prompt and not args.question:
        ap.error("give --image/--question pairs and/or --prompt")
    if args.question and len(args.image) not in (0, len(args.question)):
        ap.error(f"{len(args.image)} --image for {len(args.question)} --question (give one each, or none)")

    from PIL import Image

    net, _ = load_exported(args.ckpt)
    if args.question:
        images = [Image.open(p).convert("RGB") for p in args.image] or [None] * len(args.question)
        for q, a in zip(args.question, net.answer(images, args.question, max_new_tokens=args.max_new_tokens)):
            print(f"Q: {q}\nA: {a}")
    if args.prompt:
        from torchvision.utils import save_image

        seeds = [args.seed + i for i in range(len(args.prompt))]
        img = net.generate_image(args.prompt, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p,
                                 temperature=args.temperature, seed=seeds)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        save_image(img, out, nrow=min(8, len(args.prompt)), padding=2, pad_value=1.0)
        print(f"wrote {out} ({img.shape[0]} image(s), {img.shape[-1]} px, cfg={args.cfg}, top_k={args.top_k}, "
              f"top_p={args.top_p}, seed={args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
