"""The world LLM in a v1.1 model: format llama_qwen2 (modules/weights.py) maps the suite's Llama
(``llm.*`` names) into VARGPT-v1.1's Qwen2-VL text model. With the Llama's sizes, rope_theta and
RMS eps (experiments/world/v11/model.yaml), the mapped model computes the same function on text:
the next-token logits agree. A wrong map (a missing bias, a transposed weight, another rope) fails."""
from __future__ import annotations

import pytest
import torch

from experiments.config import load_config
from modules.checkpoint import StateDictMismatchError, save_state_dict
from modules.components.llm import LLMConfig, build_llm
from modules.vargpt11_world import VARGPT11World
from modules.weights import load_weights
from modules.config import LoadSpec

TOK = "assets/world/tokenizer"


def _v11(*over: str) -> VARGPT11World:
    cfg = load_config("experiments/world/v11/model.yaml", ["model.load=[]", *over]).cfg
    return VARGPT11World(cfg.model, template=cfg.data.chat)


def _llama(vocab: int, seed: int = 0):
    torch.manual_seed(seed)
    llm = build_llm(LLMConfig(name="llama", preset="tiny"), vocab)
    for p in llm.parameters():  # away from the init's ones / zeros: every tensor matters
        p.data.add_(0.02 * torch.randn_like(p))
    return llm.eval()


def test_mapped_llama_gives_the_same_logits(tmp_path):
    net = _v11().eval()
    llm = _llama(net.lm_head.weight.shape[0])
    f = tmp_path / "llm.safetensors"
    save_state_dict({f"llm.{k}": v for k, v in llm.state_dict().items()} | {"vision.x": torch.zeros(2)}, f)
    before = {k: v.clone() for k, v in net.state_dict().items() if k.startswith(("visual.", "gen."))}
    load_weights(net, [LoadSpec(path=str(f), format="llama_qwen2")])
    ids = torch.randint(0, 500, (2, 37))
    with torch.no_grad():
        ref = llm(input_ids=ids).logits
        pos = torch.arange(ids.shape[1]).expand(3, *ids.shape)  # text: t = h = w
        h = net.model(input_ids=ids, position_ids=pos).last_hidden_state
        got = net.lm_head(h)
    assert (got - ref).abs().max() < 1e-4, (got - ref).abs().max()
    for k, v in before.items():  # the rest of the v1.1 model is untouched
        assert torch.equal(net.state_dict()[k], v), k
    assert all(net.state_dict()[k].abs().max() == 0 for k in net.state_dict() if k.endswith("_proj.bias"))


def test_another_rope_theta_does_not_match(tmp_path):
    """The check is sharp: the release's rope_theta (1e6) with the same weights gives other logits."""
    net = _v11("model.v11.llm.rope_theta=1000000.0").eval()
    llm = _llama(net.lm_head.weight.shape[0])
    f = tmp_path / "llm.safetensors"
    save_state_dict({f"llm.{k}": v for k, v in llm.state_dict().items()}, f)
    load_weights(net, [LoadSpec(path=str(f), format="llama_qwen2")])
    ids = torch.randint(0, 500, (1, 40))
    with torch.no_grad():
        pos = torch.arange(ids.shape[1]).expand(3, *ids.shape)
        got = net.lm_head(net.model(input_ids=ids, position_ids=pos).last_hidden_state)
        assert (got - llm(input_ids=ids).logits).abs().max() > 1e-3


def test_a_file_without_llm_keys_or_with_other_sizes_is_refused(tmp_path):
    net = _v11()
    f = tmp_path / "v.safetensors"
    save_state_dict({"vision.tower.x": torch.zeros(3)}, f)
    with pytest.raises(ValueError, match="no llm"):
        load_weights(net, [LoadSpec(path=str(f), format="llama_qwen2")])
    llm = _llama(net.lm_head.weight.shape[0])
    save_state_dict({f"llm.{k}": v for k, v in llm.state_dict().items()}, f)
    with pytest.raises(StateDictMismatchError, match="k_proj"):  # 2 KV heads: experiments/v11/world.yaml
        load_weights(_v11("model.v11.llm.num_key_value_heads=2"), [LoadSpec(path=str(f), format="llama_qwen2")])
