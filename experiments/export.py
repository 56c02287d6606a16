"""Write a model in the released VARGPT layout, for the official inference code and lmms-eval.

    python -m experiments.export runs/vargpt7b/finetune /out/vargpt-ft --format vargpt
    python -m experiments.export /checkpoints/VARGPT_LLaVA-v1 /out/copy --format vargpt
    python -m experiments.export /checkpoints/VARGPT-v1.1 /out/copy --format vargpt11

RUN_OR_DIR is an export directory of `experiments.run` (model.safetensors + config.yaml) or a
released-layout directory. OUT gets config.json (VARGPTLlavaConfig; a released source's own
config.json with our sizes written over it), model-0000i-of-0000n.safetensors + the index
(parameters bf16, the VQVAE fp32, as released), the tokenizer files, preprocessor_config.json and
chat_template.json. The model must have the released structure (hf_clip tower, Llama LLM, depth-2
projectors, gen projectors with `hidden_from: in`); what is not exportable is named.

``--format vargpt11``: RUN_OR_DIR is a released VARGPT-v1.1 directory or a v1.1 export of
``experiments.run`` (model.safetensors + config.yaml with ``model.family: vargpt11``); OUT gets
config.json (the release's keys) and the sharded safetensors in the released key layout.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

import torch

from experiments.infer import is_released_dir, load_exported
from modules.released import MAX_SHARD_BYTES, export_released
from modules.vargpt_format import read_config

FORMATS = ("vargpt", "vargpt11")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.export", description=__doc__.split("\n")[0])
    ap.add_argument("src", metavar="RUN_OR_DIR")
    ap.add_argument("out", metavar="OUT")
    ap.add_argument("--format", default="vargpt", choices=FORMATS)
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPES), help="parameter dtype (the VQVAE stays fp32)")
    ap.add_argument("--max-shard-bytes", type=int, default=MAX_SHARD_BYTES)
    args = ap.parse_args(argv)
    src = Path(args.src)
    if args.format == "vargpt11":
        return _export_v11(src, Path(args.out), args)
    net, _ = load_exported(src)
    source_config = read_config(src) if is_released_dir(src) else None
    index = export_released(net, args.out, source_config=source_config, max_shard_bytes=args.max_shard_bytes,
                            dtype=_DTYPES[args.dtype])
    n = len(set(json.loads(index.read_text())["weight_map"].values()))
    print(f"wrote {args.out} ({args.format}: config.json, {n} shard(s) + {index.name}, tokenizer, processor files)")
    return 0


def _export_v11(src: Path, out: Path, args) -> int:
    from modules.vargpt11_format import build_released, write_released  # lazy: Qwen2-VL classes

    if (src / "config.json").is_file():
        model, cfg = build_released(src)
    else:
        from experiments.infer_v11 import load_v11_export  # lazy: only for suite exports

        model, cfg = load_v11_export(src)
    write_released(model, cfg, out, max_shard_bytes=args.max_shard_bytes, dtype=_DTYPES[args.dtype])
    n = len(set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values()))
    print(f"wrote {out} (vargpt11: config.json, {n} shard(s) + model.safetensors.index.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
