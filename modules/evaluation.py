"""Evaluation shared by the in-loop validation and `experiments.evaluate`: plain functions on a
VARGPT, no Lightning.

  VQA         greedy answers to shard questions, scored by VQAAccuracy (lmms-eval rules), per
              question type, beside two blind baselines: the majority answer per question type
              (the prior) and the same model asked without the image.
  generation  images for shard prompts (fixed per-prompt seeds), FID / IS against the prompts'
              own target images (real statistics cached), and, for the world, attribute accuracy
              of the reference classifier's reading of each image against the prompt.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch

from datamodules.tokens import IMAGE_TOKEN


@dataclass
class EvalConfig:
    """The `eval:` section: what validation and `experiments.evaluate` measure, and how."""

    # shard sets (patterns relative to data.root, like data sources); "" = skip that task
    vqa_shards: str = ""
    gen_shards: str = ""
    num_vqa: int = 200  # questions (first N in shard order: a fixed subset)
    num_gen: int = 64  # prompts (first N in shard order)
    max_new_tokens: int = 8
    blind_baseline: bool = True  # also ask every question without its image
    batch_size: int = 32
    # sampling protocol (written into every report)
    cfg: float = 3.0
    top_k: int = 0
    top_p: float = 0.0
    temperature: float = 1.0
    seed: int = 0  # prompt i uses seed + i
    # feature extractor for FID / IS: "world" (reference classifier) | "inception" (torch-fidelity)
    extractor: str = "world"
    classifier_path: str = ""  # world classifier weights (safetensors); "" = no attribute/FID/IS
    inception_weights_path: str = ""
    num_real: int = 0  # real images for FID statistics; 0 = num_gen
    cache_dir: str = "runs/cache/gen_metrics"
    grid_images: int = 16  # generated images in the logged grid
    table_rows: int = 8  # (image, question, answer, prediction) rows logged
    # generation samples for the prompt-use diagnostic (teacher-forced image CE with the right
    # vs rolled prompts, see prompt_gain); 0 = skip
    prompt_gain_samples: int = 64


# ------------------------------------------------------------------------------------ data
def iter_records(pattern: str, root: str = "", limit: int = 0) -> Iterator[Dict[str, Any]]:
    """Decoded samples of a shard set in stored order (a finite, fixed pass), first `limit`."""
    from datamodules.schema import iter_tar
    from datamodules.stream import decode_sample, expand_shards

    urls = expand_shards(pattern, root)
    if not urls:
        raise FileNotFoundError(f"no shards match {pattern!r} under {root or '.'}")
    n = 0
    for url in urls:
        for raw in iter_tar(url):
            yield decode_sample(raw)
            n += 1
            if limit and n >= limit:
                return


def _user_text(rec: Dict[str, Any]) -> str:
    return next(m["content"] for m in rec["messages"] if m["role"] == "user")


def _first_answer(rec: Dict[str, Any]) -> str:
    return next(m["content"] for m in rec["messages"] if m["role"] == "assistant")


def _batches(items: Sequence[Any], n: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


# ------------------------------------------------------------------------------------ VQA
@torch.no_grad()
def evaluate_vqa(net, samples: Sequence[Dict[str, Any]], cfg: EvalConfig) -> Dict[str, Any]:
    """VQA accuracy of greedy answers, per question type, with the blind baselines."""
    from modules.metrics import VQAAccuracy

    if not samples:
        raise ValueError("evaluate_vqa: no samples")
    overall, blind = VQAAccuracy(), VQAAccuracy()
    per_type: Dict[str, VQAAccuracy] = defaultdict(VQAAccuracy)
    rows: List[Dict[str, Any]] = []
    preds_all: List[str] = []
    for chunk in _batches(samples, cfg.batch_size):
        images = [s["images"][0] if s["images"] else None for s in chunk]
        qs = [_user_text(s["record"]).replace(IMAGE_TOKEN, "").strip() for s in chunk]
        preds = net.answer(images, qs, max_new_tokens=cfg.max_new_tokens)
        preds_all += preds
        answers = [s["record"].get("answers") or [_first_answer(s["record"])] for s in chunk]
        overall.update(preds, answers)
        for s, p, a in zip(chunk, preds, answers):
            per_type[s["record"].get("question_type", "all")].update([p], [a])
        if cfg.blind_baseline:
            blind.update(net.answer([None] * len(chunk), qs, max_new_tokens=cfg.max_new_tokens), answers)
        for s, q, p, a in zip(chunk, qs, preds, answers):
            if len(rows) < cfg.table_rows:
                rows.append({"key": s["key"], "question": q, "answer": a[0], "prediction": p})
    # The prior: the most common answer of each question type in this very set.
    by_type: Dict[str, List[List[str]]] = defaultdict(list)
    for s in samples:
        by_type[s["record"].get("question_type", "all")].append(s["record"].get("answers") or [_first_answer(s["record"])])
    prior = VQAAccuracy()
    for qt, answers in by_type.items():
        majority = Counter(a[0] for a in answers).most_common(1)[0][0]
        prior.update([majority] * len(answers), answers)
    out = {
        "vqa_accuracy": float(overall.compute()),
        "vqa_per_type": {k: float(m.compute()) for k, m in sorted(per_type.items())},
        "vqa_prior_baseline": float(prior.compute()),
        "vqa_n": len(samples),
        "vqa_rows": rows,
    }
    if cfg.blind_baseline:
        out["vqa_blind_baseline"] = float(blind.compute())
    return out


# ------------------------------------------------------------------------------------ generation
def requested_groups(rec: Dict[str, Any]) -> List[Dict[str, Any]]:
    """What a world generation prompt asks for: one group per (shape, colour) with its count,
    and positions / size when the prompt states them (`rec["checks"]`)."""
    checks = rec.get("checks") or {}
    groups: Dict[tuple, Dict[str, Any]] = {}
    for o in rec["scene"]["objects"]:
        g = groups.setdefault((o["shape"], o["colour"]), {"shape": o["shape"], "colour": o["colour"], "count": 0,
                                                          "positions": [], "sizes": []})
        g["count"] += 1
        g["positions"].append(o["position"])
        g["sizes"].append(o["size"])
    out = []
    for g in groups.values():
        if not checks.get("position"):
            g.pop("positions")
        if not checks.get("size"):
            g.pop("sizes")
        out.append(g)
    return out


def check_scene(groups: Sequence[Dict[str, Any]], predicted: Dict[str, Any]) -> Dict[str, bool]:
    """Per-attribute correctness of a predicted scene (classifier.predict_attributes) against the
    requested groups: `object` every requested (shape, colour) is present; `count` with the
    requested count; `position` / `size` where requested; `exact` no unrequested object either;
    `all` every requested attribute right."""
    objs = predicted.get("objects", [])
    res: Dict[str, bool] = {}
    present, count, pos, size = [], [], [], []
    for g in groups:
        mine = [o for o in objs if o["shape"] == g["shape"] and o["colour"] == g["colour"]]
        present.append(len(mine) > 0)
        count.append(len(mine) == g["count"])
        if "positions" in g:
            pos.append(sorted(o["position"] for o in mine) == sorted(g["positions"]))
        if "sizes" in g:
            size.append(sorted(o["size"] for o in mine) == sorted(g["sizes"]))
    res["object"] = all(present)
    res["count"] = all(count)
    if pos:
        res["position"] = all(pos)
    if size:
        res["size"] = all(size)
    res["exact"] = len(objs) == sum(g["count"] for g in groups) and res["count"]
    res["all"] = all(v for k, v in res.items() if k != "exact")
    return res


@torch.no_grad()
def generate_for(net, prompts: Sequence[str], cfg: EvalConfig) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1]; prompt i always gets seed cfg.seed + i."""
    out = []
    for start in range(0, len(prompts), cfg.batch_size):
        chunk = list(prompts[start:start + cfg.batch_size])
        seeds = [cfg.seed + start + i for i in range(len(chunk))]
        out.append(net.generate_image(chunk, cfg=cfg.cfg, top_k=cfg.top_k, top_p=cfg.top_p,
                                      temperature=cfg.temperature, seed=seeds).float().cpu())
    return torch.cat(out)


def target_images(samples: Sequence[Dict[str, Any]], resolution: int) -> torch.Tensor:
    """The prompts' own target images (deterministic resize + centre crop), (N, 3, R, R) in [0, 1]."""
    from datamodules.transforms import GenTransform

    tf = GenTransform(resolution)
    return torch.stack([tf(s["images"][-1]).add(1).mul(0.5) for s in samples])


def load_world_classifier(path: str, cfg_model) -> torch.nn.Module:
    from modules.checkpoint import load_strict, read_state_dict
    from modules.components.classifier import build_classifier

    clf = build_classifier(cfg_model.classifier)
    load_strict(clf, read_state_dict(path), source=path)
    return clf.eval()


@torch.no_grad()
def evaluate_generation(net, samples: Sequence[Dict[str, Any]], cfg: EvalConfig, classifier=None,
                        reals: Optional[torch.Tensor] = None, real_key: str = "", model_cfg=None) -> Dict[str, Any]:
    """Generate for each sample's prompt; FID / IS / attribute accuracy when a classifier (or
    Inception weights) is configured. Returns metrics, the protocol, and the images."""
    prompts = [_user_text(s["record"]) for s in samples]
    images = generate_for(net, prompts, cfg)
    out: Dict[str, Any] = {"gen_n": len(prompts), "gen_images": images, "gen_prompts": prompts}
    if cfg.prompt_gain_samples > 0:  # callers evaluate in eval mode (no dropout), as for sampling
        out.update(prompt_gain(net, samples[:cfg.prompt_gain_samples], cfg.batch_size))
    if classifier is not None and all("scene" in s["record"] for s in samples):
        scores = attribute_scores(classifier, images, [requested_groups(s["record"]) for s in samples])
        out.update({f"gen_attr_{k}": v for k, v in scores.items()})
        out["gen_attribute_accuracy"] = scores["mean"]
    if classifier is not None or cfg.extractor == "inception":
        if reals is None:
            reals = target_images(samples, images.shape[-1])
        out.update(fid_is(images, reals, cfg, classifier, real_key or "prompts"))
    return out


@torch.no_grad()
def prompt_gain(net, samples: Sequence[Dict[str, Any]], batch_size: int = 16) -> Dict[str, float]:
    """How much the generator uses its prompt: teacher-forced image CE (nats per token, mean
    over the samples' L tokens) with each sample's own prompt and with the prompts rolled by one
    (every target paired with another sample's instruction). gen_prompt_gain = wrong - right;
    near 0 means the LLM states reaching the VAR blocks carry almost nothing of the prompt,
    whatever the sampling settings."""
    if len(samples) < 2:
        raise ValueError("prompt_gain needs at least 2 generation samples (prompts are rolled by one)")
    col = net.collator()

    def ce(recs: Sequence[Dict[str, Any]]) -> float:
        out = []
        for chunk in _batches(recs, batch_size):
            out.append(net(col([dict(s, task="generation") for s in chunk]))["loss_img_per_target"])
        return float(torch.cat(out).mean())

    def with_prompt(s: Dict[str, Any], other: Dict[str, Any]) -> Dict[str, Any]:
        rec = dict(s["record"])
        msgs = [dict(m) for m in rec["messages"]]
        msgs[0]["content"] = _user_text(other["record"])
        rec["messages"] = msgs
        return dict(s, record=rec)

    right = ce(samples)
    wrong = ce([with_prompt(s, o) for s, o in zip(samples, list(samples[1:]) + list(samples[:1]))])
    return {"gen_loss_img": right, "gen_loss_img_rolled_prompts": wrong, "gen_prompt_gain": wrong - right}


def attribute_scores(classifier, images: torch.Tensor, groups: Sequence[Sequence[Dict[str, Any]]]) -> Dict[str, float]:
    """Accuracy per attribute over the prompts that request it, `all` (every requested
    attribute right) and `mean` (the average over requested attributes of all prompts)."""
    preds: List[Dict[str, Any]] = []
    for i in range(0, len(images), 64):
        preds += classifier.predict_attributes(images[i:i + 64])
    hits: Dict[str, List[bool]] = defaultdict(list)
    per_attr_all: List[bool] = []
    for g, p in zip(groups, preds):
        r = check_scene(g, p)
        for k, v in r.items():
            hits[k].append(v)
        per_attr_all += [v for k, v in r.items() if k not in ("all", "exact")]
    out = {k: sum(v) / len(v) for k, v in hits.items()}
    out["mean"] = sum(per_attr_all) / max(1, len(per_attr_all))
    return out


def fid_is(fakes: torch.Tensor, reals: torch.Tensor, cfg: EvalConfig, classifier, real_key: str) -> Dict[str, Any]:
    """FID and IS of `fakes` against `reals` with the configured extractor (real statistics
    cached by dataset key, extractor and resolution)."""
    from modules.metrics import GenMetricsConfig, build_gen_metrics

    gcfg = GenMetricsConfig(
        extractor=cfg.extractor, inception_weights_path=cfg.inception_weights_path,
        resolution=0, num_real_images=len(reals), num_fake_images=len(fakes),
        # world classifier: IS over the 24 (shape, colour) classes pooled over its slots
        is_heads=["class"] if cfg.extractor == "world" else [],
        is_splits=1, real_dataset=real_key, real_split=f"n{len(reals)}", cache_dir=cfg.cache_dir,
    )
    metrics = build_gen_metrics(gcfg, world_classifier=classifier if cfg.extractor == "world" else None)
    metrics.prepare_reals(lambda: [reals[i:i + 64] for i in range(0, len(reals), 64)])
    for i in range(0, len(fakes), 64):
        metrics.update(fakes[i:i + 64])
    m = metrics.compute()
    return {"fid": float(m["fid"]), "inception_score": float(m["is_mean"]), "is_std": float(m["is_std"]),
            "gen_metrics_protocol": metrics.protocol()}


def protocol(cfg: EvalConfig, **extra: Any) -> Dict[str, Any]:
    p = {k: v for k, v in asdict(cfg).items() if k not in ("table_rows", "grid_images", "batch_size")}
    p.update(extra)
    return p
