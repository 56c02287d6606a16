"""Pre-tokenize generation targets with the project's VQVAE: indices stored beside the images.

    python -m experiments.pretokenize --shards 'data/world/train/gen-*.tar' --out data/world_vq/train \
        --vqvae-config vqvae.yaml --checkpoint bases/vqvae.safetensors [--key-prefix vqvae.] [--batch-size 64]

Targets go through GenTransform (deterministic resize of the shorter side + centre crop, fp32,
eval mode); the shards keep their names, order and bytes (datamodules/pretokenize.py writes them).
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import torch
from omegaconf import OmegaConf

from datamodules.pretokenize import pretokenize_shards
from modules.checkpoint import load_strict, read_state_dict
from modules.components.vqvae import VQVAEConfig, build_vqvae


def load_vqvae(config_path: str, checkpoint: str, key_prefix: str = "") -> torch.nn.Module:
    """The project's VQVAE (modules/components/vqvae.py) from a YAML of VQVAEConfig + weights.

    key_prefix: take the sub-dict under this prefix (e.g. "vqvae." from a whole-model file).
    """
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(VQVAEConfig), OmegaConf.load(config_path)))
    model = build_vqvae(cfg)
    sd = read_state_dict(checkpoint)
    if key_prefix:
        sd = {k[len(key_prefix):]: v for k, v in sd.items() if k.startswith(key_prefix)}
        if not sd:
            raise SystemExit(f"{checkpoint}: no keys start with {key_prefix!r}")
    load_strict(model, sd, source=checkpoint)
    return model.eval().float()


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.pretokenize", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", required=True, help="glob/brace pattern of input shards")
    ap.add_argument("--out", required=True)
    ap.add_argument("--vqvae-config", required=True, help="YAML of the VQVAE component config (VQVAEConfig fields)")
    ap.add_argument("--checkpoint", required=True, help=".safetensors or .pth state dict")
    ap.add_argument("--key-prefix", default="", help="sub-dict of a whole-model checkpoint, e.g. 'vqvae.'")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    vqvae = load_vqvae(args.vqvae_config, args.checkpoint, args.key_prefix).to(args.device)
    patch_nums = list(vqvae.patch_nums)
    resolution = vqvae.cfg.resolution  # the VQVAE only accepts its own input size
    # The model compares against vqvae.fingerprint(), so the shards carry exactly that.
    fp = vqvae.fingerprint()
    m = pretokenize_shards(args.shards, args.out, vqvae.img_to_idx, patch_nums, resolution, fp,
                           int(vqvae.vocab_size), args.batch_size, args.device)
    print(f"{m['num_samples']} samples -> {args.out} (VQVAE fingerprint {fp}, {resolution} px, scales {patch_nums})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
