"""Side by side with the official FoundationVision/VAR sampler, at equal weights, in one process.

    python -m benchmarks.var_sampling --official /tmp/var_official     # depth 8 and 16, 256 px, B 4

PATH is a checkout of https://github.com/FoundationVision/VAR (never part of this repository),
e.g. `git --git-dir=<bare clone> worktree add /tmp/var_official HEAD`. Its `models` package is
imported from PATH at run time (`models.var.VAR`, `models.vqvae.VQVAE`); the names it puts in
sys.modules (`models`, `models.*`, `dist`) are removed again afterwards, and its `build_vae_var`
(which patches `reset_parameters` of torch.nn classes globally) is not used: the two classes are
built directly and get our random weights with a strict `load_state_dict`.

Per depth, with the same weights, labels and seed, alternating the methods inside each round:
  official     : `VAR.autoregressive_infer_cfg(B, labels, g_seed, cfg, top_k, top_p)`: fp32, its
                 sampler, decodes the image (it always does)
  suite        : `VARDecoder.sample(..., parity=False)`, the suite default for generation (sampler
                 "fast", compute dtype `default_sampling_dtype(var)`), decode=True
  suite_parity : `VARDecoder.sample(..., parity=True)`: fp32, the official draws, decode=True
The parity check runs both samplers once more, untimed: the official indices (recorded by a
forward pre-hook on its codebook embedding, which it calls once per scale with the sampled
indices) must equal ours scale by scale, and the images must agree to 1e-4.

Timing as in benchmarks/var_sampling.py: best of --reps rounds, process CPU time with one thread
(equal to wall time on an idle machine; the machine is shared, so the load average is recorded).
The decode is timed apart on the same latents for both VQVAEs (`decode_s`), and `tokens_ratio`
is the ratio with it subtracted from both sides.
"""
from __future__ import annotations

import contextlib
import gc
import importlib
import io
import json
import os
import platform
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import torch
import torch.nn as nn

from experiments.machine import cpu_model
from modules.components.var_sampling import resolve_sampling

SETTINGS = dict(cfg=1.5, top_k=900, top_p=0.96)  # the VARGPT generation settings
LABELS = (207, 360, 387, 974)  # any fixed classes; B = 4
SEED = 0
IMG_TOL = 1e-4
TARGET = 1.3  # suite default vs official, at every depth


def load_official(path: str | Path) -> types.SimpleNamespace:
    """The official VAR and VQVAE classes from a checkout at `path` (+ its git commit if known)."""
    path = Path(path).resolve()
    if not (path / "models" / "var.py").is_file() or not (path / "models" / "vqvae.py").is_file():
        raise FileNotFoundError(f"{path} is not a FoundationVision/VAR checkout (models/var.py, models/vqvae.py missing)")
    names = ("models", "dist")
    before = {k: v for k, v in sys.modules.items() if k in names or k.startswith("models.")}
    for k in before:  # a foreign `models` / `dist` must not shadow the official ones
        del sys.modules[k]
    sys.path.insert(0, str(path))
    shim = None
    try:
        try:  # models/var.py imports PyTorchModelHubMixin from it (a mixin the benchmark never uses)
            importlib.import_module("huggingface_hub").PyTorchModelHubMixin
        except (ImportError, AttributeError):
            shim = types.ModuleType("huggingface_hub")
            shim.PyTorchModelHubMixin = type("PyTorchModelHubMixin", (), {})
            sys.modules["huggingface_hub"] = shim
        with contextlib.redirect_stdout(io.StringIO()):
            import models.var as official_var
            import models.vqvae as official_vqvae
    finally:
        sys.path.remove(str(path))
        for k in [k for k in sys.modules if k in names or k.startswith("models.")]:
            del sys.modules[k]
        sys.modules.update(before)
        if shim is not None:
            sys.modules.pop("huggingface_hub", None)
    return types.SimpleNamespace(VAR=official_var.VAR, VQVAE=official_vqvae.VQVAE, path=str(path),
                                 commit=_git_commit(path), hub_shim=shim is not None)


def _git_commit(path: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def build_official(off: types.SimpleNamespace, vq: nn.Module, var: nn.Module) -> Tuple[nn.Module, nn.Module]:
    """Official VQVAE + VAR of the same sizes, with the weights of ours (strict load)."""
    c = vq.cfg
    if list(c.ch_mult) != [1, 1, 2, 2, 4] or c.num_res_blocks != 2:
        raise ValueError("the official VQVAE has ch_mult (1, 1, 2, 2, 4) and 2 res blocks")
    with contextlib.redirect_stdout(io.StringIO()):  # its constructors print their config
        ovq = off.VQVAE(vocab_size=vq.V, z_channels=vq.Cvae, ch=c.ch, dropout=0.0, beta=c.beta, using_znorm=c.using_znorm,
                        quant_conv_ks=c.quant_conv_ks, quant_resi=c.quant_resi, share_quant_resi=c.share_quant_resi,
                        default_qresi_counts=c.default_qresi_counts, v_patch_nums=tuple(vq.patch_nums), test_mode=True)
        v = var.cfg
        ovar = off.VAR(vae_local=ovq, num_classes=var.num_classes, depth=var.depth, embed_dim=var.C,
                       num_heads=var.num_heads, mlp_ratio=v.mlp_ratio, drop_path_rate=0.0, norm_eps=v.norm_eps,
                       shared_aln=v.shared_aln, attn_l2_norm=v.attn_l2_norm, patch_nums=tuple(var.patch_nums),
                       flash_if_available=False, fused_if_available=False)
    ovq.load_state_dict(vq.state_dict(), strict=True)
    ovar.load_state_dict(var.state_dict(), strict=True)
    return ovq.eval(), ovar.eval()


@torch.no_grad()
def official_indices(ovar: nn.Module, B: int, labels: torch.Tensor, seed: int) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """(per-scale sampled indices, image) of one official call: a forward pre-hook on its codebook
    embedding records the indices of every scale (it is called once per scale with them)."""
    seen: List[torch.Tensor] = []
    emb = ovar.vae_quant_proxy[0].embedding
    handle = emb.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    try:
        img = ovar.autoregressive_infer_cfg(B, labels, g_seed=seed, **SETTINGS)
    finally:
        handle.remove()
    return seen, img


def _cpu_clock() -> Callable[[], float]:
    return time.process_time if torch.get_num_threads() == 1 else time.perf_counter


def compare_depth(off: types.SimpleNamespace, vq: nn.Module, var: nn.Module, B: int, reps: int) -> Dict[str, Any]:
    """One depth: time the three methods on (vq, var) and the official copies of them."""
    ovq, ovar = build_official(off, vq, var)
    labels = torch.tensor(LABELS[:B]) if B <= len(LABELS) else torch.arange(B) % var.num_classes
    sampler, dtype = resolve_sampling(var, parity=False)

    def gen() -> torch.Generator:
        return torch.Generator().manual_seed(SEED)

    methods: Dict[str, Callable[[int], Any]] = {
        "official": lambda b: ovar.autoregressive_infer_cfg(b, labels[:b], g_seed=SEED, **SETTINGS),
        "suite": lambda b: var.sample(b, labels[:b], generator=gen(), parity=False, **SETTINGS),
        "suite_parity": lambda b: var.sample(b, labels[:b], generator=gen(), parity=True, **SETTINGS),
    }
    clock = _cpu_clock()
    for fn in methods.values():  # warm-up: kernels, allocator
        fn(1)
    times: Dict[str, List[float]] = {m: [] for m in methods}
    walls: Dict[str, List[float]] = {m: [] for m in methods}
    order = list(methods)
    for r in range(reps):
        for name in order[r % len(order):] + order[:r % len(order)]:  # rotate who goes first
            gc.collect()
            t0, w0 = clock(), time.perf_counter()
            methods[name](B)
            times[name].append(clock() - t0)
            walls[name].append(time.perf_counter() - w0)

    # parity: same indices, same image (untimed)
    o_idx, o_img = official_indices(ovar, B, labels, SEED)
    s_idx, s_img = var.sample(B, labels, generator=gen(), parity=True, **SETTINGS)
    same = len(o_idx) == len(s_idx) and all(torch.equal(a, b) for a, b in zip(o_idx, s_idx))
    img_diff = float((o_img - s_img).abs().max())
    # decode time on the same latents (both decoders are fp32; the suite's fast path hands its
    # decoder a channels-last latent, see sample_next_scale)
    with torch.no_grad():
        f_hat = vq.idx_to_fhat(s_idx)
        f_cl = f_hat.contiguous(memory_format=torch.channels_last)
        decode = {}
        for name, fn in (("suite", lambda: vq.fhat_to_img(f_cl)), ("official", lambda: ovq.fhat_to_img(f_hat))):
            fn()
            t0 = clock()
            fn()
            decode[name] = clock() - t0

    best = {m: min(v) for m, v in times.items()}
    med = {m: sorted(v)[len(v) // 2] for m, v in times.items()}
    row: Dict[str, Any] = {"depth": var.depth, "res": vq.patch_nums[-1] * 2 ** (len(vq.cfg.ch_mult) - 1), "B": B, "C": var.C, "L": var.L,
                           "params_M": round(sum(p.numel() for p in var.parameters()) / 1e6, 1),
                           "suite_sampler": sampler, "suite_dtype": str(dtype).replace("torch.", "")}
    for m in methods:
        row[f"{m}_s"] = round(best[m], 3)
        row[f"{m}_median_s"] = round(med[m], 3)
        row[f"{m}_wall_s"] = round(min(walls[m]), 3)
        row[f"{m}_all_s"] = [round(x, 3) for x in times[m]]
    row["decode_suite_s"] = round(decode["suite"], 3)
    row["decode_official_s"] = round(decode["official"], 3)
    row["ratio"] = round(best["official"] / best["suite"], 3)
    row["ratio_median"] = round(med["official"] / med["suite"], 3)
    row["tokens_ratio"] = round((best["official"] - decode["official"]) / (best["suite"] - decode["suite"]), 3)
    row["parity_ratio"] = round(best["official"] / best["suite_parity"], 3)
    row["parity_indices_equal"] = bool(same)
    row["parity_img_max_abs"] = img_diff
    row["parity_ok"] = bool(same and img_diff <= IMG_TOL)
    return row


def machine_info() -> Dict[str, Any]:
    name = cpu_model()
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return {"cpu": name, "cores": os.cpu_count(), "avx512_bf16": bool(caps.get("avx512_bf16")),
            "amx_bf16": bool(caps.get("amx_bf16")), "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads()}


def repo_commit() -> Dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    commit = _git_commit(root)
    try:
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "modules/components/var_sampling.py",
                                "modules/components/var_decoder.py", "benchmarks/var_sampling.py", "benchmarks/var_official.py"],
                               capture_output=True, text=True, timeout=10).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        dirty = None
    return {"commit": commit, "sampling_files_modified": dirty}


def to_markdown(meta: Dict[str, Any], rows: List[Dict[str, Any]]) -> str:
    m = meta["machine"]
    lines = [
        f"Suite vs official FoundationVision/VAR sampler ({meta['official']['commit'] or 'unknown commit'}), same random "
        f"weights, {rows[0]['res'] if rows else 256} px, batch {rows[0]['B'] if rows else 4}, cfg {SETTINGS['cfg']}, "
        f"top-k {SETTINGS['top_k']}, top-p {SETTINGS['top_p']}; {m['cpu']} ({'AVX512-BF16' if m['avx512_bf16'] else 'no AVX512-BF16'}"
        f"{', AMX' if m['amx_bf16'] else ', no AMX'}), {m['threads']} thread, torch {m['torch']}; seconds per batch of "
        f"process CPU time, best of {meta['reps']} alternating rounds (median in the JSON), image decode included "
        f"(random VQVAE ch {meta['vq_ch']}; decode timed apart in the last columns). Load average "
        f"{meta['loadavg_start'][0]:.2f} at the start, {meta['loadavg_end'][0]:.2f} at the end. "
        f"Suite commit {(meta['repo']['commit'] or '?')[:10]}.",
        "",
        "| depth | C | official s | suite default s (sampler, dtype) | **ratio** | ratio w/o decode | suite parity s "
        "| parity: same indices | parity: img max abs | decode s suite / official |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['depth']} | {r['C']} | {r['official_s']:.2f} | {r['suite_s']:.2f} ({r['suite_sampler']}, {r['suite_dtype']}) "
            f"| **{r['ratio']:.2f}x** | {r['tokens_ratio']:.2f}x | {r['suite_parity_s']:.2f} "
            f"| {'yes' if r['parity_indices_equal'] else 'NO'} | {r['parity_img_max_abs']:.1e} "
            f"| {r['decode_suite_s']:.2f} / {r['decode_official_s']:.2f} |"
        )
    if rows:
        ok = all(r["ratio"] >= TARGET for r in rows)
        par = all(r["parity_ok"] for r in rows)
        ratios = ", ".join(f"depth {r['depth']}: {r['ratio']:.2f}x" for r in rows)
        lines += ["", f"Target: suite default >= {TARGET}x the official code at every depth: **{'met' if ok else 'NOT met'}** "
                      f"({ratios}). Parity mode draws the official indices: **{'yes' if par else 'NO'}**."]
    return "\n".join(lines) + "\n"


def run(official: str, build: Callable[[int], Tuple[nn.Module, nn.Module]], depths: List[int], B: int, reps: int,
        vq_ch: int, out: Path) -> Dict[str, Any]:
    """Compare at each depth (build(depth) -> (vqvae, var) with random weights); write
    var_sampling_vs_official.json / .md under `out`."""
    off = load_official(official)
    t0 = time.time()
    meta: Dict[str, Any] = {"machine": machine_info(), "repo": repo_commit(),
                            "official": {"path": off.path, "commit": off.commit, "hub_shim": off.hub_shim},
                            "settings": SETTINGS, "labels": list(LABELS[:B]), "seed": SEED, "reps": reps, "vq_ch": vq_ch,
                            "timing": "process CPU time (1 thread)" if torch.get_num_threads() == 1 else "wall time",
                            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
                            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    rows = []
    for d in depths:
        vq, var = build(d)
        r = compare_depth(off, vq, var, B, reps)
        del vq, var
        rows.append(r)
        print(json.dumps(r), flush=True)
    meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    meta["wall_s"] = round(time.time() - t0, 1)
    meta["target"] = {"ratio": TARGET, "met": all(r["ratio"] >= TARGET for r in rows),
                      "parity_ok": all(r["parity_ok"] for r in rows)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "var_sampling_vs_official.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1) + "\n")
    md = to_markdown(meta, rows)
    (out / "var_sampling_vs_official.md").write_text(md)
    print(md)
    return {"meta": meta, "results": rows}
