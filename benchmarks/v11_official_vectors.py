"""Make a VARGPT-v1.1 parity directory with the OFFICIAL code (checkpoint + vectors.pt + meta.json).

Runs in a separate environment that has the official pins (transformers 4.46.1), never the suite's,
from the repository root; docs/v11.md ("A second official directory") has the commands. Then
``python -m benchmarks.vargpt11_parity OUT`` with the suite. The official code is imported from the
``--official`` checkout (``vargpt_qwen_v1_1/``, ``patching_utils/``); nothing of it is copied here. What
differs from running it as shipped (the same list as tests/fixtures/vargpt_v11_official/README.md):
a CPU ``flash_attn`` stub written below (bf16 q/kv in, fp32 math per ``cu_seqlens`` segment, bf16 out);
``TORCHDYNAMO_DISABLE=1``; size wrappers around ``load_infinity_train`` / ``AutoEncoder`` /
``load_visual_tokenizer``; parameters overwritten with bf16-representable draws; every DropPath at 0;
``g_seed`` of the image sampler fixed; a logits processor forcing ``<|image_gen_start|>`` at the first
generated step of the image prompts. ``--reuse DIR`` takes the weights and every input from an existing
directory instead of drawing them, recomputes the outputs and prints the largest difference per key:
that is how this script was checked against the vendored fixture.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

from benchmarks.v11_official_sections import (Draw, pad_right, sec_infer, sec_tokenizer, sec_train, sec_und,
                                             sec_und_generate, sec_und_labels)

FLASH_STUB = '''
import torch
def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                                    dropout_p=0.0, softmax_scale=None, causal=False, **kw):
    # q: (Nq, H, c), kv: (Nk, 2, H, c), both as the caller gives them (bf16); fp32 math; caller's dtype out
    assert not causal and dropout_p == 0
    CALLS.append([str(tuple(q.shape)), str(tuple(kv.shape)), str(cu_seqlens_q.tolist()), str(cu_seqlens_k.tolist())])
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    out = torch.empty(q.shape, dtype=torch.float32)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(cq) - 1):
        qs = q[cq[i]:cq[i + 1]].float().transpose(0, 1)              # H, lq, c
        ks, vs = kv[ck[i]:ck[i + 1]].float().unbind(1)               # lk, H, c
        att = (qs @ ks.permute(1, 2, 0)).mul(scale).softmax(-1)      # H, lq, lk
        out[cq[i]:cq[i + 1]] = (att @ vs.transpose(0, 1)).transpose(0, 1)
    return out.to(q.dtype)
CALLS = []
'''


def install_stubs(official: Path) -> None:
    d = Path(tempfile.mkdtemp(prefix="v11off_stubs_"))
    (d / "flash_attn").mkdir()
    (d / "flash_attn" / "__init__.py").write_text(FLASH_STUB)
    sys.path[:0] = [str(d), str(official)]


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--official", required=True, help="extracted VARGPT-v1.1 checkout (has vargpt_qwen_v1_1/)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--reuse", default="", help="take weights + inputs from this directory; report diffs")
    a = ap.add_argument
    a("--hidden", type=int, default=64); a("--inter", type=int, default=0); a("--layers", type=int, default=2)
    a("--heads", type=int, default=4); a("--kv-heads", type=int, default=2)
    a("--mrope", type=int, nargs=3, default=[2, 3, 3])
    a("--vit-depth", type=int, default=2); a("--vit-dim", type=int, default=32); a("--vit-heads", type=int, default=2)
    a("--vit-mlp", type=int, default=2)
    a("--inf-dim", type=int, default=128); a("--inf-heads", type=int, default=2); a("--inf-depth", type=int, default=4)
    a("--inf-chunks", type=int, default=2)
    a("--vae-ch", type=int, default=24); a("--vae-res", type=int, default=1); a("--bits", type=int, default=32)
    a("--official-commit", default="8c67c263497a4f303b3e9668b49217d70bd47a44")
    a("--pn", default="0.06M"); a("--id-offset", type=int, default=200); a("--vocab-extra", type=int, default=56)
    return ap.parse_args(argv)


# ---------------------------------------------------------------- building the tiny official model
def ids_for(off: int) -> dict:
    # the real layout shifted: tiny id = off + (real id - 151643)
    names = ["endoftext", "im_start", "im_end"] + [None] * 6 + ["vision_start", "vision_end", "vision_pad",
                                                              "image_pad", "video_pad", "gen_start", "gen_end", "gen_pad"]
    return {n: off + i for i, n in enumerate(names) if n}


def config_dict(args, ids: dict) -> dict:
    return dict(
        architectures=["VARGPTQwen2VLForConditionalGeneration"], attention_dropout=0.0, bos_token_id=ids["endoftext"],
        eos_token_id=ids["im_end"], hidden_act="silu", hidden_size=args.hidden, image_token_id=ids["image_pad"],
        initializer_range=0.02, intermediate_size=args.inter or 2 * args.hidden, max_position_embeddings=32768,
        max_window_layers=args.layers, model_type="vargpt_qwen2_vl", num_attention_heads=args.heads,
        num_hidden_layers=args.layers, num_key_value_heads=args.kv_heads, pad_token_id=ids["endoftext"],
        rms_norm_eps=1e-6, rope_scaling={"type": "mrope", "mrope_section": list(args.mrope)}, rope_theta=1e6,
        sliding_window=32768, tie_word_embeddings=False, use_cache=True, use_sliding_window=False,
        video_token_id=ids["video_pad"], vision_end_token_id=ids["vision_end"],
        vision_start_token_id=ids["vision_start"], vision_token_id=ids["vision_pad"],
        vocab_size=args.id_offset + args.vocab_extra, train_from_scratch=False,
        special_tokens={"image_gen_start": "<|image_gen_start|>", "image_gen_start_token_id": ids["gen_start"],
                        "image_gen_end": "<|image_gen_end|>", "image_gen_end_token_id": ids["gen_end"],
                        "image_gen_pad": "<|image_gen_pad|>", "image_gen_pad_token_id": ids["gen_pad"]},
        vision_config=dict(depth=args.vit_depth, embed_dim=args.vit_dim, hidden_size=args.hidden, in_chans=3,
                           mlp_ratio=args.vit_mlp, num_heads=args.vit_heads, spatial_patch_size=14))


def patch_sizes(sizes: dict, M, ri, vae_mod):
    """Size wrappers (stub 4): the official __init__ hard-codes the 2B Infinity, the d32 VAE and pn 0.25M."""
    inf, vae = sizes["infinity"], sizes["bsq_vae"]
    orig_lit, orig_ae, orig_lvt = ri.load_infinity_train, vae_mod.AutoEncoder, M.load_visual_tokenizer

    def lit(*a, model_kwargs=None, **kw):
        mk = {k: inf[k] for k in ("depth", "embed_dim", "num_heads", "drop_path_rate", "mlp_ratio", "block_chunks")}
        return orig_lit(*a, model_kwargs=mk, **kw)

    def ae(a):
        a.base_ch, a.num_res_blocks = vae["base_ch"], vae["num_res_blocks"]
        return orig_ae(a)

    def lvt(a):
        a.pn, a.text_channels, a.vae_type = sizes["pn"], inf["text_channels"], vae["codebook_dim"]
        return orig_lvt(a)
    ri.load_infinity_train, vae_mod.AutoEncoder, M.load_visual_tokenizer = lit, ae, lvt


def init_params(model, C: int, seed: int) -> None:
    """Stub 5: every parameter drawn bf16-representable, so the bf16 checkpoint holds the fp32 weights exactly."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            n = torch.randn(p.shape, generator=g)
            leaf = name.rsplit(".", 1)[-1]
            if "scale_mul_1H11" in name:
                v = math.log(4.0) + 0.1 * n
            elif leaf in ("pos_start", "lvl_embed") or name.endswith("lvl_embed.weight"):
                v = n * math.sqrt(1 / 3 / C)
            elif "cfg_uncond" in name:
                v = 1.2 * n / math.sqrt(C)
            elif p.dim() == 1 and ("norm" in name or ".ln_" in name) and leaf == "weight":
                v = 1 + 0.1 * n
            elif p.dim() == 1:
                v = 0.1 * n
            else:
                v = n / math.sqrt(max(1, p[0].numel()))
            p.copy_(v.to(torch.bfloat16).float())


# ---------------------------------------------------------------- driver
def sizes_from_args(a) -> dict:
    return {"llm": {"hidden_size": a.hidden, "intermediate_size": a.inter or 2 * a.hidden, "num_hidden_layers": a.layers,
                    "num_attention_heads": a.heads, "num_key_value_heads": a.kv_heads, "mrope_section": list(a.mrope)},
            "vision": {"depth": a.vit_depth, "embed_dim": a.vit_dim, "mlp_ratio": a.vit_mlp, "num_heads": a.vit_heads},
            "infinity": {"depth": a.inf_depth, "embed_dim": a.inf_dim, "num_heads": a.inf_heads, "drop_path_rate": 0.1,
                         "mlp_ratio": 4, "block_chunks": a.inf_chunks, "text_channels": a.inf_dim},
            "bsq_vae": {"base_ch": a.vae_ch, "num_res_blocks": a.vae_res, "ch_mult": [1, 2, 4, 4, 4], "patch_size": 16,
                        "codebook_dim": a.bits},
            "pn": a.pn}


def load_dir_state(d: Path):
    import torch
    from safetensors.torch import load_file
    files = sorted(d.glob("model*.safetensors"))
    sd = {}
    for f in files:
        sd.update(load_file(str(f)))
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def compare(mine, ref, pre=""):
    """Largest difference per key (0.0 = equal), for --reuse."""
    import torch
    out = {}
    if isinstance(ref, dict):
        for k in ref:
            if k not in mine:
                out[pre + k] = "missing"
            else:
                out.update(compare(mine[k], ref[k], pre + k + "."))
    elif isinstance(ref, (list, tuple)) and ref and isinstance(ref[0], (dict, torch.Tensor)):
        for i, (a, b) in enumerate(zip(mine, ref)):
            out.update(compare(a, b, f"{pre}{i}."))
    elif isinstance(ref, torch.Tensor):
        a = torch.as_tensor(mine)
        out[pre[:-1]] = ("shape " + str(tuple(a.shape))) if a.shape != ref.shape else float(
            (a.double() - ref.double()).abs().max()) if a.numel() else 0.0
    else:
        out[pre[:-1]] = 0.0 if mine == ref else f"{mine!r} != {ref!r}"
    return out


def main(argv=None) -> int:
    args = parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHDYNAMO_DISABLE"] = "1"  # before torch loads: fused_ada_layer_norm runs eagerly (stub 2)
    install_stubs(Path(args.official).resolve())
    import copy
    import importlib
    import numpy as np
    import torch
    import flash_attn as stub
    torch.set_num_threads(1)
    M = importlib.import_module("vargpt_qwen_v1_1.modeling_vargpt_qwen2_vl")
    ri = importlib.import_module("vargpt_qwen_v1_1.var_model.tools.run_infinity")
    vae_mod = importlib.import_module("vargpt_qwen_v1_1.var_model.infinity.models.bsq_vae.vae")
    C_mod = importlib.import_module("vargpt_qwen_v1_1.configuration_vargpt_qwen2_vl")
    IP = importlib.import_module("vargpt_qwen_v1_1.image_processing_qwen2_vl")
    from vargpt_qwen_v1_1.var_model.infinity.utils.dynamic_resolution import dynamic_resolution_h_w
    from patching_utils.patching import patching
    import transformers

    ref = None
    if args.reuse:
        rd = Path(args.reuse)
        meta_in = json.loads((rd / "meta.json").read_text())
        sizes, ids = meta_in["tiny_sizes"], meta_in["ids"]
        conf = json.loads((rd / "config.json").read_text())
        ref = torch.load(rd / "vectors.pt", weights_only=True)
    else:
        sizes, ids = sizes_from_args(args), ids_for(args.id_offset)
        conf = config_dict(args, ids)
    inf = sizes["infinity"]
    assert inf["embed_dim"] == inf["text_channels"] and inf["text_channels"] % 128 == 0, \
        "Infinity needs C = text_channels, a multiple of 128 (TextAttentivePool head_dim 128)"
    pn_entry = dynamic_resolution_h_w[1.0][sizes["pn"]]
    sched = [(1, h, w) for (_, h, w) in pn_entry["scales"]]
    n_tok = sum(h * w for _, h, w in sched)
    pads = -(-n_tok // 128) * 128  # Infinity pads to a multiple of 128: that many <|image_gen_pad|> slots
    patch_sizes(sizes, M, ri, vae_mod)
    config = C_mod.VARGPTQwen2VLConfig(**conf)
    torch.manual_seed(0)
    model = M.VARGPTQwen2VLForConditionalGeneration(config).float()
    if ref is not None:
        missing, unexpected = model.load_state_dict(load_dir_state(rd), strict=False)
        assert not unexpected and not [k for k in missing if "rope" not in k], (missing, unexpected)
    else:
        init_params(model, inf["embed_dim"], 0)
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(str(out), safe_serialization=True)
    re = M.VARGPTQwen2VLForConditionalGeneration.from_pretrained(str(out), torch_dtype=torch.float32)
    sd0, sd1 = model.state_dict(), re.state_dict()
    assert set(sd0) == set(sd1) and all(torch.equal(sd0[k], sd1[k]) for k in sd0), "save/reload changed weights"
    del re
    patching(model)
    proc = IP.VARGPTQwen2VLImageProcessor()

    V = {}
    D = Draw(1, ids, ids["endoftext"] - 20)  # "text" ids in [3, offset-20), clear of the specials
    R = ref or {}
    # (a) tokenizer
    src = R["tokenizer"]["source_uint8_HWC"] if ref else D.image(265, 261)
    V["tokenizer"] = sec_tokenizer(model, src, tuple(pn_entry["pixel"]), sched)
    # (b) understanding
    if ref:
        u = R["und"]
        imgs, rows, lab_from = u["images_uint8_HWC"], (u["input_ids"], u["attention_mask"]), None
    else:
        imgs = [D.image(56, 56), D.image(56, 84)]
        g = proc(images=[im.numpy() for im in imgs], return_tensors="pt")["image_grid_thw"]
        n_img = [int(t.prod()) // 4 for t in g]
        r0, r1 = D.chat(n_img[0], answer=4, user_len=5), D.chat(n_img[1], answer=3, user_len=3)
        rows = pad_right([r0, r1], ids["endoftext"])
        lab_from = [max(i for i, t in enumerate(r) if t == ids["im_start"]) + 4 for r in (r0, r1)]
    if lab_from is None:
        V["und"] = sec_und(model, proc, imgs, rows, [0, 0])
        V["und"]["labels"] = u["labels"]
        V["und"] = sec_und_labels(model, V["und"])
    else:
        V["und"] = sec_und(model, proc, imgs, rows, lab_from)
    # und_generate: row 0 up to the assistant's first two tokens, greedy, 4 new tokens
    if ref:
        ug = R["und_generate"]
        ug_ids, n_new = ug["input_ids"], ug["output_ids"].shape[1] - ug["input_ids"].shape[1]
    else:
        r0 = rows[0][0][: int(rows[1][0].sum())].tolist()
        cut = max(i for i, t in enumerate(r0) if t == ids["im_start"]) + 3
        ug_ids, n_new = torch.tensor([r0[:cut]]), 4
    pv0 = proc(images=[V["und"]["images_uint8_HWC"][0].numpy()], return_tensors="pt")
    V["und_generate"] = sec_und_generate(model, ug_ids, pv0["pixel_values"], pv0["image_grid_thw"], n_new)
    # (c) training forwards
    H, W = pn_entry["pixel"]
    if ref:
        gsec = R["gen"]
        g_ids, g_mask, g_u8 = gsec["input_ids"], gsec["attention_mask"], gsec["pixel_gen_uint8_BHWC"]
    else:
        g_ids, g_mask = pad_right([D.chat(gen_pads=pads, user_len=9), D.chat(gen_pads=pads, user_len=6)], ids["endoftext"])
        g_u8 = torch.stack([D.image(H, W), D.image(H, W)])
    V["gen"] = sec_train(model, M, g_ids, g_mask, g_u8, 2, 0.0)
    n0 = int(g_mask[0].sum())
    V["gen_b1_null"] = sec_train(model, M, g_ids[:1, :n0], g_mask[:1, :n0], g_u8[:1], 102, 1.0, full=False)
    if ref:
        e = R["edit"]
        e_src, e_ids, e_u8 = e["source_uint8_HWC"], e["input_ids"], e["pixel_gen_uint8_BHWC"]
    else:
        e_src = D.image(56, 84)
        n_e = int(proc(images=[e_src.numpy()], return_tensors="pt")["image_grid_thw"][0].prod()) // 4
        e_ids, e_u8 = torch.tensor([D.chat(n_e, gen_pads=pads, user_len=4)]), D.image(H, W)[None]
    pe = proc(images=[e_src.numpy()], return_tensors="pt")
    V["edit"] = sec_train(model, M, e_ids, torch.ones_like(e_ids), e_u8, 202, 0.0, pe["pixel_values"],
                          pe["image_grid_thw"], {"source_uint8_HWC": e_src}, full=False)
    # (d, e) inference
    if ref:
        p_ids, ep_ids, es = R["infer"]["prompt_ids"], R["edit_infer"]["prompt_ids"], R["edit_infer"]["source_uint8_HWC"]
    else:
        p_ids = torch.tensor([D.chat(user_len=9, prompt_only=True)])
        es = D.image(56, 84)
        n_es = int(proc(images=[es.numpy()], return_tensors="pt")["image_grid_thw"][0].prod()) // 4
        ep_ids = torch.tensor([D.chat(n_es, user_len=4, prompt_only=True)])
    model._IMAGE_GEN_PATH = str(out / "official_generated.png")  # the official forward's cv2.imwrite target
    V["infer"] = sec_infer(model, M, p_ids, stub)
    model._IMAGE_GEN_PATH = str(out / "official_generated_edit.png")
    pes = proc(images=[es.numpy()], return_tensors="pt")
    V["edit_infer"] = sec_infer(model, M, ep_ids, stub, pv=pes["pixel_values"], grid=pes["image_grid_thw"], edit=True)
    V["edit_infer"]["source_uint8_HWC"] = es

    torch.save(V, out / "vectors.pt")
    meta = {"official_repo": "VARGPT-family/VARGPT-v1.1", "official_commit": args.official_commit,
            "transformers": transformers.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "timm": importlib.import_module("timm").__version__,
            "attn_implementation": {"llm": model.config._attn_implementation,
                                    "vision": model.visual.config._attn_implementation},
            "config_name": "main",
            "tiny_sizes": dict(sizes, pn_entry={"pixel": list(pn_entry["pixel"]), "scales": [list(s) for s in pn_entry["scales"]]},
                               tokens_per_image=n_tok, gen_pad_slots=pads, vocab=conf["vocab_size"]),
            "ids": ids, "seeds": {"init": 0, "data": 1, "fwd": 2, "gen": 3},
            "checkpoint": "save_pretrained of the official class after casting to bf16 (all parameters are exactly "
                          "bf16-representable); reloaded with from_pretrained(torch_dtype=float32): identical state dict",
            "n_params": sum(p.numel() for p in model.parameters()),
            "generator": "python -m benchmarks.v11_official_vectors " + " ".join(argv if argv is not None else sys.argv[1:])}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    if ref is not None:
        diffs = compare(V, ref)
        bad = {k: v for k, v in diffs.items() if not (isinstance(v, float) and v == 0.0)}
        print(json.dumps({"keys": len(diffs), "equal": len(diffs) - len(bad), "different": bad}, indent=1))
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
