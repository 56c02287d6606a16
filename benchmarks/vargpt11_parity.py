"""Parity of the suite's VARGPT-v1.1 with the official code's outputs, from a fixture directory.

    python -m benchmarks.vargpt11_parity tests/fixtures/vargpt_v11_official

The directory holds a released-layout checkpoint (config.json + safetensors) and ``vectors.pt``
written by the official code (see its README.md). Everything size- or id-dependent is read from
the directory: model sizes from config.json and tensor shapes, the scale schedule, token ids,
seeds and sampling settings from vectors.pt. A directory that stores fewer intermediates still
yields every key: missing inputs are recomputed (features by the tokenizer, bit flips by replaying
the recorded seed). Prints one JSON line; ``ok`` is true when every check holds its tolerance.

Tolerances: 1e-4 everywhere, except values downstream of the released cross-attention, which
rounds q, kv and its output to bf16 inside the fp32 model (``ca_bf16``, reproduced here). A
1e-6 difference upstream (float summation order in the LLM or the VAE convs) can move one
cross-attention output across a bf16 rounding boundary: one bf16 step (2**-8 relative, <= 7.8e-3
for |x| < 2), which reaches the bit logits attenuated. With identical inputs our cross-attention
output is bit-identical to the release's (0.0 on the vendored vectors). Held there: 5e-3.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from modules.components.qwen2vl import preprocess_image
from modules.vargpt11 import V11Switches
from modules.vargpt11_format import build_released

TOL = 1e-4
TOL_AFTER_CA_BF16 = 5e-3


def _pixels(u8_BHWC: torch.Tensor) -> torch.Tensor:
    t = u8_BHWC.permute(0, 3, 1, 2).float().div(255)
    return t.add(t).add_(-1)


def _schedule(v: Dict[str, Any]) -> Optional[List[List[int]]]:
    for sec in ("tokenizer", "gen", "infer", "edit_infer", "edit", "gen_b1_null"):
        if sec in v and "scale_schedule" in v[sec]:
            return [[int(s[-2]), int(s[-1])] for s in v[sec]["scale_schedule"]]
    return None


def _processed(img_HWC: torch.Tensor, llm_cfg):
    return preprocess_image(img_HWC, llm_cfg)


class _Lazy64:
    """A float64 copy of the tokenizer, made on first use (only when an fp32 check misses TOL)."""
    def __init__(self, tok):
        self.tok, self.m = tok, None

    def __call__(self):
        if self.m is None:
            self.m = copy.deepcopy(self.tok).double()
        return self.m


def _bits_equal(bits, ref) -> bool:
    return all(torch.equal(a, b.to(torch.uint8).reshape(a.shape)) for a, b in zip(bits, ref))


def _image_check(r, key, mine, ref, tok, tok64, f_hat, ref_err, pick=lambda im: im) -> None:
    """``key_max_abs``; when over TOL, also the float error of the VAE decode on each side.

    A decoded image carries the fp32 error of the VAE decoder, measured against the same decoder in
    float64: the release's own fp32 decode lies 5.8e-5 from it on the vendored 256-px directory and
    4.6e-4 on the 512-px second directory (docs/v11.md), ours 8e-6 there. Two correct decoders can
    therefore differ by the sum of the two:
    ``key_fp32_error`` (ours: fp32 vs float64 on the same codes) and ``key_ref_fp32_error`` (the
    release's, when the directory records it as ``*_fp32_error``); the check is TOL plus both.
    """
    r[key + "_max_abs"] = _maxabs(mine, ref)
    if r[key + "_max_abs"] <= TOL:
        return
    with torch.no_grad():
        r[key + "_fp32_error"] = _maxabs(pick(tok.decode(f_hat)), pick(tok64().decoder(f_hat.double()).clamp(-1, 1)))
    if ref_err is not None:
        r[key + "_ref_fp32_error"] = float(ref_err)


def _maxabs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _train(model, s: Dict[str, Any]) -> Dict[str, Any]:
    B = s["input_ids"].shape[0]
    drop = torch.full((B,), float(s.get("cond_drop_rate", 0.0)) >= 1.0)
    flipped = s.get("bsc_flipped_bits_per_scale")
    seed = int(s.get("seed", 0))
    with torch.no_grad():
        return model.forward_train(
            s["input_ids"], s.get("attention_mask"), s.get("labels_arg"), s.get("pixel_values"), s.get("image_grid_thw"),
            _pixels(s["pixel_gen_uint8_BHWC"]), train=True, cond_drop_B=drop, flipped=flipped,
            strength_rng=np.random.RandomState(seed), generator=torch.Generator().manual_seed(seed))


def run(d: Path) -> Dict[str, Any]:
    d = Path(d)
    v = torch.load(d / "vectors.pt", weights_only=True)
    sched = _schedule(v)
    model, cfg = build_released(d, scales=sched, **asdict(V11Switches.released()))
    r: Dict[str, Any] = {"dir": str(d), "tolerance": TOL, "tolerance_after_ca_bf16": TOL_AFTER_CA_BF16}
    tok = model.gen.vae_local

    # tokenizer
    t = v["tokenizer"]
    tok64 = _Lazy64(tok)
    with torch.no_grad():
        x = _pixels(t["input_uint8_BHWC"])
        bits, bits_ref = tok.encode(x)["bits"], t.get("bits_per_scale")
        r["tokenizer_bits_precision"] = "fp32"
        if not _bits_equal(bits, bits_ref):
            # a bit is the sign of a residual: where our fp32 bits differ, tell float error from a real
            # difference by re-deriving them from float64 features (bigger VAEs: fp32 error 1e-3 at 512 px)
            f32, f64 = tok.encode(x)["features"], tok64().encoder(x.double())
            r["tokenizer_fp32_feature_error"] = _maxabs(f32, f64)
            bits, r["tokenizer_bits_precision"] = tok64().quantize(f64), "fp64"
        r["tokenizer_bits_equal"] = _bits_equal(bits, bits_ref)
        summed = tok.summed_codes(bits_ref)
        _image_check(r, "tokenizer_recon", tok.decode(summed), t["recon_from_bits"], tok, tok64, summed,
                     t.get("recon_from_bits_fp32_error"))

    # understanding
    u = v["und"]
    pv = u.get("pixel_values")
    if pv is None:
        parts = [_processed(im, cfg.llm) for im in u["images_uint8_HWC"]]
        pv, grid = torch.cat([p for p, _ in parts]), torch.cat([g for _, g in parts])
    else:
        grid = u["image_grid_thw"]
        if "images_uint8_HWC" in u:
            mine = torch.cat([_processed(im, cfg.llm)[0] for im in u["images_uint8_HWC"]])
            r["und_pixel_values_max_abs"] = _maxabs(mine, pv) if mine.shape == pv.shape else float("inf")
    with torch.no_grad():
        for scheme, key in (("1d", "logits_forward_1d_positions"), ("mrope", "logits_mrope_positions")):
            lg = model.understand_logits(u["input_ids"], u["attention_mask"], pv, grid, positions=scheme)
            r[f"und_logits_{scheme}_max_abs"] = _maxabs(lg, u[key])
        if "mrope_position_ids" in u:
            pos, delta = model.positions("mrope", u["input_ids"], u["attention_mask"], grid)
            r["und_mrope_positions_equal"] = bool(torch.equal(pos, u["mrope_position_ids"]) and
                                                  torch.equal(delta, u["mrope_rope_deltas"]))
    ug = v["und_generate"]
    n_new = ug["output_ids"].shape[1] - ug["input_ids"].shape[1]
    ids = model.generate_text(ug["input_ids"], ug.get("pixel_values"), ug.get("image_grid_thw"), max_new_tokens=n_new)
    r["und_generate_ids_equal"] = bool(torch.equal(ids, ug["output_ids"]))
    if "step_logits" in ug:
        r["und_generate_logits_max_abs"] = _maxabs(model._last_step_logits, ug["step_logits"])

    # training forwards
    for sec, pre in (("gen", "gen"), ("gen_b1_null", "gen_null"), ("edit", "edit")):
        s = v[sec]
        o = _train(model, s)
        r[f"{pre}_loss_abs"] = abs(float(o["loss"]) - float(s["loss"]))
        r[f"{pre}_image_logits_max_abs"] = _maxabs(o["image_logits"], s["image_logits"])
        m = s["logits_non_gen_pad_mask"]
        r[f"{pre}_text_logits_max_abs"] = _maxabs(o["logits"][m], s["logits_non_gen_pad"])
        r[f"{pre}_labels_equal"] = bool(torch.equal(o["gen_state"]["labels"], s["gt_BL_bits"].to(torch.uint8)))

    # inference
    for sec, pre in (("infer", "infer"), ("edit_infer", "edit_infer")):
        s = v[sec]
        model.cfg.cfg, model.cfg.tau = float(s.get("cfg", 3)), float(s.get("tau", 0.5))
        model.cfg.top_k, model.cfg.top_p = int(s.get("top_k", 900)), float(s.get("top_p", 0.97))
        pv = grid = None
        if "source_uint8_HWC" in s:
            pv, grid = _processed(s["source_uint8_HWC"], cfg.llm)
        out = model.generate_image(s["prompt_ids"], pv, grid, seed=int(s.get("seed_used", 0)))
        ref_bits = [p["bits"] for p in s["per_scale"]]
        r[f"{pre}_bits_equal"] = all(torch.equal(a.reshape(b.shape), b) for a, b in zip(out["bits"], ref_bits))
        r[f"{pre}_summed_codes_max_abs"] = _maxabs(out["summed_codes"], s["summed_codes"].reshape(out["summed_codes"].shape))
        if "decoded_m1p1" in s:
            _image_check(r, f"{pre}_image", out["image"], s["decoded_m1p1"], tok, tok64, out["summed_codes"],
                         s.get("decoded_m1p1_fp32_error"))
        elif "decoded_m1p1_checksum" in s:
            _image_check(r, f"{pre}_image", out["image"][0, :, 0], s["decoded_m1p1_checksum"]["first_row"], tok, tok64,
                         out["summed_codes"], s.get("decoded_m1p1_fp32_error"), pick=lambda im: im[0, :, 0])
        else:
            r[f"{pre}_image_max_abs"] = _maxabs(tok.decode(s["summed_codes"].reshape(out["summed_codes"].shape)), out["image"])

    r["ok"] = _ok(r)
    return r


def _ok(r: Dict[str, Any]) -> bool:
    """Every equality true, every ``*_max_abs`` / ``*_loss_abs`` within its tolerance."""
    ca = ("gen_image_logits", "gen_null_image_logits", "edit_image_logits")
    checks = []
    for k, val in r.items():
        if isinstance(val, bool):
            if k.endswith("labels_equal"):
                continue  # informative: a bit at a near-zero residual may differ (features 1e-5 apart)
            checks.append(val)
        elif k.endswith("_max_abs") or k.endswith("_loss_abs"):
            tol = TOL_AFTER_CA_BF16 if k.startswith(ca) else TOL
            # decoded images: plus the float error each side measured against its own float64 run
            floor = r.get(k.replace("_max_abs", "_fp32_error"), 0.0) + r.get(k.replace("_max_abs", "_ref_fp32_error"), 0.0)
            checks.append(val <= tol + floor)
    return all(checks)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", help="directory with config.json, the safetensors and vectors.pt")
    ap.add_argument("--out", default="", help="also write the line, with what it ran on, to this JSON file "
                                              "(benchmarks/results/vargpt11_parity.json is the committed one)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    r = run(Path(a.dir))
    print(json.dumps(r, sort_keys=True))
    if a.out:
        from benchmarks.step_timing import machine_info  # lazy: subprocess / platform probes

        import transformers

        rec = {"result": r, "machine": machine_info(), "threads": 1, "transformers": transformers.__version__,
               "command": "python -m benchmarks.vargpt11_parity " + " ".join(argv if argv is not None else sys.argv[1:])}
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(rec, indent=2, sort_keys=True) + "\n")
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
