"""VARGPT-v1.1 inference from a released-layout directory (``experiments.infer`` hands over here).

    python -m experiments.infer /checkpoints/VARGPT-v1.1 --question "What is in the image?" --image a.png
    python -m experiments.infer /checkpoints/VARGPT-v1.1 --prompt "a red apple on a table" --out apple.png
    python -m experiments.infer /checkpoints/VARGPT-v1.1 --prompt "make it green" --edit-image apple.png
    python -m experiments.infer tests/fixtures/vargpt_v11_official --prompt-ids 201,5,9,202 --out x.png

Text goes through the directory's tokenizer (ChatML, as Qwen2-VL) when it has one; a directory
without tokenizer files takes token ids (``--prompt-ids`` / ``--question-ids``, comma separated,
the whole turn). Several prompts run as batches of equal-length prompts; row i draws from a
generator seeded ``--seed + i`` (never the clock), and images are written here, not by the model.
``--behaviour released`` sets every released switch (modules/vargpt11.py ``V11Switches``). CKPT may
also be an experiments.run export of a ``model.family: vargpt11`` run (its own chat template).
"""
from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from modules.components.qwen2vl import preprocess_image
from modules.vargpt11 import V11Switches, VARGPT11
from modules.vargpt11_format import build_released

SYSTEM = "You are a helpful assistant."


def is_v11_dir(p: str | Path) -> bool:
    """A released v1.1 directory, or an experiments.run export of a ``model.family: vargpt11`` run."""
    import json

    p = Path(p)
    p = p if p.is_dir() else p.parent
    c, y = p / "config.json", p / "config.yaml"
    if y.is_file():
        from omegaconf import OmegaConf

        return OmegaConf.select(OmegaConf.load(y), "model.family", default="vargpt") == "vargpt11"
    return c.is_file() and json.loads(c.read_text()).get("model_type") == "vargpt_qwen2_vl"


class WorldPrompts:
    """Prompts of a suite export: its own collator's chat template and fixed image side."""

    def __init__(self, model):
        from datamodules.tokens import IMAGE_TOKEN  # lazy: only for suite exports
        from modules.vargpt11_world import PatchTransform  # lazy: only for suite exports

        self.model, self.image_token = model, IMAGE_TOKEN
        self.enc = model.collator()
        self.patches = PatchTransform(model.image_side, model.cfg.llm)

    def image(self, path: str):
        from PIL import Image

        return self.pil_image(Image.open(path))

    def pil_image(self, im):
        """A PIL image -> (patches, grid (1, 3)) at the export's fixed image side."""
        g = self.model.image_side // self.model.cfg.llm.patch_size
        return self.patches(im), torch.tensor([[1, g, g]])

    def ids(self, text: str, grid) -> List[int]:
        # the source image where the instruction puts <image> (as editing data may, e.g. the
        # release's "Transform this image <image> to ..."), else before the text
        if self.image_token in text and grid is None:
            raise SystemExit(f"prompt {text!r} holds {self.image_token} but has no source image: give --edit-image")
        content = text if self.image_token in text or grid is None else self.image_token + "\n" + text
        return self.enc.encode_prompt([{"role": "user", "content": content}])


class _ReleasedPrompts:
    def __init__(self, model, tok):
        self.model, self.tok = model, tok

    def image(self, path: str):
        return _image(path, self.model)

    def ids(self, text: str, grid) -> List[int]:
        return chat_ids(self.model, self.tok, text, grid, True)


def load_v11_export(d: str | Path, overrides: Sequence[str] = (), with_cfg: bool = False):
    """(VARGPT11World in eval mode, its VARGPT11Config) from an experiments.run export of a
    ``model.family: vargpt11`` run (model.safetensors + config.yaml); ``overrides`` (key=value)
    apply to its config; ``with_cfg``: the whole typed run config instead of the VARGPT11Config."""
    from experiments.config import load_config  # lazy: only for suite exports
    from modules.vargpt11_world import VARGPT11World  # lazy: only for suite exports
    from modules.weights import load_weights  # lazy: only for suite exports

    d = Path(d)
    d = d if d.is_dir() else d.parent
    if not (d / "config.yaml").is_file():
        raise FileNotFoundError(f"{d / 'config.yaml'} not found: not an experiments.run export")
    loaded = load_config(d / "config.yaml", ["init_from=''", "model.load=[]", *overrides])
    if loaded.cfg.model.family != "vargpt11":
        raise ValueError(f"{d}: model.family is {loaded.cfg.model.family!r}, not vargpt11 (use --format vargpt)")
    net = VARGPT11World(loaded.cfg.model, template=loaded.cfg.data.chat)
    load_weights(net, [], init_from=str(d.resolve() / "model.safetensors"))
    return net.eval(), (loaded.cfg if with_cfg else net.cfg)


def _tokenizer(d: Path):
    if not any((d / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer  # lazy: only with tokenizer files

    return AutoTokenizer.from_pretrained(str(d))


def _image(path: str, model: VARGPT11) -> Tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    arr = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy())
    return preprocess_image(arr, model.cfg.llm)


def chat_ids(model: VARGPT11, tok, text: str, grid: Optional[torch.Tensor], generate: bool) -> List[int]:
    """One ChatML turn: system, user (image placeholders first), the assistant's opening."""
    ids = model.cfg.ids
    vision: List[int] = []
    if grid is not None:
        n = int(grid[0].prod()) // model.cfg.llm.spatial_merge_size ** 2
        vision = [ids.vision_start] + [ids.image_pad] * n + [ids.vision_end]
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    im_start, im_end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    nl = enc("\n")
    return ([im_start] + enc("system\n" + SYSTEM) + [im_end] + nl + [im_start] + enc("user\n") + vision +
            enc(text) + [im_end] + nl + [im_start] + enc("assistant\n"))


def _parse_ids(s: str) -> List[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--prompt-ids / --question-ids take comma-separated integers, got {s!r}")


def _batches(rows: Sequence[List[int]]) -> Dict[int, List[int]]:
    """Row indices grouped by prompt length (a batch needs one length: no padding in generate)."""
    groups: Dict[int, List[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(len(r), []).append(i)
    return groups


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.infer (VARGPT-v1.1)", description=__doc__.split("\n")[0])
    ap.add_argument("ckpt")
    ap.add_argument("--question", action="append", default=[])
    ap.add_argument("--question-ids", action="append", default=[])
    ap.add_argument("--image", action="append", default=[], help="image of each question")
    ap.add_argument("--prompt", action="append", default=[])
    ap.add_argument("--prompt-ids", action="append", default=[])
    ap.add_argument("--edit-image", action="append", default=[],
                    help="source image of each prompt, in order (--prompt-ids first, then --prompt): editing. "
                         "Token-id prompts must hold the vision placeholders themselves")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--pn", default="0.25M", help="scale schedule (Infinity pn name)")
    ap.add_argument("--cfg", type=float, default=None)
    ap.add_argument("--tau", type=float, default=None)
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--behaviour", default="corrected", choices=["corrected", "released"])
    ap.add_argument("--out", default="generated.png")
    args = ap.parse_args(argv)
    d = Path(args.ckpt)
    sw = V11Switches.released() if args.behaviour == "released" else V11Switches()
    if (d if d.is_dir() else d.parent).joinpath("config.yaml").is_file():
        model, _ = load_v11_export(d)
        model.cfg.switches.__dict__.update(asdict(sw))  # the one switch object the sides share
        tok, prompts_of = model.tokenizer, WorldPrompts(model)
    else:
        model, _ = build_released(d, pn=args.pn, **asdict(sw))
        tok = _tokenizer(d)
        prompts_of = _ReleasedPrompts(model, tok)
    for k in ("cfg", "tau", "top_k", "top_p"):
        if getattr(args, k) is not None:
            setattr(model.cfg, k, getattr(args, k))
    if (args.prompt or args.question) and tok is None:
        raise SystemExit(f"{d} has no tokenizer files: give --prompt-ids / --question-ids instead of text")

    # questions
    qs = [(q, None) for q in args.question_ids] + [(q, i) for i, q in enumerate(args.question)]
    rows = []  # (question, ids, patches, grid)
    for q, i in qs:
        img = args.image[i] if i is not None and i < len(args.image) else None
        pv, grid = prompts_of.image(img) if img else (None, None)
        rows.append((q, _parse_ids(q) if i is None else prompts_of.ids(q, grid), pv, grid))
    answers: List[List[int]] = [[] for _ in rows]
    keyed = [(len(r[1]), r[2] is not None) for r in rows]  # a batch: one length, all with or without images
    for key in dict.fromkeys(keyed):
        idx = [j for j, k in enumerate(keyed) if k == key]
        pv = torch.cat([rows[j][2] for j in idx]) if key[1] else None
        grid = torch.cat([rows[j][3] for j in idx]) if key[1] else None
        out = model.generate_text(torch.tensor([rows[j][1] for j in idx]), pv, grid, max_new_tokens=args.max_new_tokens)
        for b, j in enumerate(idx):
            new = out[b, key[0]:].tolist()
            answers[j] = new[: new.index(model.cfg.ids.eos) + 1] if model.cfg.ids.eos in new else new
    for (q, *_), a in zip(rows, answers):
        print(f"Q: {q}\nA: {tok.decode(a) if tok is not None else a}")

    # image prompts (generation, or editing with --edit-image)
    prompts = [(p, _parse_ids(p)) for p in args.prompt_ids]
    n_all = len(args.prompt_ids) + len(args.prompt)
    if len(args.edit_image) > n_all:
        raise SystemExit(f"{len(args.edit_image)} --edit-image for {n_all} prompt(s): give one per prompt, in order "
                         f"('' for a prompt that generates)")
    srcs = [args.edit_image[j] if j < len(args.edit_image) else None for j in range(n_all)]
    for p, src in zip(args.prompt, srcs[len(args.prompt_ids):]):
        grid = prompts_of.image(src)[1] if src else None
        prompts.append((p, prompts_of.ids(p, grid)))
    if not prompts:
        return 0
    images: List[Optional[torch.Tensor]] = [None] * len(prompts)
    for n, rows in _batches([r for _, r in prompts]).items():
        ids = torch.tensor([prompts[i][1] for i in rows])
        src = [srcs[i] for i in rows]
        pv = grid = None
        if any(src):
            if not all(src):
                raise SystemExit("prompts of one length must all edit or all generate; vary the wording")
            parts = [prompts_of.image(s) for s in src]
            pv, grid = torch.cat([p for p, _ in parts]), torch.cat([g for _, g in parts])
        out = model.generate_image(ids, pv, grid, seed=[args.seed + i for i in rows])
        for j, i in enumerate(rows):
            images[i] = out["uint8"][j]
    from PIL import Image

    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid_img = torch.cat(list(images), dim=1)  # side by side (H, sum W, 3)
    Image.fromarray(grid_img.numpy()).save(path)
    print(f"wrote {path} ({len(images)} image(s), behaviour={args.behaviour}, cfg={model.cfg.cfg}, tau={model.cfg.tau}, "
          f"top_k={model.cfg.top_k}, top_p={model.cfg.top_p}, seed={args.seed})")
    return 0
