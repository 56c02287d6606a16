"""The suite's VARGPT-v1 training step against the official VARGPT-v1 modeling code, at equal weights.

    python -m benchmarks.train_step_vs_official --official PATH --official-python /work/venv-off41/bin/python

PATH is an extracted checkout of VARGPT-family/VARGPT (its ``vargpt_llava/`` package: modeling,
configuration, ``var_model/``), e.g. ``mkdir -p /tmp/v && git --git-dir=<bare mirror> archive HEAD
vargpt_llava | tar -x -C /tmp/v``; never part of this repository. The official code pins
transformers 4.46.1, so it runs in its own environment (``--official-python``: that venv's
interpreter, with the same torch) as a worker process, ``benchmarks/train_step_official_worker.py``
(its docstring lists what it changes of the official code: only sizes and the two random parts of
a training forward; nothing is stubbed). The worker stays alive and is told "run k steps" in turn
with the suite, in alternating rounds.

Per size (``SIZES``: the larger one is the issue's ~125M model, the LLM 512 wide; each size in a
process of its own, ``per_size_processes``):
1. the suite builds a VARGPT with random weights (seed 0; the released id layout: <image> 32000,
   <pad> 32001, <|image_gen_start|> 32002, ...) and writes it in the released layout in fp32
   (``modules.released.export_released``); the official worker builds its model from that
   config.json and loads the same file strictly; the suite loads it back with
   ``load_released(..., behaviour="released")``, so both hold the same fp32 weights;
2. per batch (``mixed``: understanding rows with an image + generation rows, the released
   if/elif included: no VAR inputs in the pad slots of a batch with input images;
   ``gen``: generation rows only), B 4, right-padded, and per precision (``fp32``; ``bf16``:
   ``torch.autocast("cpu", torch.bfloat16)`` on both sides, weights fp32): one untimed step each,
   then ``--rounds`` rounds of ``--k`` timed steps per side (the order rotates each round):
   official; suite = the suite's default for a long run, its blocks compiled (``trainer.compile=auto``
   in a one-CPU run of at least ``trainer.compile_min_steps`` steps: ``VARGPT.compile_blocks`` on a
   copy of the model; its untimed first step compiles, timed in wall clock, with a fresh inductor
   cache unless ``--warm-compile-cache``); suite eager (shorter runs); suite with pre-tokenized
   targets; the official code in a second worker with the suite's malloc setting (``--no-kept``
   skips it); bf16: the official code as released;
3. the losses of the last step (fp32: must agree to ``LOSS_TOL``) and the gradient norms over all
   trainable parameters are compared.

A step: ``zero_grad(set_to_none=True)``, forward with the released labels (input ids, only
<|image_gen_pad|> masked), ``loss.backward()``; no optimizer step. The VQVAE is frozen on both
sides; the VAR's condition dropout and drop path are off on both sides (both are random).
``suite_pretok`` is the suite fed the targets' VQ indices (what ``experiments.pretokenize`` caches
for training): it skips the VQ encoding of the targets, and is its own row, never the ratio.

The suite's process keeps freed memory for reuse (``experiments.machine.keep_freed_memory``), as
every suite run does at start (``trainer.keep_freed_memory``).

Timing: process CPU time per step with one thread in each process (``torch.set_num_threads(1)``;
the machine is shared, the load average is recorded); min and median over the timed steps.
Writes benchmarks/results/train_step_vs_official.json and .md.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from benchmarks.results_file import time_stats, write_results
from experiments.machine import cpu_flags, cpu_model, git_info, keep_freed_memory
from modules.released import build_from_config, export_released, load_released, released_config

WORKER = Path(__file__).with_name("train_step_official_worker.py")
FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "vargpt_official"
IDS = dict(image=32000, pad=32001, gen_start=32002, gen_end=32003, gen_pad=32004, bos=1, eos=2)
VOCAB = 32064
LOSS_TOL = 1e-5
TARGET = 1.5  # suite vs official at the same precision, larger size

# T: the longest row; each size's batch has rows of T, T-3, T-6, T-9 tokens (right-padded)
SIZES: Dict[str, Dict[str, Any]] = {
    "small": dict(llm=dict(hidden_size=256, num_layers=2, num_heads=4, intermediate_size=688),
                  vision=dict(image_size=56, width=128, depth=2, heads=2),
                  vae=dict(V=4096, Cvae=32, ch=32, share_quant_resi=4, patch_nums=[1, 2, 3, 4]),
                  var_depth=4, T=72),
    "large": dict(llm=dict(hidden_size=512, num_layers=4, num_heads=8, intermediate_size=1376),
                  vision=dict(image_size=112, width=256, depth=4, heads=4),
                  vae=dict(V=4096, Cvae=32, ch=64, share_quant_resi=4, patch_nums=[1, 2, 3, 4, 5, 6, 8]),
                  var_depth=8, T=179),
}


def suite_config(size: Dict[str, Any]):
    """Our ModelConfig at ``size``: the fixture's released config (made with the official code)
    with the sizes replaced (the official VQVAE has ch_mult 1,1,2,2,4 and 2 res blocks, fixed)."""
    cfg = released_config(FIXTURE).model_config
    v, pn = size["vae"], list(size["vae"]["patch_nums"])
    return replace(
        cfg, llm=replace(cfg.llm, num_kv_heads=size["llm"]["num_heads"], vocab_size=VOCAB, **size["llm"]),
        vision=replace(cfg.vision, mlp_ratio=4.0, **size["vision"]),
        vqvae=replace(cfg.vqvae, vocab_size=v["V"], z_channels=v["Cvae"], ch=v["ch"], ch_mult=[1, 1, 2, 2, 4],
                      share_quant_resi=v["share_quant_resi"], patch_nums=pn),
        var=replace(cfg.var, depth=size["var_depth"], embed_dim=64 * size["var_depth"], num_heads=size["var_depth"],
                    patch_nums=pn, drop_path_rate=0.0))


def make_batch(kind: str, T: int, L: int, n_img: int, img_px: int, gen_px: int, seed: int = 1) -> Dict[str, torch.Tensor]:
    """B 4 rows in the released layout. Generation row: bos, prompt, <|image_gen_start|>, L pads,
    <|image_gen_end|>, eos. Understanding row: bos, 4 tokens, n_img <image>, the rest text.
    ``mixed``: und, gen, und, gen; ``gen``: four generation rows. Lengths T, T-3, T-6, T-9."""
    g = torch.Generator().manual_seed(seed)
    rows, kinds = [], (["und", "gen"] * 2 if kind == "mixed" else ["gen"] * 4)
    for i, k in enumerate(kinds):
        n = T - 3 * i
        if k == "gen":
            p = n - L - 4
            if p < 1:
                raise ValueError(f"T={T} leaves no prompt for L={L}")
            row = [IDS["bos"]] + torch.randint(3, 32000, (p,), generator=g).tolist() + [IDS["gen_start"]] \
                + [IDS["gen_pad"]] * L + [IDS["gen_end"], IDS["eos"]]
        else:
            rest = n - 5 - n_img
            row = [IDS["bos"]] + torch.randint(3, 32000, (4,), generator=g).tolist() + [IDS["image"]] * n_img \
                + torch.randint(3, 32000, (rest,), generator=g).tolist()
        rows.append(row)
    ids = torch.full((4, T), IDS["pad"], dtype=torch.long)
    mask = torch.zeros(4, T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    n_gen, n_und = kinds.count("gen"), kinds.count("und")
    b = {"input_ids": ids, "attention_mask": mask,
         "pixel_gen_values": torch.rand(n_gen, 3, gen_px, gen_px, generator=g) * 2 - 1}
    if n_und:
        b["pixel_values"] = torch.randn(n_und, 3, img_px, img_px, generator=g)
    return b


def suite_batch(b: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    out = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "labels": b["input_ids"],
           "gen_images": b["pixel_gen_values"],
           "gen_uncond": torch.zeros(b["pixel_gen_values"].shape[0], dtype=torch.long)}
    if "pixel_values" in b:
        out["pixel_values"] = b["pixel_values"]
    return out


def suite_steps(net, batch: Dict[str, Any], precision: str, k: int) -> Dict[str, Any]:
    times, loss = [], None
    for _ in range(k):
        t0 = time.process_time()
        net.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = net(batch)
        out["loss"].backward()
        times.append(time.process_time() - t0)
        loss = float(out["loss"])
    grads = [p.grad.float().pow(2).sum() for p in net.parameters() if p.grad is not None]
    return {"s": times, "loss": loss, "grad_norm": float(torch.stack(grads).sum().sqrt())}


class Official:
    """The worker process in the official environment (one JSON line per command)."""

    def __init__(self, python: str, path: str, log: Path, keep_freed_memory: bool = False):
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH="")
        self.log = open(log, "w")
        flags = ["--keep-freed-memory"] if keep_freed_memory else []
        self.p = subprocess.Popen([python, str(WORKER), "--official", str(path), *flags], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        self.info = self._read()

    def _read(self) -> Dict[str, Any]:
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"the official worker exited (status {self.p.poll()}); see {self.log.name}")
        r = json.loads(line)
        if "error" in r:
            raise RuntimeError(f"official worker: {r['error']} (log {self.log.name})")
        return r

    def ask(self, **cmd) -> Dict[str, Any]:
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()
        return self._read()

    def close(self) -> None:
        try:
            self.p.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.p.stdin.flush()
            self.p.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.p.kill()
        self.log.close()


def compare(off: Official, net, comp, d: Path, name: str, kind: str, precision: str, rounds: int, k: int,
            off_kept: Optional[Official] = None) -> Dict[str, Any]:
    """One row. ``net``: the suite's model eager; ``comp``: a copy with compiled blocks
    (``VARGPT.compile_blocks``), what ``trainer.compile=auto`` runs for a long CPU run: the
    headline (``suite``); the eager model is ``suite_eager`` (runs shorter than
    ``trainer.compile_min_steps``). ``off_kept``: the official code in a process with the suite's
    malloc setting (its own column)."""
    size = SIZES[name]
    raw = make_batch(kind, size["T"], net.L, net.num_image_tokens, net.vision.image_size, net.vqvae.cfg.resolution)
    f = d / f"batch_{kind}.pt"
    torch.save(raw, f)
    batch = suite_batch(raw)
    pre = dict(batch, gen_indices=[t.clone() for t in net.encode_targets(batch)])
    del pre["gen_images"]
    sides = {"official": lambda n: off.ask(cmd="run", batch=str(f), precision=precision, k=n),
             "suite": lambda n: suite_steps(comp, batch, precision, n),
             "suite_eager": lambda n: suite_steps(net, batch, precision, n),
             "suite_pretok": lambda n: suite_steps(net, pre, precision, n)}
    if off_kept is not None:
        sides["official_kept"] = lambda n: off_kept.ask(cmd="run", batch=str(f), precision=precision, k=n)
    if precision == "bf16":  # the official code as released: its target encode under autocast too
        sides["official_released"] = lambda n: off.ask(cmd="run", batch=str(f), precision="bf16_released", k=n)
    first: Dict[str, Dict[str, Any]] = {}
    compile_wall = 0.0
    for s_, fn in sides.items():  # untimed: warm-up (the compiled side compiles here), and the losses
        t0 = time.perf_counter()
        first[s_] = fn(1)
        if s_ == "suite":
            compile_wall = time.perf_counter() - t0
    times: Dict[str, List[float]] = {s: [] for s in sides}
    last: Dict[str, Dict[str, Any]] = {}
    order = list(sides)
    for r in range(rounds):
        for s in order[r % len(order):] + order[:r % len(order)]:
            last[s] = sides[s](k)
            times[s] += last[s]["s"]
    row: Dict[str, Any] = {"size": name, "batch": kind, "precision": precision, "T": size["T"], "B": 4,
                           "gen_rows": int(raw["pixel_gen_values"].shape[0])}
    for s in sides:
        row[s] = dict(time_stats(times[s]), loss=last[s]["loss"], grad_norm=last[s]["grad_norm"])
    row["ratio_min"] = round(row["official"]["min_s"] / row["suite"]["min_s"], 3)
    row["ratio_median"] = round(row["official"]["median_s"] / row["suite"]["median_s"], 3)
    row["ratio_eager_min"] = round(row["official"]["min_s"] / row["suite_eager"]["min_s"], 3)
    row["ratio_pretok_min"] = round(row["official"]["min_s"] / row["suite_pretok"]["min_s"], 3)
    if "official_kept" in row:
        row["ratio_kept_min"] = round(row["official_kept"]["min_s"] / row["suite"]["min_s"], 3)
    # the compiled side's first step (wall clock: the compilation runs in worker processes too) and
    # how many steps of the saving per step it takes to pay it back
    row["compile_first_step_wall_s"] = round(compile_wall, 1)
    saved = row["suite_eager"]["min_s"] - row["suite"]["min_s"]
    row["compile_payback_steps"] = round(compile_wall / saved) if saved > 0 else None
    row["loss_abs_diff_compiled_vs_eager"] = abs(first["suite"]["loss"] - first["suite_eager"]["loss"])
    if "official_released" in row:
        row["ratio_released_min"] = round(row["official_released"]["min_s"] / row["suite"]["min_s"], 3)
        row["loss_abs_diff_released"] = abs(first["official_released"]["loss"] - first["suite"]["loss"])
    if precision == "bf16":
        row["target_indices_changed_by_bf16_encode"] = bf16_encode_changes(net, batch)
    row["loss_abs_diff"] = abs(first["official"]["loss"] - first["suite"]["loss"])
    row["loss_abs_diff_pretok"] = abs(first["official"]["loss"] - first["suite_pretok"]["loss"])
    row["grad_norm_rel_diff"] = abs(first["official"]["grad_norm"] - first["suite"]["grad_norm"]) / first["official"]["grad_norm"]
    row["loss_equal"] = row["loss_abs_diff"] <= LOSS_TOL if precision == "fp32" else None
    print(json.dumps(row), flush=True)
    return row


def bf16_encode_changes(net, batch: Dict[str, Any]) -> float:
    """Share of the batch's target indices that change when the VQVAE encoder runs under bf16
    autocast (the released code's step) instead of fp32 (the suite's): what the precision map buys."""
    vq, img = net.vqvae, batch["gen_images"].float()
    with torch.no_grad():
        ref = vq.img_to_idx(img)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            f = vq.quant_conv(vq.encoder(img))
        low = vq.quantize.f_to_idx(f.float(), to_fhat=False)
    n = sum(t.numel() for t in ref)
    return round(sum(int((a != b).sum()) for a, b in zip(ref, low)) / n, 4)


def build_size(name: str, d: Path):
    """The suite's model at ``name`` written to ``d`` in the released layout (fp32), loaded back."""
    torch.manual_seed(0)
    net = build_from_config(suite_config(SIZES[name]), IDS, meta=False)
    export_released(net, d, dtype=torch.float32)
    del net
    net, _ = load_released(d, behaviour="released", train=True)
    net.cfg.cond_drop_rate = 0.0  # random; off on both sides
    return net


def to_markdown(meta: Dict[str, Any], rows: List[Dict[str, Any]]) -> str:
    m = meta
    lines = [
        f"Suite VARGPT-v1 training step vs the official VARGPT-v1 modeling code (VARGPT-family/VARGPT "
        f"{m['official']['commit'][:7]}, transformers {m['official']['transformers']} in its own venv; suite "
        f"transformers {m['transformers']}), same fp32 weights, same batch, B 4 right-padded, forward + backward "
        f"(no optimizer step), the released labels; {m['cpu_model']}, 1 thread per process, torch {m['torch']}; "
        f"process CPU seconds per step, min (median) of {m['rounds']} alternating rounds x {m['k']} steps. Load "
        f"average {m['loadavg_start'][0]:.2f} at the start, {m['loadavg_end'][0]:.2f} at the end. Suite commit "
        f"{m['commit'][:10]}{' (+ uncommitted changes)' if m['dirty'] == 'true' else ''}.",
        "",
        "Sizes: " + "; ".join(f"**{n}** {s}" for n, s in m["size_notes"].items()) + ".",
        "",
        "Precision: fp32 everywhere, or bf16 autocast around the step with the suite's precision map on both sides "
        "(the VQVAE encodes the targets in fp32, as the suite does; the official code's encode is run with autocast "
        "off). The official code as released encodes under autocast (bf16 convolutions): its own column, a dtype "
        "change, not the headline.",
        "",
        "The suite's column is its default for a long run: `trainer.compile=auto` compiles the LLM decoder layers and "
        "VAR blocks (`VARGPT.compile_blocks`, torch.compile, dynamic shapes) in a one-CPU run of at least "
        "`trainer.compile_min_steps` (1000) steps; shorter runs stay eager (the eager column). The compiled side's first "
        f"step compiles ({m.get('compile_cache', 'cold')} inductor cache): its wall time and the steps of the per-step "
        "saving that pay it back are in the compile column; a row after the first reuses the graphs compiled before "
        "it (dynamic shapes) and compiles only what its precision or batch adds, so the first row's is the cold start. "
        "The suite's process keeps freed memory for reuse "
        "(`trainer.keep_freed_memory`, a glibc malloc setting every suite run makes); the official code with the same "
        "setting is its own column.",
        "",
        "| size | batch | precision | official s | suite s (default, compiled) | **ratio (min)** | ratio (median) "
        "| suite eager s | official, same malloc setting s | suite, pre-tokenized targets s "
        "| official as released (bf16 encode) s | compile: first step s wall (pays back after) | loss official "
        "| loss abs diff | compiled - eager loss | grad-norm rel diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(r, side, ratio_key):
        v = r.get(side)
        return f"{v['min_s']:.3f} ({r[ratio_key]:.2f}x)" if v else "-"

    for r in rows:
        o, s = r["official"], r["suite"]
        pay = r.get("compile_payback_steps")
        comp = f"{r['compile_first_step_wall_s']:.1f} ({pay} steps)" if pay is not None else \
            f"{r['compile_first_step_wall_s']:.1f} (no saving)"
        lines.append(
            f"| {r['size']} | {r['batch']} ({r['gen_rows']} gen rows) | {r['precision']} "
            f"| {o['min_s']:.3f} ({o['median_s']:.3f}) | {s['min_s']:.3f} ({s['median_s']:.3f}) "
            f"| **{r['ratio_min']:.2f}x** | {r['ratio_median']:.2f}x | {cell(r, 'suite_eager', 'ratio_eager_min')} "
            f"| {cell(r, 'official_kept', 'ratio_kept_min')} | {cell(r, 'suite_pretok', 'ratio_pretok_min')} "
            f"| {cell(r, 'official_released', 'ratio_released_min')} | {comp} | {o['loss']:.6f} "
            f"| {r['loss_abs_diff']:.1e} | {r['loss_abs_diff_compiled_vs_eager']:.1e} | {r['grad_norm_rel_diff']:.1e} |")
    changed = [r["target_indices_changed_by_bf16_encode"] for r in rows if "target_indices_changed_by_bf16_encode" in r]
    big = [r for r in rows if r["size"] == "large"]
    if big:
        worst = {p: min((r["ratio_min"] for r in big if r["precision"] == p), default=None) for p in ("fp32", "bf16")}
        eager = {p: min((r["ratio_eager_min"] for r in big if r["precision"] == p), default=None) for p in ("fp32", "bf16")}
        ok = lambda p: worst[p] is not None and worst[p] >= TARGET  # noqa: E731
        fp32_ok = all(r["loss_equal"] for r in rows if r["precision"] == "fp32")
        lines += ["", f"Target: the suite's default >= {TARGET}x the official code at the same precision at the larger "
                      f"size. In bf16 autocast, the precision of the 7B recipes (`experiments/real/`: "
                      f"trainer.precision bf16-mixed): **{'met' if ok('bf16') else 'NOT met'}** (lowest ratio "
                      f"{worst['bf16']}). In fp32 (the world recipes' precision): **{'met' if ok('fp32') else 'NOT met'}** "
                      f"(lowest ratio {worst['fp32']}{fp32_ceiling()}). Eager, for runs under trainer.compile_min_steps: "
                      f"fp32 {eager['fp32']}, bf16 "
                      f"{eager['bf16']}. fp32 losses equal to {LOSS_TOL:g}: **{'yes' if fp32_ok else 'NO'}**. bf16 "
                      f"losses differ by rounding (each side rounds differently)."]
    if changed:
        lines += ["", f"A bf16 encode moves {min(changed):.1%} to {max(changed):.1%} of the batches' target indices "
                      f"against the fp32 encode (random VQVAE weights and images here; `target_indices_changed_by_bf16_encode` "
                      f"in the JSON): the fp32 encode is the suite's choice for its targets, not free."]
    return "\n".join(lines) + "\n"


def fp32_ceiling(results: Path = Path(__file__).parent / "results") -> str:
    """The fp32 rows' ceiling for any equal-work step (benchmarks.train_step_bound's results), as a clause."""
    f = results / "train_step_bound.json"
    if not f.is_file():
        return ""
    c = [r["ceiling_same_kernels"] for r in json.loads(f.read_text())["results"] if r["precision"] == "fp32"]
    return f"; the ceiling for any equal-work step in fp32 is {min(c):.2f}-{max(c):.2f}x (train_step_bound)" if c else ""


def size_note(net) -> str:
    n = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    c = net.llm.config
    return (f"{n(net) / 1e6:.0f}M parameters ({n(net) - n(net.vqvae):,} trained, VQVAE {n(net.vqvae) / 1e6:.1f}M frozen): "
            f"Llama {c.num_hidden_layers} x {c.hidden_size} (vocab {VOCAB}), CLIP {net.vision.tower.config.num_hidden_layers} x "
            f"{net.vision.tower.config.hidden_size} at {net.vision.image_size} px ({net.num_image_tokens} tokens), VAR depth "
            f"{net.var.depth} (C {net.var.C}) at {net.vqvae.cfg.resolution} px (L {net.L}), VQVAE ch {net.vqvae.cfg.ch}, "
            f"T {SIZES[[k for k in SIZES if SIZES[k]['var_depth'] == net.var.depth][0]]['T']}")


def per_size_processes(argv: List[str], sizes: List[str], out: Path, name: str) -> int:
    """Each size in a process of its own, merged into one results file: a size measured after
    another in the same process ran on its heap and its compiled graphs (dynamic shapes are reused
    across sizes), which moved the larger size's compiled step by up to 8 % (0.778 s alone vs
    0.840 s after the smaller size, mixed bf16)."""
    keep, skip = [], False
    for a in argv:  # this command's arguments without --sizes/--out/--name (each part gets its own)
        if skip:
            skip = False
        elif a in ("--sizes", "--out", "--name"):
            skip = True
        elif not a.startswith(("--sizes=", "--out=", "--name=")):
            keep.append(a)
    parts, rc = [], 0
    with tempfile.TemporaryDirectory(prefix="train_step_parts_") as tmp:
        for size in sizes:
            r = subprocess.run([sys.executable, "-m", "benchmarks.train_step_vs_official", *keep, "--sizes", size,
                                "--out", tmp, "--name", size])
            rc = rc or r.returncode
            f = Path(tmp) / f"{size}.json"
            if not f.is_file():
                raise SystemExit(f"the {size} part wrote no results (exit {r.returncode}); see its output above")
            parts.append(json.loads(f.read_text()))
    meta = dict(parts[0]["meta"])
    meta["command"] = "python -m benchmarks.train_step_vs_official " + " ".join(argv)
    meta["size_notes"] = {k: v for p in parts for k, v in p["meta"]["size_notes"].items()}
    meta["loadavg_end"] = parts[-1]["meta"]["loadavg_end"]
    meta["wall_s"] = round(sum(p["meta"]["wall_s"] for p in parts), 1)
    meta["processes"] = "one per size"
    rows = [r for p in parts for r in p["results"]]
    write_results(out, name, meta, rows, to_markdown(meta, rows))
    return rc


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.train_step_vs_official", description=__doc__.split("\n")[0])
    ap.add_argument("--official", required=True, help="VARGPT-family/VARGPT checkout (has vargpt_llava/)")
    ap.add_argument("--official-python", required=True, help="interpreter of the official env (transformers 4.46.1)")
    ap.add_argument("--sizes", default="small,large")
    ap.add_argument("--batches", default="mixed,gen")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--k", type=int, default=3, help="timed steps per side per round")
    ap.add_argument("--official-commit", default="", help="its commit when PATH has no .git (a git archive)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--name", default="train_step_vs_official")
    ap.add_argument("--warm-compile-cache", action="store_true",
                    help="reuse the machine's inductor cache (default: a fresh one, so compile times are a cold start's)")
    ap.add_argument("--no-kept", action="store_true", help="skip the official code with the suite's malloc setting")
    args = ap.parse_args(argv)
    if not (Path(args.official) / "vargpt_llava" / "modeling_vargpt_llava.py").is_file():
        raise SystemExit(f"--official {args.official}: no vargpt_llava/modeling_vargpt_llava.py (a VARGPT-family/VARGPT checkout)")
    sizes = args.sizes.split(",")
    if len(sizes) > 1:
        return per_size_processes(argv if argv is not None else sys.argv[1:], sizes, Path(args.out), args.name)
    torch.set_num_threads(1)
    kept = keep_freed_memory()  # the suite's runs do this at start (trainer.keep_freed_memory)
    import transformers

    repo = git_info()
    ocommit = ""
    if (Path(args.official) / ".git").exists():
        ocommit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=args.official, capture_output=True, text=True).stdout.strip()
    meta: Dict[str, Any] = {
        "command": "python -m benchmarks.train_step_vs_official " + " ".join(argv if argv is not None else sys.argv[1:]),
        "commit": repo["git_commit"], "dirty": repo["git_dirty"], "cpu_model": cpu_model(), "cpu_flags": cpu_flags(),
        "torch": torch.__version__, "transformers": transformers.__version__, "threads": 1,
        "official": {"path": str(args.official), "commit": ocommit or args.official_commit or "unknown"},
        "suite_keep_freed_memory": kept, "rounds": args.rounds, "k": args.k, "loss_tol": LOSS_TOL, "timing": "process CPU time, 1 thread per process",
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()], "size_notes": {}}
    rows: List[Dict[str, Any]] = []
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="train_step_vs_official_") as tmp:
        if not args.warm_compile_cache:  # the compile times are a cold start's, as a fresh machine's first run
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / "inductor")
        meta["compile_cache"] = "warm (the machine's)" if args.warm_compile_cache else "cold (a fresh directory)"
        off = Official(args.official_python, args.official, Path(tmp) / "official.log")
        off_kept = None if args.no_kept else Official(args.official_python, args.official, Path(tmp) / "official_kept.log",
                                                      keep_freed_memory=True)
        meta["official"].update(torch=off.info["torch"], transformers=off.info["transformers"])
        try:
            for name in args.sizes.split(","):
                d = Path(tmp) / name
                net = build_size(name, d)
                comp = copy.deepcopy(net)
                comp.compile_blocks()
                meta["size_notes"][name] = size_note(net)
                for o in (off, off_kept):
                    if o is not None:
                        loaded = o.ask(cmd="load", dir=str(d), vae=SIZES[name]["vae"], var_depth=SIZES[name]["var_depth"])
                meta.setdefault("official_attn", loaded["attn"])
                for kind in args.batches.split(","):
                    for prec in args.precisions.split(","):
                        rows.append(compare(off, net, comp, d, name, kind, prec, args.rounds, args.k, off_kept))
                del net, comp
        finally:
            off.close()
            if off_kept is not None:
                off_kept.close()
    meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    meta["wall_s"] = round(time.time() - t0, 1)
    write_results(Path(args.out), args.name, meta, rows, to_markdown(meta, rows))
    return 0 if all(r["loss_equal"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
