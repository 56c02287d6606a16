"""Experiment (issue #41): torch.compile (inductor, CPU) of the KV-cached per-scale step (all
blocks + head, `var_sampling._scale_step`, `sample(compile_mode=...)`) against the eager fast path,
same weights, same batch, alternating rounds, process CPU time on 1 thread.

    python -m benchmarks.var_sampling_compile --depth 8 --modes default --reps 3

The first call of each compiled variant (the compile, wall time) is timed apart; then the fp32
and bf16 indices / images / logits of compiled vs eager with the same generator.
"""
import argparse, gc, json, os, sys, time
import torch
torch.set_num_threads(1)
from benchmarks.var_sampling import build_models
from experiments.machine import cpu_model

SET = dict(cfg=1.5, top_k=900, top_p=0.96)
ap = argparse.ArgumentParser()
ap.add_argument("--depth", type=int, default=8)
ap.add_argument("--modes", default="default")
ap.add_argument("--dtypes", default="fp32,bf16")
ap.add_argument("--reps", type=int, default=3)
ap.add_argument("--B", type=int, default=4)
ap.add_argument("--out", default="/tmp/var_sampling_compile.json")
a = ap.parse_args()
torch.manual_seed(0)
vq, var = build_models(a.depth, 256, torch.device("cpu"))
labels = torch.tensor([207, 360, 387, 974])[:a.B]
gen = lambda: torch.Generator().manual_seed(0)
def call(dt, mode, B=a.B, **kw):
    return var.sample(B, labels[:B], generator=gen(), parity=False, dtype=dt, compile_mode=mode, **SET, **kw)
res = {"cpu": cpu_model(), "torch": torch.__version__, "depth": a.depth, "B": a.B, "load_start": os.getloadavg()[0], "modes": {}}
methods = {}
for dt in a.dtypes.split(","):
    call(dt, None)  # eager warm-up
    methods[f"eager_{dt}"] = (dt, None)
    for m in a.modes.split(","):
        t0, c0 = time.perf_counter(), time.process_time()
        call(dt, m)
        res["modes"][f"{m}_{dt}_first_call_wall_s"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter(); call(dt, m); res["modes"][f"{m}_{dt}_second_call_wall_s"] = round(time.perf_counter() - t0, 2)
        methods[f"{m}_{dt}"] = (dt, m)
        # correctness vs eager, same generator
        lo_e, lo_c = [], []
        ie, img_e = call(dt, None, logits_out=lo_e)
        ic, img_c = call(dt, m, logits_out=lo_c)
        res["modes"][f"{m}_{dt}_same_indices"] = all(torch.equal(x, y) for x, y in zip(ie, ic))
        res["modes"][f"{m}_{dt}_first_diff_scale"] = next((k for k, (x, y) in enumerate(zip(ie, ic)) if not torch.equal(x, y)), None)
        res["modes"][f"{m}_{dt}_img_max_abs"] = float((img_e - img_c).abs().max())
        res["modes"][f"{m}_{dt}_logits_scale0_max_abs"] = float((lo_e[0] - lo_c[0]).abs().max())
        res["modes"][f"{m}_{dt}_logits_max_abs_all"] = max(float((x - y).abs().max()) for x, y in zip(lo_e, lo_c))
        print(json.dumps(res["modes"]), flush=True)
times = {k: [] for k in methods}; walls = {k: [] for k in methods}
order = list(methods)
for r in range(a.reps):
    for name in order[r % len(order):] + order[:r % len(order)]:
        gc.collect(); dt, m = methods[name]
        t0, w0 = time.process_time(), time.perf_counter()
        call(dt, m)
        times[name].append(round(time.process_time() - t0, 3)); walls[name].append(round(time.perf_counter() - w0, 3))
    print(r, {k: v[-1] for k, v in times.items()}, flush=True)
res["cpu_s"] = times; res["wall_s"] = walls; res["load_end"] = os.getloadavg()[0]
res["best"] = {k: min(v) for k, v in times.items()}
for k in methods:
    if not k.startswith("eager"):
        dt = methods[k][0]
        res[f"speedup_{k}"] = round(min(times[f"eager_{dt}"]) / min(times[k]), 3)
json.dump(res, open(a.out, "w"), indent=1)
print(json.dumps({k: v for k, v in res.items() if k not in ("modes",)}, indent=0))
