"""A VARGPT-v1.1 directory "made the same way" at other sizes, head counts, bit depth, scale schedule
and token ids than the vendored one: the released layout written by experiments' writer, and a
vectors.pt with the fields the official fixture has, computed by the suite's model in released
mode. It checks the parity command for fixture-specific assumptions (sizes, ids, schedule, seeds
are all read from the directory); it is not official parity (tests/test_vargpt11_parity.py is)."""
from __future__ import annotations

from pathlib import Path

import torch

from modules.components.bsq import BSQConfig
from modules.components.infinity import InfinityConfig
from modules.components.qwen2vl import Qwen2VLConfig, image_to_patches
from modules.vargpt11 import TokenIds, V11Switches, VARGPT11, VARGPT11Config
from modules.vargpt11_format import write_released

OFF = 300  # token ids: real id - 151643 + OFF (the vendored directory uses 200)


def _ids() -> TokenIds:
    return TokenIds(pad=OFF, eos=OFF + 2, vision_start=OFF + 9, vision_end=OFF + 10, image_pad=OFF + 12,
                    gen_start=OFF + 14, gen_end=OFF + 15, gen_pad=OFF + 16)


def config() -> VARGPT11Config:
    llm = Qwen2VLConfig(vocab_size=OFF + 20, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                        num_attention_heads=3, num_key_value_heads=1, mrope_section=[2, 3, 3],
                        vision_depth=1, vision_embed_dim=48, vision_num_heads=3, vision_mlp_ratio=2)
    tok = BSQConfig(codebook_dim=16, base_ch=24, ch_mult=[1, 2, 2, 2, 2], num_res_blocks=1,
                    scales=[[1, 1], [2, 2], [3, 3], [4, 4], [6, 6], [8, 8]])  # 128 px, 130 tokens
    dec = InfinityConfig(embed_dim=128, depth=3, block_chunks=3, num_heads=4, ffn_hidden=256, text_channels=128,
                         cond_dim=128, d_vae=16, text_maxlen=64, ca_bf16=True)
    return VARGPT11Config(llm=llm, tokenizer=tok, decoder=dec, ids=_ids(), switches=V11Switches.released())


def _bf16_init(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_((torch.randn(p.shape, generator=g) * (0.02 if p.dim() > 1 else 0.1)
                     + (1.0 if n.endswith(("norm.weight", "ln_q.weight", "layernorm.weight", "norm1.weight", "norm2.weight"))
                        else 0.0)).to(torch.bfloat16).float())


def _px(u8):
    t = u8.permute(0, 3, 1, 2).float().div(255)
    return t.add(t).add_(-1)


def make(d: Path) -> Path:
    torch.manual_seed(0)
    cfg = config()
    model = VARGPT11(cfg).eval()
    _bf16_init(model)
    write_released(model, cfg, d, max_shard_bytes=1_000_000)
    ids = cfg.ids
    g = torch.Generator().manual_seed(1)
    txt = lambda n: torch.randint(3, 180, (n,), generator=g).tolist()  # noqa: E731
    sched = [[1, h, w] for h, w in cfg.tokenizer.scales]
    res = cfg.tokenizer.scales[-1][0] * 16
    img = lambda h, w: torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8)  # noqa: E731
    v = {}
    with torch.no_grad():
        x = img(res, res)
        bits = model.gen.vae_local.encode(_px(x[None]))["bits"]
        v["tokenizer"] = {"input_uint8_BHWC": x[None], "scale_schedule": sched, "bits_per_scale": bits,
                          "recon_from_bits": model.gen.vae_local.decode_bits(bits)}
        # understanding: one 56x56 image (4 merged tokens), B=1
        im = img(56, 56)
        pv, grid = image_to_patches(im, cfg.llm)
        grid = grid.view(1, 3)
        row = [OFF + 1] + txt(3) + [ids.vision_start] + [ids.image_pad] * 4 + [ids.vision_end] + txt(4) + [OFF + 2]
        u_ids = torch.tensor([row])
        u = {"images_uint8_HWC": [im], "pixel_values": pv, "image_grid_thw": grid, "input_ids": u_ids,
             "attention_mask": torch.ones_like(u_ids)}
        u["logits_forward_1d_positions"] = model.understand_logits(u_ids, None, pv, grid, positions="1d")
        u["logits_mrope_positions"] = model.understand_logits(u_ids, None, pv, grid, positions="mrope")
        v["und"] = u
        out = model.generate_text(u_ids, pv, grid, max_new_tokens=3)
        v["und_generate"] = {"input_ids": u_ids, "pixel_values": pv, "image_grid_thw": grid, "output_ids": out,
                             "step_logits": model._last_step_logits}
        n_slots = 256
        for sec, seed, drop, edit in (("gen", 2, 0.0, False), ("gen_b1_null", 102, 1.0, False), ("edit", 202, 0.0, True)):
            head = [OFF + 1] + txt(3) + [OFF + 2] + [OFF + 1] + txt(2)
            pv_e = grid_e = None
            if edit:
                head += [ids.vision_start] + [ids.image_pad] * 4 + [ids.vision_end]
                pv_e, grid_e = pv, grid
            r = head + txt(2) + [ids.gen_start] + [ids.gen_pad] * n_slots + [ids.gen_end, ids.eos]
            t_ids = torch.tensor([r])
            target = img(res, res)[None]
            o = model.forward_train(t_ids, torch.ones_like(t_ids), t_ids.clone(), pv_e, grid_e, _px(target), train=True,
                                    cond_drop_B=torch.tensor([drop >= 1]),
                                    strength_rng=__import__("numpy").random.RandomState(seed),
                                    generator=torch.Generator().manual_seed(seed))
            m = t_ids != ids.gen_pad
            s = {"input_ids": t_ids, "attention_mask": torch.ones_like(t_ids), "labels_arg": t_ids.clone(),
                 "pixel_gen_uint8_BHWC": target, "cond_drop_rate": drop, "seed": seed, "scale_schedule": sched,
                 "loss": o["loss"], "image_logits": o["image_logits"], "logits_non_gen_pad": o["logits"][m],
                 "logits_non_gen_pad_mask": m, "gt_BL_bits": o["gen_state"]["labels"]}
            if edit:
                s.update(pixel_values=pv_e, image_grid_thw=grid_e)
            v[sec] = s
        for sec, edit in (("infer", False), ("edit_infer", True)):
            p = [OFF + 1] + txt(3) + [OFF + 2] + [OFF + 1]
            pv_i = grid_i = None
            if edit:
                p += [ids.vision_start] + [ids.image_pad] * 4 + [ids.vision_end]
                pv_i, grid_i = pv, grid
            p += txt(3) + [OFF + 2] + [OFF + 1] + txt(1)
            o = model.generate_image(torch.tensor([p]), pv_i, grid_i, seed=5)
            s = {"prompt_ids": torch.tensor([p]), "seed_used": 5, "cfg": 3, "tau": 0.5, "top_k": 900, "top_p": 0.97,
                 "scale_schedule": sched, "per_scale": [{"bits": b.reshape(1, -1)} for b in o["bits"]],
                 "summed_codes": o["summed_codes"]}
            if edit:
                s.update(source_uint8_HWC=im, decoded_m1p1_checksum={"first_row": o["image"][0, :, 0]})
            else:
                s["decoded_m1p1"] = o["image"]
            v[sec] = s
    torch.save(v, d / "vectors.pt")
    return d
