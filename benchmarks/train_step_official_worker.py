"""The official side of benchmarks.train_step_vs_official: a worker process in the official environment.

    <official python> benchmarks/train_step_official_worker.py --official PATH [--keep-freed-memory]

Run by ``benchmarks.train_step_vs_official`` (never by hand) with the official code's own
interpreter (transformers 4.46.1, its pin). It imports nothing of this project, only torch,
transformers, safetensors and the official ``vargpt_llava`` package from PATH (a checkout of
VARGPT-family/VARGPT). It stays alive and answers one JSON line per JSON command on stdin:

    {"cmd": "load", "dir": D, "vae": {...}, "var_depth": n}   build + load D's weights -> {"params": n}
    {"cmd": "run", "batch": F, "precision": "fp32"|"bf16"|"bf16_released", "k": k}
                                         k training steps on F's batch -> {"s": [...], "loss": x, "grad_norm": g}
    {"cmd": "quit"}

What the worker changes of the official code, and why (nothing is stubbed: every import works on CPU):
- ``build_vae_vargpt_v1`` is called with the benchmark's sizes (the official constructor hard-codes
  the 7B's: 256 px, patch_nums 1..16, depth 30); its own code, only other arguments.
- The random parts of a training forward are switched off so both sides compute the same thing:
  the VAR's ``cond_drop_rate`` -> 0 (the condition row is then always <|image_gen_start|>) and each
  block's drop path -> identity (the released 0.1 * depth / 24).
- The VQVAE (``vae_local``) is frozen (``requires_grad_(False)``), as the suite's tokenizer is and
  as VARGPT's training keeps it; everything else trains.
- Precision ``bf16`` is the suite's precision map: the step under bf16 autocast, but the VQVAE
  encodes the targets with autocast off (fp32), as the suite does (its ``img_to_idxBl`` wrapped
  on the instance). ``bf16_released`` leaves the encode under autocast (bf16 convolutions), as the
  released code runs; the comparison reports it in a column of its own.

``--keep-freed-memory``: the process-level malloc setting the suite's runs make at start
(glibc ``mallopt``: freed blocks up to 1 GiB kept for reuse; the suite's
``experiments.machine.keep_freed_memory``, written again here because this worker imports nothing
of the project); the comparison reports the official code with it in a column of its own.

One step = ``zero_grad(set_to_none=True)``, ``forward(..., labels=input_ids)`` (``bf16``: inside
``torch.autocast("cpu", torch.bfloat16)``), ``loss.backward()``; no optimizer step. Timed with
``time.process_time`` with one thread (``torch.set_num_threads(1)``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn


def build(official: str, d: str, vae: dict, var_depth: int):
    sys.path.insert(0, official)
    import vargpt_llava.modeling_vargpt_llava as M
    from safetensors.torch import load_file
    from vargpt_llava.configuration_vargpt_llava import VARGPTLlavaConfig
    from vargpt_llava.var_model.models import build_vae_vargpt_v1

    def sized(device, num_classes, depth):  # the official builder at the benchmark's sizes
        return build_vae_vargpt_v1(device, patch_nums=tuple(vae["patch_nums"]), V=vae["V"], Cvae=vae["Cvae"],
                                   ch=vae["ch"], share_quant_resi=vae["share_quant_resi"],
                                   num_classes=num_classes, depth=var_depth)

    M.build_vae_vargpt_v1 = sized
    conf = json.loads((Path(d) / "config.json").read_text())
    conf.pop("architectures", None)
    config = VARGPTLlavaConfig(**conf)
    config._attn_implementation = "sdpa"
    model = M.VARGPTLlavaForConditionalGeneration(config)
    index = json.loads((Path(d) / "model.safetensors.index.json").read_text())
    sd = {}
    for shard in sorted(set(index["weight_map"].values())):
        sd.update(load_file(str(Path(d) / shard)))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    # ln_q of the gen projectors is built but never applied; the export leaves it out
    missing = [k for k in missing if ".ln_q." not in k]
    if missing or unexpected:
        raise RuntimeError(f"official load of {d}: missing {missing[:8]}, unexpected {unexpected[:8]}")
    model.vargpt_gen.cond_drop_rate = 0.0
    for b in model.vargpt_gen.blocks:
        b.drop_path = nn.Identity()
    model.vae_local.requires_grad_(False)
    encode = model.vae_local.img_to_idxBl

    def encode_as(*args, **kw):  # on the instance: the class is untouched
        with torch.autocast("cpu", enabled=STATE["encode_autocast"]):
            return encode(*args, **kw)

    model.vae_local.img_to_idxBl = encode_as
    model.train()
    return model


# Whether the VQVAE encodes the targets under the step's autocast (bf16 convolutions: the released
# code) or with autocast off (fp32: the suite's precision map, what "bf16" compares at)
STATE = {"encode_autocast": False}
PRECISIONS = {"fp32": (False, False), "bf16": (True, False), "bf16_released": (True, True)}


def run(model, batch_file: str, precision: str, k: int):
    b = torch.load(batch_file, map_location="cpu", weights_only=True)
    bf16, STATE["encode_autocast"] = PRECISIONS[precision]
    kw = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["input_ids"],
              pixel_gen_values=b["pixel_gen_values"])
    if b.get("pixel_values") is not None:
        kw["pixel_values"] = b["pixel_values"]
    times, loss, gnorm = [], None, None
    for _ in range(k):
        t0 = time.process_time()
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(**kw)
        out.loss.backward()
        times.append(time.process_time() - t0)
        loss = float(out.loss)
    grads = [p.grad.float().pow(2).sum() for p in model.parameters() if p.grad is not None]
    gnorm = float(torch.stack(grads).sum().sqrt())
    return {"s": times, "loss": loss, "grad_norm": gnorm}


def profile_step(model, batch_file: str, precision: str):
    """Self CPU seconds of every op in one training step (after run()'s warm-up), for
    benchmarks.train_step_bound: the parent sorts them into kernel categories."""
    from torch.profiler import ProfilerActivity, profile

    run(model, batch_file, precision, 1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        res = run(model, batch_file, precision, 1)
    ops = {}
    for e in prof.key_averages():
        ops[e.key] = ops.get(e.key, 0.0) + e.self_cpu_time_total / 1e6
    return {"self_s_by_op": ops, "loss": res["loss"]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--official", required=True)
    ap.add_argument("--keep-freed-memory", action="store_true")
    args = ap.parse_args()
    if args.keep_freed_memory:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        if not (libc.mallopt(-3, 1 << 30) and libc.mallopt(-1, 1 << 30)):  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
            raise SystemExit("mallopt failed")
    torch.set_num_threads(1)
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # the official code prints; keep the reply channel clean
    model = None
    import transformers
    reply.write(json.dumps({"ready": True, "torch": torch.__version__, "transformers": transformers.__version__}) + "\n")
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["cmd"] == "quit":
                break
            if cmd["cmd"] == "load":
                model = None
                model = build(args.official, cmd["dir"], cmd["vae"], int(cmd["var_depth"]))
                attn = (model.language_model.config._attn_implementation, model.vision_tower.config._attn_implementation)
                res = {"params": sum(p.numel() for p in model.parameters()), "attn": attn}
            elif cmd["cmd"] == "run":
                res = run(model, cmd["batch"], cmd["precision"], int(cmd["k"]))
            elif cmd["cmd"] == "profile":
                res = profile_step(model, cmd["batch"], cmd["precision"])
            else:
                raise ValueError(f"unknown command {cmd['cmd']!r}")
        except Exception as e:  # report, keep serving: the parent decides
            res = {"error": f"{type(e).__name__}: {e}"}
        reply.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
