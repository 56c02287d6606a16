"""GPU check: the real VARGPT-7B on the CUDA devices it finds, in minutes, no downloads.

    python -m benchmarks.gpu_check                    # CUDA: VARGPT-7B sizes, random weights
    python -m benchmarks.gpu_check --device cpu       # CI: the world recipes, 2 CPU ranks for the sharded phase
    python -m benchmarks.gpu_check --device meta      # plan only: real-size batches, sizes, FLOP estimates
    make gpu-check ARGS="--max-minutes 6"

Exit status: 0 when every phase ran or was skipped for the budget / the disk (status ok / partial),
1 when a phase failed (status failed: the error is in the report, the later phases still ran),
3 when the --max-minutes watchdog fired. --fail-phase NAME makes a phase fail on purpose.

What runs (phases in this order, each skipped with a reason when the --max-minutes budget,
default 8, cannot hold it; a watchdog writes what is done and exits 3 at the limit):
  sharded     the recipe's training path (benchmarks/gpu_check_sharded.py, a subprocess): stage 3
              (--sharded-stages) trained the way experiments.run trains it, on every CUDA device
              found (--sharded-devices; CPU: 2 ranks over gloo): trainer.strategy fsdp (FSDP2,
              modules/sharded.py), bf16-mixed with fp32 master weights and fp32 gradient
              reduction, the LLM layers and VAR blocks recomputed in backward, fp32 weights built
              on each rank's device, 2 steps, a sharded checkpoint directory, then a resume that
              must restore every shard bit for bit. Reports step times, losses, peak memory per
              rank, the dtypes seen, the units and recomputed blocks.
Then, in this process on one device (the phases below measure speed; their weights are pure bf16
at the real size, not the recipe's fp32 master weights):
  build       the real recipe's model (experiments/real/stage3.yaml: Vicuna-7B + CLIP ViT-L/14-336 +
              VAR-d30 + vae_ch160v4096z32, 9.1B parameters) with random weights, built directly on
              the device: `model.load=[]`, weights bf16 (llm / projector / var dtype; the VQVAE stays
              fp32 as always), a stand-in BPE tokenizer (the Vicuna vocabulary stays 32000 rows).
              --device cpu: the world recipes with their assets/world weights, fp32.
  stage 3, then stage 2  the stage's LightningModule (STAGE_CLASSES, its trainable set and
              configure_optimizers) on one hand-made batch at the recipe's lengths through
              `net.collator` (8 samples: 576 image tokens per understanding image at 336 px, L=680
              VAR tokens per 256-px target, ~40-120 text tokens per turn; stage 3 all generation,
              stage 2 seven understanding + one generation sample). Plain loop: `net(batch)["loss"]`
              under bf16 autocast (the recipe's bf16-mixed), backward, grad clip, AdamW, schedule;
              1 warm-up step, then --steps timed (device synchronised). Gradient checkpointing is
              the recipe's (`model.llm.gradient_checkpointing: true`); the report says whether it is
              active: a frozen LLM is in eval mode, where HF layers do not checkpoint (stage 3).
  FLOPs       torch.utils.flop_counter.FlopCounterMode over one extra step: "model" FLOPs without
              recomputation (MFU) and "hardware" FLOPs as executed (HFU); cross-checked against
              an analytic 2 x Linear weights x tokens per pass. Peak: the bf16 dense data-sheet
              figure by device name (H100/H200 SXM 989, NVL 835, H100 PCIe 756, A100 312 TFLOP/s),
              else the best measured bf16 matmul (the CPU run: measured fp32 matmul).
  checkpoint  the suite's path: a Lightning Trainer (experiments.run.build_trainer) fits 2 steps with
              modules.stages.resume.TrainingCheckpoint saving at the end (trainable weights,
              optimizer, schedule, RNG; frozen weights only as a sha256), the trainable weights are
              then perturbed and a new Trainer resumes from the file for a 3rd step; at restart the
              weights must equal the saved ones bit for bit and the optimizer state its fingerprint.
              Times: frozen-weight hash, write, save (write + sha256 sidecar + rename), the
              launcher's verify, read, resume (Trainer start to the first step); peak memory of
              the fit and of the resume (Lightning reads the file onto the device). Stage 2's
              file here (~40 GB: bf16 LLM + two Adam moments; the recipe's own, fp32 master weights,
              is ~81 GB: modules.optim.checkpoint_bytes, in the plan) comes last and is skipped when the
              disk or the budget cannot take it.
  generate    `net.generate_image` for 8 prompts at 256 px (the released sampling: cfg 1.5, top-k
              900, top-p 0.96; world: the recipe's eval settings), after a 2-prompt warm-up: images/s.
Peak memory per phase: torch.cuda.max_memory_allocated (CPU: the process's VmHWM).

Writes <out>/<name>.json (everything, per-step lists included) and <name>.md (the tables);
--out defaults to benchmarks/results, --name to gpu_check (CUDA) / gpu_check_<device>.

On a GPU box without this repository's environment (Python 3.12, torch, transformers, lightning,
timm, torchmetrics present): nothing here pins versions and nothing on this path imports mlflow
or webdataset (checked: none is imported by this path); the config loader needs omegaconf (pure
Python, with antlr4-python3-runtime: `pip download omegaconf -d wheels` on a networked machine,
`pip install --no-index wheels/*` there), then from the repository root
`PYTHONPATH=. python -m benchmarks.gpu_check` (or `make gpu-check PY=python3`). Give it --workdir
on a disk with ~45 GB free for stage 2's checkpoint (default: the system temp folder; skipped with
a reason when too small).
"""
from __future__ import annotations

import os

# OpenMP threads spin-waiting for each other slow CPU steps 10-80x when anything else shares the
# cores (benchmarks/train_step.py); must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import contextlib
import json
import logging
import shutil
import signal
import socket
import subprocess
import statistics
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from benchmarks import gpu_check_parts as P
from benchmarks.gpu_check_report import NOTES, _si, markdown
from benchmarks.step_timing import machine_info
from modules.optim import checkpoint_bytes
from modules.sharded import planned_bytes
from modules.stages.vargpt_stages import STAGE_CLASSES

RESULTS = Path(__file__).resolve().parent / "results"
# Released VARGPT sampling (modules.config behaviour "released"); forced <|image_gen_start|>.
REAL_SAMPLING = {"cfg": 1.5, "top_k": 900, "top_p": 0.96}


class Budget:
    def __init__(self, minutes: float):
        self.t0, self.total = time.perf_counter(), minutes * 60.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.total - self.elapsed()


class Report:
    """The result document, written after every phase (a killed run still leaves its numbers)."""

    def __init__(self, out: Path, name: str, data: Dict[str, Any]):
        self.out, self.name, self.data = out, name, data
        self.lock = threading.Lock()

    def write(self) -> None:
        with self.lock:
            self.out.mkdir(parents=True, exist_ok=True)
            text = json.dumps(self.data, indent=1, default=str) + "\n"
            (self.out / f"{self.name}.json").write_text(text)
            (self.out / f"{self.name}.md").write_text(markdown(self.data))

    @contextlib.contextmanager
    def phase(self, what: str, budget: "Budget", fatal: bool = False):
        """Wall seconds of a phase into ``timeline``. A failing phase that is not ``fatal`` (a
        CUDA out-of-memory in stage 2, say) is recorded under ``errors`` and the run goes on."""
        t0 = budget.elapsed()
        print(f"[gpu_check] {what} ({t0:.0f} s)", flush=True)
        try:
            yield
            if what in self.data["config"].get("fail_phase", []):  # --fail-phase: the exit status is tested
                raise RuntimeError(f"failure injected into phase {what!r} (--fail-phase)")
        except Exception:  # noqa: BLE001 - recorded; the next phases still run
            if fatal:
                raise
            tb = traceback.format_exc()
            traceback.print_exc()
            self.data["errors"].append({"phase": what, "error": tb.strip().splitlines()[-1], "traceback": tb})
        finally:
            self.data["timeline"].append({"phase": what, "start_s": round(t0, 2), "end_s": round(budget.elapsed(), 2)})

    def skip(self, what: str, why: str) -> None:
        self.data["skipped"].append({"phase": what, "reason": why})
        print(f"[gpu_check] skipped {what}: {why}", flush=True)


def _median(xs: List[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# ------------------------------------------------------------------------------------------
# phases
# ------------------------------------------------------------------------------------------


def plan_stage(name: str, cfg: Any, net: Any, size: str, batch_size: int) -> Dict[str, Any]:
    """Stage module, its batch and what can be said before running: lengths, trainable set,
    analytic FLOPs, checkpoint and optimizer-state sizes."""
    sizes = P.SIZES[size]
    module = STAGE_CLASSES[name](cfg, net=net)
    n_gen = batch_size if name == "stage3" else min(sizes["stage2_gen"], batch_size)
    batch = P.make_batch(net, cfg, P.make_samples(net, batch_size - n_gen, n_gen, sizes))
    stats = P.batch_stats(net, batch)
    trainable = [p for p in net.parameters() if p.requires_grad]
    plan = {"recipe": str(P.RECIPES[size][name].relative_to(P.REPO_ROOT)),
            "batch": stats, "trainable_params": sum(p.numel() for p in trainable),
            "trainable_dtype": str(trainable[0].dtype).replace("torch.", ""),
            "trainable_prefixes": list(module.trainable_prefixes()),
            "llm_checkpointing_configured": bool(cfg.model.llm.gradient_checkpointing),
            "lr": cfg.optim.lr, "grad_clip": cfg.optim.grad_clip,
            # the recipe's checkpoint (fp32 master weights + AdamW's two moments: 12 B per trainable
            # parameter) and this check's own (the weights' dtype here, bf16 at the real size)
            "est_checkpoint_gb": checkpoint_bytes(trainable, torch.float32) / 1e9,
            "this_checkpoint_gb": checkpoint_bytes(trainable) / 1e9,
            # all weights + the trainable ones' gradients and two moments (in the weights' dtype)
            "est_train_state_gb": (sum(p.numel() * p.element_size() for p in net.parameters())
                                   + checkpoint_bytes(trainable)) / 1e9,
            "analytic_flops": P.analytic_flops(net, stats)}
    # the recipe's sharded state per rank over its ranks (trainer.devices x num_nodes): fp32 master
    # weights, AdamW state of the trainable rows (modules.sharded.planned_bytes, which
    # tests/test_sharded.py checks against what 2 CPU ranks hold)
    ranks = cfg.trainer.devices * cfg.trainer.num_nodes
    per = planned_bytes(net, ranks, 0, torch.float32)
    plan["sharded_per_rank"] = {"ranks": ranks, "weights_gb": per["param_bytes"] / 1e9,
                                "optimizer_gb": per["optimizer_bytes"] / 1e9, "total_gb": per["total_bytes"] / 1e9}
    return {"module": module, "batch": batch, "plan": plan}


def train_stage(st: Dict[str, Any], cfg: Any, device: torch.device, amp: bool, args: argparse.Namespace,
                peak: Dict[str, Any]) -> Dict[str, Any]:
    module, net = st["module"], st["module"].net
    batch = P.to_device(module, st["batch"], device)
    P.free_memory(device)
    P.reset_peak(device)
    r = P.train_steps(module, batch, args.steps, args.warmup, device, amp, cfg.optim.grad_clip)
    r.update(P.peak_memory_gb(device))
    module.train()
    r["llm_checkpointing_active"] = len(P.checkpointed_layers(net))
    r["flops"] = P.step_flops(net, batch, device, amp)
    stats = st["plan"]["batch"]
    t = _median(r["step_s"])
    r.update(step_s_median=t, step_s_mean=statistics.mean(r["step_s"]), tokens_per_s=stats["tokens"] / t,
             tokens_per_s_padded=stats["tokens_padded"] / t, samples_per_s=stats["samples"] / t,
             model_flops_per_s=r["flops"]["model"] / t, mfu=r["flops"]["model"] / t / peak["peak_flops"],
             hfu=r["flops"]["hardware"] / t / peak["peak_flops"],
             analytic_over_counted=st["plan"]["analytic_flops"]["total"] / max(r["flops"]["model"], 1))
    st["device_batch"] = batch
    P.free_memory(device)
    return r


def checkpoint_stage(st: Dict[str, Any], cfg: Any, device: torch.device, precision: str, work: Path) -> Dict[str, Any]:
    d = work / f"ckpt_{cfg.stage}"
    try:
        return P.lightning_roundtrip(st["module"], cfg, st["device_batch"], device, precision, d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def checkpoint_fits(report: Report, name: str, plan: Dict[str, Any], budget: Budget, work: Path,
                    rate: Dict[str, float]) -> bool:
    need_gb = plan["this_checkpoint_gb"]
    free_gb = shutil.disk_usage(work).free / 1e9
    if free_gb < 1.2 * need_gb + 1:
        report.skip(f"{name} checkpoint", f"needs ~{need_gb:.1f} GB on disk, {free_gb:.1f} GB free under {work}")
        return False
    est = 4 * need_gb / rate["gb_per_s"] + 20  # write, sidecar hash, verify hash, read
    if est > budget.left() - 15:
        report.skip(f"{name} checkpoint", f"~{est:.0f} s estimated, {budget.left():.0f} s of the budget left")
        return False
    return True


def sharded_stage(args: argparse.Namespace, stage: str, work: Path, timeout: float) -> Dict[str, Any]:
    """The recipe's training path for one stage (benchmarks/gpu_check_sharded.py) on every device:
    a subprocess (Lightning starts the other ranks by running its command again) in its own process
    group, killed whole at the timeout. Its ranks' results, or RuntimeError with its output."""
    out = work / f"sharded_{stage}"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "benchmarks.gpu_check_sharded", "--accelerator", args.device.type,
           "--devices", str(args.sharded_devices), "--size", args.size, "--stage", stage, "--out", str(out)]
    if args.batch:
        cmd += ["--batch", str(args.batch)]
    env = {**os.environ, "MASTER_PORT": str(port), "PYTHONPATH": str(P.REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if args.device.type == "cpu":
        env["OMP_NUM_THREADS"] = "1"  # 2 ranks on the CI's 2 cores
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=P.REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        log, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        log = f"(no exit within {timeout:.0f} s)"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
    ranks = [json.loads(f.read_text()) for f in sorted(out.glob(f"{stage}.rank*.json"))]
    if p.returncode != 0 or len(ranks) != args.sharded_devices:
        tail = "\n".join(log.splitlines()[-40:])
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode} with {len(ranks)} of {args.sharded_devices} "
                           f"rank results:\n{tail}")
    sharding = json.loads((out / stage / "sharding.rank0.json").read_text())
    return {"seconds": time.perf_counter() - t0, "command": " ".join(cmd[1:]), "ranks": ranks,
            "sharding": sharding["sharding"], "memory_rank0": sharding["memory"],
            "compute_dtype": sharding["compute_dtype"], "forward_calls_per_step": sharding["forward_calls_per_step"],
            "param_dtypes": sorted({q["dtype"] for q in sharding["params"].values()}),
            "sharded_params": sum(q["sharded"] for q in sharding["params"].values()),
            "params": len(sharding["params"])}


def run(args: argparse.Namespace, report: Report, budget: Budget, work: Path) -> None:
    data = report.data
    device, size, bf16 = args.device, args.size, args.dtype == "bf16"
    amp = bf16 or device.type == "cuda"
    precision = "bf16-mixed" if amp else "32-true"
    # first, before this process holds a model: the recipe's sharded path in a subprocess
    for name in args.sharded_stages if device.type != "meta" else []:
        if budget.left() < args.min_phase_s:
            report.skip(f"sharded {name}", f"{budget.left():.0f} s of the budget left")
            continue
        with report.phase(f"sharded {name}", budget):
            data["sharded"][name] = sharded_stage(args, name, work, max(budget.left() - 10, 30))
        report.write()
    cfgs = P.stage_configs(size, bf16)
    batch_size = args.batch or P.SIZES[size]["batch"]
    t = time.perf_counter()
    with report.phase("build", budget, fatal=True):
        net = P.build_model(cfgs["stage3"], size, device, work)
    data["model"] = {"build_s": time.perf_counter() - t, "params": P.param_counts(net), "device": str(device),
                     "dtypes": {n: str(next(m.parameters()).dtype).replace("torch.", "") for n, m in net.named_children()},
                     "num_image_tokens": net.num_image_tokens, "var_L": net.L,
                     "gen_resolution": int(net.vqvae.cfg.resolution), "vocab_rows": int(net.llm.config.vocab_size)}
    print(f"[gpu_check] built {_si(data['model']['params']['total'])} parameters on {device} "
          f"in {data['model']['build_s']:.1f}s", flush=True)
    stages = {}
    with report.phase("plan", budget, fatal=True):
        for name in args.stages:
            stages[name] = plan_stage(name, cfgs[name], net, size, batch_size)
            data["stages"][name] = {"plan": stages[name]["plan"]}
    report.write()
    if device.type == "meta":
        return
    with report.phase("peak", budget, fatal=True):
        data["peak"] = peak = P.peak_flops(device, torch.bfloat16 if amp else torch.float32)
    rate = {"gb_per_s": 0.5}  # checkpoint I/O + hashing, until one is measured
    deferred = []
    for name in args.stages:
        st, cfg = stages[name], cfgs[name]
        if budget.left() < args.min_phase_s:
            report.skip(f"{name} training", f"{budget.left():.0f} s of the budget left")
            continue
        # the stage's trainable set (the net is shared: the previous stage changed requires_grad)
        st["module"].apply_trainable_set()
        with report.phase(f"{name} training", budget):
            data["stages"][name]["train"] = train_stage(st, cfg, device, amp, args, peak)
        P.free_memory(device)
        report.write()
        if name not in args.checkpoint or "train" not in data["stages"][name]:
            continue
        if name == "stage2" and "stage3" in args.stages:
            deferred.append(name)  # the biggest file: after generation
            continue
        _checkpoint(report, name, st, cfg, device, precision, work, budget, rate)
    if args.gen_images and budget.left() >= args.min_phase_s:
        ev = cfgs["stage3"].eval
        sampling = REAL_SAMPLING if size == "real" else {"cfg": ev.cfg, "top_k": ev.top_k, "top_p": ev.top_p}
        P.free_memory(device)
        with report.phase("generation", budget):
            data["generation"] = P.generate(net, args.gen_images, device, amp, sampling)
        P.free_memory(device)
        report.write()
    elif args.gen_images:
        report.skip("generation", f"{budget.left():.0f} s of the budget left")
    for name in deferred:
        stages[name]["module"].apply_trainable_set()
        _checkpoint(report, name, stages[name], cfgs[name], device, precision, work, budget, rate)


def _checkpoint(report: Report, name: str, st: Dict[str, Any], cfg: Any, device: torch.device, precision: str,
                work: Path, budget: Budget, rate: Dict[str, float]) -> None:
    if not checkpoint_fits(report, name, st["plan"], budget, work, rate):
        return
    c: Dict[str, Any] = {}
    with report.phase(f"{name} checkpoint", budget):
        c = checkpoint_stage(st, cfg, device, precision, work)
    P.free_memory(device)
    if not c:
        report.write()
        return
    passes = (c.get("write_s") or 0) + c.get("verify_s", 0) + c.get("read_s", 0) + \
        ((c.get("save_s") or 0) - (c.get("write_s") or 0))
    if passes > 0 and c["size_gb"] > 1:
        rate["gb_per_s"] = 4 * c["size_gb"] / passes
    report.data["stages"][name]["checkpoint"] = c
    report.write()


# ------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="auto (cuda if present, else cpu) | cuda[:N] | cpu | meta (plan only)")
    p.add_argument("--size", choices=("auto", "real", "world"), default="auto",
                   help="auto: real on CUDA / meta, else world")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="weights; auto: bf16 for real, fp32 for world")
    p.add_argument("--stages", default="stage3,stage2", help="comma-separated, in order")
    p.add_argument("--checkpoint", default="stage3,stage2", help="stages whose checkpoint round trip runs ('' for none)")
    p.add_argument("--sharded-stages", default="stage3",
                   help="stages trained the recipe's way first (trainer.strategy fsdp, bf16-mixed over fp32 master "
                        "weights, recomputed blocks) on --sharded-devices ranks ('' for none)")
    p.add_argument("--sharded-devices", type=int, default=0, help="ranks of the sharded phase (0: every CUDA device; CPU: 2)")
    p.add_argument("--fail-phase", action="append", default=[], metavar="PHASE",
                   help="make the named phase fail (e.g. 'stage2 training'): checks that a failed phase exits non-zero")
    p.add_argument("--batch", type=int, default=0, help="samples per step (0: 8)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per stage")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--gen-images", type=int, default=-1, help="images generated at once (-1: 8 real, 4 world; 0: none)")
    p.add_argument("--max-minutes", type=float, default=8.0)
    p.add_argument("--min-phase-s", type=float, default=0.0,
                   help="skip a phase with less budget left (0: 45 CUDA, 5 CPU)")
    p.add_argument("--threads", type=int, default=0, help="CPU torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--name", default="", help="file stem (default gpu_check on CUDA, gpu_check_<device> elsewhere)")
    p.add_argument("--workdir", default=None, help="where checkpoints go (a temporary folder inside; removed)")
    a = p.parse_args(argv)
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    a.device = torch.device(a.device)
    if a.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device visible")
    if a.size == "auto":
        a.size = "world" if a.device.type == "cpu" else "real"
    if a.dtype == "auto":
        a.dtype = "bf16" if a.size == "real" else "fp32"
    a.stages = [s for s in a.stages.split(",") if s]
    a.checkpoint = [s for s in a.checkpoint.split(",") if s]
    a.sharded_stages = [s for s in a.sharded_stages.split(",") if s]
    if a.sharded_devices <= 0:
        a.sharded_devices = torch.cuda.device_count() if a.device.type == "cuda" else 2
    for s in a.stages + a.checkpoint + a.sharded_stages:
        if s not in P.STAGES:
            p.error(f"unknown stage {s!r}; valid: {', '.join(P.STAGES)}")
    if a.gen_images < 0:
        a.gen_images = P.SIZES[a.size]["gen_batch"]
    a.min_phase_s = a.min_phase_s or (45.0 if a.device.type == "cuda" else 5.0)
    a.name = a.name or ("gpu_check" if a.device.type == "cuda" else f"gpu_check_{a.device.type}")
    return a


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    for name in ("lightning.pytorch", "lightning.fabric"):  # device banners and tips, once per Trainer
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    budget = Budget(args.max_minutes)
    where = "CUDA" if args.device.type == "cuda" else args.device.type.upper()
    label = f"{where}, {'VARGPT-7B real sizes' if args.size == 'real' else 'world size'}, {args.dtype} weights" + \
        (" (plan only: nothing runs)" if args.device.type == "meta" else "")
    import lightning
    import transformers

    info = {**machine_info(), "transformers": transformers.__version__, "lightning": lightning.__version__,
            "torch_threads": torch.get_num_threads()}
    cfg = {k: (str(v) if isinstance(v, (Path, torch.device)) else v) for k, v in vars(args).items()}
    report = Report(args.out, args.name, {"check": "gpu_check", "label": label, "status": "running", "config": cfg,
                                          "machine": info, "stages": {}, "sharded": {}, "skipped": [], "errors": [],
                                          "timeline": [],
                                          "notes": NOTES})

    def on_timeout() -> None:
        report.data.update(status="timed_out", elapsed_s=budget.elapsed())
        try:
            report.write()
        finally:
            print(f"[gpu_check] --max-minutes {args.max_minutes} reached; partial results in {args.out}", flush=True)
            os._exit(3)

    watchdog = threading.Timer(budget.total, on_timeout)
    watchdog.daemon = True
    watchdog.start()
    work = Path(tempfile.mkdtemp(prefix="gpu_check_", dir=args.workdir))
    rc = 0
    try:
        run(args, report, budget, work)
        # a failed phase fails the check (exit 1); a phase skipped for the budget or the disk does not
        report.data["status"] = "failed" if report.data["errors"] else "partial" if report.data["skipped"] else "ok"
        rc = 1 if report.data["errors"] else 0
    except Exception:  # noqa: BLE001 - recorded in the report, then re-raised as the exit status
        report.data.update(status="failed", error=traceback.format_exc())
        traceback.print_exc()
        rc = 1
    finally:
        watchdog.cancel()
        shutil.rmtree(work, ignore_errors=True)
    report.data["elapsed_s"] = budget.elapsed()
    report.write()
    print(markdown(report.data))
    print(f"[gpu_check] {report.data['status']}: {args.out / (args.name + '.json')}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
