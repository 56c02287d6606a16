"""Ask a trained model a question or have it draw: the quickest look at a checkpoint.

    python -m experiments.infer runs/world/stage2 --image img.png --question "What colour is the circle?"
    python -m experiments.infer runs/world/stage3 --prompt "draw a red circle on the left" --out red.png
    python -m experiments.infer runs/world/stage3 --prompt "two blue squares" --temperature 0.5 --best-of 4
    python -m experiments.infer /checkpoints/VARGPT_LLaVA-v1 --behaviour released --dtype bfloat16 \\
        --device cuda --prompt "Please design a drawing of a butterfly on a flower."

A released VARGPT-v1.1 directory (config.json model_type vargpt_qwen2_vl) goes to
experiments/infer_v11.py (questions, generation, editing with --edit-image).

CKPT is an export directory of `experiments.run` (model.safetensors + config.yaml), the
model.safetensors file itself, or a released-layout directory (VARGPT-family/VARGPT_LLaVA-v1:
config.json + safetensors shards; built from its config.json and loaded shard by shard, see
modules/released.py). Several --prompt / --image+--question pairs run as one batch.
--behaviour released gives the official inference (noise guidance, null condition row, cfg 1.5,
top-k 900, top-p 0.96, image generation once greedy decoding emits <|image_gen_start|>); the
default is the checkpoint's own (a released directory: corrected).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

import torch

from datamodules.config import DataConfig
from experiments.config import ExperimentConfig, load_config
from modules.released import load_released, released_config
from modules.self_verify import draw_seed, pick_best, prompt_questions, understanding_scores
from modules.vargpt import VARGPT
from modules.weights import load_weights


def is_released_dir(p: str | Path) -> bool:
    """A released-layout directory: config.json (no config.yaml of experiments.run) + safetensors."""
    p = Path(p)
    return p.is_dir() and (p / "config.json").is_file() and not (p / "config.yaml").is_file() and (
        (p / "model.safetensors.index.json").is_file() or (p / "model.safetensors").is_file())


def load_exported(ckpt: str | Path, overrides: tuple = ()):
    """(VARGPT in eval mode, typed config) from an export directory of experiments.run (or its
    model.safetensors) or a released-layout directory (its config: sizes from config.json, the
    chat template of the released processor; ``overrides`` such as model.behaviour=released or
    model.llm.dtype=bfloat16 apply on top)."""
    p = Path(ckpt)
    if is_released_dir(p):
        return _load_released_dir(p, overrides)
    d = p if p.is_dir() else p.parent
    cfg_file = d / "config.yaml"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: CKPT must be an export directory of experiments.run "
                                f"(model.safetensors + config.yaml) or a released-layout directory (config.json "
                                f"+ safetensors)")
    loaded = load_config(cfg_file, ["init_from=''", "model.load=[]", *overrides])
    net = VARGPT(loaded.cfg.model, template=loaded.cfg.data.chat)
    load_weights(net, [], init_from=str(d.resolve() / "model.safetensors"))
    return net.eval(), loaded.cfg


def _load_released_dir(d: Path, overrides: tuple):
    from omegaconf import OmegaConf

    info = released_config(d)
    base = ExperimentConfig(name=d.name, model=info.model_config, data=DataConfig(chat=info.template))
    merged = OmegaConf.merge(OmegaConf.structured(base), OmegaConf.from_dotlist(list(overrides)))
    cfg: ExperimentConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    cfg.model.validate()
    net, _ = load_released(d, base=cfg.model)
    return net.eval(), cfg


def load_any(ckpt: str | Path, behaviour: str = "", dtype: str = ""):
    """A VARGPT in eval mode from either kind of checkpoint; ``behaviour`` sets model.behaviour,
    ``dtype`` the weight dtype of everything but the VQVAE (LLM, vision tower, projectors, VAR)."""
    over = [f"model.behaviour={behaviour}"] if behaviour else []
    if dtype:
        over += [f"model.llm.dtype={dtype}", f"model.vision.dtype={dtype}", f"model.projector_dtype={dtype}",
                 f"model.var_dtype={dtype}"]
    net, _ = load_exported(ckpt, tuple(over))
    return net


def _best_of(net, args, questions, first):
    """The kept draw per prompt among args.best_of (draw 0 = the single draw of these seeds)."""
    ids = net.generation_prompt_ids(args.prompt)
    draws = [first] + [net.generate(ids, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, temperature=args.temperature,
                                    seed=[draw_seed(args.seed, k) + i for i in range(len(args.prompt))]).images.float().cpu()
                       for k in range(1, args.best_of)]
    scores_KN = torch.stack([understanding_scores(net, d, questions) for d in draws])
    img, pick_N = pick_best(draws, scores_KN)
    for i, p in enumerate(args.prompt):
        k = int(pick_N[i])
        print(f"P: {p}\n   kept draw {k} of {args.best_of} (implied answers' log-probability "
              f"{float(scores_KN[k, i]):.2f}; the draws: {', '.join(f'{float(v):.2f}' for v in scores_KN[:, i])})")
    return img


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):
        from experiments.infer_v11 import is_v11_dir, main as main_v11  # lazy: the Qwen2-VL classes

        if is_v11_dir(argv[0]):
            return main_v11(argv)
    ap = argparse.ArgumentParser(prog="python -m experiments.infer", description=__doc__.split("\n")[0])
    ap.add_argument("ckpt")
    ap.add_argument("--image", action="append", default=[], help="input image (pairs with --question)")
    ap.add_argument("--question", action="append", default=[])
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--prompt", action="append", default=[], help="generation instruction")
    ap.add_argument("--out", default="generated.png", help="output PNG (a grid when several prompts)")
    ap.add_argument("--cfg", type=float, default=None,
                    help="classifier-free guidance at the last scale (default: the model's sample_cfg: 3.0, released 1.5)")
    ap.add_argument("--top-k", type=int, default=None, help="default: the model's (0, released 900)")
    ap.add_argument("--top-p", type=float, default=None, help="default: the model's (0, released 0.96)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--best-of", type=int, default=1, metavar="N",
                    help="draw N images per prompt and keep the one whose implied answers the model's own "
                         "understanding finds most likely (world prompts; modules/self_verify.py)")
    ap.add_argument("--behaviour", default="", choices=["", "corrected", "released"],
                    help="model.behaviour (released: the official inference)")
    ap.add_argument("--dtype", default="", choices=["", "float32", "bfloat16", "float16"],
                    help="weight dtype of everything but the VQVAE (bfloat16: the 7B in 18.6 GB)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if not args.prompt and not args.question:
        ap.error("give --image/--question pairs and/or --prompt")
    if args.question and len(args.image) not in (0, len(args.question)):
        ap.error(f"{len(args.image)} --image for {len(args.question)} --question (give one each, or none)")

    if args.best_of < 1:
        ap.error(f"--best-of must be >= 1, got {args.best_of}")
    questions = None
    if args.prompt and args.best_of > 1:
        try:
            questions = prompt_questions(args.prompt)
        except ValueError as e:
            ap.error(str(e))
    from PIL import Image

    net = load_any(args.ckpt, args.behaviour, args.dtype).to(args.device)
    if args.question:
        images = [Image.open(p).convert("RGB") for p in args.image] or [None] * len(args.question)
        for q, a in zip(args.question, net.answer(images, args.question, max_new_tokens=args.max_new_tokens)):
            print(f"Q: {q}\nA: {a}")
    if args.prompt:
        from torchvision.utils import save_image

        seeds = [args.seed + i for i in range(len(args.prompt))]
        out = net.generate(net.generation_prompt_ids(args.prompt), cfg=args.cfg, top_k=args.top_k, top_p=args.top_p,
                           temperature=args.temperature, seed=seeds)
        for p, ids, ok in zip(args.prompt, out.output_ids, out.started):
            text = net.tokenizer.decode(ids, skip_special_tokens=False)
            print(f"P: {p}\n   {text}" + ("" if ok else "   (<|image_gen_start|> not emitted: forced)"))
        img = out.images.float().cpu()
        if questions is not None:
            img = _best_of(net, args, questions, img)
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(img, path, nrow=min(8, len(args.prompt)), padding=2, pad_value=1.0)
        cfg, k, tp = net._sampling_defaults(args.cfg, args.top_k, args.top_p)
        print(f"wrote {path} ({img.shape[0]} image(s), {img.shape[-1]} px, behaviour={net.cfg.behaviour}, "
              f"cfg={cfg}, top_k={k}, top_p={tp}, seed={args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
