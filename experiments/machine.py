"""The machine and commit a figure was measured on: what makes two timings comparable (or not).

Read by every results file's provenance (experiments.report, experiments.tracking run tags,
exports, benchmarks): the CPU's model name and its matrix-unit flags, which change timings by up
to 2x between the machines this suite runs on (Intel AMX, AMD AVX-512, AVX2 only).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform
import subprocess
from pathlib import Path
from typing import Dict, List

from experiments.config import REPO_ROOT


@functools.lru_cache(maxsize=None)
def cpu_model() -> str:
    """The CPU's marketing name (lscpu "Model name"), the fact that makes two timings comparable."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.strip().startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> List[str]:
    """The matrix-unit flags that change timings most between machines of this kind."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((l.split(":", 1)[1].split() for l in text.splitlines() if l.startswith("flags")), [])
    return [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]


def git_info(root: Path = REPO_ROOT) -> Dict[str, str]:
    """Commit SHA and whether the work tree differs from it ("unknown" outside a git checkout)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=10, check=True).stdout
        return {"git_commit": sha, "git_dirty": str(bool(status.strip())).lower()}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "unknown", "git_dirty": "unknown"}


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
KEEP_FREED_BYTES = 1 << 30


@functools.lru_cache(maxsize=None)
def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks up to 1 GiB in the process heap instead of returning
    them to the OS. A training step allocates and frees the same large tensors every step (bf16
    copies of the weights under autocast, gradients, the text head's logits); by default glibc
    serves blocks above its dynamic mmap threshold (at most 32 MiB) with fresh mmap pages, each of
    them page-faulted and zeroed by the kernel on first touch, every step. Kept, they are reused.
    Nothing computed changes; the process's resident memory stays at its peak instead of shrinking
    between steps. Measured on the official VARGPT-v1 code's step, which allocates more per step
    (benchmarks/results/train_step_vs_official.md, its "same malloc setting" column; the 125M model,
    bf16, 1 thread, AMX Xeon): mixed batch 1.299 -> 1.042 s, generation batch 1.657 -> 1.309 s.
    Returns whether it applied (glibc only; elsewhere the allocator is left as it is). Idempotent."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, KEEP_FREED_BYTES)) and \
            bool(libc.mallopt(_M_TRIM_THRESHOLD, KEEP_FREED_BYTES))
    except (OSError, AttributeError):
        return False
