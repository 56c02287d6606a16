"""Package the stage-0 world bases that ship with the project (assets/world/).

`make bases` trains every base under runs/bases/ (see the Makefile for the order) and then runs

    python -m experiments.bases pack            # runs/bases/* -> assets/world/*.safetensors (fp16)
    python -m experiments.bases pack --only var # one retrained base (runs/bases/var); the other
                                                # entries of MANIFEST.json stay as they are

so that a fresh clone's `make stage1` starts from trained bases in minutes. `check` verifies that
the shipped files are complete and match MANIFEST.json (sha256); world configs read assets/world/.

    python -m experiments.bases tokenizer --shards 'runs/data/world/train/*.tar' --out runs/bases/tokenizer

trains the world tokenizer by hand (base_llm does it itself when model.tokenizer.path has none).

    python -m experiments.bases ceiling runs/bases/bsq/model.safetensors --n 400

scores the BSQ base as the VQVAE's ceiling is scored (docs/evaluation.md): the test generation
prompts rendered again by the world, encoded to bits and decoded; PSNR and the reference
classifier's attribute accuracy on the reconstructions and on the real images themselves.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from datamodules.config import SourceConfig
from experiments.config import REPO_ROOT
from modules.checkpoint import load_strict, read_state_dict, save_state_dict, sha256_file
from modules.components.text_tokenizer import train_world_tokenizer
from modules.stages.bases.data import read_world
from modules.stages.bases.llm import tokenizer_corpus

ASSETS = REPO_ROOT / "assets" / "world"
SRC = REPO_ROOT / "runs" / "bases"
# name in assets -> (export under runs/bases, key prefixes kept (None = all))
PARTS = {
    "llm": ("llm/model.safetensors", None),
    "vision": ("vision/model.safetensors", None),
    "vqvae": ("vqvae/model.safetensors", None),
    "bsq": ("bsq/model.safetensors", None),  # VARGPT-v1.1's bit tokenizer (the v1.1 world's)
    "var": ("var/model.safetensors", None),
    "classifier": ("classifier/model.safetensors", None),
    # the LLaVA-1.5-world start of VARGPT: only what understanding training produced
    "llava": ("llava_sft/model.safetensors", ("llm.", "vision.", "und_proj.")),
    # the v1.1 world's start, a world Qwen2-VL: its ViT, LLM and LM head (not the random generation side)
    "qwen2vl": ("qwen2vl/model.safetensors", ("visual.", "model.", "lm_head.")),
}


# What export.json's metadata records of the run that made a base (experiments.run.provenance)
PROVENANCE_KEYS = ("config_source", "config_hash", "seed", "steps", "fit_seconds", "final_metrics", "cpu_model", "git",
                   "init_from", "init_from_sha256")


def base_provenance(weights: Path) -> Dict[str, object]:
    """The run that trained a base, from the export.json beside its weights: commit, config,
    seed, steps, final metrics, wall time and CPU (what `make bases` must reproduce)."""
    ej = weights.parent / "export.json"
    if not ej.is_file():
        return {"provenance": f"unknown: {ej} missing (a base exported before runs recorded it)"}
    meta = json.loads(ej.read_text()).get("metadata", {})
    return {"trained_by": {k: meta[k] for k in PROVENANCE_KEYS if k in meta}}


def pack(src: Path = SRC, dst: Path = ASSETS, dtype: str = "float16", only: Sequence[str] = ()) -> Dict[str, Dict]:
    """Pack every base (and the tokenizer) from `src` into `dst`; with `only`, just those bases,
    the rest of an existing MANIFEST.json kept (a base retrained on its own)."""
    unknown = [n for n in only if n not in PARTS]
    if unknown:
        raise SystemExit(f"bases pack: unknown base(s) {unknown}; valid: {', '.join(PARTS)}")
    names = list(only) or list(PARTS)
    missing = [str(src / PARTS[n][0]) for n in names if not (src / PARTS[n][0]).is_file()]
    if not only and not (src / "tokenizer" / "tokenizer.json").is_file():
        missing.append(str(src / "tokenizer"))
    if missing:
        raise SystemExit("bases pack: missing " + ", ".join(missing) + "\n  run `make bases` (it trains them) first")
    dst.mkdir(parents=True, exist_ok=True)
    tdt = getattr(torch, dtype)
    mf = dst / "MANIFEST.json"
    manifest: Dict[str, Dict] = json.loads(mf.read_text()) if only and mf.is_file() else {}
    if only and manifest.get("_dtype", dtype) != dtype:
        raise SystemExit(f"bases pack: {mf} is {manifest['_dtype']}, not {dtype}: pack every base")
    manifest.update({"_created": time.strftime("%Y-%m-%d %H:%M:%S"), "_dtype": dtype})
    for name in names:
        rel, keep = PARTS[name]
        sd = read_state_dict(src / rel)
        if keep:
            sd = {k: v for k, v in sd.items() if k.startswith(keep)}
        # fp16 halves the repository size; floats only (integer buffers keep their type)
        sd = {k: (v.to(tdt) if v.is_floating_point() else v) for k, v in sd.items()}
        out = dst / f"{name}.safetensors"
        save_state_dict(sd, out, metadata={"source": rel, "dtype": dtype})
        manifest[name] = {"file": out.name, "sha256": sha256_file(out), "tensors": len(sd),
                          "params": int(sum(v.numel() for v in sd.values())), "bytes": out.stat().st_size,
                          **base_provenance(src / rel)}
    if not only:
        tok_dst = dst / "tokenizer"
        if tok_dst.exists():
            shutil.rmtree(tok_dst)
        shutil.copytree(src / "tokenizer", tok_dst)
        manifest["tokenizer"] = {"file": "tokenizer/", "sha256": sha256_file(tok_dst / "tokenizer.json")}
    mf.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def check(dst: Path = ASSETS) -> List[str]:
    """Problems with the shipped bases (empty list = complete and unchanged)."""
    mf = dst / "MANIFEST.json"
    if not mf.is_file():
        return [f"{mf} missing: run `make bases`"]
    manifest = json.loads(mf.read_text())
    problems = []
    for name in list(PARTS) + ["tokenizer"]:
        entry = manifest.get(name)
        if entry is None:
            problems.append(f"{name}: not in {mf}")
            continue
        p = dst / entry["file"]
        p = p / "tokenizer.json" if p.is_dir() else p
        if not p.is_file():
            problems.append(f"{name}: {p} missing")
        elif sha256_file(p) != entry["sha256"]:
            problems.append(f"{name}: {p} differs from MANIFEST.json (re-run `python -m experiments.bases pack`)")
    return problems


def bsq_ceiling(weights: Path, shards: str, root: str, n: int, classifier: str, classifier_config: str,
                recipe: Path = REPO_ROOT / "experiments/world/bases/bsq.yaml", seed: int = 1) -> Dict[str, object]:
    """PSNR and attribute accuracy of BSQ reconstructions of world images (the tokenizer's ceiling:
    no generator of these bits scores above it), beside the same images unreconstructed."""
    from experiments.config import load_config  # lazy: only this subcommand
    from experiments.infer_edit import load_classifier  # lazy: only this subcommand
    from modules import evaluation as ev  # lazy: only this subcommand
    from modules.components.bsq import BSQTokenizer  # lazy: only this subcommand
    from modules.metrics_world import attribute_scores, requested_groups  # lazy: only this subcommand
    from modules.stages.bases.bsq import bsq_reconstructions  # lazy: only this subcommand (Lightning)

    cfg_file = weights.parent / "config.yaml"
    tcfg = load_config(cfg_file if cfg_file.is_file() else recipe).cfg.model.v11.tokenizer
    tok = BSQTokenizer(tcfg)
    load_strict(tok, {k: v.float() if v.is_floating_point() else v for k, v in read_state_dict(weights).items()},
                source=str(weights))
    tok.eval()
    samples, _ = ev.read_records(shards, root, n)
    res = tcfg.downsample * tcfg.scales[-1][0]
    reals = ev.rerendered_targets(samples, res, seed=seed)  # (N, 3, R, R) in [0, 1]
    real8 = reals.mul(255).round().to(torch.uint8)
    recon = bsq_reconstructions(tok, real8).float().div(255)
    mse = (recon - real8.float().div(255)).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    clf = load_classifier(classifier_config, classifier)
    groups = [requested_groups(s["record"]) for s in samples]
    out: Dict[str, object] = {"weights": str(weights), "shards": shards, "n": len(samples), "resolution": res,
                              "psnr": round(float((-10 * torch.log10(mse)).mean()), 3)}
    for name, imgs in (("bsq_reconstruction", recon), ("real", reals)):
        sc = attribute_scores(clf, imgs, groups)
        out[name] = {"attribute_accuracy": round(sc["mean"], 4), "attribute_accuracy_ci95": sc["mean_ci95"],
                     "attr_all": round(sc["all"], 4), "attr_all_ci95": sc["all_ci95"]}
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.bases", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="runs/bases/* -> assets/world/ (fp16) + MANIFEST.json")
    p.add_argument("--src", default=str(SRC))
    p.add_argument("--dst", default=str(ASSETS))
    p.add_argument("--only", nargs="+", default=[], metavar="BASE",
                   help=f"pack just these ({', '.join(PARTS)}); MANIFEST.json keeps the others")
    c = sub.add_parser("check", help="exit 1 unless assets/world/ is complete and matches its manifest")
    c.add_argument("--dst", default=str(ASSETS))
    t = sub.add_parser("tokenizer", help="train the world tokenizer on world shards")
    t.add_argument("--shards", required=True, help="shard pattern, e.g. 'runs/data/world/train/*.tar'")
    t.add_argument("--out", required=True, help="output directory (model.tokenizer.path)")
    t.add_argument("--vocab-size", type=int, default=1024)
    e = sub.add_parser("ceiling", help="PSNR + classifier attribute accuracy of BSQ reconstructions of world images")
    e.add_argument("weights", help="a base_bsq export (runs/bases/bsq/model.safetensors or assets/world/bsq.safetensors)")
    e.add_argument("--shards", default="test/gen-*.tar", help="world generation shards (their prompts are rendered again)")
    e.add_argument("--root", default="runs/data/world")
    e.add_argument("--n", type=int, default=400)
    e.add_argument("--classifier", default="assets/world/classifier.safetensors")
    e.add_argument("--classifier-config", default="experiments/world/model.yaml")
    args = ap.parse_args(argv)
    if args.cmd == "ceiling":
        print(json.dumps(bsq_ceiling(Path(args.weights), args.shards, args.root, args.n, args.classifier,
                                     args.classifier_config), indent=1))
        return 0
    if args.cmd == "tokenizer":
        records = read_world([SourceConfig(name="text", shards=args.shards)], images=False)["records"]
        tok = train_world_tokenizer(tokenizer_corpus(records), args.out, vocab_size=args.vocab_size)
        print(f"world tokenizer: {len(tok)} tokens from {len(records)} records -> {args.out}")
        return 0
    if args.cmd == "pack":
        m = pack(Path(args.src), Path(args.dst), only=args.only)
        total = sum(v["bytes"] for k, v in m.items() if not k.startswith("_") and "bytes" in v)
        what = ", ".join(args.only) if args.only else f"{len(PARTS)} bases + tokenizer"
        print(f"packed {what} into {args.dst} (assets now {total / 1e6:.1f} MB)")
        return 0
    problems = check(Path(args.dst))
    for pr in problems:
        print(pr, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
