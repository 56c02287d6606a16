"""How fast can any sampler be against the official VAR code at equal precision and equal work?

    python -m benchmarks.var_official_bound --official PATH [--depths 8,16]

Issue #41 asks for the suite's sampler at >= 1.5x the official FoundationVision/VAR sampler at the
same precision. Both run the same linear layers on the same shapes (blocks, head: the suite
computes what the official code computes, `benchmarks/var_official.py` checks the draws), and on
a CPU those GEMMs go to the same library kernel. So the official call's own GEMM time is a floor
under any equal-work sampler, and `official time / official GEMM time` is the largest ratio one
can reach by removing everything else (attention, GELU, sampling, copies, the decode).

This profiles one official call per depth and precision (torch.profiler, self CPU time by op,
1 thread, after a warm-up call), adds up the linear-layer GEMMs (aten::addmm / mm / bmm outside
attention are not separable by name, so every addmm / mm counts, and the attention's bmm is
reported apart as `attention`), and writes that ceiling beside how far the GEMMs are from the
core's peak: a large square GEMM of the same dtype timed alone on the same core
(`peak_gflops`), against the FLOP rate of the call's GEMMs (profiler FLOP counts). When the GEMMs
already run near that peak, no library choice makes them much faster at the same precision.

Writes benchmarks/results/var_official_bound.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import var_official
from benchmarks.results_file import write_results
from benchmarks.var_sampling import build_models

RESULTS = Path(__file__).resolve().parent / "results"
GEMM = ("aten::addmm", "aten::mm")
ATTENTION = ("aten::bmm", "aten::baddbmm", "aten::_softmax", "aten::softmax", "aten::_scaled_dot_product_flash_attention_for_cpu")
CATEGORIES = {"gemm": GEMM, "attention": ATTENTION, "gelu": ("aten::gelu",),
              "convolution": ("aten::mkldnn_convolution", "aten::_convolution", "aten::convolution", "aten::_slow_conv2d_forward")}


def by_category(self_s_by_op: Dict[str, float], categories: Dict[str, tuple] = CATEGORIES) -> Dict[str, float]:
    """Self CPU seconds per kernel category (ops not named in any: "other")."""
    cats = {c: round(sum(self_s_by_op.get(k, 0.0) for k in keys), 4) for c, keys in categories.items()}
    cats["other"] = round(sum(self_s_by_op.values()) - sum(cats.values()), 4)
    return cats


def peak_gflops(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """The core's GEMM rate for ``dtype``: best of ``reps`` n x n x n products (one thread)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def profile_call(fn, C: int = 0) -> Dict[str, Any]:
    """Self CPU seconds by category and the GEMMs' FLOPs of one call of ``fn`` (after a warm-up).
    ``C``: the model width, to time apart the AdaLN projections (addmm on a C x 6C or C x 2C
    weight), which the official code recomputes at every scale and the suite computes once: they
    are not work the suite repeats, so the ceiling leaves them out of the floor."""
    fn()
    t0 = time.process_time()
    with profile(activities=[ProfilerActivity.CPU], with_flops=True, record_shapes=bool(C)) as prof:
        fn()
    wall_cpu = time.process_time() - t0
    adaln = 0.0
    if C:
        for e in prof.key_averages(group_by_input_shape=True):
            shapes = e.input_shapes or []
            if e.key == "aten::addmm" and len(shapes) >= 3 and list(shapes[2]) in ([C, 6 * C], [C, 2 * C]):
                adaln += e.self_cpu_time_total / 1e6
    by_op: Dict[str, float] = defaultdict(float)
    flops, all_flops = 0, defaultdict(int)
    for e in prof.key_averages():
        by_op[e.key] += e.self_cpu_time_total / 1e6
        if e.flops:  # the profiler counts FLOPs on the op the call names (conv2d, addmm, mm, bmm), once
            all_flops[e.key] += e.flops
        if e.key in GEMM:
            flops += e.flops or 0
    total = sum(by_op.values())
    cats = by_category(by_op)
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:8]
    return {"profiled_self_s": round(total, 4), "process_cpu_s_under_profiler": round(wall_cpu, 4), "by_category_s": cats,
            "adaln_gemm_s": round(adaln, 4),
            "gemm_gflop": round(flops / 1e9, 3), "counted_gflop": round(sum(all_flops.values()) / 1e9, 3),
            "counted_gflop_by_op": {k: round(v / 1e9, 3) for k, v in all_flops.items()},
            "top_ops_s": {k: round(v, 4) for k, v in top}}


def bound_rows(off: Any, depths: List[int], B: int, res: int = 256) -> List[Dict[str, Any]]:
    """``off``: the official code, ``var_official.load_official(PATH)``."""
    labels = torch.tensor(var_official.LABELS[:B])
    rows = []
    for d in depths:
        vq, var = build_models(d, res, torch.device("cpu"))
        ovq, ovar = var_official.build_official(off, vq, var)
        var_official.official_precision_map(ovar, ovq)
        call = lambda: ovar.autoregressive_infer_cfg(B, labels, g_seed=var_official.SEED, **var_official.SETTINGS)  # noqa: E731

        def call_bf16():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return call()

        for precision, fn, dtype in (("fp32", call, torch.float32), ("bf16 autocast", call_bf16, torch.bfloat16)):
            with torch.no_grad():
                p = profile_call(fn, var.C)
            gemm = p["by_category_s"]["gemm"]
            peak = peak_gflops(dtype)
            rate = p["gemm_gflop"] / gemm if gemm else float("nan")
            rows.append({"depth": d, "C": var.C, "B": B, "res": res, "precision": precision, **p,
                         "gemm_share": round(gemm / p["profiled_self_s"], 3),
                         "ceiling_ratio": round(p["profiled_self_s"] / gemm, 3),
                         # the suite calls these same aten kernels (addmm, the SDPA flash kernel,
                         # gelu) on the same shapes: their official time is a floor for it too
                         "ceiling_same_kernels": round(p["profiled_self_s"] / (sum(
                             p["by_category_s"][k] for k in ("gemm", "attention", "gelu")) - p["adaln_gemm_s"]), 3),
                         "gemm_gflops": round(rate, 1), "peak_gflops": round(peak, 1),
                         "gemm_of_peak": round(rate / peak, 3),
                         # every counted FLOP (GEMMs, attention products, decode convolutions) at
                         # the core's peak: a floor no equal-work code goes under (fp32 parts
                         # of a bf16 row counted at the bf16 peak: the ceiling only loosens)
                         "ceiling_at_peak": round(p["profiled_self_s"] / (p["counted_gflop"] / peak), 2)})
            print(json.dumps(rows[-1]), flush=True)
        del vq, var, ovq, ovar
    return rows


def to_markdown(meta: Dict[str, Any], rows: List[Dict[str, Any]]) -> str:
    m = meta["machine"]
    out = [f"The ceiling on any equal-work sampler against the official VAR code ({meta['official']['commit']}), "
           f"{m['cpu']}, 1 thread, torch {m['torch']}, B {rows[0]['B'] if rows else '?'}, {rows[0]['res'] if rows else '?'} px, cfg "
           f"{meta['settings']['cfg']}, top-k {meta['settings']['top_k']}, top-p {meta['settings']['top_p']}; one "
           f"profiled official call per row after a warm-up (self CPU time by op). Load average {meta['loadavg_start'][0]} "
           f"at the start, {meta['loadavg_end'][0]} at the end. Suite commit {str(meta['repo']['commit'])[:10]}. "
           f"`{meta['command']}`.", "",
           "| depth | C | precision | official call s (profiled) | GEMM s (of which per-scale AdaLN) | attention s | GELU s | conv s | other s "
           "| GEMM share | ceiling: call / GEMM | **ceiling: call / (GEMM + attention + GELU)** | GEMM GFLOP/s | peak GFLOP/s "
           "| GEMM of peak | ceiling at peak (all counted FLOPs) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["by_category_s"]
        out.append(f"| {r['depth']} | {r['C']} | {r['precision']} | {r['profiled_self_s']:.2f} | {c['gemm']:.2f} "
                   f"({r['adaln_gemm_s']:.2f}) | "
                   f"{c['attention']:.2f} | {c['gelu']:.2f} | {c['convolution']:.2f} | {c['other']:.2f} | "
                   f"{r['gemm_share']:.0%} | {r['ceiling_ratio']:.2f}x | **{r['ceiling_same_kernels']:.2f}x** | {r['gemm_gflops']:.0f} | "
                   f"{r['peak_gflops']:.0f} | {r['gemm_of_peak']:.0%} | {r['ceiling_at_peak']:.2f}x |")
    out += ["", "Reading: a ceiling is what a sampler would reach that ran only those kernels, at the official "
            "call's speed, and nothing else (no sampling, copies, normalisation, decode). The suite calls the same "
            "aten kernels for the linear layers (addmm), the attention (the SDPA flash kernel) and GELU on the same "
            "shapes (less the AdaLN projections the official code recomputes at every scale and the suite once), "
            "so the bold column bounds any equal-work suite sampler that uses PyTorch's kernels; under 1.5x "
            "the issue's target cannot be met by removing overhead. GEMM of peak compares the call's GEMM FLOP "
            "rate with a 2048^3 product of the same dtype alone on the same core. The last column is the "
            "hard ceiling: every FLOP the profiler counts (GEMMs, attention products, the decode's "
            "convolutions) at that peak rate and nothing else.", ""]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official", required=True, metavar="PATH", help="a FoundationVision/VAR checkout")
    ap.add_argument("--depths", default="8,16")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--res", type=int, default=256, help="image side (the official comparison's 256)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    off = var_official.load_official(args.official)
    meta: Dict[str, Any] = {"machine": var_official.machine_info(), "repo": var_official.repo_commit(),
                            "official": {"path": off.path, "commit": off.commit}, "settings": var_official.SETTINGS,
                            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
                            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                            "command": "python -m benchmarks.var_official_bound --official PATH"
                                       + (f" --depths {args.depths}" if args.depths != "8,16" else "")}
    rows = bound_rows(off, [int(x) for x in args.depths.split(",")], args.batch, args.res)
    meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    write_results(Path(args.out), "var_official_bound", meta, rows, to_markdown(meta, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
