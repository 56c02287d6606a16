"""torch.compile of the VARGPT blocks (VARGPT.compile_blocks, trainer.compile): the compiled
training step computes the eager one (loss and every gradient, fp32, two batch lengths through
one dynamic graph), the state-dict keys stay, and trainer.compile=auto compiles only where it was
measured to pay."""
import copy

import pytest
import torch

from experiments.config import REPO_ROOT, ConfigError, compile_decision, load_config
from modules.vargpt import VARGPT
from tests.tiny import collator_for, gen_sample, tiny_model_config, und_sample


def _step(net, batch):
    net.zero_grad(set_to_none=True)
    out = net(batch)
    out["loss"].backward()
    return out["loss"].detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def test_compiled_step_equals_eager(tmp_path):
    torch.manual_seed(0)
    eager = VARGPT(tiny_model_config(tmp_path)).train()
    eager.cfg.cond_drop_rate = 0.0  # random; off so both draw nothing
    comp = copy.deepcopy(eager)
    keys = list(comp.state_dict())
    assert comp.compile_blocks() == len(comp.llm.get_decoder().layers) + len(comp.var.blocks)
    assert list(comp.state_dict()) == keys  # compiled in place: no _orig_mod. prefixes
    col = collator_for(eager)
    batches = [col([und_sample("u0"), gen_sample("g0")]),
               col([und_sample("u1"), gen_sample("g1", instr="Can you make an image showing two blue squares at the top, please?"),
                    gen_sample("g2")])]
    assert batches[0]["input_ids"].shape[1] != batches[1]["input_ids"].shape[1]
    for b in batches:  # the second length runs through the same dynamic graph
        l0, g0 = _step(eager, b)
        l1, g1 = _step(comp, b)
        torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
        assert g1.keys() == g0.keys() and len(g0) > 10
        for n in g0:
            torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")
    # eval mode (evaluation, sampling with KV caches): the eager forwards, nothing traced or compiled
    from torch._dynamo.utils import counters

    before = sum(counters["frames"].values())
    comp.eval()
    with torch.no_grad():
        out = comp(batches[0])
        comp.generate_image(["Draw a red circle on the left."], cfg=0.0, seed=[0])
    assert sum(counters["frames"].values()) == before
    torch.testing.assert_close(out["loss"], eager.eval()(batches[0])["loss"], rtol=0, atol=0)


def _cfg(*over):
    return load_config(REPO_ROOT / "experiments/tiny/stage3.yaml", list(over)).cfg


def test_auto_compiles_long_single_cpu_runs_only():
    assert compile_decision(_cfg("trainer.max_steps=5000", "trainer.accelerator=cpu"))[0]
    off, why = compile_decision(_cfg("trainer.max_steps=50", "trainer.accelerator=cpu"))
    assert not off and "max_steps 50 < trainer.compile_min_steps 1000" in why
    assert compile_decision(_cfg("trainer.max_steps=50", "trainer.compile_min_steps=10", "trainer.accelerator=cpu"))[0]
    cpu = "trainer.accelerator=cpu"
    for over, reason in [([cpu, "trainer.devices=2"], "more than one process"),
                         ([cpu, "trainer.strategy=ddp"], "more than one process"),
                         ([cpu, "model.llm.gradient_checkpointing=true"], "recomputed"),
                         ([cpu, "trainer.threads_file=runs/threads.txt"], "thread count"),
                         (["trainer.accelerator=gpu"], "not a CPU run")]:
        ok, why = compile_decision(_cfg("trainer.max_steps=5000", *over))
        assert not ok and reason in why, (over, why)
    assert compile_decision(_cfg("trainer.max_steps=5", "trainer.compile=always"))[0]
    assert not compile_decision(_cfg("trainer.max_steps=5000", "trainer.accelerator=cpu", "trainer.compile=never"))[0]


def test_bad_compile_value_is_named():
    with pytest.raises(ConfigError, match="trainer.compile"):
        _cfg("trainer.compile=yes")
