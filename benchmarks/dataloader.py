"""Throughput of the stage-2 mixed stream (read + decode + collate) against training's demand.

    python -m benchmarks.dataloader                      # ~1 min on 2 CPU cores
    python -m benchmarks.dataloader --step-rate 4.0      # compare with a measured training rate
    python -m benchmarks.dataloader --quick              # smoke test

What is measured:
  loader   samples/s delivered by DataLoader(ShardStream(train, resampled) + Collator) with 0, 1
           and 2 workers, on world shards written into a temp dir (64 px PNG, the stage-2 mix:
           vqa 0.35 / conv 0.35 / caption 0.2 / gen 0.1, prompt dropout 0.1). Median of --reps
           runs of --batches batches after a warm-up (worker start-up excluded).
  demand   training's consumption in samples/s = steps/s x batch size. The embedded default's
           training step does not exist yet, so unless --step-rate is given a *stand-in* is
           timed: a 4-layer width-128 transformer LM over the batch's tokens + a small conv
           tower over its images, forward + backward + AdamW, the faster of 1 and 2 torch
           threads. Rerun with --step-rate once the real stage-2 step rate is known.
The target: the loader with 2 workers delivers at least 3x the demand. Loader and stand-in are
timed separately; in training they share the cores, so the margin is what covers that.
Writes benchmarks/results/dataloader.json and dataloader.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import torch
from torch.utils.data import DataLoader

from datamodules import world
from datamodules.collate import Collator
from datamodules.config import ChatTemplateConfig, SourceConfig
from datamodules.stream import ShardStream
from datamodules.transforms import GenTransform
from modules.components.text_tokenizer import train_world_tokenizer
from modules.components.vision_encoders import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageTransform

RESULTS = Path(__file__).resolve().parent / "results"
MIX = (("vqa", 0.35, "understanding"), ("conv", 0.35, "understanding"), ("caption", 0.2, "understanding"),
       ("gen", 0.1, "generation"))


def bench_tokenizer():
    """A small real tokenizer (the world tokenizer trainer on the world's words and the chat template)."""
    corpus = [ChatTemplateConfig().system, "USER: ASSISTANT: What colour is the circle? How many objects are there?",
              " ".join(world.SHAPES + world.COLOURS + world.SIZES + world.POSITIONS)]
    with tempfile.TemporaryDirectory() as d:
        return train_world_tokenizer(corpus * 3, d, vocab_size=400)


def make_collator(args: argparse.Namespace) -> Collator:
    pns = [int(p) for p in args.patch_nums.split(",")]
    return Collator(bench_tokenizer(), args.num_image_tokens, sum(p * p for p in pns),
                    ImageTransform(args.image_size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "pad"), GenTransform(args.gen_resolution),
                    max_length=args.max_length, prompt_dropout=0.1, seed=0, gen_patch_nums=pns)


def loader(shard_dir: str, args: argparse.Namespace, collator: Collator, workers: int) -> DataLoader:
    sources = [SourceConfig(n, os.path.join(shard_dir, f"{n}-*.tar"), w, t) for n, w, t in MIX]
    ds = ShardStream(sources, "train", seed=0, shuffle_buffer=args.shuffle_buffer, resampled=True)
    return DataLoader(ds, batch_size=args.batch_size, num_workers=workers, collate_fn=collator,
                      prefetch_factor=4 if workers else None)


def time_loader(dl: DataLoader, batches: int, warmup: int) -> float:
    it = iter(dl)
    for _ in range(warmup):
        next(it)
    n, t0 = 0, time.perf_counter()
    for _ in range(batches):
        n += len(next(it)["key"])
    dt = time.perf_counter() - t0
    del it  # shuts the workers down
    return n / dt


class StandIn(torch.nn.Module):
    """Stand-in training step: small LM over the tokens + conv tower over the input images."""

    def __init__(self, vocab: int, d: int = 128, layers: int = 4):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        block = torch.nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = torch.nn.Linear(d, vocab)
        self.vision = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 4, 4), torch.nn.GELU(), torch.nn.Conv2d(32, d, 2, 2))

    def forward(self, b: Dict[str, Any]) -> torch.Tensor:
        ids = b["input_ids"]
        x = self.emb(ids)
        if b["pixel_values"].numel():
            v = self.vision(b["pixel_values"]).flatten(2).mean(-1)  # (N_img, d)
            x = x.index_add(0, b["image_sample_idx"], v[:, None, :].expand(-1, x.shape[1], -1) * 0.01)
        T = ids.shape[1]
        causal = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)  # True = masked, as the padding mask
        h = self.blocks(x, mask=causal, src_key_padding_mask=b["attention_mask"] == 0)
        logits = self.head(h[:, :-1])
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), b["labels"][:, 1:].reshape(-1))


def time_stand_in(batches: List[Dict[str, Any]], vocab: int, steps: int) -> float:
    torch.manual_seed(0)
    model = StandIn(vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for b in batches[:3]:  # warm-up
        model(b).backward()
        opt.step()
        opt.zero_grad()
    t0 = time.perf_counter()
    for i in range(steps):
        loss = model(batches[i % len(batches)])
        loss.backward()
        opt.step()
        opt.zero_grad()
    return steps / (time.perf_counter() - t0)


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.dataloader", description=__doc__.split("\n\n")[0])
    ap.add_argument("--step-rate", type=float, default=0.0, help="training steps/s of stage 2 (0 = time the stand-in)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", default="0,1,2")
    ap.add_argument("--batches", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--samples-per-task", type=int, default=1000, help="world shards written for the run")
    ap.add_argument("--world-size-px", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=64, help="vision encoder input")
    ap.add_argument("--num-image-tokens", type=int, default=16)
    ap.add_argument("--gen-resolution", type=int, default=64)
    ap.add_argument("--patch-nums", default="1,2,3,4,6,8")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--shuffle-buffer", type=int, default=500)
    ap.add_argument("--stand-in-steps", type=int, default=30)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.quick:
        args.batches, args.reps, args.samples_per_task, args.stand_in_steps = 10, 1, 100, 5
    # Loader timing on one torch thread: DataLoader workers use one each, and with 0 workers the
    # collator's small tensor ops only lose to OpenMP start-up on more.
    torch.set_num_threads(1)
    load_start = os.getloadavg()[0]  # other processes on the machine skew every number here

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        world.generate_split(tmp, "train", {n: args.samples_per_task for n, _, _ in MIX}, seed=0,
                             size=args.world_size_px, shard_size=250)
        gen_s = time.perf_counter() - t0
        collator = make_collator(args)
        rows = []
        for nw in [int(w) for w in args.workers.split(",")]:
            rates = [time_loader(loader(tmp, args, collator, nw), args.batches, args.warmup) for _ in range(args.reps)]
            rows.append({"workers": nw, "samples_per_s": round(statistics.median(rates), 1),
                         "runs": [round(r, 1) for r in rates]})
            print(f"workers={nw}: {rows[-1]['samples_per_s']} samples/s (runs {rows[-1]['runs']})", flush=True)
        sample_batches = []
        if not args.step_rate:
            it = iter(loader(tmp, args, collator, 0))
            sample_batches = [next(it) for _ in range(8)]
        mean_T = statistics.mean(b["input_ids"].shape[1] for b in sample_batches) if sample_batches else None

    if args.step_rate:
        demand = {"source": "--step-rate", "steps_per_s": args.step_rate}
    else:
        # The faster of 1 and 2 threads: on a loaded machine OpenMP threads can be far slower than
        # one, and the demand should be the most the loader could be asked for.
        by_threads = {}
        for nt in sorted({1, min(2, os.cpu_count() or 1)}):
            torch.set_num_threads(nt)
            by_threads[nt] = round(time_stand_in(sample_batches, len(collator.tok), args.stand_in_steps), 2)
        sps = max(by_threads.values())
        demand = {"source": "stand-in (4-layer d128 transformer LM + conv tower, fwd+bwd+AdamW; NOT the real "
                            "stage-2 model)", "steps_per_s": sps, "steps_per_s_by_threads": by_threads,
                  "mean_padded_tokens": round(mean_T, 1)}
    demand["samples_per_s"] = round(demand["steps_per_s"] * args.batch_size, 1)
    for r in rows:
        r["x_demand"] = round(r["samples_per_s"] / demand["samples_per_s"], 2)
    two = next((r for r in rows if r["workers"] == 2), None)
    result = {
        "benchmark": "dataloader",
        "git_sha": git_sha(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "loadavg_1m_start": round(load_start, 2), "loadavg_1m_end": round(os.getloadavg()[0], 2),
                    "torch": torch.__version__},
        "setup": {"mix": [{"source": n, "weight": w, "task": t} for n, w, t in MIX], "batch_size": args.batch_size,
                  "image_px": args.world_size_px, "vision_input": args.image_size,
                  "num_image_tokens": args.num_image_tokens, "patch_nums": args.patch_nums,
                  "gen_resolution": args.gen_resolution, "tokenizer": "tiny byte-level BPE (datamodules.testing)",
                  "world_generation_s": round(gen_s, 2), "world_samples": args.samples_per_task * len(MIX),
                  "batches_timed": args.batches, "reps": args.reps},
        "loader": rows,
        "demand": demand,
        "target": "2 workers >= 3x demand",
        "pass": bool(two and two["x_demand"] >= 3.0),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dataloader.json").write_text(json.dumps(result, indent=1) + "\n")
    md = ["| loader workers | samples/s (decode + collate) | x training demand |", "|---|---|---|"]
    md += [f"| {r['workers']} | {r['samples_per_s']} | {r['x_demand']} |" for r in rows]
    md += ["", f"Demand: {demand['samples_per_s']} samples/s = {demand['steps_per_s']} steps/s x batch "
               f"{args.batch_size} ({demand['source']}). Target {result['target']}: "
               f"{'met' if result['pass'] else 'NOT met'}. Machine: {result['machine']['cpus']} CPUs, 1-min load "
               f"{result['machine']['loadavg_1m_start']} -> {result['machine']['loadavg_1m_end']}, git {result['git_sha']}. "
               f"Stage-2 world mix, {args.world_size_px} px PNG, batch {args.batch_size}."]
    (out / "dataloader.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
