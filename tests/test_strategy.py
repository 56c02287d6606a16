"""The typed strategy section: ``trainer.strategy: fsdp`` builds the sharded strategy
(modules/sharded.py: FSDP2 over every rank, on CPU and GPU alike) from ``trainer.fsdp``, and what
cannot run sharded fails at load naming the key. The sharded runs themselves: tests/test_sharded.py
(2 CPU ranks) and benchmarks.gpu_check (the GPU check below)."""
from __future__ import annotations

import pytest
import torch

from experiments.config import REPO_ROOT, ConfigError, load_config
from experiments.run import build_strategy


def test_fsdp_section_builds_the_sharded_strategy():
    from lightning.pytorch.strategies import ModelParallelStrategy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from modules.parallel import layer_classes
    from modules.sharded import ShardedStrategy, mixed_precision_policy

    loaded = load_config(REPO_ROOT / "experiments/real/stage3.yaml",
                         ["trainer.fsdp.activation_checkpointing=[llm_decoder_layer]"])
    s = build_strategy(loaded.cfg)
    assert isinstance(s, ShardedStrategy) and isinstance(s, ModelParallelStrategy)
    assert (s._data_parallel_size, s._tensor_parallel_size) == (8, 1)  # every rank shards, no tensor parallelism
    assert s._save_distributed_checkpoint  # state_dict_type sharded: one shard file per rank
    mp = mixed_precision_policy(s.fsdp, s.precision_name)  # the recipe's bf16-mixed
    assert (mp.param_dtype, mp.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert mixed_precision_policy(s.fsdp, "32-true").param_dtype is None
    assert LlamaDecoderLayer in layer_classes(s.fsdp.activation_checkpointing)
    full = build_strategy(load_config(REPO_ROOT / "experiments/real/stage3.yaml", ["trainer.fsdp.state_dict_type=full"]).cfg)
    assert not full._save_distributed_checkpoint


def test_strategy_values_checked_at_load():
    real = REPO_ROOT / "experiments/real/stage3.yaml"
    with pytest.raises(ConfigError, match="trainer.fsdp.wrap"):
        load_config(real, ["trainer.fsdp.wrap=[llm_layers]"])
    with pytest.raises(ConfigError, match="trainer.strategy"):
        load_config(REPO_ROOT / "experiments/world/stage1.yaml", ["trainer.strategy=fsdpp"])
    with pytest.raises(ConfigError, match="trainer.fsdp.sharding_strategy.*FULL_SHARD or SHARD_GRAD_OP"):
        load_config(real, ["trainer.fsdp.sharding_strategy=HYBRID_SHARD"])
    with pytest.raises(ConfigError, match="model.llm_length_groups.*set it to 1"):
        load_config(real, ["model.llm_length_groups=2"])
    for precision in ("16-mixed", "bf16-true"):
        with pytest.raises(ConfigError, match="trainer.precision.*bf16-mixed"):
            load_config(real, [f"trainer.precision={precision}"])
    with pytest.raises(ConfigError, match="trainer.fsdp.cpu_offload.*set trainer.fsdp.cpu_offload=false"):
        load_config(real, ["trainer.fsdp.cpu_offload=true", "trainer.accelerator=cpu"])
    load_config(real, ["trainer.fsdp.cpu_offload=true"])  # GPU ranks: allowed (not run anywhere yet)
    with pytest.raises(ConfigError, match="trainer.val_every_n_steps.*evaluate the export"):
        load_config(REPO_ROOT / "experiments/tiny/stage3.yaml", ["trainer.strategy=fsdp"])
    # the same values are fine without sharding
    load_config(REPO_ROOT / "experiments/tiny/stage3.yaml", ["model.llm_length_groups=2"])
    assert build_strategy(load_config(REPO_ROOT / "experiments/world/stage1.yaml").cfg) == "auto"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fsdp_runs_on_a_gpu(tmp_path):  # pragma: no cover - GPU machines only
    """The recipe's sharded path (trainer.strategy fsdp, bf16-mixed over fp32 master weights,
    recomputed blocks, sharded checkpoint + bitwise resume) on every CUDA device found, through
    benchmarks.gpu_check's sharded phase alone."""
    import json
    import subprocess
    import sys

    from tests.test_gpu_check import check_sharded

    out = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(tmp_path), "--name", "fsdp",
                          "--stages", "", "--checkpoint", "", "--gen-images", "0", "--workdir", str(tmp_path)],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    check_sharded(json.loads((tmp_path / "fsdp.json").read_text()), ranks=torch.cuda.device_count(), device="cuda")
