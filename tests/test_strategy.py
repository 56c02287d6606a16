"""The typed strategy section: FSDP wraps the named layer groups of the real recipe (Lightning's
FSDPStrategy needs CUDA to run; its construction and the wrap policy are checked here, a run on
a GPU by the `gpu` test and benchmarks.gpu_check)."""
from __future__ import annotations

import pytest
import torch

from experiments.config import REPO_ROOT, ConfigError, load_config
from experiments.run import build_strategy
from modules.components.var_decoder import AdaLNSelfAttn


def test_fsdp_section_builds_the_wrap_and_checkpointing_policy():
    from lightning.pytorch.strategies import FSDPStrategy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    loaded = load_config(REPO_ROOT / "experiments/real/stage3.yaml",
                         ["trainer.fsdp.activation_checkpointing=[llm_decoder_layer]", "trainer.fsdp.mixed_precision=bf16"])
    s = build_strategy(loaded.cfg)
    assert isinstance(s, FSDPStrategy)
    wrap = s.kwargs["auto_wrap_policy"]._module_classes
    assert LlamaDecoderLayer in wrap and AdaLNSelfAttn in wrap
    assert s.kwargs["use_orig_params"]  # frozen and trainable parameters share FSDP units
    assert s.mixed_precision.param_dtype == torch.bfloat16
    assert s._activation_checkpointing_kwargs  # per-layer recomputation requested


def test_strategy_values_checked_at_load():
    with pytest.raises(ConfigError, match="trainer.fsdp.wrap"):
        load_config(REPO_ROOT / "experiments/real/stage3.yaml", ["trainer.fsdp.wrap=[llm_layers]"])
    with pytest.raises(ConfigError, match="trainer.strategy"):
        load_config(REPO_ROOT / "experiments/world/stage1.yaml", ["trainer.strategy=fsdpp"])
    assert build_strategy(load_config(REPO_ROOT / "experiments/world/stage1.yaml").cfg) == "auto"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fsdp_runs_on_a_gpu(tmp_path):  # pragma: no cover - GPU machines only
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(tmp_path)], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
