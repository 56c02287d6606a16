"""The GPU check's tables: ``markdown(report)`` renders ``benchmarks.gpu_check``'s JSON (the
per-stage step table, the sharded phase, checkpoints, sampling) as the .md written beside it."""
from __future__ import annotations

from typing import Any, Dict, List



def _f(x: Any, nd: int = 2) -> str:
    if x is None:
        return ""
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, float):
        return f"{x:.{nd}f}" if abs(x) < 1e4 else f"{x:.3g}"
    return str(x)


def _si(x: float) -> str:
    for div, unit in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.4g}{unit}"
    return f"{x:.3g}"


def _runs(per_block: Dict[str, List[int]]) -> str:
    """Forward runs per step of the recomputed blocks, by group: "llm.model.layers.* 2; var.blocks.* 2"."""
    import re

    groups: Dict[str, set] = {}
    for name, runs in per_block.items():
        groups.setdefault(re.sub(r"\.\d+(\.|$)", r".*\1", name), set()).update(runs)
    return "; ".join(f"{g} {'/'.join(map(str, sorted(v)))}" for g, v in groups.items()) or "none"


def markdown(d: Dict[str, Any]) -> str:
    m = d.get("machine", {})
    peak = d.get("peak", {})
    mem_key = "peak_allocated_gb" if d["config"]["device"] == "cuda" else "peak_rss_gb"
    lines = [f"# GPU check: {d['label']}", "",
             f"Status **{d['status']}**, {d.get('elapsed_s', 0):.0f} s of a {d['config']['max_minutes']} min budget. "
             f"Device: {peak.get('device') or d['config']['device']}; torch {m.get('torch')}, transformers "
             f"{m.get('transformers')}, lightning {m.get('lightning')}, python {m.get('python')}; git {m.get('git_sha')}; "
             f"{m.get('date_utc')}.", ""]
    mod = d.get("model")
    if mod:
        pc = mod["params"]
        parts = ", ".join(f"{k} {_si(v)}" for k, v in pc.items() if k != "total")
        lines += [f"Model: {_si(pc['total'])} parameters ({parts}); weights {mod['dtypes'].get('llm')} "
                  f"(vqvae {mod['dtypes'].get('vqvae')}), built in {mod['build_s']:.1f} s on {mod['device']}; "
                  f"{mod['num_image_tokens']} image tokens, L={mod['var_L']} at {mod['gen_resolution']} px, "
                  f"{mod['vocab_rows']} vocabulary rows.", ""]
    if peak:
        lines += [f"Peak for MFU: {_si(peak['peak_flops'])}FLOP/s ({peak['source']}); best measured "
                  f"{peak['measured_dtype']} matmul {_si(peak['measured_matmul_flops'])}FLOP/s.", ""]
    sh = d.get("sharded") or {}
    if sh:
        lines += ["| sharded (the recipe's path) | ranks | precision | layer units compute / reduce | weights | "
                  "recomputed blocks (forward runs/step) | sharded params | step s rank 0 | loss rank 0 | "
                  "peak mem GB per rank | checkpoint | resumed bit for bit |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, x in sh.items():
            r0, sd, ck = x["ranks"][0], x["sharding"], x["ranks"][0]["checkpoint"]
            mem = ", ".join(_f(r.get(f"fit_{mem_key}")) for r in x["ranks"])
            lines.append("| " + " | ".join(str(v) for v in [
                name, f"{r0['world_size']} x {r0['device'].split(':')[0]}", r0["precision"],
                f"{x['compute_dtype']} / {sd['reduce_dtype'] or 'own'}", "/".join(x["param_dtypes"]),
                _runs(x["forward_calls_per_step"]), f"{x['sharded_params']} of {x['params']}",
                " ".join(_f(t, 3) for t in r0["step_s"]), " ".join(_f(v, 3) for v in r0["losses"]), mem,
                f"{'directory' if ck['dir'] else 'file'}, {len(ck['files'])} files, {_f(ck['size_gb'], 3)} GB",
                _f(all(r["checkpoint"]["shards_equal"] for r in x["ranks"]))]) + " |")
        lines.append("")
    lines += ["| stage | trainable | batch und+gen | seq len | tokens/step (padded) | step s (median) | tokens/s | "
              "samples/s | model FLOP/step (analytic) | MFU | HFU | LLM layers checkpointed | peak mem GB | loss first→last |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in d["stages"].items():
        p, t = s["plan"], s.get("train")
        b = p["batch"]
        row = [name, _si(p["trainable_params"]), f"{b['understanding']}+{b['generation']}", b["seq_len"],
               f"{b['tokens']} ({b['tokens_padded']})"]
        if t:
            row += [f"{_f(t['step_s_median'], 3)} ({len(t['step_s'])} steps)", _f(t["tokens_per_s"], 0),
                    _f(t["samples_per_s"]), f"{_si(t['flops']['model'])} ({_si(p['analytic_flops']['total'])})",
                    f"{100 * t['mfu']:.1f}%", f"{100 * t['hfu']:.1f}%", t["llm_checkpointing_active"],
                    _f(t.get(mem_key)), f"{t['losses'][0]:.3f}→{t['losses'][-1]:.3f}"]
        else:
            row += ["not run", "", "", f"({_si(p['analytic_flops']['total'])})", "", "", "", "", ""]
        lines.append("| " + " | ".join(str(x) for x in row) + " |")
    for name, s in d["stages"].items():
        p = s["plan"]
        lines.append(f"\n{name} ({p['recipe']}): trains {', '.join(p['trainable_prefixes'])} ({p['trainable_dtype']}); "
                     f"the recipe's checkpoint ~{p['est_checkpoint_gb']:.3g} GB (trainable fp32 master weights + 2 AdamW "
                     f"moments; this check's own ~{p['this_checkpoint_gb']:.3g} GB), "
                     + (f"sharded over the recipe's {p['sharded_per_rank']['ranks']} ranks "
                        f"~{p['sharded_per_rank']['weights_gb']:.3g} GB of weights + "
                        f"~{p['sharded_per_rank']['optimizer_gb']:.3g} GB of AdamW state per rank, "
                        if "sharded_per_rank" in p else "") +
                     f"all weights + the trainable grads and moments ~{p['est_train_state_gb']:.3g} GB; "
                     f"{p['batch']['supervised_text_tokens']} "
                     f"supervised text tokens, {p['batch']['image_tokens']} image tokens, {p['batch']['gen_tokens']} "
                     f"VAR tokens per step.")
    ck = {n: s["checkpoint"] for n, s in d["stages"].items() if "checkpoint" in s}
    if ck:
        lines += ["", "| checkpoint | size GB | frozen hash s | write s | save s (+sha256) | verify s | read s | "
                  "resume s | peak mem GB fit / resume | weights equal | optimizer equal | steps |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for n, c in ck.items():
            lines.append("| " + " | ".join([n, _f(c["size_gb"], 3), _f(c["frozen_hash_s"]), _f(c["write_s"]),
                                            _f(c["save_s"]), _f(c["verify_s"]), _f(c.get("read_s")), _f(c["resume_s"]),
                                            f"{_f(c.get('fit_' + mem_key))} / {_f(c.get('resume_' + mem_key))}",
                                            _f(c["weights_equal"]), _f(c["optimizer_equal"]),
                                            f"2 → resumed at {c['resumed_at_step']} → {c['continued_to_step']}"]) + " |")
    g = d.get("generation")
    if g:
        lines += ["", "| generation | images | size | seconds | images/s | peak mem GB | sampling |",
                  "|---|---|---|---|---|---|---|",
                  f"| generate_image | {g['images']} | {'x'.join(map(str, g['shape']))} | {_f(g['seconds'])} | "
                  f"{_f(g['images_per_s'])} | {_f(g.get(mem_key))} | {g['sampling']} |"]
    for s in d.get("skipped", []):
        lines.append(f"\nSkipped {s['phase']}: {s['reason']}.")
    for e in d.get("errors", []):
        lines.append(f"\nError in {e['phase']}: `{e['error']}`")
    if d.get("error"):
        lines.append(f"\nError: `{d['error'].strip().splitlines()[-1]}`")
    lines += ["", d["notes"], ""]
    return "\n".join(lines)


NOTES = ("Step time: median of the timed steps of a plain loop (forward under bf16 autocast when on CUDA, backward, "
         "grad clip, AdamW + schedule from the stage's configure_optimizers), device synchronised, after 1 warm-up "
         "step, one fixed hand-made batch (data loading not timed). tokens/s counts non-padding tokens. FLOPs: "
         "FlopCounterMode over one more step (matmul, conv, attention); model = without gradient-checkpointing "
         "recomputation (MFU), hardware = as executed (HFU); analytic = 2 x Linear/conv weights x tokens per pass "
         "(cross-check). Checkpoint: Lightning fit of 2 steps with TrainingCheckpoint (trainable weights + AdamW "
         "state; frozen weights as a sha256), weights perturbed, a new Trainer resumed from the file: weights "
         "compared bit for bit, optimizer state by fingerprint, then one more step. Peak memory: "
         "torch.cuda.max_memory_allocated per phase (CPU: VmHWM). Random weights: speeds and sizes only, no "
         "quality.")
