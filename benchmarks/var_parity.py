"""Parity of our VQVAE + VAR decoder with the official FoundationVision/VAR code.

    python -m benchmarks.var_parity tests/fixtures/var_official

DIR holds config.json (sizes and sampling settings), the weights in the official key layout and
vectors.pt (inputs and the official outputs); see that folder's README. The weights are either
weights.pt ({"vae": sd, "var": sd}, the layout the fixture was first made in) or safetensors files
named in config.json:

    "weights": {"var": {"file": "var.safetensors", "prefix": ""},
                "vae": {"file": "../vargpt_official/model-00002-of-00002.safetensors", "prefix": "vae_local."}}

(paths relative to DIR; the keys under `prefix` are taken with it stripped; a file may also be a
`*.safetensors.index.json` of a sharded checkpoint). A part in weights.pt wins over config.json.
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


def load_safetensors(path: str | Path, prefix: str = "") -> Dict[str, torch.Tensor]:
    """The tensors under `prefix` (stripped) of one .safetensors file or of a sharded checkpoint's
    *.safetensors.index.json ({"weight_map": {key: shard file}}, shards beside it)."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.name.endswith(".index.json"):
        weight_map = json.loads(path.read_text())["weight_map"]
        files = [path.parent / f for f in sorted({f for k, f in weight_map.items() if k.startswith(prefix)})]
    else:
        files = [path]
    out: Dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing")
        out.update({k[len(prefix):]: t for k, t in load_file(f).items() if k.startswith(prefix)})
    if not out:
        raise ValueError(f"no tensor under prefix {prefix!r} in {path}")
    return out


def load_weights(d: str | Path, c: Dict[str, Any]) -> Dict[str, Dict[str, torch.Tensor]]:
    """{"vae": sd, "var": sd}: from DIR/weights.pt where it holds the part, else from the file
    config.json's "weights" names for it."""
    d = Path(d)
    pt = d / "weights.pt"
    w = torch.load(pt, map_location="cpu", weights_only=True) if pt.is_file() else {}
    spec = c.get("weights", {})
    out = {}
    for part in ("vae", "var"):
        if part in w:
            out[part] = w[part]
        elif part in spec:
            out[part] = load_safetensors(d / spec[part]["file"], spec[part].get("prefix", ""))
        else:
            raise FileNotFoundError(f"no {part!r} weights for {d}: {pt} does not hold them and config.json "
                                    f"names no file for them (weights.{part}.file)")
    return out


def load_fixture(d: str | Path) -> Tuple[Dict[str, Any], MultiScaleVQVAE, VARDecoder, Dict[str, Any]]:
    d = Path(d)
    for name in ("config.json", "vectors.pt"):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{d / name} is missing: DIR must hold config.json, vectors.pt and the "
                                    "weights (weights.pt or the files config.json names)")
    c = json.loads((d / "config.json").read_text())
    weights = load_weights(d, c)
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
        print("usage: python -m benchmarks.var_parity DIR   (DIR: config.json, vectors.pt, weights; see the docstring)",
              file=sys.stderr)
        return 2
    r = run_parity(argv[0])
    print(json.dumps(r))
    return 0 if passed(r) else 1


if __name__ == "__main__":
    sys.exit(main())
