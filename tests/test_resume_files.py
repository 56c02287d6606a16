"""Checkpoint files on disk: sidecars, verification, rotation; what a relaunched sweep resumes;
an export whose input changed is stale."""
from __future__ import annotations

import json

import torch

from experiments.run_guard import init_hash, stale_inputs
from experiments.sweep_launcher import resumable
from modules.checkpoint import (checkpoint_info, checkpoint_name, finalize_checkpoint, latest_valid_checkpoint,
                                prune_checkpoints, write_export)


def _ckpt(d, step, config_hash="abc"):
    tmp = d / (checkpoint_name(step) + ".tmp")
    torch.save({"step": step}, tmp)
    return finalize_checkpoint(tmp, d / checkpoint_name(step), {"config_hash": config_hash, "step": step})


def test_a_checkpoint_that_does_not_verify_is_skipped_for_the_one_before(tmp_path):
    for s in (2, 4, 6):
        _ckpt(tmp_path, s)
    assert latest_valid_checkpoint(tmp_path).name == checkpoint_name(6)
    (tmp_path / checkpoint_name(6)).write_bytes(b"truncated")  # a crash mid-write, say
    warned = []
    assert latest_valid_checkpoint(tmp_path, warn=warned.append).name == checkpoint_name(4)
    assert warned and "does not match its sidecar" in warned[0]
    assert checkpoint_info(tmp_path / checkpoint_name(4))["step"] == 4
    prune_checkpoints(tmp_path, keep_last=1)
    assert [p.name for p in sorted(tmp_path.glob("*.ckpt"))] == [checkpoint_name(6)]  # newest kept


def test_a_relaunched_sweep_resumes_only_its_own_config(tmp_path):
    assert not resumable(tmp_path, "abc")
    _ckpt(tmp_path, 3, "abc")
    assert resumable(tmp_path, "abc") and not resumable(tmp_path, "other")


def test_an_export_trained_from_a_changed_input_is_stale(tmp_path):
    src, dst = tmp_path / "stage1", tmp_path / "stage2"
    write_export(src, {"model.safetensors": {"w": torch.zeros(2)}}, "a: 1\n")
    write_export(dst, {"model.safetensors": {"w": torch.ones(2)}}, "b: 1\n",
                 metadata={"init_from": str(src), "init_from_sha256": init_hash(str(src))})
    assert stale_inputs(dst) == []
    write_export(src, {"model.safetensors": {"w": torch.full((2,), 5.0)}}, "a: 1\n")  # stage 1 retrained
    (msg,) = stale_inputs(dst)
    assert "has changed since" in msg
    assert json.loads((src / "export.json").read_text())["files"]["model.safetensors"]["sha256"] == init_hash(str(src))
