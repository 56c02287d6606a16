"""The measuring pieces of benchmarks/gpu_check.py (that file runs the phases and writes the report).

  build_model        one VARGPT shared by the stage-3 and stage-2 modules: the real 7B recipe with
                     random weights (bf16) built on the target device, or the world recipe with
                     its assets/world weights; on "meta" a plan-only build
  make_batch         hand-made samples at the recipe's lengths through ``net.collator(data, train=True)``
  train_steps        the step of a stage in a plain torch loop: forward (``net(batch)["loss"]``,
                     bf16 autocast as the recipe's bf16-mixed), backward, grad clip, AdamW + LR
                     schedule from the stage's ``configure_optimizers()``
  step_flops         FlopCounterMode over one step: executed FLOPs (with the recompute of
                     gradient checkpointing) and model FLOPs (without it)
  analytic_flops     2 x Linear weights x tokens per pass, as a cross-check
  peak_flops         the device's bf16 dense peak from its name, else a measured matmul
  lightning_roundtrip  the suite's checkpoint path: Lightning fit (2 steps) + TrainingCheckpoint
                     save, then a fresh fit resumed from the file (weights / optimizer compared)
  generate           ``net.generate_image`` for a batch of prompts, images/s
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import lightning as L
import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from datamodules.paths import REPO_ROOT
from datamodules.tokens import IMAGE_GEN_PLACEHOLDER, IMAGE_TOKEN
from experiments.config import load_config
from experiments.run import build_trainer
from modules.checkpoint import checkpoint_info
from modules.components.text_tokenizer import train_world_tokenizer
from modules.components.vqvae import build_vqvae
from modules.stages.resume import TrainingCheckpoint
from modules.vargpt import VARGPT
from modules.weights import load_weights

STAGES = ("stage3", "stage2")  # the released recipe first
RECIPES = {size: {s: REPO_ROOT / f"experiments/{size}/{s}.yaml" for s in STAGES} for size in ("real", "world")}
# Per size: samples per step (the recipe's per-device batch is 8), text tokens of an understanding
# question / answer and of a generation instruction, generation samples in a stage-2 batch (the
# image-loss path through the frozen VAR; the recipe's mix has 5 in 1178), images generated.
SIZES = {
    "real": dict(batch=8, q_tokens=40, a_tokens=120, instr_tokens=40, stage2_gen=1, gen_batch=8),
    "world": dict(batch=8, q_tokens=24, a_tokens=24, instr_tokens=16, stage2_gen=1, gen_batch=4),
}
# Always: no init_from chain, no in-loop evaluation, no prompt dropout (fixed lengths), and the
# recipe's gradient checkpointing (the world recipe leaves it off; on here so the path is exercised).
COMMON = ["init_from=''", "eval.vqa_shards=''", "eval.gen_shards=''", "data.prompt_dropout=0.0",
          "model.llm.gradient_checkpointing=true"]
REAL = ["model.load=[]", "model.vision.config_dir=''"]  # random weights, CLIP-L/336 from its preset
BF16 = ["model.llm.dtype=bfloat16", "model.projector_dtype=bfloat16", "model.var_dtype=bfloat16",
        "model.vision.dtype=bfloat16"]
# bf16 dense tensor-core peaks (NVIDIA data sheets; "with sparsity" figures halved), most specific first.
BF16_PEAKS = (("H100 PCIE", 756e12), ("H100 NVL", 835e12), ("H200 NVL", 835e12), ("GH200", 989e12),
              ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))
WORDS = ("the a red blue green yellow purple black large small circle square triangle cross left right top "
         "bottom centre image picture shows there is are two three one of on in at and with what where colour "
         "shape how many objects describe draw please generate paint short caption answer question").split()
CORPUS = ["A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.", "USER: ASSISTANT:", " ".join(WORDS)]


# ------------------------------------------------------------------------------------------
# device helpers
# ------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def amp_context(device: torch.device, amp: bool):
    """bf16 autocast (the recipe's ``bf16-mixed``) or nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # resets VmHWM (Linux): the peak below is this phase's
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def peak_memory_gb(device: torch.device) -> Dict[str, float]:
    if device.type == "cuda":
        return {"peak_allocated_gb": torch.cuda.max_memory_allocated(device) / 1e9,
                "peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 1e9}
    return {"peak_rss_gb": _status_kb("VmHWM") / 1e6}


def _status_kb(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------
# model and batches
# ------------------------------------------------------------------------------------------


def stage_configs(size: str, bf16: bool, extra: Sequence[str] = ()) -> Dict[str, Any]:
    """stage name -> validated ExperimentConfig of the recipe at ``size``."""
    over = list(COMMON) + (list(REAL) if size == "real" else []) + (list(BF16) if bf16 else []) + list(extra)
    return {s: load_config(RECIPES[size][s], over).cfg for s in STAGES}


def stand_in_tokenizer(work: Path) -> Any:
    """The real recipe's tokenizer is a LLaVA checkpoint directory; this BPE (with VARGPT's special
    tokens) stands in. Shorter than 32000 entries, so the Vicuna vocabulary stays at 32000 rows."""
    return train_world_tokenizer(CORPUS * 3, work / "tokenizer", vocab_size=400)


def build_model(cfg: Any, size: str, device: torch.device, work: Path) -> VARGPT:
    """The composed model. real: random weights, built directly on ``device`` (no host copy; the
    builders' own initialisation), the stand-in tokenizer. world: the recipe's tokenizer and its
    ``model.load`` weights (assets/world). meta: parameters without storage (plan only), the
    VQVAE on the CPU (the collator reads its fingerprint)."""
    tok = stand_in_tokenizer(work) if size == "real" else None
    with torch.device(device):
        net = VARGPT(cfg.model, tokenizer=tok, template=cfg.data.chat)
    if device.type == "meta":
        net.vqvae = build_vqvae(cfg.model.vqvae).requires_grad_(False)
        return net
    net.to(device)  # buffers a builder made on the CPU on purpose
    if size == "world":
        load_weights(net, cfg.model.load)
    return net


def param_counts(net: nn.Module) -> Dict[str, int]:
    out = {name: sum(p.numel() for p in child.parameters()) for name, child in net.named_children()}
    out["total"] = sum(out.values())
    return out


def _text(tok: Any, n_tokens: int, rng: np.random.Generator) -> str:
    """Words until the tokenizer makes at least ``n_tokens`` tokens of them."""
    words: List[str] = []
    while True:
        words.extend(rng.choice(WORDS, 4).tolist())
        s = " ".join(words)
        if len(tok(s, add_special_tokens=False)["input_ids"]) >= n_tokens:
            return s


def _sample(key: str, task: str, messages: List[Dict[str, str]], image: Image.Image) -> Dict[str, Any]:
    record = {"id": key, "task": task, "source": "gpu_check", "messages": messages, "images": ["img0.png"]}
    return {"key": key, "task": task, "record": record, "images": [image], "vq": [None], "n_unreadable": 0}


def make_samples(net: VARGPT, n_und: int, n_gen: int, sizes: Dict[str, int], seed: int = 0) -> List[Dict[str, Any]]:
    """Understanding samples (an image at the tower's input size + question + answer) and
    generation samples (instruction + a target at the VQVAE's resolution; coarse random blocks so
    the VQ indices vary)."""
    rng = np.random.default_rng(seed)
    tok = net.tokenizer
    s_und, s_gen = int(net.vision.image_size), int(net.vqvae.cfg.resolution)
    out = []
    for i in range(n_und):
        img = Image.fromarray(rng.integers(0, 256, (s_und, s_und, 3), dtype=np.uint8))
        msgs = [{"role": "user", "content": f"{IMAGE_TOKEN}\n{_text(tok, sizes['q_tokens'], rng)}?"},
                {"role": "assistant", "content": _text(tok, sizes["a_tokens"], rng)}]
        out.append(_sample(f"und{i}", "understanding", msgs, img))
    for i in range(n_gen):
        blocks = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(blocks).resize((s_gen, s_gen), Image.NEAREST)
        msgs = [{"role": "user", "content": f"Draw {_text(tok, sizes['instr_tokens'], rng)}."},
                {"role": "assistant", "content": IMAGE_GEN_PLACEHOLDER}]
        out.append(_sample(f"gen{i}", "generation", msgs, img))
    return out


def make_batch(net: VARGPT, cfg: Any, samples: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    return net.collator(cfg.data, train=True)(list(samples))


def batch_stats(net: VARGPT, batch: Dict[str, Any]) -> Dict[str, int]:
    ids = batch["input_ids"]
    B, T = ids.shape
    n_gen = int((ids == net.gen_pad_id).sum()) // net.L
    return {"samples": int(B), "understanding": int(B) - n_gen, "generation": n_gen, "seq_len": int(T),
            "tokens": int(batch["attention_mask"].sum()), "tokens_padded": int(B * T),
            "image_tokens": int((ids == net.image_token_id).sum()), "gen_tokens": n_gen * net.L,
            "supervised_text_tokens": int((batch["labels"] != -100).sum())}


def to_device(module: Any, batch: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    return module.transfer_batch_to_device(batch, device, 0)  # tensors only (the stage's own rule)


# ------------------------------------------------------------------------------------------
# training steps and FLOPs
# ------------------------------------------------------------------------------------------


def _optimizer(module: Any) -> Tuple[torch.optim.Optimizer, Any]:
    conf = module.configure_optimizers()
    sched = conf["lr_scheduler"]["scheduler"] if isinstance(conf, dict) else None
    return (conf["optimizer"] if isinstance(conf, dict) else conf), sched


def train_steps(module: Any, batch: Dict[str, Any], steps: int, warmup: int, device: torch.device, amp: bool,
                grad_clip: float) -> Dict[str, Any]:
    """Seconds of each step (device synchronised) and the losses; the first ``warmup`` untimed."""
    net = module.net
    module.train()
    opt, sched = _optimizer(module)
    params = [p for g in opt.param_groups for p in g["params"]]
    times, losses = [], []
    for _ in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with amp_context(device, amp):
            loss = net(batch)["loss"]
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(float(loss.detach()))  # synchronises
        sync(device)
        times.append(time.perf_counter() - t0)
    opt.zero_grad(set_to_none=True)
    del opt, sched, params
    return {"step_s": times[warmup:], "warmup_s": times[:warmup], "losses": losses}


def checkpointed_layers(net: nn.Module) -> List[str]:
    """FlopCounterMode names of the layers gradient checkpointing reruns in backward (HF's
    GradientCheckpointingLayer with the switch on, in train mode: a frozen LLM in eval mode is not)."""
    root = type(net).__name__
    return [f"{root}.{n}" for n, m in net.named_modules()
            if any(c.__name__ == "GradientCheckpointingLayer" for c in type(m).__mro__)
            and getattr(m, "gradient_checkpointing", False) and m.training]


def step_flops(net: nn.Module, batch: Dict[str, Any], device: torch.device, amp: bool) -> Dict[str, Any]:
    """Counted FLOPs (matmul, conv, attention) of one forward + backward.

    hardware: as the timed steps execute them (recompute included, with torch's early stop).
    model: without recomputation: counted with early stop off, so the recompute equals the forward
    of the checkpointed layers, which is then subtracted."""
    from torch.utils.checkpoint import set_checkpoint_early_stop
    from torch.utils.flop_counter import FlopCounterMode

    layers = set(checkpointed_layers(net))

    def count(early_stop: bool) -> Tuple[int, int, int]:
        with (contextlib.nullcontext() if early_stop else set_checkpoint_early_stop(False)):
            with FlopCounterMode(display=False) as fwd, amp_context(device, amp):
                loss = net(batch)["loss"]
            with FlopCounterMode(display=False) as bwd:
                loss.backward()
        net.zero_grad(set_to_none=True)
        rec = sum(sum(v.values()) for k, v in fwd.get_flop_counts().items() if k in layers)
        return int(fwd.get_total_flops()), int(bwd.get_total_flops()), int(rec)

    f, b, _ = count(True)
    out = {"forward": f, "hardware": f + b, "model": f + b, "recompute_full": 0,
           "checkpointed_layers": len(layers)}
    if layers:
        f2, b2, rec = count(False)
        out.update(model=f2 + b2 - rec, recompute_full=rec)
    return out


def _linear_weights(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


def analytic_flops(net: VARGPT, stats: Dict[str, int]) -> Dict[str, Any]:
    """2 x (Linear/conv weights) x tokens per pass, per part: forward; + activation gradients where
    a trainable part lies upstream or inside; + weight gradients where the part trains. Attention
    scores, the VQVAE encode and everything elementwise are left out."""
    trains = {n: any(p.requires_grad for p in getattr(net, n).parameters())
              for n in ("vision", "und_proj", "llm", "gen_in", "gen_out", "var")}
    grads_llm = trains["llm"] or trains["und_proj"] or trains["gen_in"] or trains["vision"]
    grads_var = trains["var"] or trains["gen_out"] or grads_llm
    n_llm, n_var, n_vis = _linear_weights(net.llm), _linear_weights(net.var), _linear_weights(net.vision)
    llm = (2 + 2 * grads_llm + 2 * trains["llm"]) * n_llm * stats["tokens_padded"]
    var = (2 + 2 * grads_var + 2 * trains["var"]) * n_var * stats["gen_tokens"]
    vis = 2 * n_vis * stats["image_tokens"]
    return {"total": llm + var + vis, "llm": llm, "var": var, "vision": vis,
            "weights": {"llm": n_llm, "var": n_var, "vision": n_vis}}


# ------------------------------------------------------------------------------------------
# device peak
# ------------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"


def measured_matmul(device: torch.device, dtype: torch.dtype, n: int = 0, seconds: float = 1.0) -> float:
    """Best FLOP/s of square ``dtype`` matmuls over ~``seconds`` (n: 8192 on CUDA, 1024 on CPU)."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best, t_end = 0.0, time.perf_counter() + seconds
    for _ in range(2):
        a @ b
    while time.perf_counter() < t_end:
        sync(device)
        t0, k = time.perf_counter(), 4 if device.type == "cuda" else 1
        for _ in range(k):
            a @ b
        sync(device)
        best = max(best, k * 2.0 * n ** 3 / (time.perf_counter() - t0))
    del a, b
    return best


def peak_flops(device: torch.device, dtype: torch.dtype) -> Dict[str, Any]:
    """The peak MFU is taken against: the bf16 dense peak of a known GPU by name, else measured."""
    name = device_name(device)
    measured = measured_matmul(device, dtype)
    out = {"device": name, "measured_matmul_flops": measured, "measured_dtype": str(dtype).replace("torch.", "")}
    for key, peak in BF16_PEAKS:
        if device.type == "cuda" and key in name.upper():
            out.update(peak_flops=peak, source=f"data sheet: {key} bf16 dense")
            return out
    out.update(peak_flops=measured, source=f"measured: best {out['measured_dtype']} matmul on this device")
    return out


# ------------------------------------------------------------------------------------------
# checkpoint round trip through the suite's Lightning path
# ------------------------------------------------------------------------------------------


class _TimedSaver(TrainingCheckpoint):
    """TrainingCheckpoint, timing its write (``trainer.save_checkpoint``) and the whole save
    (write + sha256 sidecar + rename)."""
    write_s: Optional[float] = None
    save_s: Optional[float] = None

    def save(self, trainer: Any, step: int) -> Optional[Path]:
        orig = trainer.save_checkpoint

        def timed(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            r = orig(*a, **k)
            self.write_s = time.perf_counter() - t
            return r

        trainer.save_checkpoint = timed
        try:
            t0 = time.perf_counter()
            path = super().save(trainer, step)
            self.save_s = time.perf_counter() - t0
        finally:
            del trainer.save_checkpoint
        return path


def optimizer_fingerprint(opt: torch.optim.Optimizer) -> List[Tuple[float, float]]:
    """(sum, sum of |x|) in float64 of every optimizer state tensor, in parameter order."""
    out = []
    for g in opt.param_groups:
        for p in g["params"]:
            for _, v in sorted(opt.state.get(p, {}).items()):
                if torch.is_tensor(v):
                    d = v.detach().double()
                    out.append((float(d.sum()), float(d.abs().sum())))
    return out


def _timed_method(obj: Any, name: str, into: Dict[str, float], key: str) -> None:
    """Replace ``obj.name`` on the instance by a wrapper adding its seconds to ``into[key]``."""
    orig = getattr(obj, name)

    def wrapper(*a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        try:
            return orig(*a, **k)
        finally:
            into[key] = into.get(key, 0.0) + time.perf_counter() - t

    setattr(obj, name, wrapper)


def lightning_roundtrip(module: Any, cfg: Any, batch: Dict[str, Any], device: torch.device, precision: str,
                        work: Path) -> Dict[str, Any]:
    """Lightning fit of 2 steps saving a checkpoint at the end (TrainingCheckpoint: trainable
    weights, optimizer + schedule, RNG, frozen-weight hash), the trainable weights perturbed, then a
    new Trainer resumed from the file for 1 more step; the resumed weights / optimizer state are
    compared with the saved ones when training restarts."""
    import warnings

    from torch.utils.data import DataLoader

    tcfg = replace(cfg, output_dir=str(work / "out"), trainer=replace(
        cfg.trainer, max_steps=2, accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=[device.index] if device.type == "cuda" and device.index is not None else 1, num_nodes=1,
        strategy="auto", precision=precision, accumulate_grad_batches=1, val_every_n_steps=0,
        enable_progress_bar=False))
    out: Dict[str, Any] = {}
    t = time.perf_counter()
    module._frozen_sha256 = module.frozen_hash()  # what the first save computes (and every resume)
    out["frozen_hash_s"] = time.perf_counter() - t
    saver = _TimedSaver(work / "ckpt", at_end=True, keep_last=1)
    trainer = build_trainer(tcfg, None, [saver])
    reset_peak(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = time.perf_counter()
        trainer.fit(module, train_dataloaders=DataLoader([batch] * 2, batch_size=None, collate_fn=_identity))
        out["fit_s"] = time.perf_counter() - t
    out.update({f"fit_{k}": v for k, v in peak_memory_gb(device).items()})
    path = saver.last_path
    if path is None or trainer.global_step != 2:
        raise RuntimeError(f"Lightning fit ended at step {trainer.global_step} without a checkpoint")
    out.update(file=path.name, size_gb=path.stat().st_size / 1e9, write_s=saver.write_s, save_s=saver.save_s)
    snapshot = {n: p.detach().to("cpu", copy=True) for n, p in module.net.named_parameters() if p.requires_grad}
    opt_fp = optimizer_fingerprint(trainer.optimizers[0])
    module.trainer = None
    module.net.zero_grad(set_to_none=True)  # the last step's gradients
    del trainer
    free_memory(device)
    with torch.no_grad():  # so the comparison below can only pass if the file was read back
        for p in module.net.parameters():
            if p.requires_grad:
                p.add_(1.0)
    t = time.perf_counter()
    info = checkpoint_info(path)  # the launcher's --resume check: size + sha256 against the sidecar
    out.update(verify_s=time.perf_counter() - t, sidecar_ok=info is not None)

    probe = _ResumeProbe(snapshot, opt_fp)
    trainer = build_trainer(replace(tcfg, trainer=replace(tcfg.trainer, max_steps=3)), None,
                            [TrainingCheckpoint(work / "ckpt2", at_end=False), probe])
    times: Dict[str, float] = {}
    _timed_method(trainer.strategy.checkpoint_io, "load_checkpoint", times, "read_s")
    _timed_method(module, "frozen_hash", times, "frozen_hash_check_s")
    reset_peak(device)  # Lightning reads the file onto the device it was saved from (map_location: identity)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probe.t0 = time.perf_counter()
        trainer.fit(module, train_dataloaders=DataLoader([batch] * 4, batch_size=None, collate_fn=_identity),
                    ckpt_path=str(path), weights_only=True)
    del module.frozen_hash  # the instance wrapper; the method again
    out.update({f"resume_{k}": v for k, v in peak_memory_gb(device).items()})
    out.update(times, resume_s=probe.resume_s, resumed_at_step=probe.step, weights_equal=probe.weights_equal,
               optimizer_equal=probe.optimizer_equal, continued_to_step=int(trainer.global_step))
    module.trainer = None
    module.net.zero_grad(set_to_none=True)
    del trainer, snapshot
    free_memory(device)
    return out


def _identity(x: Any) -> Any:
    return x


class _ResumeProbe(L.Callback):
    def __init__(self, snapshot: Dict[str, torch.Tensor], opt_fp: List[Tuple[float, float]]):
        self.snapshot, self.opt_fp = snapshot, opt_fp
        self.t0 = self.resume_s = 0.0
        self.step = -1
        self.weights_equal = self.optimizer_equal = False

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.resume_s = time.perf_counter() - self.t0  # Trainer set-up + read + checks + restore
        self.step = int(trainer.global_step)
        params = {n: p for n, p in pl_module.net.named_parameters() if p.requires_grad}
        self.weights_equal = set(params) == set(self.snapshot) and all(
            torch.equal(params[n].detach().cpu(), t) for n, t in self.snapshot.items())
        self.optimizer_equal = optimizer_fingerprint(trainer.optimizers[0]) == self.opt_fp


# ------------------------------------------------------------------------------------------
# generation
# ------------------------------------------------------------------------------------------


def generate(net: VARGPT, n: int, device: torch.device, amp: bool, sampling: Dict[str, Any]) -> Dict[str, Any]:
    """A warm-up batch of 2, then ``n`` prompts at once (one seed each): seconds, images/s."""
    colours, shapes, places = ("red", "blue", "green", "yellow"), ("circle", "square", "triangle"), ("left", "right")
    prompts = [f"Draw a {colours[i % 4]} {shapes[i % 3]} on the {places[i % 2]}." for i in range(n)]
    net.eval()
    with torch.no_grad(), amp_context(device, amp):
        net.generate_image(prompts[:2], seed=[0, 1], **sampling)
        sync(device)
        reset_peak(device)
        t = time.perf_counter()
        imgs = net.generate_image(prompts, seed=list(range(n)), **sampling)
        sync(device)
        dt = time.perf_counter() - t
    imgs = imgs.float()
    ok = bool(torch.isfinite(imgs).all()) and float(imgs.min()) >= 0.0 and float(imgs.max()) <= 1.0
    return {"images": int(imgs.shape[0]), "shape": list(imgs.shape[1:]), "seconds": dt, "images_per_s": n / dt,
            "values_ok": ok, "sampling": dict(sampling), "image_sha256": hashlib.sha256(
                imgs.cpu().numpy().tobytes()).hexdigest()[:16], **peak_memory_gb(device)}
