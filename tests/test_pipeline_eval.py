"""The scoreboard's evaluation step: stage 3 reuses stage 2's VQA only when its understanding
path is stage 2's, tensor by tensor and setting by setting."""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from experiments.pipeline import same_understanding


def _export(d: Path, tensors, llm_width: int = 128) -> Path:
    d.mkdir(parents=True)
    save_file(tensors, str(d / "model.safetensors"))
    OmegaConf.save(OmegaConf.create({"model": {"llm": {"hidden_size": llm_width}, "vision": {"name": "tiny_vit"},
                                               "und_projector": {"name": "mlp"}, "tokenizer": {"path": "t"}},
                                     "data": {"chat": {"system": ""}, "max_length": 256}}), d / "config.yaml")
    return d


def test_same_understanding_tensor_by_tensor(tmp_path):
    und = {"llm.w": torch.randn(4, 4), "vision.w": torch.randn(3), "und_proj.0.weight": torch.randn(2, 2)}
    gen = {"gen_in.0.weight": torch.randn(2, 2), "var.x": torch.randn(5)}
    a = _export(tmp_path / "a", {**und, **gen})
    # stage 3 changed only the generation side: same answers
    b = _export(tmp_path / "b", {**und, "gen_in.0.weight": torch.randn(2, 2), "var.x": torch.randn(5)})
    assert same_understanding(a, b)
    # one LLM value moved by one ulp: not the same model
    moved = dict(und, **{"llm.w": torch.nextafter(und["llm.w"], torch.full_like(und["llm.w"], 9.0))})
    assert not same_understanding(a, _export(tmp_path / "c", {**moved, **gen}))
    # an extra understanding tensor, or a different LLM setting, is not the same either
    assert not same_understanding(a, _export(tmp_path / "d", {**und, **gen, "llm.extra": torch.zeros(1)}))
    assert not same_understanding(a, _export(tmp_path / "e", {**und, **gen}, llm_width=256))
