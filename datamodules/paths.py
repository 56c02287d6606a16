"""Where relative paths in configs point: one resolver with one documented base.

Every path a config holds (``model.load[].path``, ``init_from``, ``model.tokenizer.path``,
``model.vision.pretrained_path``, ``data.root``, ``output_dir``, ``eval.classifier_path``, ...)
is relative to the repository root unless it is absolute, whatever the working directory.
This module is part of the bottom layer (with ``tokens`` and ``config``): it imports nothing
from the project, so every layer may use it.
"""
from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def resolve_path(p: str | Path) -> Path:
    """``p`` with ``~`` expanded; relative paths are taken from the repository root."""
    path = Path(p).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def run_dir(cfg) -> Path:
    """Where a run writes its export and checkpoints: ``cfg.output_dir``, else ``runs/<cfg.name>``
    (``cfg`` is an experiment config; duck-typed so this module stays import-free)."""
    return resolve_path(cfg.output_dir or f"runs/{cfg.name}")
