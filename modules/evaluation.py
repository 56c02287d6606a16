"""Evaluation of a VARGPT: the one evaluator behind the in-loop callback
(modules/stages/callbacks.py ``EvalCallback``) and ``experiments.evaluate``; no Lightning here.

  VQA         greedy answers to shard questions, scored by VQAAccuracy (lmms-eval rules), per
              question type, beside two blind baselines: the majority answer per question type
              (the prior) and the same model asked without the image.
  generation  images for shard prompts (fixed per-prompt seeds), FID / IS against the prompts'
              own target images (real statistics cached), the CLIP score against their captions
              (``eval.clip_dir``), and, for the world, attribute accuracy of the reference
              classifier's reading of each image against the prompt.
  edit        world edit pairs (datamodules/world_edit.py): each source image edited by its
              instruction (fixed per-sample seeds), the classifier's reading scored by
              ``metrics_world.edit_scores`` (edit accuracy, preservation, both), with intervals.

The model is anything with the ``EvalModel`` calls: a v1 ``VARGPT`` itself, a v1.1 world model
through ``modules.eval_v11.V11EvalModel``.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict, replace
from typing import Any, Dict, Iterator, List, Optional, Protocol, Sequence, Tuple

import torch
from torchmetrics import Metric

from datamodules.paths import resolve_path
from datamodules.config import SourceConfig
from datamodules.stream import ShardStream
from datamodules.tokens import IMAGE_TOKEN
from datamodules.transforms import GenTransform
from modules.checkpoint import load_strict, read_state_dict
from modules.config import EvalConfig
from modules.components.classifier import build_classifier
from modules.metrics import GenMetricsConfig, VQAAccuracy, build_gen_metrics
from modules.metrics_clip import clip_score
from modules.metrics_world import attribute_scores, bootstrap_ci, edit_accuracy, requested_groups
from modules.self_verify import draw_seed, pick_best, pick_summary, prompt_questions, understanding_scores

TASKS = ("vqa", "generation", "edit")


class EvalModel(Protocol):
    """What the evaluator calls on a model. A v1 ``VARGPT`` (modules/inference.py) has these
    itself; ``modules.eval_v11.V11EvalModel`` puts a v1.1 world model behind them and adds
    ``edit_images(sources, instructions, seeds) -> (N, 3, R, R)`` and ``eval_resolution``. A model
    with ``v1_diagnostics = False`` has no VQVAE indices / teacher-forced image loss: the v1
    diagnostics (eval.teacher_scales, eval.best_of, the prompt gain) are refused or skipped."""

    def answer(self, images: Sequence[Any], questions: Sequence[str], max_new_tokens: int = 16) -> List[str]: ...

    def generate_image(self, prompts: Sequence[str], **sampling: Any) -> torch.Tensor: ...


def resolution_of(net: Any) -> int:
    """The side of a model's generated images: ``eval_resolution`` (interface), else the v1 VQVAE's."""
    r = getattr(net, "eval_resolution", None)
    return int(r) if r is not None else int(net.vqvae.cfg.resolution)


# ------------------------------------------------------------------------------------ data
def read_records(pattern: str, root: str = "", limit: int = 0) -> Tuple[List[Dict[str, Any]], int]:
    """(decoded samples of a shard set in stored order, the first ``limit``; the number of
    unreadable samples skipped on the way). Bad samples (corrupt image, broken JSON, a
    truncated shard) are skipped, logged with key and shard, and counted, as in training."""
    sources = [SourceConfig(name="eval", shards=pattern, task="")]  # task "": each record keeps its own
    try:
        stream = ShardStream(sources, mode="eval", root=root, shuffle_buffer=0, resampled=False, rank=0, world_size=1)
    except FileNotFoundError:
        raise FileNotFoundError(f"no shards match {pattern!r} under {root or '.'}") from None
    out: List[Dict[str, Any]] = []
    for s in stream:
        out.append(s)
        if limit and len(out) >= limit:
            break
    return out, stream.n_unreadable


def iter_records(pattern: str, root: str = "", limit: int = 0) -> Iterator[Dict[str, Any]]:
    """The samples of ``read_records`` one by one."""
    yield from read_records(pattern, root, limit)[0]


def local(metric: torch.nn.Module) -> torch.nn.Module:
    """Evaluation runs in one process (rank 0 of a distributed run): its metrics must not wait
    for the other ranks at compute() (they are training on; that would deadlock)."""
    for m in metric.modules():
        if isinstance(m, Metric):
            m.sync_on_compute = False
            m._to_sync = False  # what compute() reads (torchmetrics copies sync_on_compute at init)
    return metric


def user_text(rec: Dict[str, Any]) -> str:
    """The first user turn of a record: a generation prompt, or a question with its image tag."""
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
    if not samples:
        raise ValueError("evaluate_vqa: no samples")
    # keep_scores: each question is scored once; its score feeds the mean, the bootstrap interval
    # and the per-type means
    overall, blind = (VQAAccuracy(sync_on_compute=False, keep_scores=True) for _ in range(2))
    types: List[str] = []  # question type of each scored question, in order
    rows: List[Dict[str, Any]] = []
    preds_all: List[str] = []
    for chunk in _batches(samples, cfg.batch_size):
        images = [s["images"][0] if s["images"] else None for s in chunk]
        qs = [user_text(s["record"]).replace(IMAGE_TOKEN, "").strip() for s in chunk]
        preds = net.answer(images, qs, max_new_tokens=cfg.max_new_tokens)
        preds_all += preds
        answers = [s["record"].get("answers") or [_first_answer(s["record"])] for s in chunk]
        overall.update(preds, answers)
        types += [s["record"].get("question_type", "all") for s in chunk]
        if cfg.blind_baseline:
            blind_preds = net.answer([None] * len(chunk), qs, max_new_tokens=cfg.max_new_tokens)
            blind.update(blind_preds, answers)
        for s, q, p, a in zip(chunk, qs, preds, answers):
            if len(rows) < cfg.table_rows:
                rows.append({"key": s["key"], "question": q, "answer": a[0], "prediction": p})
    # The prior: the most common answer of each question type in this very set.
    by_type: Dict[str, List[List[str]]] = defaultdict(list)
    for s in samples:
        by_type[s["record"].get("question_type", "all")].append(s["record"].get("answers") or [_first_answer(s["record"])])
    prior = VQAAccuracy(sync_on_compute=False)
    for qt, answers in by_type.items():
        majority = Counter(a[0] for a in answers).most_common(1)[0][0]
        prior.update([majority] * len(answers), answers)
    out = {
        "vqa_accuracy": float(overall.compute()),
        "vqa_accuracy_ci95": _question_ci(overall.per_sample().tolist()),
        "vqa_per_type": _type_means(types, overall.per_sample()),
        "vqa_prior_baseline": float(prior.compute()),
        "vqa_n": len(samples),
        "vqa_rows": rows,
    }
    if cfg.blind_baseline:
        out["vqa_blind_baseline"] = float(blind.compute())
        out["vqa_blind_baseline_ci95"] = _question_ci(blind.per_sample().tolist())
    return out


def _type_means(types: Sequence[str], scores: torch.Tensor) -> Dict[str, float]:
    """Mean score per question type, from the per-question scores (in the order of ``types``)."""
    by: Dict[str, List[float]] = defaultdict(list)
    for t, v in zip(types, scores.tolist()):
        by[t].append(v)
    return {t: sum(v) / len(v) for t, v in sorted(by.items())}


def _question_ci(scores: Sequence[float]) -> List[float]:
    """95% percentile bootstrap over the questions (metrics_world.bootstrap_ci): the one place a
    VQA interval is computed. Right for the world's 0/1 answers and for lmms-eval's fractional
    min(matches / 3, 1) scores alike, where a binomial from n would not be."""
    return bootstrap_ci(torch.tensor(scores, dtype=torch.float64), torch.ones(len(scores), dtype=torch.float64))


# ------------------------------------------------------------------------------------ generation
@torch.no_grad()
def generate_for(net, prompts: Sequence[str], cfg: EvalConfig,
                 teacher_idx: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1]; prompt i always gets seed cfg.seed + i. teacher_idx: per
    scale (N, pn^2) indices forced for those first scales (eval.teacher_scales), the rest sampled."""
    out = []
    for start in range(0, len(prompts), cfg.batch_size):
        chunk = list(prompts[start:start + cfg.batch_size])
        seeds = [cfg.seed + start + i for i in range(len(chunk))]
        tf = None if teacher_idx is None else [t[start:start + len(chunk)] for t in teacher_idx]
        out.append(net.generate_image(chunk, cfg=cfg.cfg, top_k=cfg.top_k, top_p=cfg.top_p,
                                      temperature=cfg.temperature, seed=seeds, parity=cfg.parity,
                                      sampler=cfg.sampler, dtype=cfg.sample_dtype, teacher_idx=tf).float().cpu())
    return torch.cat(out)


def target_images(samples: Sequence[Dict[str, Any]], resolution: int) -> torch.Tensor:
    """The prompts' own target images (deterministic resize + centre crop), (N, 3, R, R) in [0, 1]."""
    tf = GenTransform(resolution)
    return torch.stack([tf(s["images"][-1]).add(1).mul(0.5) for s in samples])


def rerendered_targets(samples: Sequence[Dict[str, Any]], resolution: int, seed: int = 1) -> torch.Tensor:
    """Each world generation sample's request rendered again with its own placement and seed
    (``datamodules.world.rerender_request``), transformed as ``target_images``: real images for the
    same prompts, independent of the stored targets. (N, 3, R, R) in [0, 1]."""
    from PIL import Image

    from datamodules.world import render, rerender_request  # lazy: the world only where it is evaluated

    if not all("scene" in s["record"] for s in samples):
        raise ValueError("a same-prompt real-vs-real floor needs world generation records (a 'scene' per "
                         "sample); for other data pass shards of other real images as the baseline")
    tf = GenTransform(resolution)
    return torch.stack([tf(Image.fromarray(render(rerender_request(s["record"], seed)))).add(1).mul(0.5)
                        for s in samples])


@torch.no_grad()
def vqvae_reconstructions(vqvae: torch.nn.Module, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] (as ``target_images`` gives them) -> their VQVAE
    reconstructions (encode to the multi-scale indices, decode), same shape and range."""
    out = [vqvae.img_to_recon(images[i:i + batch].mul(2).sub(1)).add_(1).mul_(0.5) for i in range(0, len(images), batch)]
    return torch.cat(out).clamp_(0, 1)


def load_world_classifier(path: str, cfg_model) -> torch.nn.Module:
    """The world's reference classifier (``model.classifier`` sizes) from a safetensors file."""
    clf = build_classifier(cfg_model.classifier)
    load_strict(clf, read_state_dict(path), source=path)
    return clf.eval()


@torch.no_grad()
def evaluate_generation(net, samples: Sequence[Dict[str, Any]], cfg: EvalConfig, classifier=None,
                        reals: Optional[torch.Tensor] = None, real_key: str = "", model_cfg=None) -> Dict[str, Any]:
    """Generate for each sample's prompt; FID / IS / attribute accuracy when a classifier (or
    Inception weights) is configured. Returns metrics, the protocol, and the images."""
    prompts = [user_text(s["record"]) for s in samples]
    teacher = None
    v1 = getattr(net, "v1_diagnostics", True)
    if not v1 and (cfg.teacher_scales > 0 or cfg.best_of > 1):
        raise ValueError("eval.teacher_scales and eval.best_of are v1 (VQVAE / self-verify) protocols: "
                         "set eval.teacher_scales=0 eval.best_of=1 for this model")
    if cfg.teacher_scales > 0:
        K = len(net.var.patch_nums)
        if cfg.teacher_scales > K:
            raise ValueError(f"eval.teacher_scales={cfg.teacher_scales} but the VAR has {K} scales")
        dev = next(net.vqvae.parameters()).device
        targets = target_images(samples, net.cfg.vqvae.resolution)  # the prompts' own images
        # the model's own fp32 tokenization of generation targets ([-1, 1] images)
        teacher = net.encode_targets({"gen_images": targets.to(dev).mul(2).sub(1)})[:cfg.teacher_scales]
        reals = targets if reals is None else reals  # FID's default reals, made once
    images = generate_for(net, prompts, cfg, teacher)
    out: Dict[str, Any] = {"gen_n": len(prompts), "gen_images": images, "gen_prompts": prompts}
    first_draw = images
    draws = [images]
    if cfg.best_of > 1:  # N draws per prompt, the model's own understanding keeps one (modules/self_verify.py)
        questions = prompt_questions(prompts, [str(s.get("key", "")) or f"sample {i}" for i, s in enumerate(samples)])
        draws = [images] + [generate_for(net, prompts, replace(cfg, seed=draw_seed(cfg.seed, k)), teacher)
                            for k in range(1, cfg.best_of)]
        scores_KN = torch.stack([understanding_scores(net, d, questions, cfg.batch_size) for d in draws])
        images, pick_N = pick_best(draws, scores_KN)
        out.update(gen_images=images, gen_best_of_kept=pick_summary(pick_N, cfg.best_of))
    if cfg.prompt_gain_samples > 0 and v1:  # callers evaluate in eval mode (no dropout), as for sampling
        out.update(prompt_gain(net, samples[:cfg.prompt_gain_samples], cfg.batch_size))
    seeds: Dict[str, List[float]] = {}  # best of N: every draw is a one-draw run at its own seed
    if classifier is not None and all("scene" in s["record"] for s in samples):
        groups = [requested_groups(s["record"]) for s in samples]
        scores = attribute_scores(classifier, images, groups)
        # gen_attr_<attribute> (+ _mean_ci95 / _all_ci95), and gen_attr_by_objects: one- vs multi-object prompts
        out.update({f"gen_attr_{k}": v for k, v in scores.items()})
        out["gen_attribute_accuracy"] = scores["mean"]
        if cfg.best_of > 1:  # the single-draw protocol's figures, from the same run (draw 0)
            per_draw = [attribute_scores(classifier, d, groups) for d in draws]
            one = per_draw[0]
            out["gen_attribute_accuracy_one_draw"] = one["mean"]
            out["gen_one_draw"] = {k: one[k] for k in ("mean", "mean_ci95", "all", "all_ci95", "object", "count",
                                                        "position", "by_objects") if k in one}
            seeds.update(attribute_accuracy=[d["mean"] for d in per_draw], attr_all=[d["all"] for d in per_draw])
    if classifier is not None or cfg.extractor == "inception":
        if reals is None:
            reals = target_images(samples, images.shape[-1])
        out.update(fid_is(images, reals, cfg, classifier, real_key or "prompts"))
        if cfg.best_of > 1:  # each draw against the same reals: the single-draw protocol's FID / IS
            per_fid = [fid_is(d, reals, cfg, classifier, real_key or "prompts") for d in draws]
            out.update(fid_one_draw=per_fid[0]["fid"], inception_score_one_draw=per_fid[0]["inception_score"])
            seeds.update(fid=[f["fid"] for f in per_fid], inception_score=[f["inception_score"] for f in per_fid])
    if seeds:
        # The spread a one-draw figure has from the draw seed alone (the prompts fixed): the K draws
        # of best of K are K one-draw runs. Mean and 1.96 standard deviations over them.
        out["gen_draw_seeds"] = {k: {"values": [round(x, 4) for x in v], "mean": round(float(torch.tensor(v).mean()), 4),
                                     "range95": _range95(v)} for k, v in seeds.items()}
    if cfg.clip_dir:
        out.update(clip_score(images, clip_texts(samples), str(resolve_path(cfg.clip_dir)), cfg.batch_size))
    return out


@torch.no_grad()
def evaluate_edit(net, samples: Sequence[Dict[str, Any]], cfg: EvalConfig, classifier) -> Dict[str, Any]:
    """Each world edit sample's source image edited by its instruction (sample i: seed cfg.seed + i),
    read by the classifier and scored against the record (``metrics_world.edit_scores``)."""
    if not hasattr(net, "edit_images"):
        raise ValueError(f"{type(net).__name__} has no editing path (edit_images): editing is evaluated on "
                         f"VARGPT-v1.1 exports")
    recs = [s["record"] for s in samples]
    bad = [s["key"] for s in samples if "source_scene" not in s["record"] or len(s["images"]) < 1]
    if bad:
        raise ValueError(f"edit samples {bad[:3]} have no source_scene / source image: not world edit records "
                         f"(render them with python -m datamodules.world_edit)")
    images = torch.cat([net.edit_images([s["images"][0] for s in chunk], [user_text(s["record"]) for s in chunk],
                                        [cfg.seed + start + i for i in range(len(chunk))])
                        for start, chunk in ((i, samples[i:i + cfg.batch_size]) for i in range(0, len(samples), cfg.batch_size))])
    side = classifier.cfg.image_size
    if images.shape[-1] != side:
        images = torch.nn.functional.interpolate(images, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    sc = edit_accuracy(classifier, images, recs)
    return {"edit_accuracy": sc["edit"], "edit_accuracy_ci95": sc["edit_ci95"], "edit_preservation": sc["preservation"],
            "edit_preservation_ci95": sc["preservation_ci95"], "edit_success": sc["success"],
            "edit_success_ci95": sc["success_ci95"], "edit_n": sc["n"], "edit_by_op": sc["by_op"]}


def _range95(values: Sequence[float]) -> List[float]:
    """mean +- 1.96 sd (sample sd) of K one-draw figures: where one run's figure falls 95% of the
    time from its draw seed alone."""
    t = torch.tensor(list(values), dtype=torch.float64)
    sd = float(t.std()) if len(t) > 1 else float("nan")
    m = float(t.mean())
    return [round(m - 1.96 * sd, 4), round(m + 1.96 * sd, 4)]


def clip_texts(samples: Sequence[Dict[str, Any]]) -> List[str]:
    """What each generated image is scored against for the CLIP score: the caption inside the
    instruction when the record lists its image's captions (COCO from datamodules.convert: the
    longest caption the prompt contains), else the instruction itself."""
    out = []
    for s in samples:
        prompt = user_text(s["record"])
        caps = [c for c in (s["record"].get("captions") or []) if isinstance(c, str) and c and c in prompt]
        out.append(max(caps, key=len) if caps else prompt)
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

    def with_prompt(s: Dict[str, Any], other: Dict[str, Any]) -> Dict[str, Any]:
        rec = dict(s["record"])
        msgs = [dict(m) for m in rec["messages"]]
        msgs[0]["content"] = user_text(other["record"])
        rec["messages"] = msgs
        return dict(s, record=rec)

    rolled = [with_prompt(s, o) for s, o in zip(samples, list(samples[1:]) + list(samples[:1]))]
    # One pass per chunk over its right-prompt and rolled-prompt rows together (2n rows), the
    # targets tokenized once: a sample's loss does not depend on its batch-mates (right padding,
    # causal mask), so this is the two passes of before at half the calls and one VQVAE encode.
    half = max(1, batch_size // 2)
    right, wrong = [], []
    for start in range(0, len(samples), half):
        mine, theirs = samples[start:start + half], rolled[start:start + half]
        batch = col([dict(s, task="generation") for s in list(mine) + list(theirs)])
        n = len(mine)
        if batch.get("gen_indices") is None:  # the same targets twice: encode the first n once
            imgs = batch.pop("gen_images")
            idx = net.encode_targets({"gen_images": imgs[:n]})
            batch["gen_indices"] = [torch.cat([t, t]) for t in idx]
        per_target = net(batch)["loss_img_per_target"]  # (2n,): right rows first
        right.append(per_target[:n])
        wrong.append(per_target[n:])
    r, w = float(torch.cat(right).mean()), float(torch.cat(wrong).mean())
    return {"gen_loss_img": r, "gen_loss_img_rolled_prompts": w, "gen_prompt_gain": w - r}


def fid_is(fakes: torch.Tensor, reals: torch.Tensor, cfg: EvalConfig, classifier, real_key: str) -> Dict[str, Any]:
    """FID and IS of `fakes` against `reals` with the configured extractor (real statistics
    cached by dataset key, extractor and resolution)."""
    gcfg = GenMetricsConfig(
        extractor=cfg.extractor, inception_weights_path=cfg.inception_weights_path,
        resolution=0, num_real_images=len(reals), num_fake_images=len(fakes),
        # world classifier: IS over the 24 (shape, colour) classes pooled over its slots
        is_heads=["class"] if cfg.extractor == "world" else [],
        is_splits=1, real_dataset=real_key, real_split=f"n{len(reals)}", cache_dir=cfg.cache_dir,
    )
    metrics = local(build_gen_metrics(gcfg, world_classifier=classifier if cfg.extractor == "world" else None))
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


# ------------------------------------------------------------------------------------ the evaluator
class Evaluator:
    """One evaluation protocol (an ``eval:`` section) over fixed sample sets, for any VARGPT.

    The sample sets (first ``num_vqa`` questions / ``num_gen`` prompts of the shards, in stored
    order) and the reference classifier are read once and reused, so the in-loop callback
    evaluates the same items at every validation and ``experiments.evaluate`` the same ones as
    the loop did. ``run(net, tasks)`` returns the report: metrics, per-type VQA, the protocol, plus
    ``vqa_rows`` (a few predictions) and ``gen_images`` / ``gen_prompts`` for grids.
    """

    def __init__(self, cfg: EvalConfig, model_cfg: Any, data_root: str = "", edit_shards: str = "", num_edit: int = 64):
        self.cfg, self.model_cfg = cfg, model_cfg
        # world edit shards (not in the eval section, whose fields are in every run's config hash)
        self.edit_shards, self.num_edit = edit_shards, num_edit
        self.root = str(resolve_path(data_root)) if data_root else ""
        self._sets: Dict[str, List[Dict[str, Any]]] = {}
        self.num_unreadable: Dict[str, int] = {}  # per task: bad samples skipped reading its set
        self._classifier: Any = None

    def tasks(self) -> List[str]:
        """The tasks this protocol configures (shards given)."""
        return [t for t, shards in (("vqa", self.cfg.vqa_shards), ("generation", self.cfg.gen_shards)) if shards]

    def samples(self, task: str) -> List[Dict[str, Any]]:
        if task == "edit" and task not in self._sets:
            if not self.edit_shards:
                raise ValueError("evaluation task 'edit' has no shards: pass the world edit shards "
                                 "(python -m datamodules.world_edit), e.g. --edit-shards 'runs/data/world-edit/test/edit-*.tar'")
            self._sets[task], self.num_unreadable[task] = read_records(self.edit_shards, "", self.num_edit)
        if task not in self._sets:
            pattern, n = (self.cfg.vqa_shards, self.cfg.num_vqa) if task == "vqa" else (self.cfg.gen_shards, self.cfg.num_gen)
            if not pattern:
                key = "eval.vqa_shards" if task == "vqa" else "eval.gen_shards"
                raise ValueError(f"evaluation task {task!r} has no shards: set {key}=PATTERN (relative to data.root)")
            self._sets[task], self.num_unreadable[task] = read_records(pattern, self.root, n)
        return self._sets[task]

    @property
    def classifier(self) -> Optional[torch.nn.Module]:
        if self._classifier is None and self.cfg.classifier_path:
            self._classifier = load_world_classifier(str(resolve_path(self.cfg.classifier_path)), self.model_cfg)
        return self._classifier

    @property
    def real_key(self) -> str:
        """Cache key of the generation set's real-image statistics."""
        return f"{self.cfg.gen_shards}@{self.root}"

    @torch.no_grad()
    def run(self, net: Any, tasks: Sequence[str]) -> Dict[str, Any]:
        bad = [t for t in tasks if t not in TASKS]
        if bad:
            raise ValueError(f"unknown evaluation task(s) {bad}; valid: {', '.join(TASKS)}")
        report: Dict[str, Any] = {}
        if "vqa" in tasks:
            report.update(evaluate_vqa(net, self.samples("vqa"), self.cfg))
        if "generation" in tasks:
            report.update(evaluate_generation(net, self.samples("generation"), self.cfg, self.classifier,
                                              real_key=self.real_key))
        if "edit" in tasks:
            if self.classifier is None:
                raise ValueError("evaluation task 'edit' reads edits with the reference classifier: set eval.classifier_path")
            report.update(evaluate_edit(net, self.samples("edit"), self.cfg, self.classifier))
        for t in tasks:
            prefix = {"vqa": "vqa", "generation": "gen"}.get(t, t)  # edit -> edit_num_unreadable
            report[f"{prefix}_num_unreadable"] = self.num_unreadable.get(t, 0)
        extra = net.protocol() if callable(getattr(net, "protocol", None)) else {}
        report["protocol"] = protocol(self.cfg, resolution=resolution_of(net), data_root=self.root,
                                      resize="targets: PIL resize of the short side + centre crop to the VQVAE "
                                             "resolution; generated: native", **extra)
        if "edit" in tasks:
            report["protocol"]["edit_shards"], report["protocol"]["num_edit"] = self.edit_shards, self.num_edit
        return report


def report_metrics(report: Dict[str, Any], prefix: str) -> Dict[str, float]:
    """The scalar metrics of an evaluation report, flat: ``<prefix><k>`` for every numeric
    top-level value (not bools), ``<prefix>vqa_<type>`` per question type and
    ``<prefix>real_vs_real_<k>`` / ``<prefix>vqvae_reconstruction_<k>`` for the real-vs-real
    floor and the tokenizer's ceiling, ``<prefix>gen_attr_objects<n>_mean`` per number of requested
    objects (the mean only: the full ``gen_attr_by_objects`` stays in the report, and sweep tables
    stay readable). The one flattening of reports: the
    in-loop callback logs ``val/...``, ``experiments.evaluate`` and sweeps ``eval/...``."""
    flat = {f"{prefix}{k}": float(v) for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for k, v in (report.get("vqa_per_type") or {}).items():
        flat[f"{prefix}vqa_{k}"] = float(v)
    for n, scores in (report.get("gen_attr_by_objects") or {}).items():
        flat[f"{prefix}gen_attr_objects{n}_mean"] = float(scores["mean"])
    for part in ("real_vs_real", "vqvae_reconstruction", "bsq_reconstruction"):
        for k, v in (report.get(part) or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                flat[f"{prefix}{part}_{k}"] = float(v)
    return flat
