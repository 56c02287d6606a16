"""Sharded training (trainer.strategy: fsdp, modules/sharded.py) on 2 CPU ranks over gloo, through
`python -m experiments.run` on the tiny stage-2 preset: the code path the 7B recipes take on GPUs.

Four launches, in two pairs run side by side, feed every test here (module-scoped fixtures):
  one     one process, no sharding, fp32, 6 steps, a Qwen2 LLM (tied embedding / head) (the reference)
  sharded the same on 2 ranks, both reading rank 0's batches (data.replicate_across_ranks), with
          SHARD_GRAD_OP and full (gathered) checkpoints
  recipe  2 ranks, the recipe's path: bf16-mixed (bf16 compute, fp32 master weights), activation
          checkpointing of the LLM layers and VAR blocks, sharded checkpoints every 2 steps, each
          rank its own batches (so ranks meet batches with and without generation targets), 10 steps,
          validation every 5
  killed  the recipe run SIGKILLed after a checkpoint, then --resume
Each run writes <output_dir>/sharding.rank<r>.json (trainer.fsdp.report): shard shapes and hashes,
bytes held, per-step losses, the compute dtype seen in forward, forward runs per step.
"""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from safetensors.torch import load_file

from tests.test_long_runs import REPO, kill_group, start, wait_for, world  # noqa: F401 (fixture)

STAGE2 = str(REPO / "experiments/tiny/stage2.yaml")
COMMON = ["init_from=", "logging.enabled=false", "trainer.accelerator=cpu", "trainer.num_threads=1",
          "data.num_workers=0", "checkpoint.every_n_minutes=0", "eval.vqa_shards=", "eval.gen_shards=",
          "trainer.fsdp.report=true"]
STEPS = 10  # the recipe runs': the kill comes after step 4's checkpoint, well before the end
RECIPE = ["trainer.devices=2", "trainer.strategy=fsdp", "trainer.precision=bf16-mixed",
          "trainer.fsdp.activation_checkpointing=[llm_decoder_layer,var_block]", f"trainer.max_steps={STEPS}",
          "checkpoint.every_n_steps=2", "checkpoint.keep_last=4",
          # validation in the loop: every rank reads every validation batch (each forward gathers
          # weights with all ranks, so the ranks must run the same number of batches)
          "trainer.val_every_n_steps=5", "trainer.limit_val_batches=0", "data.val_batch_size=3",
          "data.val_sources=[{name: g, shards: 'val/gen-*.tar', task: generation}, "
          "{name: q, shards: 'val/vqa-*.tar', task: understanding}]"]
TIMEOUT = 300


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world, out: Path, *extra: str) -> subprocess.Popen:  # noqa: F811
    root, tok = world
    os.environ["MASTER_PORT"] = str(_port())  # start() copies os.environ; each multi-rank run its own port
    return start([STAGE2, f"model.tokenizer.path={tok}", f"data.root={root}", f"output_dir={out}", *COMMON, *extra])


class Launched(list):
    """Runs started by a fixture: every process group still there is killed when it leaves, so a
    failing fixture leaves no rank behind."""

    def __enter__(self) -> "Launched":
        return self

    def __exit__(self, *exc) -> None:
        for p in self:
            kill_group(p)


def done(p: subprocess.Popen, timeout: float = TIMEOUT) -> str:
    try:
        log, _ = p.communicate(timeout=timeout)
    finally:
        kill_group(p)
    assert p.returncode == 0, log[-6000:]
    return log


def reports(out: Path) -> List[Dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("sharding.rank*.json"))]


@pytest.fixture(scope="module")
def fp32_runs(world, tmp_path_factory):  # noqa: F811
    d = tmp_path_factory.mktemp("sharded_fp32")
    t0 = time.monotonic()
    with Launched() as runs:
        # a Qwen2 LLM here: its input embedding and output head are one tied parameter
        runs.append(launch(world, d / "one", "model.llm.name=qwen2", "data.replicate_across_ranks=true",
                           "trainer.max_steps=6", "checkpoint.at_end=false"))
        # the other sharding options on the way: units keep their gathered weights until backward, and
        # checkpoints are one gathered file (rank 0) instead of a directory of shards
        runs.append(launch(world, d / "sharded", "model.llm.name=qwen2", "data.replicate_across_ranks=true",
                           "trainer.max_steps=6", "checkpoint.at_end=false", "trainer.devices=2", "trainer.strategy=fsdp",
                           "trainer.fsdp.sharding_strategy=SHARD_GRAD_OP", "trainer.fsdp.state_dict_type=full",
                           "checkpoint.every_n_steps=3"))
        for p in runs:
            done(p)
    print(f"[test_sharded] fp32 pair: {time.monotonic() - t0:.1f} s")
    return {"one": reports(d / "one"), "sharded": reports(d / "sharded"), "dir": d}


@pytest.fixture(scope="module")
def recipe_runs(world, tmp_path_factory):  # noqa: F811
    d = tmp_path_factory.mktemp("sharded_recipe")
    t0 = time.monotonic()
    with Launched() as runs:
        ref = launch(world, d / "ref", *RECIPE)
        killed = launch(world, d / "killed", *RECIPE)
        runs += [ref, killed]
        wait_for(d / "killed" / "checkpoints" / "step-00000004.json", killed)
        kill_group(killed)  # SIGKILL to both ranks (one process group)
        killed.wait(30)
        ref_log = done(ref)
        assert not (d / "killed" / "model.safetensors").exists()
        runs.append(launch(world, d / "killed", *RECIPE, "--resume"))
        resumed_log = done(runs[-1])
    print(f"[test_sharded] recipe runs: {time.monotonic() - t0:.1f} s")
    return {"dir": d, "ref_log": ref_log, "resumed_log": resumed_log, "ref": reports(d / "ref")}


def test_losses_equal_one_process(fp32_runs):
    """Both ranks see the batch one process sees, so the averaged gradient is that process's
    (g + g) / 2 = g exactly in fp32, and every forward runs on the same gathered weights. What may
    differ is the summation order of the gradient norm for clipping (per shard, then over ranks),
    about 1 ulp in the clip factor: losses agree to 1e-5 relative (seen: 1e-7). A wrong reduction
    (a sum instead of a mean over ranks, a shard left out) moves them by far more than that."""
    one = fp32_runs["one"][0]["losses"]
    r0, r1 = (r["losses"] for r in fp32_runs["sharded"])
    assert len(one) == len(r0) == len(r1) == 6
    assert len(set(round(x, 4) for x in one)) > 1  # the losses move: the comparison is not of constants
    for a, b, c in zip(one, r0, r1):
        assert math.isclose(a, b, rel_tol=1e-5) and math.isclose(a, c, rel_tol=1e-5), (one, r0, r1)
    assert fp32_runs["sharded"][0]["strategy"] == "ShardedStrategy" and fp32_runs["one"][0]["world_size"] == 1
    assert fp32_runs["sharded"][0]["sharding"]["reshard_after_forward"] is False  # SHARD_GRAD_OP


def test_tied_embedding_and_head_stay_one_parameter(fp32_runs):
    """Qwen2's tied input embedding / output head: one sharded parameter (named once), trained as
    one, and exported under both names with equal values, as one process exports it."""
    params = fp32_runs["sharded"][0]["params"]
    assert "llm.model.embed_tokens.weight" in params and "llm.lm_head.weight" not in params
    assert params["llm.model.embed_tokens.weight"]["sharded"] and params["llm.model.embed_tokens.weight"]["trainable"]
    one = load_file(str(fp32_runs["dir"] / "one" / "model.safetensors"))
    two = load_file(str(fp32_runs["dir"] / "sharded" / "model.safetensors"))
    assert one.keys() == two.keys()
    assert torch.equal(two["llm.lm_head.weight"], two["llm.model.embed_tokens.weight"])
    # and 6 steps later the weights still agree with one process (the tolerance of the losses' test)
    assert max(float((one[k] - two[k]).abs().max()) for k in one) < 1e-5


def test_full_state_dict_checkpoint_is_one_gathered_file(fp32_runs):
    ckpt = fp32_runs["dir"] / "sharded" / "checkpoints" / "step-00000006.ckpt"
    assert ckpt.is_file()
    sd = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    params = fp32_runs["sharded"][0]["params"]
    trainable = {f"net.{n}" for n, p in params.items() if p["trainable"]}
    assert trainable <= set(sd) and not any(f"net.{n}" in sd for n, p in params.items() if not p["trainable"])
    for k in trainable:  # full shapes, plain tensors: gathered, not one rank's shard
        assert list(sd[k].shape) == params[k[len("net."):]]["shape"] and type(sd[k]) is torch.Tensor, k


def test_each_rank_holds_half_of_each_sharded_tensor(fp32_runs):
    r0, r1 = fp32_runs["sharded"]
    assert (r0["world_size"], r0["sharding"]["mesh"]) == (2, {"device_type": "cpu", "size": 2})
    units = r0["sharding"]["units"]
    assert "llm.model.layers.0" in units and "var.blocks.0.attn" in units and "vision.tower.blocks.0" in units
    assert r0["sharding"]["kept_whole"] == ["vqvae"]
    sharded = 0
    for name, p0 in r0["params"].items():
        p1, n = r1["params"][name], p0["shape"][0]
        if name.startswith("vqvae."):  # kept whole: every rank the full tensor
            assert not p0["sharded"] and p0["local_shape"] == p1["local_shape"] == p0["shape"], name
            continue
        assert p0["sharded"] and p1["sharded"], name
        half = math.ceil(n / 2)  # dim 0 split in rank order, rank 0 the larger part
        assert p0["local_shape"] == [half, *p0["shape"][1:]] and p1["local_shape"] == [n - half, *p0["shape"][1:]], name
        sharded += 1
    assert sharded > 50  # the LLM, the vision tower, the VAR, the projectors: all of them


def test_params_and_optimizer_state_per_rank_halve(fp32_runs):
    """Bytes of the parameters + AdamW state held by a rank, from the tensors' sizes: the sharded
    part halves at 2 ranks (up to the odd rows of odd-sized dims); the VQVAE stays whole."""
    one = fp32_runs["one"][0]["memory"]
    for r in fp32_runs["sharded"]:
        m = r["memory"]
        assert 0.49 < m["sharded_bytes"] / one["sharded_bytes"] < 0.52, (m, one)
        assert m["optimizer_bytes"] / one["optimizer_bytes"] == pytest.approx(0.5, abs=0.01)
        assert m["kept_whole_bytes"] == one["kept_whole_bytes"] > 0
    # what the plan (benchmarks.gpu_check) predicts from shapes alone is what each rank holds
    from experiments.config import load_config
    from modules.sharded import planned_bytes
    from modules.stages.vargpt_stages import STAGE_CLASSES

    cfg = load_config(fp32_runs["dir"] / "sharded" / "config.yaml").cfg
    net = STAGE_CLASSES["stage2"](cfg).net
    assert planned_bytes(net, 1) == one
    for r in fp32_runs["sharded"]:
        assert planned_bytes(net, 2, r["rank"]) == r["memory"], r["rank"]
    # nothing held twice, nothing lost: the two ranks together hold one process's bytes, plus
    # AdamW's step counter (one fp32 scalar per trainable parameter) that every rank keeps
    total = sum(r["memory"]["sharded_bytes"] for r in fp32_runs["sharded"])
    n_trainable = sum(p["trainable"] for p in fp32_runs["one"][0]["params"].values())
    assert total - one["sharded_bytes"] == 4 * n_trainable


def test_recipe_runs_bf16_compute_fp32_master_weights_and_recomputes(recipe_runs):
    for r in recipe_runs["ref"]:
        s = r["sharding"]
        assert r["precision"] == "bf16-mixed" and (s["param_dtype"], s["reduce_dtype"]) == ("bfloat16", "float32")
        assert {p["dtype"] for p in r["params"].values()} == {"float32"}  # master weights (and the VQVAE)
        assert r["compute_dtype"] == "bfloat16"  # a unit's Linear weight as its forward saw it
        assert {"llm.model.layers.0", "llm.model.layers.1", "var.blocks.0"} <= set(s["recomputed"])
        # a recomputed block runs its forward twice a step: in forward, and again in backward (stage 2
        # trains the LLM, and its gradient flows back through the frozen VAR blocks too)
        assert r["forward_calls_per_step"] == {n: [2] * STEPS for n in s["recomputed"]}, r["forward_calls_per_step"]
        assert all(math.isfinite(x) for x in r["losses"]) and len(r["losses"]) == STEPS


def test_sharded_checkpoint_sigkill_resume_is_bitwise(recipe_runs):
    d = recipe_runs["dir"]
    assert "resuming from" in recipe_runs["resumed_log"], recipe_runs["resumed_log"][-3000:]
    ckpt = d / "ref" / "checkpoints" / f"step-{STEPS:08d}.ckpt"
    assert ckpt.is_dir() and sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    a, b = load_file(str(d / "ref" / "model.safetensors")), load_file(str(d / "killed" / "model.safetensors"))
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert diff == [], f"{len(diff)} tensors differ after SIGKILL + --resume, e.g. {diff[:3]}"


def test_export_gathers_the_shards_and_loads_into_one_process(recipe_runs):
    """The export is the ranks' shards put together (each rank's part of each tensor hashes to what
    that rank held at the end), and it loads into a model built in this process bit for bit."""
    import hashlib

    from experiments.config import load_config
    from modules.checkpoint import load_strict
    from modules.vargpt import VARGPT

    d = recipe_runs["dir"] / "ref"
    sd = load_file(str(d / "model.safetensors"))
    for r in recipe_runs["ref"]:
        for name, p in r["params"].items():
            full = sd[name]
            assert list(full.shape) == p["shape"] and str(full.dtype) == f"torch.{p['dtype']}", name
            half = math.ceil(full.shape[0] / 2)
            part = full[half * r["rank"]: half * (r["rank"] + 1)] if p["sharded"] else full
            got = hashlib.sha256(part.contiguous().view(torch.uint8).numpy().tobytes() if part.numel() else b"")
            assert got.hexdigest() == p["sha256"], f"rank {r['rank']}: {name}"
    cfg = load_config(d / "config.yaml").cfg
    net = VARGPT(cfg.model, template=cfg.data.chat)
    load_strict(net, sd)
    mine = net.state_dict()
    assert mine.keys() >= sd.keys()
    assert [k for k in sd if not torch.equal(mine[k], sd[k])] == []


def test_every_part_runs_on_zero_samples_and_adds_exactly_zero(tmp_path):
    """Under sharding each rank runs the vision tower and the generation side every step, also on a
    batch with no image / no target (zero samples), since each unit's gather waits for every rank.
    One process, the world recipe (its prompt cross-attention included): the loss is bitwise the
    same as without it, and the skipped parts did run."""
    from benchmarks import gpu_check_parts as P
    from modules.stages.vargpt_stages import STAGE_CLASSES

    cfg = P.stage_configs("world", False)["stage2"]
    net = P.build_model(cfg, "world", torch.device("cpu"), tmp_path)
    STAGE_CLASSES["stage2"](cfg, net=net)  # the stage's trainable set
    calls = {"vision": 0, "var": 0}
    net.vision.register_forward_pre_hook(lambda m, a: calls.__setitem__("vision", calls["vision"] + 1))
    net.var.blocks[0].attn.register_forward_pre_hook(lambda m, a: calls.__setitem__("var", calls["var"] + 1))
    for n_und, n_gen, skipped in ((4, 0, "var"), (0, 4, "vision")):
        batch = P.make_batch(net, cfg, P.make_samples(net, n_und, n_gen, P.SIZES["world"]))
        losses = []
        for every in (False, True):
            net.run_every_part = every
            calls.update(vision=0, var=0)
            torch.manual_seed(0)
            loss = net(batch)["loss"]
            loss.backward()
            losses.append(loss.detach())
            assert calls[skipped] == (1 if every else 0), (n_und, n_gen, every, calls)
        assert torch.equal(losses[0], losses[1]) and torch.isfinite(losses[1])
