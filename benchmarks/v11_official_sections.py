"""The sections of a VARGPT-v1.1 parity ``vectors.pt``, computed by the OFFICIAL model (see v11_official_vectors).

Imported by ``benchmarks.v11_official_vectors`` only, inside the official environment: every function
takes the official model (and module) as arguments and records what the official code computes, through
wrappers put on the instance for the duration of one call (the official code itself is not changed).
"""
from __future__ import annotations

import math
import random

# ---------------------------------------------------------------- inputs
class Draw:
    def __init__(self, seed: int, ids: dict, vocab_text: int):
        import torch
        self.g, self.ids, self.vt = torch.Generator().manual_seed(seed), ids, vocab_text

    def text(self, n):
        import torch
        return torch.randint(3, self.vt, (n,), generator=self.g).tolist()

    def image(self, h, w):
        """A smooth random RGB image (uint8 HWC): low-resolution noise, bilinear up."""
        import torch
        import torch.nn.functional as F
        lo = torch.rand(1, 3, 5, 5, generator=self.g)
        x = F.interpolate(lo, size=(h, w), mode="bilinear", align_corners=False)[0]
        return x.mul(255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous()

    def chat(self, user_img_tokens=0, answer=None, gen_pads=0, user_len=8, prompt_only=False):
        I = self.ids
        s = [I["im_start"]] + self.text(4) + [I["im_end"]] + self.text(1)
        u = [I["im_start"]] + self.text(2)
        if user_img_tokens:
            u += [I["vision_start"]] + [I["image_pad"]] * user_img_tokens + [I["vision_end"]]
        u += self.text(user_len) + [I["im_end"]] + self.text(1)
        a = [I["im_start"]] + self.text(2 if prompt_only else 3)
        if prompt_only:
            pass
        elif gen_pads:
            a += [I["gen_start"]] + [I["gen_pad"]] * gen_pads + [I["gen_end"]] + [I["im_end"]]
        elif answer:
            a += self.text(answer) + [I["im_end"]]
        return s + u + a


def pad_right(rows, pad_id):
    import torch
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    return ids, mask


def pixels(u8_BHWC):
    t = u8_BHWC.permute(0, 3, 1, 2).float().div(255)
    return t.add(t).add_(-1)


# ---------------------------------------------------------------- the sections of vectors.pt
def ref_fp32_error(model, z, pick=lambda im: im) -> float:
    """How far the official fp32 VAE decode of ``z`` lies from the same decoder run in float64 (recorded
    as ``*_fp32_error``: the reference image is only this accurate; benchmarks.vargpt11_parity adds it)."""
    import copy
    import torch
    with torch.no_grad():
        d32 = model.vae_local.decode(z)
        d64 = copy.deepcopy(model.vae_local).double().decode(z.double())
    return float((pick(d32).double() - pick(d64)).abs().max())


def sec_tokenizer(model, src_u8, px_hw, sched):
    import PIL.Image as PImage
    import torch
    from vargpt_qwen_v1_1.var_model.tools import run_infinity as ri
    vae = model.vae_local
    x = ri.transform(PImage.fromarray(src_u8.numpy()), *px_hw)[None]
    u8 = ((x + 1) / 2 * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    assert torch.equal(pixels(u8), x), "uint8 round trip of the official transform is not exact"
    with torch.no_grad():
        h, z, _, bits, _, var_input = vae.encode(x, scale_schedule=sched)
        summed, recon = vae.decode_from_indices(bits, sched, "bit_label")
        recon_z = vae.decode(z.squeeze(-3) if z.dim() == 5 else z)
    B = x.shape[0]
    return dict(source_uint8_HWC=src_u8, transform_hw=list(px_hw), input_uint8_BHWC=u8,
                scale_schedule=[list(s) for s in sched], raw_features=h,
                bits_per_scale=[b.reshape(B, -1, b.shape[-1]).to(torch.uint8) for b in bits],
                bits_per_scale_shape_note="each (B, h*w, d): row-major over (h, w) of that scale",
                var_input_per_scale=list(var_input), z_quantized_out=z,
                recon_from_z_minus_recon_from_bits_maxabs=(recon_z - recon).abs().max(),
                summed_codes_from_bits=summed, recon_from_bits=recon,
                recon_from_bits_fp32_error=ref_fp32_error(model, summed.squeeze(-3)))


def sec_und(model, proc, imgs, rows, labels_from):
    import torch
    out = proc(images=[im.numpy() for im in imgs], return_tensors="pt")
    pv, grid = out["pixel_values"], out["image_grid_thw"]
    ids, mask = rows
    labels = torch.full_like(ids, -100)
    for b, st in enumerate(labels_from):
        labels[b, st:] = torch.where(mask[b, st:] == 1, ids[b, st:], torch.full_like(ids[b, st:], -100))
    model.eval()
    with torch.no_grad():
        emb = model.visual(pv, grid_thw=grid)
        o1 = model(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid, labels=labels)
        pos, delta = model.get_rope_index(ids, grid, None, mask)
        o2 = model(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid, labels=labels,
                   position_ids=pos)
    return dict(images_uint8_HWC=list(imgs), pixel_values=pv, image_grid_thw=grid, input_ids=ids,
                attention_mask=mask, labels=labels, image_embeds=emb, logits_forward_1d_positions=o1.logits,
                loss_forward_1d_positions=o1.loss, mrope_position_ids=pos, mrope_rope_deltas=delta,
                logits_mrope_positions=o2.logits, loss_mrope_positions=o2.loss)


class LLMRecorder:
    """Records what each call of the language model (model.model) got and gave."""
    def __init__(self, model):
        self.calls, self.m = [], model.model
        self.h = [self.m.register_forward_pre_hook(self.pre, with_kwargs=True),
                  self.m.register_forward_hook(self.post, with_kwargs=True)]

    def pre(self, mod, a, kw):
        import torch
        emb, pkv, pos = kw.get("inputs_embeds"), kw.get("past_key_values"), kw.get("position_ids")
        L = emb.shape[1]
        if pos is None:  # what Qwen2VLModel.forward does with position_ids=None: cache_position on 3 sections
            past = pkv.get_seq_length() if pkv is not None and hasattr(pkv, "get_seq_length") else 0
            pos = torch.arange(past, past + L).view(1, 1, -1).expand(3, emb.shape[0], -1)
        self.calls.append({"in": emb.detach().clone(), "pos": pos.clone(), "pkv": pkv is not None})

    def post(self, mod, a, kw, out):
        self.calls[-1]["out"] = out[0].detach().clone()

    def close(self):
        for h in self.h:
            h.remove()


def sec_und_generate(model, ids, pv, grid, n_new):
    import torch
    rec = LLMRecorder(model)
    model.eval()
    with torch.no_grad():
        g = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pv, image_grid_thw=grid,
                           max_new_tokens=n_new, do_sample=False, output_logits=True, return_dict_in_generate=True)
    rec.close()
    return dict(input_ids=ids, pixel_values=pv, image_grid_thw=grid, output_ids=g.sequences,
                step_logits=torch.stack(list(g.logits), 1), llm_position_ids_per_step=[c["pos"] for c in rec.calls])


def seed_all(s):
    import numpy as np
    import torch
    np.random.seed(s); torch.manual_seed(s); random.seed(s)


def sec_train(model, M, ids, mask, gen_u8, seed, cond_drop, pv=None, grid=None, extra=None, full=True):
    """Teacher-forced training forward (train mode, DropPath 0), the BSC flips recorded (stub 6)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from vargpt_qwen_v1_1.var_model.infinity.models import bitwise_self_correction as bsc_mod
    model.train()
    model.vargpt_gen.cond_drop_rate = cond_drop
    lfq, rec = model.vae_local.quantizer.lfq, {"strength": [], "gt": [], "flipped": []}
    orig_i2c, orig_lfq_fwd, orig_np = lfq.indices_to_codes, lfq.forward, bsc_mod.np

    class NpRec:  # the BSC's np.random.randint draws, recorded
        def __getattr__(self, k):
            return getattr(np, k)

        class random:
            @staticmethod
            def randint(*a, **k):
                r = np.random.randint(*a, **k)
                rec["strength"].append(r * 0.01)
                return r

    def lfq_fwd(*a, **k):
        o = orig_lfq_fwd(*a, **k)
        rec["gt"].append(o[2].to(torch.uint8))
        return o

    def i2c(idx, label_type="int_label", **k):
        rec["flipped"].append(idx.to(torch.uint8))
        return orig_i2c(idx, label_type=label_type, **k)
    cap = {}
    orig_vg_fwd, orig_dec, orig_pigt, orig_loss = (model.vargpt_gen.forward, model.vargpt_gen.forward_decoder,
                                                   model.process_image_gen_tokens_vargpt_v1_1, model.get_gen_loss_1_1)

    orig_raw = model.vae_local.encode_for_raw_features

    def raw(*a, **k):
        r = orig_raw(*a, **k)
        cap["raw"] = r[0].clone()
        return r

    def vg_fwd(label, x_wo, sched, **k):
        cap["sos_kv"] = label[0]
        cap["x_BLC_wo_prefix"] = x_wo.detach().clone()
        r = orig_vg_fwd(label, x_wo, sched, **k)
        cap.update(var_x_BLC_padded=r[0], cond_BD_or_gss=r[2], cond_BD=r[3], scale_schedule=r[6], need_to_pad=r[7],
                   l_end=r[8])
        return r

    def dec(x, ca_kv, *a):
        cap["ca"] = ca_kv
        return orig_dec(x, ca_kv, *a)

    def pigt(*a, **k):
        r = orig_pigt(*a, **k)
        cap.update(other_labels=r[1], gen_hidden=r[2], kv=r[4], kv_cu=r[5], kv_max=r[7])
        return r

    def loss_fn(labels, ol, olab, igl, igl_lab, **k):
        cap["loss_text"] = orig_loss(labels, ol, olab, None, igl_lab, **k)
        return orig_loss(labels, ol, olab, igl, igl_lab, **k)
    for m in model.modules():
        if type(m).__name__ == "DropPath":
            m.drop_prob = 0.0
    lfq.indices_to_codes, lfq.forward, bsc_mod.np = i2c, lfq_fwd, NpRec()
    model.vargpt_gen.forward, model.vargpt_gen.forward_decoder = vg_fwd, dec
    model.vae_local.encode_for_raw_features = raw
    model.process_image_gen_tokens_vargpt_v1_1, model.get_gen_loss_1_1 = pigt, loss_fn
    try:
        seed_all(seed)
        with torch.no_grad():
            o = model(pixel_gen_values=pixels(gen_u8), input_ids=ids, attention_mask=mask, labels=ids.clone(),
                      pixel_values=pv, image_grid_thw=grid)
    finally:
        lfq.indices_to_codes, lfq.forward, bsc_mod.np = orig_i2c, orig_lfq_fwd, orig_np
        for k in ("forward", "forward_decoder"):
            model.vargpt_gen.__dict__.pop(k, None)
        model.vae_local.__dict__.pop("encode_for_raw_features", None)
        for k in ("process_image_gen_tokens_vargpt_v1_1", "get_gen_loss_1_1"):
            model.__dict__.pop(k, None)
    gp = M_ids(model)["gen_pad"]
    nonpad = ids != gp
    sched = [list(s) for s in cap["scale_schedule"]]
    d = dict(x_BLC_wo_prefix=cap["x_BLC_wo_prefix"], scale_schedule=sched, gt_BL_bits=o.image_gen_labels.to(torch.uint8),
             sos_kv_compact_after_cond_drop=cap["sos_kv"].detach().clone(), cond_BD=cap["cond_BD"],
             need_to_pad=int(cap["need_to_pad"]), l_end=int(cap["l_end"]), text_labels_used=cap["other_labels"],
             kv_hidden_compact=cap["kv"], kv_cu_seqlens=cap["kv_cu"], ca_kv_compact=cap["ca"][0],
             ca_kv_cu_seqlens=cap["ca"][1], ca_kv_max_seqlen=int(cap["ca"][2]), image_logits=o.gen_logits,
             loss_text=cap["loss_text"], loss_img_x3=o.loss - cap["loss_text"], loss=o.loss, input_ids=ids,
             attention_mask=mask, labels_arg=ids.clone(), cond_drop_rate=float(cond_drop), seed=seed,
             bsc_strength_per_scale=torch.tensor(rec["strength"], dtype=torch.float64),
             bsc_gt_bits_per_scale=rec["gt"][:len(sched)], bsc_flipped_bits_per_scale=rec["flipped"][:len(sched)],
             gen_out_projector_out_kv=cap["ca"][0], logits_non_gen_pad=o.logits[nonpad],
             logits_non_gen_pad_mask=nonpad, pixel_gen_uint8_BHWC=gen_u8)
    if full:
        d.update(vae_raw_features=cap["raw"], var_x_BLC_padded=cap["var_x_BLC_padded"], cond_BD_or_gss=cap["cond_BD_or_gss"],
                 gen_hidden_BLH=cap["gen_hidden"])
    if pv is not None:
        d.update(pixel_values=pv, image_grid_thw=grid)
    d.update(extra or {})
    return {k: v for k, v in d.items() if v is not None}


def M_ids(model):
    st = model.config.special_tokens
    return {"gen_start": st["image_gen_start_token_id"], "gen_pad": st["image_gen_pad_token_id"]}


def sec_infer(model, M, prompt_ids, stub, seed=3, pv=None, grid=None, edit=False):
    """Official generate + patching (B=1), with the first generated token forced to <|image_gen_start|>."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList
    gs, P = M_ids(model)["gen_start"], prompt_ids.shape[1]

    class ForceStart(LogitsProcessor):
        def __call__(self, input_ids, scores):
            if input_ids.shape[1] == P:
                scores = torch.full_like(scores, -math.inf)
                scores[:, gs] = 0
            return scores
    cap, samp, heads, dec = {}, [], [], {}
    orig_ar, orig_kv, orig_s = model.autoregressive_infer_cfg, model.get_ca_kv_cross, M.sample_with_top_k_top_p_also_inplace_modifying_logits_
    orig_gl, orig_dec = model.vargpt_gen.get_logits, model.vae_local.decode

    def ar(*a, **k):
        k["g_seed"] = seed  # stub 7: instead of int(time.time()*1000)
        cap["past"] = model.past_hidden_states.detach().clone()
        cap["sched"] = [list(s) for s in k["scale_schedule"]]
        cap.update({n: k[n] for n in ("cfg_list", "tau_list", "top_k", "top_p", "cfg_insertion_layer")})
        r = orig_ar(*a, **k)
        cap["img"] = r[2]
        return r

    def kv(*a, **k):
        r = orig_kv(*a, **k)
        cap["ca_proj"] = r[0][:cap["past"].shape[1] - 1].clone()
        return r

    def s(logits, **k):
        inp = logits.clone()
        r = orig_s(logits, **k)
        samp.append((inp, r[:, :, 0].to(torch.uint8), torch.isinf(logits) & (logits < 0)))
        return r

    def gl(h, c):
        r = orig_gl(h, c)
        heads.append(r.clone())
        return r

    def dd(z):
        r = orig_dec(z)
        dec.update(z=z.clone(), img=r.clone())
        return r
    model.autoregressive_infer_cfg, model.get_ca_kv_cross, M.sample_with_top_k_top_p_also_inplace_modifying_logits_ = ar, kv, s
    model.vargpt_gen.get_logits, model.vae_local.decode = gl, dd
    rec, n0 = LLMRecorder(model), len(stub.CALLS)
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids), pixel_values=pv,
                                 image_grid_thw=grid, max_new_tokens=8, do_sample=False,
                                 logits_processor=LogitsProcessorList([ForceStart()]))
    finally:
        rec.close()
        M.sample_with_top_k_top_p_also_inplace_modifying_logits_ = orig_s
        for k in ("autoregressive_infer_cfg", "get_ca_kv_cross"):
            model.__dict__.pop(k, None)
        for o, k in ((model.vargpt_gen, "get_logits"), (model.vae_local, "decode")):
            o.__dict__.pop(k, None)
    calls, n_sc = rec.calls, len(cap["sched"])
    assert len(calls) == 2 + 2 * n_sc, f"expected prefill, gen_start and 2 LLM calls per scale, got {len(calls)}"
    cfg = cap["cfg_list"][0]
    d = dict(prompt_ids=prompt_ids, output_ids=out, seed_used=seed, cfg=cfg, tau=cap["tau_list"][0],
             top_k=cap["top_k"], top_p=cap["top_p"], cfg_insertion_layer=list(cap["cfg_insertion_layer"]),
             scale_schedule=cap["sched"], prefill_position_ids=calls[0]["pos"],
             gen_start_step_position_ids=calls[1]["pos"], llm_hidden_prompt_and_gen_start=cap["past"],
             sos_in_proj_2B=torch.cat([calls[2]["in"][:, 0], calls[3]["in"][:, 0]]))
    per = []
    for si in range(n_sc):
        c, u = calls[2 + 2 * si], calls[3 + 2 * si]
        inp, bits, removed = samp[si]
        p = {} if edit else {"llm_in_cond": c["in"]}
        p["llm_out_cond"] = c["out"]
        if si == 0 and not edit:
            p["llm_in_uncond"] = u["in"]
        p.update(llm_out_uncond=u["out"]) if not edit else None
        p.update(llm_position_ids_cond=c["pos"], llm_position_ids_uncond=u["pos"], head_logits_2B=heads[si],
                 bits=bits, topk_topp_removed=removed)
        assert torch.equal(inp, (cfg * heads[si][:1] / d["tau"] + (1 - cfg) * heads[si][1:] / d["tau"]).reshape(inp.shape))
        per.append(p)
    d["per_scale"] = per
    d["summed_codes"] = dec["z"]
    if not edit:
        d["decoded_m1p1"] = dec["img"]
    d["img_uint8_BGR_BHWC"] = cap["img"]
    d["ca_kv_cond_projected"] = cap["ca_proj"]
    d["ca_kv_cond_llm_states"] = cap["past"][0, :-1]
    d["flash_stub_calls"] = stub.CALLS[n0:n0 + 4]  # the first four calls, as a record of the shapes
    d["decoded_m1p1_fp32_error"] = ref_fp32_error(model, dec["z"], (lambda im: im[0, :, 0]) if edit else (lambda im: im))
    if edit:
        im = dec["img"]
        d["decoded_m1p1_checksum"] = {"sum": im.double().sum(), "abs_sum": im.double().abs().sum(),
                                      "first_row": im[0, :, 0].clone()}
    return d


def sec_und_labels(model, u):
    """--reuse: the understanding losses with the reference's labels."""
    import torch
    with torch.no_grad():
        kw = dict(input_ids=u["input_ids"], attention_mask=u["attention_mask"], pixel_values=u["pixel_values"],
                  image_grid_thw=u["image_grid_thw"], labels=u["labels"])
        u["loss_forward_1d_positions"] = model(**kw).loss
        u["loss_mrope_positions"] = model(**kw, position_ids=u["mrope_position_ids"]).loss
    return u
