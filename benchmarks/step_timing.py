"""Measuring training steps: the reusable pieces of benchmarks/train_step.py.

  matmul_peak       best fp32 torch.mm FLOP/s, per wall second and per CPU second
  count_flops       FLOPs torch's flop counter attributes to a call (matmul / conv / attention)
  train_flops       (forward, forward + backward) counted FLOPs of one step of a `net(batch)["loss"]` model
  llm_matmul_params LLM parameters that multiply activations (the analytic 2 x params x tokens cross-check)
  rss_mb, peak_rss_mb  current / peak resident memory of this process
  time_plain        per-step seconds of a LightningModule's `training_step` in a plain PyTorch loop
  time_lightning    per-step seconds of the same steps under the launcher's Trainer
  lower_envelope    per cached batch its fastest occurrence, averaged over the batches
  step_estimates    envelope / best rep mean / time outside the model, per method and clock
  machine_info      what the numbers were measured on

Every step time is read on two clocks (`_clock`): wall, and this process's CPU time.
"""
from __future__ import annotations

import os
import platform
import resource
import statistics
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from experiments.machine import cpu_model

REPO_ROOT = Path(__file__).resolve().parent.parent
CLOCKS = ("wall", "cpu")


def _clock() -> Tuple[float, float]:
    """(wall, this process's CPU) seconds. With one torch thread the CPU clock is the work done
    and barely moves while other jobs hold the cores; the wall clock is what a run waits."""
    return time.perf_counter(), time.process_time()


# ------------------------------------------------------------------------------------------
# machine, memory, FLOPs
# ------------------------------------------------------------------------------------------


def matmul_peak(n: int = 1024, seconds: float = 1.5, window: float = 0.25) -> Dict[str, float]:
    """Best fp32 torch.mm FLOP/s over windows of ~`window` s for ~`seconds` s in total: per wall
    second ("wall") and per second of this process's CPU time ("cpu")."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)  # warm-up (thread pool, page faults)
    flop = 2.0 * n ** 3
    best = {"wall": 0.0, "cpu": 0.0}
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        k, (w0, c0) = 0, _clock()
        while True:
            torch.mm(a, b, out=out)
            k += 1
            w, c = _clock()
            if w - w0 >= window:
                break
        best["wall"] = max(best["wall"], k * flop / (w - w0))
        best["cpu"] = max(best["cpu"], k * flop / max(c - c0, 1e-9))
    return best


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs torch's flop counter attributes to `fn()` (matmul / conv / attention ops)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2 ** 20


def llm_matmul_params(net: torch.nn.Module) -> int:
    """LLM parameters that multiply activations (all but the input embedding table and norms)."""
    emb = net.llm.get_input_embeddings().weight
    out_w = net.llm.get_output_embeddings().weight
    n = sum(p.numel() for p in net.llm.parameters() if p.dim() == 2 and p is not emb)
    if out_w is emb:  # tied head: still a matmul
        n += out_w.numel()
    return n


def train_flops(net: torch.nn.Module, batch: Dict[str, Any]) -> Tuple[int, int]:
    """(forward, forward + backward) counted FLOPs of one training step on `batch`."""
    out: Dict[str, Any] = {}

    def fwd():
        out["loss"] = net(batch)["loss"]

    f = count_flops(fwd)
    b = count_flops(lambda: out["loss"].backward())
    net.zero_grad(set_to_none=True)
    return f, f + b


def machine_info() -> Dict[str, Any]:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=REPO_ROOT, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        sha = "unknown"
    return {"date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpu_model": cpu_model(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(), "git_sha": sha,
            "loadavg_1m": round(os.getloadavg()[0], 2)}


# ------------------------------------------------------------------------------------------
# step timing: plain loop vs Lightning
# ------------------------------------------------------------------------------------------


def _clip_params(opt: torch.optim.Optimizer) -> List[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def _optim(module: Any) -> Tuple[torch.optim.Optimizer, Any]:
    conf = module.configure_optimizers()
    if isinstance(conf, dict):
        sched = conf.get("lr_scheduler")
        return conf["optimizer"], (sched["scheduler"] if isinstance(sched, dict) else sched)
    return conf, None


def _identity(x):
    return x


class _Marks:
    """Clock readings at each step start and around the model's own work in that step: the
    forward of `module.net`, `loss.backward()`, and gradient clipping + optimizer update. What a
    step spends outside those three is loop/hook/logging work, the part Lightning can add to."""

    def __init__(self):
        self.t: Dict[str, List[Tuple[float, float]]] = {k: [] for k in
                                                         ("start", "fwd0", "fwd1", "bwd0", "bwd1", "upd0", "upd1")}

    def __call__(self, key: str) -> None:
        self.t[key].append(_clock())

    def hook_net(self, net: torch.nn.Module) -> List[Any]:
        return [net.register_forward_pre_hook(lambda *a: self("fwd0")),
                net.register_forward_hook(lambda *a: self("fwd1"))]

    def times(self, warmup: int) -> Dict[str, List[float]]:
        """Per timed step and clock: step seconds ("wall", "cpu") and seconds outside the model's
        work ("wall_outside", "cpu_outside")."""
        n = len(self.t["start"]) - 1
        for k, v in self.t.items():
            if len(v) < n:
                raise RuntimeError(f"step timing: {len(v)} '{k}' marks for {n} steps")
        out: Dict[str, List[float]] = {}
        for c, clock in enumerate(CLOCKS):
            step, outside = [], []
            for i in range(warmup, n):
                t = {k: v[i][c] for k, v in self.t.items()}
                dt = self.t["start"][i + 1][c] - t["start"]
                inside = (t["fwd1"] - t["fwd0"]) + (t["bwd1"] - t["bwd0"]) + (t["upd1"] - t["upd0"])
                step.append(dt)
                outside.append(dt - inside)
            out[clock], out[f"{clock}_outside"] = step, outside
        return out


def time_plain(module: Any, batches: Sequence[Dict[str, Any]], steps: int, warmup: int,
               grad_clip: float) -> Dict[str, List[float]]:
    """Per-step seconds of `steps` timed steps of a plain PyTorch loop over `module.training_step`
    (see `_Marks.times` for the keys)."""
    module.trainer = None  # detached: self.log returns at once, as in any Trainer-less loop
    if hasattr(module, "_t_last"):
        module._t_last = None
    module.train()
    opt, sched = _optim(module)
    params = _clip_params(opt)
    marks = _Marks()
    handles = marks.hook_net(module.net)
    try:
        for i in range(warmup + steps + 1):
            marks("start")
            batch = batches[i % len(batches)]
            loss = module.training_step(batch, i)
            opt.zero_grad(set_to_none=True)
            marks("bwd0")
            loss.backward()
            marks("bwd1")
            marks("upd0")
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            marks("upd1")
            if sched is not None:
                sched.step()
    finally:
        for h in handles:
            h.remove()
    opt.zero_grad(set_to_none=True)
    return marks.times(warmup)


def time_lightning(module: Any, cfg: Any, batches: Sequence[Dict[str, Any]], steps: int, warmup: int,
                   logger: Any = None, root_dir: Optional[str] = None) -> Dict[str, List[float]]:
    """Per-step seconds of the same steps under the launcher's Trainer (in-memory batches)."""
    from dataclasses import replace

    import lightning as L
    from torch.utils.data import DataLoader

    # importing experiments.run sets OMP_WAIT_POLICY=PASSIVE in os.environ; at module top the
    # benchmark's driver would hand that on to every measuring subprocess
    from experiments.run import build_trainer  # lazy: keeps OMP_WAIT_POLICY out of the driver's environment

    n = warmup + steps + 1
    marks = _Marks()

    class _StepMarks(L.Callback):
        # Lightning 2.x per step: batch start -> training_step -> zero_grad -> on_before_backward ->
        # backward -> on_after_backward -> on_before_optimizer_step -> clip -> optimizer update
        def on_train_start(self, trainer, pl_module):
            for opt in trainer.optimizers:
                opt.register_step_post_hook(lambda *a: marks("upd1"))

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            marks("start")

        def on_before_backward(self, trainer, pl_module, loss):
            marks("bwd0")

        def on_after_backward(self, trainer, pl_module):
            marks("bwd1")

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            marks("upd0")

    # the Trainer stops after n steps; the module's LR schedule still follows the experiment's max_steps
    tcfg = replace(cfg, trainer=replace(cfg.trainer, max_steps=n, enable_progress_bar=False, val_every_n_steps=0),
                   output_dir=root_dir or cfg.output_dir)
    trainer = build_trainer(tcfg, logger, callbacks=[_StepMarks()])
    if hasattr(module, "_t_last"):
        module._t_last = None
    data = [batches[i % len(batches)] for i in range(n)]
    dl = DataLoader(data, batch_size=None, shuffle=False, collate_fn=_identity)
    handles = marks.hook_net(module.net)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # num_workers / log-interval advice: not what is measured
            trainer.fit(module, train_dataloaders=dl)
    finally:
        for h in handles:
            h.remove()
    module.trainer = None
    if len(marks.t["start"]) != n:
        raise RuntimeError(f"Lightning ran {len(marks.t['start'])} steps, expected {n}")
    return marks.times(warmup)


# ------------------------------------------------------------------------------------------
# estimates over repetitions
# ------------------------------------------------------------------------------------------


def lower_envelope(reps: Sequence[Sequence[float]], warmup: int, distinct: int) -> float:
    """Mean over cached batches of each batch's fastest timed step (step i used batch i % distinct)."""
    fastest: Dict[int, float] = {}
    for rep in reps:
        for k, t in enumerate(rep):
            j = (warmup + k) % distinct
            fastest[j] = min(t, fastest.get(j, float("inf")))
    return statistics.mean(fastest.values())


def step_estimates(times: Dict[str, List[Dict[str, List[float]]]], warmup: int,
                   distinct: int) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Per clock, per method (the keys of `times`, each a list of reps from time_plain /
    time_lightning): "envelope" (lower_envelope), "best_mean" (best rep mean: includes periodic
    work such as logging every n steps), "outside_median" and "outside_mean" (seconds per step
    outside the model's forward/backward/update, over every timed step)."""
    # The lower envelope is robust to other jobs on a shared machine, which only add time.
    est = {clock: {"envelope": {k: lower_envelope([v[clock] for v in vs], warmup, distinct) for k, vs in times.items()},
                   "best_mean": {k: min(statistics.mean(v[clock]) for v in vs) for k, vs in times.items()}}
           for clock in CLOCKS}
    for clock in CLOCKS:
        # Robust to load: the median time spent outside the model; what Lightning adds is its
        # excess over the plain loop's.
        est[clock]["outside_median"] = {k: statistics.median([x for v in vs for x in v[f"{clock}_outside"]])
                                        for k, vs in times.items()}
        # the mean keeps work done every n steps (a logger's writes), which the median drops
        est[clock]["outside_mean"] = {k: statistics.mean([x for v in vs for x in v[f"{clock}_outside"]])
                                      for k, vs in times.items()}
    return est
