"""A v1.1 release stage sharded (trainer.strategy: fsdp, bf16-mixed, every unit recomputed) on 2 CPU
ranks through `python -m experiments.run`: the path the 7B recipes (experiments/real/vargpt_v11_stage*.yaml)
take on GPUs. Batches of one sample from a vqa + gen mix, each rank its own, so a rank meets steps
without a generation target or without an input image while the other has one: run_every_part keeps
every unit's gathers in step (without it the ranks' collectives mismatch and the run aborts)."""
from __future__ import annotations

import json
import os
import socket

import pytest

from tests.test_long_runs import REPO, kill_group, start

pytestmark = pytest.mark.slow


def test_release_stage5_runs_sharded_on_two_ranks(tmp_path):
    from datamodules.world import generate_split
    from tests.tiny import tiny_tokenizer_dir

    generate_split(str(tmp_path / "w" / "train"), "train", {"vqa": 8, "gen": 8}, seed=0, size=32, shard_size=8)
    tok = tiny_tokenizer_dir(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    out = tmp_path / "run"
    p = start([str(REPO / "experiments/v11/world.yaml"), "stage=v11_stage5", f"model.tokenizer.path={tok}",
               f"data.root={tmp_path / 'w'}", f"output_dir={out}", "logging.enabled=false", "trainer.accelerator=cpu",
               "trainer.num_threads=1", "data.num_workers=0", "trainer.devices=2", "trainer.strategy=fsdp",
               "trainer.precision=bf16-mixed", "trainer.fsdp.activation_checkpointing=[llm_decoder_layer,var_block,vision_layer]",
               "trainer.max_steps=8", "data.batch_size=1", "checkpoint.at_end=false", "trainer.fsdp.report=true",
               "model.v11.llm.num_hidden_layers=1", "model.v11.tokenizer.base_ch=24", "model.v11.tokenizer.ch_mult=[1,1,1,1,1]", "model.v11.tokenizer.scales=[[1,1],[2,2],[4,4]]"])
    try:
        log, _ = p.communicate(timeout=400)
    finally:
        kill_group(p)
    assert p.returncode == 0, log[-4000:]
    reps = [json.loads((out / f"sharding.rank{r}.json").read_text()) for r in (0, 1)]
    for rep in reps:
        assert len(rep["sharding"]["units"]) == 5 and rep["compute_dtype"] == "bfloat16"
        # every unit (1 LLM layer, 2 ViT blocks, 2 Infinity blocks) ran forward + recompute every step
        assert set(rep["forward_calls_per_step"]) == {"model.layers.0", "visual.blocks.0", "visual.blocks.1",
                                                      "gen.vargpt_gen.block_chunks.0.module.0",
                                                      "gen.vargpt_gen.block_chunks.0.module.1"}
        assert all(c == [2] * 8 for c in rep["forward_calls_per_step"].values())
        assert len(rep["losses"]) == 8 and all(0 < x < 20 for x in rep["losses"])
    assert reps[0]["losses"] != reps[1]["losses"]  # each rank read its own batches
    assert (out / "model.safetensors").is_file()
