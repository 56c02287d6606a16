"""Linear probe of a checkpoint's vision features: is an understanding failure in the vision
tower or after it (projector + LLM)?

    python -m experiments.probe runs/world/stage2 [--shards "train/class-*.tar"] [--n 3000] [--train-frac 0.67]

Reads single-object world images with their (shape, colour) label (the `class` task), runs the
frozen vision tower exactly as the model does (its `feature_layer`, its transform) and fits one
linear softmax classifier per attribute on the flattened tokens (N, n_tokens * C) of the first
`train_frac` of the images; prints held-out accuracy per attribute as JSON. High probe accuracy
with low VQA accuracy on the same attribute puts the gap after the vision tower.

Expected runtime: about a minute on 2 CPU cores for 3000 images.

    python -m experiments.probe runs/world/stage3 --prompt-binding [--shards "train/gen-*.tar"] [--n 2000]

The generation side instead: does the state at each object's shape word in a generation prompt
carry that object's colour (what the VAR's cross-attention needs to pair colours with shapes)?
One colour probe per LLM layer (0 = the input embeddings), on the projected LLM states
(`gen_cond_context`) and, when the model adds to them (model.prompt_context_bigram, a prompt
encoder), on the context the VAR cross-attends to (`cross_attn_context`). Prompts whose shape
words do not line up one-to-one with the scene's objects (plurals: "two red circles") are skipped
and counted.

    python -m experiments.probe runs/world/stage3 --llm-path [--shards "val/gen-*.tar"] [--n 64]

How much of what the VAR blocks read at the image slots comes through the LLM: the RMS of
gen_out(LLM states) against the RMS of the VAR's own front end (what `model.var_skip` adds it
to), and the image loss of the records as they are and with gen_out's output set to zero.
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
from modules.evaluation import user_text, iter_records


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


def shape_word_positions(pieces: List[str], shapes: List[str]) -> List[int]:
    """Token positions whose text holds a whole shape word, in order (the world tokenizer keeps
    each shape word in one token; a prompt where it does not is skipped by the caller)."""
    return [t for t, piece in enumerate(pieces) if any(sh in piece.lower() for sh in shapes)]


def prompt_binding(net, samples: List[Dict], train_frac: float) -> Dict[str, float]:
    """Colour-at-shape-word probe accuracies per representation (see the module docstring)."""
    shapes = sorted({o["shape"] for s in samples for o in s["record"]["scene"]["objects"]})
    colours = sorted({o["colour"] for s in samples for o in s["record"]["scene"]["objects"]})
    feats, ys, skipped = [], [], 0
    for s in samples:
        rec = s["record"]
        ids = net.generation_prompt_ids([user_text(rec)])[0]
        pos = shape_word_positions([net.tokenizer.decode([i]) for i in ids], shapes)
        objs = rec["scene"]["objects"]
        if len(pos) != len(objs):
            skipped += 1
            continue
        with torch.no_grad():
            emb = net.llm.get_input_embeddings()(torch.tensor([ids]))
            hs = net.run_llm(emb, None, output_hidden_states=True, use_cache=False).hidden_states
            reps = [(f"llm_layer_{i}", h) for i, h in enumerate(hs)]  # (1, T, D) each, 0 = embeddings
            if net.gen_cond is not None:
                ctx = net.project_cond(hs[-1])  # (1, T, C_var): the projected LLM states
                reps.append(("gen_cond_context", ctx))
                if net.gen_cond_bigram is not None or net.prompt_enc is not None:
                    # what the VAR cross-attends to: + the bigram map, then the prompt encoder
                    keep = torch.ones(ctx.shape[:2], dtype=torch.bool)
                    reps.append(("cross_attn_context", net.cross_context(hs[-1], keep, emb)))
        names = [name for name, _ in reps]
        for t, o in zip(pos, objs):
            feats.append([h[0, t].float() for _, h in reps])
            ys.append(colours.index(o["colour"]))
    if len(ys) < 10:
        raise SystemExit(f"probe: only {len(ys)} objects with a lined-up shape word; use generation shards "
                         f"(task generation, records with `scene`)")
    y = torch.tensor(ys)
    n_train = int(len(ys) * train_frac)
    out: Dict[str, float] = {"objects_train": n_train, "objects_test": len(ys) - n_train, "prompts_skipped": skipped,
                             "chance_colour": round(float(torch.bincount(y[n_train:]).max()) / (len(y) - n_train), 4)}
    for j, name in enumerate(names):
        x = torch.stack([f[j] for f in feats])
        out[f"colour_at_shape_word_{name}"] = round(linear_probe(x, y, n_train, steps=300, lr=0.05, l2=1e-3), 4)
    return out


def llm_path(net, samples: List[Dict], batch_size: int = 16) -> Dict[str, float]:
    """RMS of the VAR front end and of gen_out(LLM states) over the image slots, and the image
    loss with and without the LLM path (gen_out's output zeroed by a forward hook)."""
    col = net.collator()
    sums = {"front": 0.0, "gen_out": 0.0, "loss": 0.0, "loss_zero": 0.0}
    n_el = n_tgt = 0
    state: Dict[str, object] = {"zero": False}

    def hook(module, inputs, out):
        state["gen_out"] = out
        return torch.zeros_like(out) if state["zero"] else None

    handle = net.gen_out.register_forward_hook(hook)
    try:
        for b0 in range(0, len(samples), batch_size):
            b = col(samples[b0:b0 + batch_size])
            with torch.no_grad():
                got: List[torch.Tensor] = []
                if net.embed(b, insert_gen=False, front_out=got)[2] is None:
                    continue  # no generation target in this batch
                front = got[0]  # the VAR front end of the targets (N, L, C_var)
                loss = float(net(b)["loss_img"])
                g = state["gen_out"]
                state["zero"] = True
                loss_zero = float(net(b)["loss_img"])
                state["zero"] = False
            n = front.shape[0]
            sums["front"] += float(front.float().pow(2).sum())
            sums["gen_out"] += float(g.float().pow(2).sum())
            sums["loss"] += loss * n
            sums["loss_zero"] += loss_zero * n
            n_el += front.numel()
            n_tgt += n
    finally:
        handle.remove()
    if n_tgt == 0:
        raise SystemExit("probe --llm-path: no generation targets in these records; use generation shards")
    return {"targets": n_tgt, "var_skip": bool(net.cfg.var_skip),
            "rms_front_end": round((sums["front"] / n_el) ** 0.5, 5), "rms_gen_out": round((sums["gen_out"] / n_el) ** 0.5, 5),
            "loss_img": round(sums["loss"] / n_tgt, 4), "loss_img_without_llm_path": round(sums["loss_zero"] / n_tgt, 4)}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.probe", description=__doc__.split("\n")[0])
    ap.add_argument("ckpt")
    ap.add_argument("--shards", default=None,
                    help="world class shards (records with `label`; default train/class-*.tar), with "
                         "--prompt-binding generation shards (default train/gen-*.tar)")
    ap.add_argument("--n", type=int, default=None, help="records to read (default 3000; 2000 with --prompt-binding)")
    ap.add_argument("--train-frac", type=float, default=2 / 3)
    ap.add_argument("--prompt-binding", action="store_true",
                    help="probe the prompt states the VAR reads instead (default shards train/gen-*.tar, n 2000)")
    ap.add_argument("--llm-path", action="store_true",
                    help="how much the VAR's input at the image slots gets from the LLM (default shards "
                         "val/gen-*.tar, n 64)")
    ap.add_argument("--data-root", default="", help="world data root (default: the checkpoint's data.root)")
    args = ap.parse_args(argv)
    if args.prompt_binding and args.llm_path:
        ap.error("--prompt-binding and --llm-path are separate probes: give one")

    net, cfg = load_exported(args.ckpt)
    root = args.data_root or (str(resolve_path(cfg.data.root)) if cfg.data.root else "")
    if args.llm_path:
        shards = args.shards or "val/gen-*.tar"
        samples = list(iter_records(shards, root, args.n or 64))  # records without a target are skipped
        print(json.dumps({"checkpoint": args.ckpt, "shards": shards, **llm_path(net, samples)}, indent=1))
        return 0
    if args.prompt_binding:
        shards = args.shards or "train/gen-*.tar"
        samples = list(iter_records(shards, root, args.n or 2000))
        if any("scene" not in s["record"] for s in samples):
            raise SystemExit(f"probe: records of {shards!r} have no `scene`; use the world's generation shards")
        out = {"checkpoint": args.ckpt, "shards": shards, **prompt_binding(net, samples, args.train_frac)}
        print(json.dumps(out, indent=1))
        return 0
    shards = args.shards or "train/class-*.tar"
    samples = list(iter_records(shards, root, args.n or 3000))
    if any("label" not in s["record"] for s in samples):
        raise SystemExit(f"probe: records of {shards!r} have no `label`; use the world's class shards")
    tf = net.vision.image_transform()
    px = torch.stack([tf(s["images"][0]) for s in samples])
    with torch.no_grad():
        feats_NTC = torch.cat([net.vision(px[i:i + 256]) for i in range(0, len(px), 256)])
    label = torch.tensor([s["record"]["label"] for s in samples])
    targets: Dict[str, torch.Tensor] = {"shape": label // len(COLOURS), "colour": label % len(COLOURS)}
    n_train = int(len(samples) * args.train_frac)
    out = {"checkpoint": args.ckpt, "shards": shards, "n_train": n_train, "n_test": len(samples) - n_train,
           "features": f"{feats_NTC.shape[1]} tokens x {feats_NTC.shape[2]} (feature_layer {cfg.model.vision.feature_layer})"}
    for name, y in targets.items():
        out[f"probe_{name}_accuracy"] = round(linear_probe(feats_NTC.flatten(1), y, n_train), 4)
        out[f"chance_{name}"] = round(float(torch.bincount(y[n_train:]).max()) / (len(y) - n_train), 4)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
