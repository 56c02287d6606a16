"""Peak memory of loading a released-layout VARGPT checkpoint, two ways:

  streamed  modules.released.load_released: the model built on the meta device, the checkpoint
            read shard by shard, tensor by tensor, each assigned (format ``vargpt``)
  naive     the model built with random weights, every shard read into one state dict, then
            copied in (what loading with read_state_dict + load_state_dict costs)

    python -m benchmarks.vargpt_load_memory                       # synthetic checkpoint, both ways
    python -m benchmarks.vargpt_load_memory --hidden 1024 --layers 8 --shards 24
    python -m benchmarks.vargpt_load_memory --load DIR [--naive]  # one measurement, this process

The synthetic checkpoint is the tiny fixture's VARGPT (tests/fixtures/vargpt_official: its
vision tower, VAR and VQVAE) with a larger Llama (``--hidden``, ``--layers``, a 32064-token
vocabulary as the released 7B), random bf16 weights, split into ``--shards`` shards. Each way runs
in a fresh process; the peak is the resident-set high-water mark (VmHWM, reset just before the
load) minus the resident set before it. Prints one JSON line:

    {"model_bytes", "checkpoint_bytes", "shards", "streamed": {"peak_delta_bytes", "final_delta_bytes",
     "seconds"}, "naive": {...}, "streamed_peak_over_model": float}
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from datamodules.paths import REPO_ROOT
from modules.checkpoint import load_strict, read_safetensors_tensor, read_state_dict, safetensors_shapes, \
    save_sharded_safetensors
from modules.released import build_from_config, load_released, num_class_rows, released_config
from modules.vargpt_format import (DROP, export_dtype, model_config_from_vargpt, patch_nums_from, read_config,
                                   released_ids, to_vargpt, vargpt_config_json, vargpt_key_map)

FIXTURE = REPO_ROOT / "tests" / "fixtures" / "vargpt_official"


def make_checkpoint(out: Path, hidden: int = 256, layers: int = 4, vocab: int = 32064, shards: int = 12,
                    kv_heads: int = 0, seed: int = 0) -> Dict[str, int]:
    """A released-layout checkpoint with random weights in ``out`` (head width 64; ``kv_heads``
    < heads: grouped-query attention); returns its sizes."""
    hf = read_config(FIXTURE)
    heads = max(1, hidden // 64)
    hf["text_config"].update(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                             num_key_value_heads=kv_heads or heads, head_dim=64, intermediate_size=hidden * 11 // 4,
                             vocab_size=vocab)
    hf["hidden_size"], hf["vocab_size"] = hidden, vocab
    shapes = safetensors_shapes(FIXTURE)
    shapes["image_gen_projector_out.mlp.0.weight"] = (hidden, hidden)
    pn = patch_nums_from(read_safetensors_tensor(FIXTURE, "vargpt_gen.lvl_1L"), 0)
    cfg = model_config_from_vargpt(hf, shapes, pn)
    ids = released_ids(hf)
    net = build_from_config(cfg, ids)  # parameters on meta, buffers (masks, scale layout) real
    g = torch.Generator().manual_seed(seed)
    items = [(k, t, export_dtype(k, t)) for k, t in to_vargpt(net, ids["gen_start"], num_class_rows(ids))]
    total = sum(t.numel() * dt.itemsize for _, t, dt in items)

    def materialize(key: str, t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            return t
        return torch.randn(t.shape, generator=g).mul_(0.02)

    out.mkdir(parents=True, exist_ok=True)
    save_sharded_safetensors(items, out, max_shard_bytes=max(1, total // shards), materialize=materialize)
    (out / "config.json").write_text(json.dumps(vargpt_config_json(net, ids, hf), indent=2) + "\n")
    return {"checkpoint_bytes": total, "shards": len(set(json.loads((out / "model.safetensors.index.json")
                                                                   .read_text())["weight_map"].values()))}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        return True
    except OSError:
        return False


def _naive_load(d: Path):
    info = released_config(d)
    net = build_from_config(info.model_config, info.ids, meta=False)
    key_map = vargpt_key_map(info.ids["gen_start"], False)
    sd = {}
    for k, t in read_state_dict(d).items():  # every shard at once
        m = key_map(k)
        if m is not DROP:
            sd[m[0]] = m[1](t) if m[1] is not None else t
    load_strict(net, sd, source=str(d))
    return net


def measure(d: Path, naive: bool = False) -> Dict[str, Any]:
    """Load ``d`` in this process one way; resident-set deltas in bytes."""
    import gc

    warm = _naive_load(FIXTURE) if naive else load_released(FIXTURE)[0]  # imports and one-off caches first
    del warm
    gc.collect()
    if not _reset_peak():
        raise RuntimeError("needs Linux /proc/self/clear_refs to reset the peak resident set")
    before = _status_kb("VmRSS")
    t0 = time.perf_counter()
    net = _naive_load(d) if naive else load_released(d)[0]
    seconds = time.perf_counter() - t0
    gc.collect()
    peak, final = _status_kb("VmHWM"), _status_kb("VmRSS")
    model = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    return {"peak_delta_bytes": (peak - before) * 1024, "final_delta_bytes": (final - before) * 1024,
            "model_bytes": model, "seconds": round(seconds, 2)}


def run(hidden: int, layers: int, shards: int, kv_heads: int = 0, workdir: Optional[Path] = None,
        ways=("streamed", "naive")) -> Dict[str, Any]:
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        d = Path(tmp) / "ckpt"
        sizes = make_checkpoint(d, hidden=hidden, layers=layers, shards=shards, kv_heads=kv_heads)
        res: Dict[str, Any] = dict(sizes)
        for way in ways:
            cmd = [sys.executable, "-m", "benchmarks.vargpt_load_memory", "--load", str(d)] + (["--naive"] if way == "naive" else [])
            p = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
            if p.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
            res[way] = json.loads(p.stdout.strip().splitlines()[-1])
    res["model_bytes"] = res[ways[0]].pop("model_bytes")
    for way in ways[1:]:
        res[way].pop("model_bytes")
    res["streamed_peak_over_model"] = round(res["streamed"]["peak_delta_bytes"] / res["model_bytes"], 3) \
        if "streamed" in res else None
    return res


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.vargpt_load_memory", description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=0, help="0: as many as the query heads")
    ap.add_argument("--load", default="", help="measure loading this directory in this process")
    ap.add_argument("--naive", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.load:
        print(json.dumps(measure(Path(args.load), naive=args.naive)))
        return 0
    print(json.dumps(run(args.hidden, args.layers, args.shards, args.kv_heads)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
