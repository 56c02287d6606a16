"""Parity of our VQVAE + VAR decoder with the official FoundationVision/VAR code.

    python -m benchmarks.var_parity ../shared/fixtures/var_official

DIR holds config.json (sizes and sampling settings), weights.pt ({"vae": sd, "var": sd} in the
official key layout) and vectors.pt (inputs and the official outputs); see that folder's README.
Loads both state dicts strictly, runs our implementation on the inputs and prints one JSON line:

    {"indices_equal": bool, "recon_max_abs": float, "logits_max_abs": float, "loss_abs": float,
     "sample_indices_equal": bool}

Exit status 1 if any indices differ or a float exceeds 1e-4 (fp32). Runs in a few seconds on CPU.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, Tuple

import torch

from modules.components.var_decoder import VARConfig, VARDecoder, build_var
from modules.components.vqvae import MultiScaleVQVAE, VQVAEConfig, build_vqvae

TOL = 1e-4


def configs_from_official(c: Dict[str, Any]) -> Tuple[VQVAEConfig, VARConfig]:
    """Map the official constructor arguments (as in the fixture's config.json) to our configs."""
    vq = VQVAEConfig(
        vocab_size=c["V"], z_channels=c["Cvae"], ch=c["ch"], ch_mult=list(c.get("ch_mult", [1, 1, 2, 2, 4])),
        num_res_blocks=c.get("num_res_blocks", 2), using_sa=c.get("using_sa", True),
        using_mid_sa=c.get("using_mid_sa", True), dropout=c.get("dropout", 0.0), beta=c.get("beta", 0.25),
        using_znorm=c.get("using_znorm", False), quant_conv_ks=c.get("quant_conv_ks", 3),
        quant_resi=c.get("quant_resi", 0.5), share_quant_resi=c.get("share_quant_resi", 4),
        patch_nums=list(c["patch_nums"]),
    )
    var = VARConfig(
        depth=c["depth"], embed_dim=c.get("embed_dim", 0), num_heads=c.get("num_heads", 0),
        num_classes=c["num_classes"], shared_aln=c.get("shared_aln", False),
        attn_l2_norm=c.get("attn_l2_norm", True), norm_eps=c.get("norm_eps", 1e-6), cond_mode="class",
    )
    return vq, var


def load_fixture(d: str | Path) -> Tuple[Dict[str, Any], MultiScaleVQVAE, VARDecoder, Dict[str, Any]]:
    d = Path(d)
    for name in ("config.json", "weights.pt", "vectors.pt"):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{d / name} is missing: DIR must hold config.json, weights.pt and vectors.pt")
    c = json.loads((d / "config.json").read_text())
    weights = torch.load(d / "weights.pt", map_location="cpu", weights_only=True)
    vectors = torch.load(d / "vectors.pt", map_location="cpu", weights_only=True)
    vq_cfg, var_cfg = configs_from_official(c)
    vqvae = build_vqvae(vq_cfg).eval()
    vqvae.load_official_state_dict(weights["vae"])
    var = build_var(var_cfg, vqvae).eval()
    var.load_official_state_dict(weights["var"])
    return c, vqvae, var, vectors


@torch.no_grad()
def run_parity(d: str | Path) -> Dict[str, Any]:
    c, vqvae, var, v = load_fixture(d)
    idx = vqvae.img_to_idx(v["images"])
    indices_equal = len(idx) == len(v["gt_idx"]) and all(torch.equal(a, b) for a, b in zip(idx, v["gt_idx"]))
    recon = vqvae.idx_to_img(idx)
    x_in = vqvae.idx_to_var_input(idx)
    logits = var(v["label"], x_in)
    loss = var.loss(logits, v["gt_idx"])
    g = torch.Generator().manual_seed(int(c["g_seed"]))
    s_idx, _ = var.sample(len(v["label"]), v["label"], cfg=c["cfg"], top_k=c["top_k"], top_p=c["top_p"],
                          generator=g, decode=False)
    sample_equal = len(s_idx) == len(v["sample_idx"]) and all(torch.equal(a, b) for a, b in zip(s_idx, v["sample_idx"]))
    return {
        "indices_equal": bool(indices_equal),
        "recon_max_abs": float((recon - v["recon"]).abs().max()),
        "logits_max_abs": float((logits - v["logits"]).abs().max()),
        "loss_abs": float((loss - v["loss"]).abs()),
        "sample_indices_equal": bool(sample_equal),
    }


def passed(r: Dict[str, Any]) -> bool:
    return (r["indices_equal"] and r["sample_indices_equal"]
            and max(r["recon_max_abs"], r["logits_max_abs"], r["loss_abs"]) <= TOL)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m benchmarks.var_parity DIR   (DIR: config.json, weights.pt, vectors.pt)", file=sys.stderr)
        return 2
    r = run_parity(argv[0])
    print(json.dumps(r))
    return 0 if passed(r) else 1


if __name__ == "__main__":
    sys.exit(main())
