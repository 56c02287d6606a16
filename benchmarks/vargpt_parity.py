"""Parity of this suite's VARGPT with the official VARGPT-v1 code on a released-layout checkpoint.

    python -m benchmarks.vargpt_parity tests/fixtures/vargpt_official

DIR is a released directory (config.json + model.safetensors or shards + index) with the official
outputs in vectors.pt (layout: DIR/README.md). The model is built from DIR's config.json and tensor
headers (modules.released), loaded strictly with the ``vargpt`` format, switched to the released
behaviour (``model.behaviour: released``), and run on every recorded batch:

    und                          eval: logits, loss (the labels given)
    gen, gen_b1, gen_b1_null     train mode, teacher-forced: VQ indices, text and image logits,
                                 losses with the released labels (input ids, only gen pads masked);
                                 gen_b1_null: the null condition row (its cond_drop_rate 1)
    mixed                        train mode, the released if/elif: no VAR inputs, image loss on the
                                 pad-token states (mixed_batches: released)
    infer                        seeded generation: per scale the raw logits (2B, l, V), every
                                 index, the output ids and the decoded image

It prints one JSON line (keys below; maxima over every batch that records the tensor) and exits
with status 1 when an index differs or a difference exceeds 1e-4 (fp32).

The recorded generation starts from its context (prompt + decoded text + <|image_gen_start|>,
all of output_ids but the last two): the official loop checks each greedy token for
<|image_gen_start|>, and the fixture's maker had to put it first (a random-weight model never
emits it; greedy decoding of the tiny fixture gives <|image_gen_end|> first). Its output ids
(the context, then the token after it twice) and everything sampled are then compared.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from modules.released import load_released

TOL = 1e-4
KEYS = ("vq_indices_equal", "und_logits_max_abs", "gen_text_logits_max_abs", "gen_image_logits_max_abs",
        "loss_max_abs", "released_mixed_loss_max_abs", "infer_logits_max_abs", "infer_indices_equal",
        "infer_image_max_abs")
GEN_BATCHES = ("gen", "gen_b1", "gen_b1_null")


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise ValueError(f"shape {tuple(a.shape)} vs recorded {tuple(b.shape)}")
    return float((a.float() - b.float()).abs().max())


def _teacher_forced(net, rec: Dict[str, Any]) -> Dict[str, Any]:
    n = rec["pixel_gen_values"].shape[0]
    null = float(rec.get("cond_drop_rate", 0.0)) >= 1.0
    batch = {"input_ids": rec["input_ids"], "attention_mask": rec["attention_mask"],
             "labels": rec.get("labels_arg", rec["input_ids"]), "gen_images": rec["pixel_gen_values"],
             "gen_uncond": torch.full((n,), 1 if null else 0, dtype=torch.long)}
    if rec.get("pixel_values") is not None:
        batch["pixel_values"] = rec["pixel_values"]
    idx = net.encode_targets(batch)
    with torch.no_grad():
        out = net(batch, return_logits=True)
    r = {"vq": torch.equal(torch.cat(idx, 1), rec["gt_BL"]),
         "text": _max_abs(out["logits_text"], rec["logits"][:, :-1]),
         "loss": max(abs(float(out[k]) - float(rec[k])) for k in ("loss_text", "loss_img", "loss"))}
    r["image"] = _max_abs(out["logits_img"], rec["image_logits"]) if "logits_img" in out else float("inf")
    return r


def run_parity(d: str | Path) -> Dict[str, Any]:
    d = Path(d)
    vec = torch.load(d / "vectors.pt", map_location="cpu", weights_only=True)
    net, _ = load_released(d, behaviour="released")
    net.cfg.cond_drop_rate = 0.0  # the records fix the condition row (gen_b1_null: the null row)
    res: Dict[str, Any] = {}

    u = vec["und"]
    net.eval()
    with torch.no_grad():
        emb, _, _, _ = net.embed({"input_ids": u["input_ids"], "pixel_values": u["pixel_values"]}, with_gen=False)
        h = net.run_llm(emb, u["attention_mask"]).last_hidden_state
        logits = net.llm.get_output_embeddings()(h)
        out = net({"input_ids": u["input_ids"], "attention_mask": u["attention_mask"], "labels": u["labels"],
                   "pixel_values": u["pixel_values"]})
    res["und_logits_max_abs"] = _max_abs(logits, u["logits"])
    losses = [abs(float(out["loss_text"]) - float(u["loss"]))]

    net.train()
    tf = {name: _teacher_forced(net, vec[name]) for name in GEN_BATCHES + ("mixed",) if name in vec}
    res["vq_indices_equal"] = all(r["vq"] for r in tf.values())
    res["gen_text_logits_max_abs"] = max(r["text"] for r in tf.values())
    res["gen_image_logits_max_abs"] = max(r["image"] for r in tf.values())
    res["loss_max_abs"] = max(losses + [r["loss"] for n, r in tf.items() if n != "mixed"])
    res["released_mixed_loss_max_abs"] = tf["mixed"]["loss"] if "mixed" in tf else float("inf")

    net.eval()
    res.update(_infer(net, vec["infer"]))
    return {k: res[k] for k in KEYS}


def _infer(net, rec: Dict[str, Any]) -> Dict[str, Any]:
    out_ids = rec["output_ids"][0].tolist()
    context = out_ids[:-2]
    if context[-1] != net.ids["gen_start"]:
        raise ValueError(f"infer.output_ids does not end with <|image_gen_start|> + 2 tokens: {out_ids[-4:]}")
    net.cfg.gen_start = "forced"
    logits: List[torch.Tensor] = []
    g = net.generate([context[:-1]], cfg=float(rec["cfg"]), top_k=int(rec["top_k"]), top_p=float(rec["top_p"]),
                     seed=int(rec["seed"]), logits_out=logits)
    same = g.output_ids[0] == out_ids and len(g.indices) == len(rec["idx"]) and all(
        torch.equal(a.cpu(), b) for a, b in zip(g.indices, rec["idx"]))
    return {"infer_logits_max_abs": max(_max_abs(a, b) for a, b in zip(logits, rec["raw_logits_2BlV"])),
            "infer_indices_equal": bool(same),
            "infer_image_max_abs": _max_abs(g.images, rec["recon_01"])}


def passed(res: Dict[str, Any]) -> bool:
    return all(bool(v) if isinstance(v, bool) else float(v) <= TOL for v in res.values())


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.vargpt_parity", description=__doc__.split("\n")[0])
    ap.add_argument("dir", help="released-layout directory with vectors.pt")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    res = run_parity(args.dir)
    print(json.dumps(res))
    return 0 if passed(res) else 1


if __name__ == "__main__":
    sys.exit(main())
