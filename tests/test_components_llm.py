"""LLM backbone family: tiny Llama/Qwen2 builds, embedding resize, checkpointing, meta-device 7B."""
import time

import pytest
import torch

from modules.config import LoadSpec
from modules.weights import load_into
from modules.components.llm import (
    LLMS,
    LLMConfig,
    build_llm,
    get_input_embeddings,
    is_gradient_checkpointing,
    llm_hidden_size,
    resize_embeddings_mean,
)
from modules.components.registry import UnknownComponentError


def test_registry_names_and_unknown_name():
    assert LLMS.names() == ["hf_causal", "llama", "qwen2"]
    with pytest.raises(UnknownComponentError, match="valid choices: hf_causal, llama, qwen2"):
        build_llm(LLMConfig(name="gpt2"), 100)
    with pytest.raises(ValueError, match="valid: tiny, vicuna-13b, vicuna-7b"):
        build_llm(LLMConfig(name="llama", preset="llama-3"), 100)


@pytest.mark.parametrize("name,cls", [("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM")])
def test_tiny_forward_with_inputs_embeds(name, cls):
    model = build_llm(LLMConfig(name=name, preset="tiny"), 300).eval()
    assert type(model).__name__ == cls
    d = llm_hidden_size(model)
    assert d == 128 and get_input_embeddings(model).weight.shape == (300, 128)
    embeds_BLD = torch.randn(2, 7, d)
    with torch.no_grad():
        out = model(inputs_embeds=embeds_BLD, attention_mask=torch.ones(2, 7, dtype=torch.long),
                    output_hidden_states=True)
    assert out.logits.shape == (2, 7, 300)
    assert len(out.hidden_states) == 5 and out.hidden_states[-1].shape == (2, 7, 128)


def test_size_fields_override_preset():
    model = build_llm(LLMConfig(name="llama", preset="tiny", hidden_size=64, num_layers=2, num_heads=2), 50)
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (64, 2, 2, 2)
    with pytest.raises(ValueError, match="missing"):
        build_llm(LLMConfig(name="llama", hidden_size=64), 50)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_resize_new_rows_are_mean_of_old(name):
    # vocab_size 296 in the config, tokenizer length 300 -> 4 new rows (the VARGPT tokens).
    model = LLMS.build(LLMConfig(name=name, preset="tiny", vocab_size=296))
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    assert resize_embeddings_mean(model, 300) == 300
    new_in = model.get_input_embeddings().weight
    new_out = model.get_output_embeddings().weight
    assert new_in.shape == (300, 128) and new_out.shape == (300, 128)
    assert model.config.vocab_size == 300
    assert torch.equal(new_in[:296], old_in)
    torch.testing.assert_close(new_in[296:], old_in.mean(0, keepdim=True).expand(4, -1))
    torch.testing.assert_close(new_out[296:], old_out.mean(0, keepdim=True).expand(4, -1))
    # Qwen2 tiny ties lm_head to the embeddings, Llama does not; both stay as they were.
    assert (new_out.data_ptr() == new_in.data_ptr()) == (name == "qwen2")


def test_resize_pad_to_multiple_and_never_shrink():
    model = build_llm(LLMConfig(name="llama", preset="tiny", vocab_size=296, pad_vocab_to_multiple_of=64), 300)
    assert get_input_embeddings(model).weight.shape[0] == 320
    model = build_llm(LLMConfig(name="qwen2", preset="tiny", vocab_size=400), 300)
    assert get_input_embeddings(model).weight.shape[0] == 400


def test_gradient_checkpointing_switch():
    off = build_llm(LLMConfig(name="llama", preset="tiny"), 100)
    on = build_llm(LLMConfig(name="llama", preset="tiny", gradient_checkpointing=True), 100)
    assert not is_gradient_checkpointing(off)
    assert is_gradient_checkpointing(on) and all(layer.gradient_checkpointing for layer in on.model.layers)
    on.train()
    embeds_BLD = torch.randn(1, 5, 128, requires_grad=True)
    on(inputs_embeds=embeds_BLD).logits.sum().backward()
    assert embeds_BLD.grad is not None and on.model.layers[0].mlp.down_proj.weight.grad is not None


def test_attn_implementation_and_dtype():
    model = build_llm(LLMConfig(name="qwen2", preset="tiny", attn_implementation="eager", dtype="bfloat16"), 100)
    assert model.config._attn_implementation == "eager"
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="sdpa or eager"):
        build_llm(LLMConfig(name="llama", preset="tiny", attn_implementation="flash"), 100)
    with pytest.raises(ValueError, match="llm.dtype"):
        build_llm(LLMConfig(name="llama", preset="tiny", dtype="fp8"), 100)


def test_hf_causal_from_local_dir(tmp_path):
    src = build_llm(LLMConfig(name="llama", preset="tiny", num_layers=2), 120).eval()
    src.save_pretrained(str(tmp_path / "llm"))
    loaded = build_llm(LLMConfig(name="hf_causal", path=str(tmp_path / "llm")), 124).eval()  # architecture only
    load_into(loaded, LoadSpec(path=str(tmp_path / "llm"), format="hf", into="llm"))  # 120 rows grown to 124
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert get_input_embeddings(loaded).weight.shape[0] == 124  # grown for 4 new tokens
    ids = torch.tensor([[1, 5, 9, 119]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits[..., :120], src(input_ids=ids).logits)
    # the 4 new rows are the mean of the checkpoint's rows (LLaVA's rule for added tokens)
    emb = get_input_embeddings(loaded).weight
    torch.testing.assert_close(emb[120:], emb[:120].mean(0, keepdim=True).expand(4, -1))
    with pytest.raises(FileNotFoundError, match="not a directory"):
        build_llm(LLMConfig(name="hf_causal", path=str(tmp_path / "missing")), 100)


def test_meta_vicuna_7b_parameter_count():
    """LLaVA-1.5-7B's LLM, config only: Vicuna-7B + 4 new tokens in embed_tokens and lm_head."""
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = build_llm(LLMConfig(name="llama", preset="vicuna-7b", dtype="bfloat16"), 32004)
    elapsed = time.perf_counter() - t0
    n = sum(p.numel() for p in model.parameters())
    # 6,738,415,616 at vocab 32000 (the published Vicuna/LLaMA-2-7B count) + 2 x 4 x 4096.
    assert n == 6_738_415_616 + 2 * 4 * 4096
    assert abs(n - 6.74e9) / 6.74e9 < 0.001
    assert next(model.parameters()).device.type == "meta"
    assert llm_hidden_size(model) == 4096
    assert model.get_output_embeddings().weight.shape == (32004, 4096)
    assert elapsed < 10.0


@pytest.mark.parametrize("preset,count", [("qwen2-0.5b", 494_032_768), ("qwen2-7b", 7_615_616_512)])
def test_meta_qwen2_parameter_count(preset, count):
    with torch.device("meta"):
        model = build_llm(LLMConfig(name="qwen2", preset=preset), 151_650)  # fits: no resize
    assert sum(p.numel() for p in model.parameters()) == count


def test_world_tiny_preset_size():
    model = build_llm(LLMConfig(name="llama", preset="tiny"), 1024)
    assert sum(p.numel() for p in model.parameters()) == 1_115_264
