"""Speed and peak memory of next-scale sampling, against two baselines in the same process.

    python -m benchmarks.var_sampling            # depth 2/4/8 x 128/256 px, ~4 min of CPU on 1 core
    python -m benchmarks.var_sampling --quick    # depth 2 only, a smoke test
    python -m benchmarks.var_sampling --official PATH   # vs the official code: benchmarks/var_official.py
    python -m benchmarks.var_sampling --dtype-sweep     # fp32 vs bf16 by width: the BF16_MIN_WIDTH rule

Methods (same random weights, same batch, classifier-free guidance on a fused 2B batch, top-k/p):
  cached      : ours, `VARDecoder.sample`: one step per scale with a preallocated KV cache
  cached_official : cached with the official sampler (the official random stream); the other
                three share sampler="fast" (same distribution, cheaper), so ratios measure the model
  no_cache    : the same next-scale steps, but every step re-runs the whole prefix through the
                blocks under the block-causal mask (no KV cache)
  raster      : classic raster-order AR generation of the same L tokens, one token per step, with
                the same KV cache and blocks (what a VQGAN-style transformer of this size costs)

Timing: best of --reps runs; on CPU with one thread (the default) the process CPU time, which on
a shared machine does not count the time other processes held the core (it equals wall time on an
idle machine); wall time is kept in the JSON (`*_wall_s`). Images/s counts token generation only (decode=False): the VQVAE decode is the same for every
method, so it is reported apart (`decode_s_per_img`, with the benchmark's small random VQVAE; the
official ch=160 decoder costs far more on a CPU). Peak memory: on CPU the increase of the
process's peak RSS over its RSS before the batch (glibc is told to mmap blocks >= 128 KiB so
freed tensors leave the RSS; /proc/self/clear_refs resets the peak); on a GPU the increase of
torch.cuda.max_memory_allocated. Writes benchmarks/results/var_sampling.json and .md.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from benchmarks import var_official
from benchmarks.results_file import write_results
from modules.components.var_decoder import VARConfig, VARDecoder, build_var
from modules.components.var_sampling import BF16_MIN_WIDTH, SAMPLERS, KVCache, fast_bf16
from modules.components.vqvae import VQVAEConfig, build_vqvae

PATCH_NUMS = {128: [1, 2, 3, 4, 5, 6, 8], 256: [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]}  # 16x VQVAE latents
SAMPLING = dict(cfg=4.0, top_k=900, top_p=0.95)  # the official demo settings
RESULTS = Path(__file__).resolve().parent / "results"


# ------------------------------------------------------------------------------------------------
# raster-order baseline
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_raster(var: VARDecoder, B: int, label_B: torch.Tensor, cfg: float, top_k: int, top_p: float,
                  generator: Optional[torch.Generator], n_tokens: Optional[int] = None,
                  sampler: str = "official") -> torch.Tensor:
    """L tokens one at a time (2B guidance batch, KV cache); returns idx (B, L). The input of
    step t is the embedding of token t-1 (word_embed of its code vector) + position t."""
    quant = var.vqvae.quantize
    L = var.L
    n = L if n_tokens is None else min(n_tokens, L)
    cond_2B = torch.cat((label_B, torch.full_like(label_B, var.null_cond)))
    cond_BD = var.cond_embed(cond_2B)
    ada = var.block_conds(cond_BD)
    head_ada = var.head_nm.ada(cond_BD)
    lvl_pos = var.lvl_pos()
    cache = KVCache(var.depth, 2 * B, var.num_heads, max(n - 1, 1), var.C // var.num_heads, cond_BD.device, cond_BD.dtype)
    x = cond_BD.unsqueeze(1) + var.pos_start[:, :1] + lvl_pos[:, :1]
    out = torch.empty(B, L, dtype=torch.long)
    for t in range(n):
        for i, blk in enumerate(var.blocks):
            x = blk(x, ada[i], None, cache.slot(i))
        cache.pos += 1
        logits = var.logits(x, cond_BD, head_ada)
        r = cfg * t / (L - 1)
        logits = (1 + r) * logits[:B] - r * logits[B:]
        idx_B1 = SAMPLERS[sampler](logits, top_k=top_k, top_p=top_p, generator=generator)
        out[:, t] = idx_B1[:, 0]
        if t + 1 < n:
            x = (var.word_embed(quant.embedding(idx_B1)) + lvl_pos[:, t + 1:t + 2]).repeat(2, 1, 1)
    return out


# ------------------------------------------------------------------------------------------------
# measurement helpers
# ------------------------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    m = re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text())
    return int(m.group(1)) if m else 0


class PeakMemory:
    """Peak memory increase of one call, in MiB (CUDA allocator or process RSS)."""

    def __init__(self, device: torch.device, enable: bool = True):
        self.device, self.enable = device, enable
        self.rss_ok = False
        # enable=False: measure nothing (returns None) and leave the process's malloc settings alone
        if enable and device.type == "cpu" and Path("/proc/self/clear_refs").exists():
            try:
                # large blocks via mmap: a freed tensor leaves the RSS, so earlier runs do not hide
                # this run's allocations inside memory glibc kept (M_MMAP_THRESHOLD = -3)
                ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 17)
                Path("/proc/self/clear_refs").write_text("5")
                self.rss_ok = True
            except OSError:
                self.rss_ok = False

    def measure(self, fn: Callable[[], Any]) -> Optional[float]:
        if self.device.type == "cuda" and self.enable:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - base) / 2**20
        if not self.rss_ok:
            fn()
            return None
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        base = _status_kb("VmRSS")
        fn()
        return (_status_kb("VmHWM") - base) / 1024


def _timed(fn: Callable[[], Any], reps: int, device: torch.device, mem: "PeakMemory"):
    """(best wall seconds, best CPU seconds of this process, peak memory MiB of the first rep)."""
    best_wall, best_cpu, peak = float("inf"), float("inf"), None
    for r in range(reps):
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        m = mem.measure(fn)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best_wall = min(best_wall, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
        peak = m if r == 0 else peak
    return best_wall, best_cpu, peak


def build_models(depth: int, res: int, device: torch.device, vq_ch: int = 32):
    torch.manual_seed(0)
    vq = build_vqvae(VQVAEConfig(vocab_size=4096, z_channels=32, ch=vq_ch, patch_nums=PATCH_NUMS[res])).to(device).eval()
    var = build_var(VARConfig(depth=depth, num_classes=1000), vq).to(device).eval()
    return vq, var


def bench_config(depth: int, res: int, B: int, reps: int, device: torch.device, mem: PeakMemory) -> Dict[str, Any]:
    vq, var = build_models(depth, res, device)
    label = torch.arange(B, device=device) % 1000

    def gen(seed: int) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(seed)

    fast = dict(SAMPLING, sampler="fast")
    methods: Dict[str, Callable[..., Any]] = {
        # the three compared methods share one sampler (the fast one), so the ratios measure the
        # transformer work; `cached_official` is ours with the official random stream
        "cached": lambda b: var.sample(b, label[:b], generator=gen(0), decode=False, **fast),
        "no_cache": lambda b: var.sample(b, label[:b], generator=gen(0), decode=False, use_cache=False, **fast),
        "raster": lambda b, n=None: sample_raster(var, b, label[:b], generator=gen(0), n_tokens=n, **fast),
        "cached_official": lambda b: var.sample(b, label[:b], generator=gen(0), decode=False, **SAMPLING),
    }
    row: Dict[str, Any] = {"depth": depth, "res": res, "L": var.L, "C": var.C, "B": B,
                           "params_M": round(sum(p.numel() for p in var.parameters()) / 1e6, 2)}
    for name, fn in methods.items():
        fn(1) if name != "raster" else fn(1, 16)  # warm-up (kernels, allocator); raster: 16 tokens
        wall, cpu, peak = _timed(lambda: fn(B), reps, device, mem)
        # On CPU with one thread, CPU time is the work done and does not count the time other
        # processes held the core (this machine is shared); it equals wall time when idle.
        s = cpu if (device.type == "cpu" and torch.get_num_threads() == 1) else wall
        row[f"{name}_s"] = round(s, 4)
        row[f"{name}_wall_s"] = round(wall, 4)
        row[f"{name}_img_s"] = round(B / s, 3)
        row[f"{name}_peak_mib"] = None if peak is None else round(peak, 1)
    # decode cost (common to every method), with the benchmark's small random VQVAE
    idx, _ = var.sample(B, label, generator=gen(0), decode=False, **SAMPLING)
    with torch.no_grad():
        f_hat = vq.idx_to_fhat(idx)
        vq.fhat_to_img(f_hat[:1])
        clock = time.process_time if (device.type == "cpu" and torch.get_num_threads() == 1) else time.perf_counter
        t0 = clock()
        vq.fhat_to_img(f_hat)
        row["decode_s_per_img"] = round((clock() - t0) / B, 4)
    row["speedup_vs_no_cache"] = round(row["no_cache_s"] / row["cached_s"], 2)
    row["speedup_vs_raster"] = round(row["raster_s"] / row["cached_s"], 2)
    row["fast_sampler_gain"] = round(row["cached_official_s"] / row["cached_s"], 2)
    return row


# ------------------------------------------------------------------------------------------------
# fp32 vs bf16 autocast by width: the numbers behind var_sampling.BF16_MIN_WIDTH
# ------------------------------------------------------------------------------------------------
SWEEP_WIDTHS = (128, 256, 384, 512, 768)
# (name, patch_nums, V, Cvae, ch_mult, head width, batches, sampling): the embedded world's sizes
# and its eval settings, and the official 256 px sizes with the VARGPT settings
SWEEP_CASES = (
    ("64 px world", [1, 2, 3, 4, 6, 8], 512, 16, [1, 1, 2, 2], 32, (4, 16, 48), dict(cfg=3.0, top_k=100, top_p=0.0)),
    ("256 px", PATCH_NUMS[256], 4096, 32, [1, 1, 2, 2, 4], 64, (4,), dict(cfg=1.5, top_k=900, top_p=0.96)),
)
SWEEP_MIN_GAIN = 1.2  # bf16 must be this much faster at every measured batch to be worth its rounding


def dtype_sweep(reps: int, widths=SWEEP_WIDTHS, cases=SWEEP_CASES, depth: int = 2) -> Dict[str, Any]:
    """Time the fast path (parity=False) with dtype fp32 and bf16 per width and batch."""
    rows = []
    for name, pn, V, cvae, ch_mult, hd, batches, samp in cases:
        torch.manual_seed(0)
        vq = build_vqvae(VQVAEConfig(vocab_size=V, z_channels=cvae, ch=32, ch_mult=ch_mult, patch_nums=pn)).eval()
        for C in widths:
            var = build_var(VARConfig(depth=depth, embed_dim=C, num_heads=max(1, C // hd), num_classes=10), vq).eval()
            for B in batches:
                label = torch.arange(B) % 10
                s = {}
                for dt in ("fp32", "bf16"):
                    def fn(dt=dt):
                        var.sample(B, label, generator=torch.Generator().manual_seed(0), decode=False, parity=False,
                                   dtype=dt, **samp)
                    fn()  # warm-up
                    s[dt] = _timed(fn, reps, torch.device("cpu"), PeakMemory(torch.device("cpu"), enable=False))[1]
                rows.append({"case": name, "res": pn[-1] * 2 ** (len(ch_mult) - 1), "depth": depth, "width": C,
                             "heads": max(1, C // hd), "B": B, "fp32_s": round(s["fp32"], 4), "bf16_s": round(s["bf16"], 4),
                             "gain": round(s["fp32"] / s["bf16"], 3)})
                print(json.dumps(rows[-1]), flush=True)
    ok = {C: all(r["gain"] >= SWEEP_MIN_GAIN for r in rows if r["width"] == C) for C in widths}
    suggested = next((C for C in widths if all(ok[w] for w in widths if w >= C)), None)
    return {"rows": rows, "min_gain": SWEEP_MIN_GAIN, "suggested_min_width": suggested, "rule_min_width": BF16_MIN_WIDTH}


def sweep_markdown(meta: Dict[str, Any], sweep: Dict[str, Any]) -> str:
    lines = [f"fp32 time / bf16-autocast time of VAR sampling (fast path, decode=False, depth {sweep['rows'][0]['depth']}, "
             f"random weights) on {meta['cpu']}, {meta['threads']} thread, torch {meta['torch']}, best of {meta['reps']}; "
             f"load average {meta['loadavg'][0]:.2f}. > 1: bf16 faster.", "",
             "| case | width | heads | B | fp32 s | bf16 s | gain |", "|---|---|---|---|---|---|---|"]
    for r in sweep["rows"]:
        lines.append(f"| {r['case']} | {r['width']} | {r['heads']} | {r['B']} | {r['fp32_s']:.3f} | {r['bf16_s']:.3f} | {r['gain']:.2f} |")
    lines += ["", f"Smallest width from which bf16 gains >= {sweep['min_gain']}x at every measured size: "
                  f"**{sweep['suggested_min_width']}**; the rule in modules/components/var_sampling.py: "
                  f"BF16_MIN_WIDTH = {sweep['rule_min_width']} (bf16 only on hardware with fast bf16)."]
    return "\n".join(lines) + "\n"


def to_markdown(meta: Dict[str, Any], rows: List[Dict[str, Any]]) -> str:
    lines = [
        f"VAR sampling on {meta['device']} ({meta['threads']} thread(s)), torch {meta['torch']}, fp32, random weights; "
        f"cfg {SAMPLING['cfg']}, top-k {SAMPLING['top_k']}, top-p {SAMPLING['top_p']}; images/s of token generation "
        f"(decode listed apart) from {meta['timing']}, best of {meta['reps']} runs. `cached`, `no-cache` and `raster` share one sampler "
        "(sampler=\"fast\"); `cached, official sampler` reproduces the official random stream (torch.multinomial over V). "
        f"Peak = increase of peak {'GPU memory' if meta['device'] != 'cpu' else 'RSS'} during one batch.",
        "",
        "| depth | px | L | B | cached img/s | no-cache img/s | raster img/s | cached vs no-cache "
        "| cached vs raster | cached, official sampler img/s | peak MiB cached / no-cache / raster | decode s/img |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peaks = " / ".join("-" if r[f"{m}_peak_mib"] is None else f"{r[f'{m}_peak_mib']:.0f}" for m in ("cached", "no_cache", "raster"))
        lines.append(
            f"| {r['depth']} | {r['res']} | {r['L']} | {r['B']} | {r['cached_img_s']:.2f} "
            f"| {r['no_cache_img_s']:.2f} | {r['raster_img_s']:.2f} | {r['speedup_vs_no_cache']:.2f}x "
            f"| {r['speedup_vs_raster']:.2f}x | {r['cached_official_img_s']:.2f} | {peaks} | {r['decode_s_per_img']:.3f} |"
        )
    t = meta.get("targets")
    if t:
        lines += ["", f"Targets at depth 8, 256 px: cached >= 2x no-cache: **{'met' if t['vs_no_cache_met'] else 'NOT met'}** "
                      f"({t['vs_no_cache']:.2f}x); cached >= 5x raster: **{'met' if t['vs_raster_met'] else 'NOT met'}** "
                      f"({t['vs_raster']:.2f}x)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="depth 2 only")
    # 1 thread by default: with 2 OpenMP threads on a busy 2-core machine every tiny op of the
    # token-by-token baseline waits at a barrier for a descheduled thread (measured ~4 ms per op),
    # which would make the raster baseline look 10x slower than it is.
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=None, help="timed rounds (default 2; 3 with --official / --dtype-sweep)")
    ap.add_argument("--batch", type=int, default=None, help="batch size for every size (default: by resolution)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--official", metavar="PATH", help="a FoundationVision/VAR checkout: compare with it (CPU)")
    ap.add_argument("--depths", default="8,16", help="--official: depths to compare")
    ap.add_argument("--vq-ch", type=int, default=32, help="--official: VQVAE width (the decode is timed in; 160 = official)")
    ap.add_argument("--dtype-sweep", action="store_true", help="fp32 vs bf16 by model width (CPU)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.official:
        reps = args.reps or 3
        var_official.run(args.official, lambda d: build_models(d, 256, torch.device("cpu"), vq_ch=args.vq_ch),
                         [int(d) for d in args.depths.split(",")], args.batch or 4, reps, args.vq_ch, out,
                         command="python -m benchmarks.var_sampling " + " ".join(argv if argv is not None else sys.argv[1:]))
        return 0
    if args.dtype_sweep:
        reps = args.reps or 3
        meta = dict(var_official.machine_info(), reps=reps, loadavg=[round(x, 2) for x in os.getloadavg()],
                    fast_bf16=fast_bf16("cpu"), repo=var_official.repo_commit())
        sweep = dtype_sweep(reps)
        (out / "var_sampling_dtype.json").write_text(json.dumps({"meta": meta, **sweep}, indent=1) + "\n")
        md = sweep_markdown(meta, sweep)
        (out / "var_sampling_dtype.md").write_text(md)
        print(md)
        return 0
    reps = args.reps or 2
    device = torch.device(args.device)
    mem = PeakMemory(device)
    sizes = [(2, 128), (2, 256)] if args.quick else [(2, 128), (4, 128), (8, 128), (2, 256), (4, 256), (8, 256)]
    # batch: enough rows to amortise per-step overhead, small enough for a few minutes on 2 cores
    batch = {128: 8, 256: 4} if device.type == "cpu" else {128: 64, 256: 32}
    if args.batch:
        batch = {128: args.batch, 256: args.batch}
    t0 = time.time()
    rows = []
    for depth, res in sizes:
        r = bench_config(depth, res, batch[res], reps, device, mem)
        rows.append(r)
        print(json.dumps(r), flush=True)
    meta: Dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu": platform.processor() or platform.machine(), "threads": args.threads,
        "torch": torch.__version__, "reps": reps, "sampling": SAMPLING,
        "wall_s": round(time.time() - t0, 1),
        "timing": "process CPU time (1 thread)" if (device.type == "cpu" and args.threads == 1) else "wall time", "vqvae_for_decode": "random, ch 32, ch_mult (1,1,2,2,4), V 4096, Cvae 32",
        "peak_memory": "cuda max_memory_allocated increase" if device.type == "cuda" else "peak RSS increase (VmHWM after clear_refs, glibc mmap threshold 128 KiB)",
    }
    big = [r for r in rows if r["depth"] == 8 and r["res"] == 256]
    if big:
        r = big[0]
        meta["targets"] = {"vs_no_cache": r["speedup_vs_no_cache"], "vs_no_cache_met": r["speedup_vs_no_cache"] >= 2,
                           "vs_raster": r["speedup_vs_raster"], "vs_raster_met": r["speedup_vs_raster"] >= 5}
    write_results(out, "var_sampling", meta, rows, to_markdown(meta, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
